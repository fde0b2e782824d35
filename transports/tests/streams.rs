//! Bulk data through every transport at once: thousands of frames queued
//! faster than the peer reads them arrive whole and in order (TLS must
//! wait for its plaintext to be read before taking more records).

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_transports::listen::{BindOptions, Conn, ConnectOptions, connect};
use rsbroker_transports::rustls::ServerConfig;
use rsbroker_transports::tls::ServerTls;
use rsbroker_transports::{FrameIo, Handshake, ListenAddr, Listener, Scheme};
use rsocket_proto::OutFrame;
use rsocket_proto::frame::{Frame, Payload};

const FRAMES: u32 = 3000;
const SIZE: usize = 16 * 1024;

fn frame(i: u32) -> OutFrame {
    let mut data = vec![(i % 251) as u8; SIZE];
    data[..4].copy_from_slice(&i.to_be_bytes());
    OutFrame::from_frame(&Frame::from(Payload {
        stream_id: 1,
        follows: false,
        complete: false,
        next: true,
        metadata: None,
        data: Bytes::from(data),
    }))
}

fn certificate(dir: &std::path::Path) -> ServerTls {
    std::fs::create_dir_all(dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    ServerTls {
        certificate: c,
        key: k,
        ..ServerTls::default()
    }
}

/// A listener on a loopback port for `scheme`, its address, and the
/// handshake its connections get.
fn listen(scheme: Scheme, tls: &Arc<ServerConfig>) -> (Listener, ListenAddr, Handshake) {
    let bind = BindOptions {
        tls: Some(tls.clone()),
        ..BindOptions::default()
    };
    let listener =
        Listener::bind_with(&ListenAddr::new(scheme, ([127, 0, 0, 1], 0).into()), &bind).unwrap();
    let url = listener.local().clone();
    let hs = Handshake {
        max_frame: 1 << 20,
        tls: Some(tls.clone()),
        timeout: Duration::from_secs(5),
    };
    (listener, url, hs)
}

/// A client that takes any certificate (the test's own).
fn client_options() -> ConnectOptions {
    ConnectOptions {
        max_frame: 1 << 20,
        tls: Some(rsbroker_transports::tls::client_config_insecure()),
        alpn: Vec::new(),
    }
}

#[test]
fn bulk_frames_arrive_whole_and_in_order_on_every_transport() {
    let dir = std::env::temp_dir().join(format!("rsbroker-transports-{}", std::process::id()));
    let tls = certificate(&dir).build().unwrap();
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(move || async move {
            for scheme in [
                Scheme::Tcp,
                Scheme::Tls,
                Scheme::Ws,
                Scheme::Wss,
                Scheme::Quic,
            ] {
                let (listener, url, hs) = listen(scheme, &tls);
                let server = glommio::spawn_local(async move {
                    let mut io = listener
                        .accept()
                        .await
                        .unwrap()
                        .establish(&hs)
                        .await
                        .unwrap();
                    // Reads slowly at first, so the sender gets ahead.
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    let mut frames = Vec::new();
                    let mut next = 0u32;
                    while next < FRAMES {
                        let got = poll_fn(|cx| io.poll_read(cx, &mut frames)).await;
                        assert!(got.expect("read"), "the stream ended after {next} frames");
                        for f in frames.drain(..) {
                            assert_eq!(f.len(), 6 + SIZE);
                            assert_eq!(f[6..10], next.to_be_bytes(), "frame {next} in order");
                            next += 1;
                        }
                    }
                    assert!(io.wire_bytes().read >= u64::from(FRAMES) * SIZE as u64);
                });
                let mut io = connect(&url, &client_options()).await.unwrap();
                for i in 0..FRAMES {
                    io.queue(&frame(i)).unwrap();
                    if io.queued_bytes() > 256 * 1024 {
                        poll_fn(|cx| io.poll_flush(cx)).await.unwrap();
                    }
                }
                poll_fn(|cx| io.poll_flush(cx)).await.unwrap();
                server.await;
                if let Conn::Quic(q) = &io {
                    // Loopback drops nothing: every loss is a datagram the
                    // sender built and the kernel refused (a GSO batch
                    // larger than a UDP datagram may be).
                    let p = q.packets().expect("connection open");
                    eprintln!("{scheme}: {} packets sent, {} lost", p.sent, p.lost);
                    assert!(
                        p.lost * 100 <= p.sent,
                        "{} of {} packets lost on loopback",
                        p.lost,
                        p.sent
                    );
                }
                eprintln!("{scheme}: {FRAMES} frames of {SIZE} bytes arrived in order");
            }
        })
        .unwrap()
        .join()
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn quic_hands_payload_buffers_to_quinn_uncopied() {
    let dir = std::env::temp_dir().join(format!("rsbroker-quic-copies-{}", std::process::id()));
    let tls = certificate(&dir).build().unwrap();
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(move || async move {
            let (listener, url, hs) = listen(Scheme::Quic, &tls);
            let server = glommio::spawn_local(async move {
                let mut io = listener
                    .accept()
                    .await
                    .unwrap()
                    .establish(&hs)
                    .await
                    .unwrap();
                let mut frames = Vec::new();
                while frames.is_empty() {
                    let got = poll_fn(|cx| io.poll_read(cx, &mut frames)).await;
                    assert!(got.expect("read"), "the stream ended before the frame");
                }
                assert_eq!(frames.len(), 1);
                assert_eq!(frames[0].len(), 6 + SIZE);
                assert!(frames[0][6..].iter().all(|&b| b == 7));
                // Keep the connection until the sender has its acks.
                glommio::timer::sleep(Duration::from_millis(500)).await;
            });
            let mut io = connect(&url, &client_options()).await.unwrap();
            let payload = Bytes::from(vec![7u8; SIZE]);
            let frame = OutFrame::from_frame(&Frame::from(Payload {
                stream_id: 1,
                follows: false,
                complete: true,
                next: true,
                metadata: None,
                data: payload.clone(),
            }));
            io.queue(&frame).unwrap();
            drop(frame);
            poll_fn(|cx| io.poll_flush(cx)).await.unwrap();
            // Nothing has been acknowledged yet (the executor has not run
            // the endpoint since): quinn's send buffer holds the payload's
            // own buffer, not a copy of it.
            assert!(
                !payload.is_unique(),
                "the payload was copied on its way to quinn"
            );
            // Once acknowledged, quinn lets go of it.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !payload.is_unique() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "quinn still holds the payload after 5 s"
                );
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            server.await;
        })
        .unwrap()
        .join()
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
