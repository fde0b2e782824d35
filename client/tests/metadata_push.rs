//! METADATA_PUSH both ways against a hand-driven server: the client's SETUP
//! carries its app, a push from the server reaches `next_metadata_push`, and
//! a push from the client reaches the server on stream 0.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_client::{AppConfig, Client, ClientConfig};
use rsocket_proto::codec::put_prefixed;
use rsocket_proto::frame::MetadataPush;
use rsocket_proto::metadata::{CompositeMetadata, WellKnownMime};
use rsocket_proto::{Frame, OutFrame};

fn read_frame(s: &mut TcpStream) -> Frame {
    let mut len = [0u8; 3];
    s.read_exact(&mut len).expect("frame length");
    let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
    let mut frame = vec![0u8; len];
    s.read_exact(&mut frame).expect("frame");
    Frame::decode(Bytes::from(frame)).expect("a valid frame")
}

#[test]
fn metadata_push_both_ways() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let Frame::Setup(setup) = read_frame(&mut s) else {
            panic!("the first frame is not SETUP");
        };
        let metadata = setup.metadata.clone().unwrap_or_default();
        let app = CompositeMetadata::new(&metadata)
            .find(WellKnownMime::APPLICATION)
            .expect("valid composite metadata")
            .expect("app metadata in SETUP");
        let app: serde_json::Value = serde_json::from_slice(app).unwrap();
        assert_eq!(app["uuid"], "push-1");

        let mut out = BytesMut::new();
        let push = Frame::MetadataPush(MetadataPush {
            metadata: Bytes::from_static(b"to-client"),
        });
        put_prefixed(&mut out, &OutFrame::from_frame(&push)).unwrap();
        s.write_all(&out).unwrap();
        loop {
            match read_frame(&mut s) {
                Frame::MetadataPush(p) => return p.metadata,
                Frame::Keepalive(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    });

    let got = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(move || async move {
            let config = ClientConfig {
                app: Some(AppConfig {
                    name: "push".into(),
                    uuid: "push-1".into(),
                    power_rating: 1,
                }),
                ..ClientConfig::default()
            };
            let client = Client::builder(config).connect(addr).await.unwrap();
            let got = futures_lite::future::or(client.next_metadata_push(), async {
                glommio::timer::sleep(Duration::from_secs(10)).await;
                None
            })
            .await;
            client
                .metadata_push(Bytes::from_static(b"to-server"))
                .unwrap();
            // Let the driver flush before the executor ends.
            glommio::timer::sleep(Duration::from_millis(100)).await;
            got
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"to-client"[..]));
    assert_eq!(server.join().unwrap(), Bytes::from_static(b"to-server"));
}
