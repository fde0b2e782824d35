//! How the client's connection ends: the reason it reports is the one the
//! peer gave, and bytes that are not frames get an ERROR before the close.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_client::Client;
use rsocket_proto::codec::{ReadBuf, put_prefixed};
use rsocket_proto::frame::{ErrorFrame, MAX_U24};
use rsocket_proto::{ErrorCode, Frame, FrameType, FrameView, OutFrame};

/// Frames a plain TCP peer reads until it has `n` or the client closes.
fn read_frames(s: &mut std::net::TcpStream, n: usize) -> Vec<FrameView> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rb = ReadBuf::new(MAX_U24);
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    while frames.len() < n {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => rb.feed(&chunk[..k], &mut frames).unwrap(),
        }
    }
    frames
        .into_iter()
        .map(|f| FrameView::parse(f).unwrap())
        .collect()
}

/// Runs `peer` on a plain TCP socket that the client connects to, and
/// returns the client's close reason.
fn close_reason_against(peer: impl FnOnce(std::net::TcpStream) + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        peer(s);
    });
    let reason = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(move || async move {
            let client = Client::connect(addr).await.unwrap();
            futures_lite::future::or(client.closed(), async {
                glommio::timer::sleep(Duration::from_secs(10)).await;
                panic!("the client did not see its connection close");
            })
            .await;
            client.close_reason().unwrap()
        })
        .unwrap()
        .join()
        .unwrap();
    server.join().unwrap();
    reason
}

#[test]
fn the_close_reason_is_the_error_the_peer_sent() {
    let reason = close_reason_against(|mut s| {
        let setup = read_frames(&mut s, 1);
        assert_eq!(setup[0].frame_type(), FrameType::Setup);
        let mut out = BytesMut::new();
        let error = Frame::Error(ErrorFrame {
            stream_id: 0,
            code: ErrorCode::REJECTED_SETUP,
            data: Bytes::from_static(b"this app may not connect here"),
        });
        put_prefixed(&mut out, &OutFrame::from_frame(&error)).unwrap();
        s.write_all(&out).unwrap();
        // The ERROR and the end of the stream arrive together.
        drop(s);
    });
    assert!(
        reason.contains("REJECTED_SETUP") && reason.contains("this app may not connect here"),
        "{reason}"
    );
}

#[test]
fn bytes_that_are_not_frames_get_a_connection_error_first() {
    let reason = close_reason_against(|mut s| {
        read_frames(&mut s, 1);
        // A length prefix shorter than any frame header.
        s.write_all(&[0, 0, 2, 0xde, 0xad]).unwrap();
        let answer = read_frames(&mut s, 1);
        assert_eq!(answer.len(), 1, "the client sent an ERROR before closing");
        assert_eq!(answer[0].frame_type(), FrameType::Error);
        assert_eq!(answer[0].error_code(), Some(ErrorCode::CONNECTION_ERROR));
    });
    assert!(reason.contains("unreadable frame"), "{reason}");
}
