//! Frames captured from rsocket-py 0.4.20 (a client and server written by
//! others): every frame decodes with the fields the capture describes,
//! re-encodes to the same bytes, and a replay through our connection state
//! machine produces the same bytes rsocket-py's server sent.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::drain_events;
use rsocket_proto::conn::{
    ClientSettings, Config, Connection, Event, Interaction, RequestKind, SetupPayload,
};
use rsocket_proto::frame::{Frame, FrameType, FrameView, Version};
use rsocket_proto::metadata::{
    Auth, CompositeMetadata, MimeType, RequestMetadata, Route, WellKnownMime,
};
use rsocket_proto::{ErrorCode, OutFrame};

const CAPTURE: &str = include_str!("data/rsocket-py-0.4.20.txt");

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dir {
    ToServer,
    ToClient,
}

fn capture() -> Vec<(Dir, Bytes)> {
    CAPTURE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (dir, hex) = l.split_once(' ').unwrap();
            let dir = match dir {
                "client->server" => Dir::ToServer,
                "server->client" => Dir::ToClient,
                other => panic!("unknown direction {other}"),
            };
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (dir, Bytes::from(bytes))
        })
        .collect()
}

fn route_of(frame: &FrameView) -> String {
    let md = RequestMetadata::scan(frame.metadata_slice().unwrap()).unwrap();
    md.route().unwrap().unwrap().to_string()
}

#[test]
fn every_frame_round_trips_byte_for_byte() {
    let frames = capture();
    assert_eq!(frames.len(), 24);
    for (i, (_, bytes)) in frames.iter().enumerate() {
        let frame = Frame::decode(bytes.clone()).unwrap_or_else(|e| panic!("frame {i}: {e}"));
        assert_eq!(&frame.to_bytes(), bytes, "frame {i} re-encodes differently");
        assert_eq!(
            &OutFrame::from_frame(&frame).to_bytes(),
            bytes,
            "frame {i} as OutFrame"
        );
        assert_eq!(frame.encoded_len(), bytes.len());
    }
}

#[test]
fn setup_fields() {
    let (dir, bytes) = capture().remove(0);
    assert_eq!(dir, Dir::ToServer);
    let Frame::Setup(setup) = Frame::decode(bytes).unwrap() else {
        panic!("not SETUP")
    };
    assert_eq!(setup.version, Version { major: 1, minor: 0 });
    assert_eq!(setup.keepalive_interval, 1000);
    assert_eq!(setup.max_lifetime, 600_000);
    assert_eq!(setup.resume_token, None);
    assert!(!setup.lease);
    assert_eq!(
        setup.metadata_mime_str(),
        Some("message/x.rsocket.composite-metadata.v0")
    );
    assert_eq!(setup.data_mime_str(), Some("application/json"));
    assert!(setup.data.is_empty());
    let metadata = setup.metadata.unwrap();
    let entries: Vec<_> = CompositeMetadata::new(&metadata)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(
        entries[0].mime,
        MimeType::Custom("message/x.rsocket.application+json")
    );
    assert!(entries[0].mime.is(WellKnownMime::APPLICATION));
    assert_eq!(
        entries[0].content,
        br#"{"name": "vec-app", "uuid": "0123456789abcdef0123456789abcdef", "ip": "127.0.0.1"}"#
    );
    assert!(entries[1].mime.is(WellKnownMime::SERVICE_REGISTRY));
    assert_eq!(
        entries[1].content,
        br#"{"published": [{"group": "", "service": "com.example.Echo", "version": ""}]}"#
    );
    assert_eq!(
        entries[2].mime,
        MimeType::WellKnown(WellKnownMime::AUTHENTICATION)
    );
    assert_eq!(
        Auth::parse(entries[2].content).unwrap(),
        Auth::Bearer { token: b"T0K3N" }
    );
}

#[test]
fn stream_frame_fields() {
    let frames: Vec<FrameView> = capture()
        .into_iter()
        .map(|(_, b)| FrameView::parse(b).unwrap())
        .collect();
    let f = &frames[1];
    assert_eq!(
        (f.frame_type(), f.stream_id(), f.follows()),
        (FrameType::RequestResponse, 1, false)
    );
    assert_eq!(route_of(f), "echo");
    assert_eq!(f.data_slice(), b"hi");

    let f = &frames[2];
    assert_eq!(
        (f.frame_type(), f.stream_id(), f.next(), f.complete()),
        (FrameType::Payload, 1, true, true)
    );
    assert_eq!(f.data_slice(), b"echo:hi");
    assert!(!f.has_metadata());

    // The fragmented request: routing + simple auth, 150 bytes of 'Z' over four frames.
    let f = &frames[3];
    assert_eq!(
        (f.frame_type(), f.stream_id(), f.follows()),
        (FrameType::RequestResponse, 3, true)
    );
    let md = RequestMetadata::scan(f.metadata_slice().unwrap()).unwrap();
    assert_eq!(Route::from_tags(md.routing.unwrap()).unwrap().key, b"echo");
    assert_eq!(
        Auth::parse(md.auth.unwrap()).unwrap(),
        Auth::Simple {
            username: b"user",
            password: b"pw"
        }
    );
    let mut data = f.data_slice().to_vec();
    for (i, f) in frames[4..7].iter().enumerate() {
        assert_eq!(
            (f.frame_type(), f.stream_id(), f.next()),
            (FrameType::Payload, 3, true)
        );
        assert_eq!(f.follows(), i < 2, "fragment {i}");
        assert!(!f.has_metadata());
        data.extend_from_slice(f.data_slice());
    }
    assert_eq!(data, vec![b'Z'; 150]);
    assert_eq!(
        frames[7].data_slice(),
        [&b"echo:"[..], &[b'Z'; 150]].concat()
    );

    let f = &frames[8];
    assert_eq!(
        (f.frame_type(), f.stream_id(), f.request_n()),
        (FrameType::RequestStream, 5, 1)
    );
    assert_eq!(route_of(f), "count");
    assert!(f.data_slice().is_empty());
    for (i, (at, item)) in [(9, "0"), (11, "1"), (13, "2")].into_iter().enumerate() {
        let f = &frames[at];
        assert_eq!(
            (f.frame_type(), f.stream_id(), f.next()),
            (FrameType::Payload, 5, true)
        );
        assert_eq!(f.complete(), i == 2);
        assert_eq!(f.data_slice(), item.as_bytes());
    }
    for at in [10, 12] {
        assert_eq!(
            (
                frames[at].frame_type(),
                frames[at].stream_id(),
                frames[at].request_n()
            ),
            (FrameType::RequestN, 5, 1)
        );
    }

    assert_eq!(route_of(&frames[14]), "fail");
    let Frame::Error(e) = Frame::from_view(&frames[15]).unwrap() else {
        panic!("not ERROR")
    };
    assert_eq!(
        (e.stream_id, e.code, e.message().as_ref()),
        (7, ErrorCode::APPLICATION_ERROR, "boom")
    );

    let f = &frames[16];
    assert_eq!((f.frame_type(), f.stream_id()), (FrameType::RequestFnf, 9));
    assert_eq!(route_of(f), "log");
    assert_eq!(f.data_slice(), b"note");

    let f = &frames[17];
    assert_eq!(
        (f.frame_type(), f.stream_id(), f.request_n()),
        (FrameType::RequestStream, 11, 0x7FFF_FFFF)
    );
    assert_eq!(frames[20].data_slice(), b"2");
    assert!(frames[20].complete());

    let f = &frames[21];
    assert_eq!(
        (f.frame_type(), f.stream_id()),
        (FrameType::MetadataPush, 0)
    );
    assert_eq!(route_of(f), "anything");

    let Frame::Keepalive(k) = Frame::from_view(&frames[22]).unwrap() else {
        panic!("not KEEPALIVE")
    };
    assert!(k.respond && k.last_received_position == 0 && k.data.is_empty());
    let Frame::Keepalive(k) = Frame::from_view(&frames[23]).unwrap() else {
        panic!("not KEEPALIVE")
    };
    assert!(!k.respond);
}

/// Plays rsocket-py's client against our server connection. Wherever the
/// capture has a frame from rsocket-py's server, our server produces it from
/// the same application calls, and it must be byte-identical.
fn replay_server(reassemble: bool) {
    let frames = capture();
    let now = Instant::now();
    let config = Config {
        reassemble,
        ..Config::default()
    };
    let mut server = Connection::server(config, now);
    let mut requests = Vec::new();
    for (i, (dir, bytes)) in frames.iter().enumerate() {
        match dir {
            Dir::ToServer => {
                server.handle_frame(now, bytes.clone());
                for event in drain_events(&mut server) {
                    match event {
                        Event::Setup(s) => assert_eq!(s.keepalive_interval, 1000),
                        Event::Request {
                            stream_id,
                            interaction,
                            frame,
                            ..
                        } => requests.push((
                            stream_id,
                            interaction,
                            frame.data_slice().len(),
                            frame.follows(),
                        )),
                        Event::Fragment { stream_id, .. } => {
                            requests.push((stream_id, Interaction::RequestResponse, 0, true))
                        }
                        Event::RequestN { .. } | Event::MetadataPush(_) => {}
                        other => panic!("frame {i}: unexpected {other:?}"),
                    }
                }
            }
            Dir::ToClient => {
                let expected = FrameView::parse(bytes.clone()).unwrap();
                let id = expected.stream_id();
                match expected.frame_type() {
                    FrameType::Payload => server
                        .send_payload(
                            id,
                            None,
                            expected.data(),
                            expected.next(),
                            expected.complete(),
                        )
                        .unwrap(),
                    FrameType::Error => server
                        .send_error(id, expected.error_code().unwrap(), expected.data())
                        .unwrap(),
                    FrameType::Keepalive => {} // echoed by the connection itself
                    other => panic!("unexpected {other}"),
                }
                let sent = server.poll_transmit().expect("a frame").to_bytes();
                assert_eq!(&sent, bytes, "frame {i}");
                assert!(server.poll_transmit().is_none());
            }
        }
    }
    assert_eq!(server.stream_count(), 0, "every stream ended");
    let fragmented: Vec<_> = requests.iter().filter(|r| r.0 == 3).collect();
    if reassemble {
        assert_eq!(fragmented, [&(3, Interaction::RequestResponse, 150, false)]);
    } else {
        assert_eq!(fragmented.len(), 4, "first frame and three fragments");
    }
    assert!(requests.contains(&(9, Interaction::FireAndForget, 4, false)));
}

#[test]
fn our_server_answers_like_rsocket_py() {
    replay_server(false);
    replay_server(true);
}

/// Our client, driven by the same application calls, writes the same bytes
/// as rsocket-py's client (the fragmented request aside: fragment sizes are
/// an implementation's choice).
#[test]
fn our_client_writes_like_rsocket_py() {
    let frames = capture();
    let now = Instant::now();
    let Frame::Setup(setup) = Frame::decode(frames[0].1.clone()).unwrap() else {
        panic!()
    };
    let config = Config {
        client: ClientSettings {
            keepalive_interval: Duration::from_millis(1000),
            max_lifetime: Duration::from_millis(600_000),
            metadata_mime: setup.metadata_mime.clone(),
            data_mime: setup.data_mime.clone(),
            ..ClientSettings::default()
        },
        ..Config::default()
    };
    let mut client = Connection::client(
        config,
        SetupPayload {
            metadata: setup.metadata,
            data: setup.data,
        },
        now,
    );
    let next = |c: &mut Connection| c.poll_transmit().unwrap().to_bytes();
    assert_eq!(next(&mut client), frames[0].1);

    let view = |i: usize| FrameView::parse(frames[i].1.clone()).unwrap();
    let id = client
        .send_request(
            RequestKind::RequestResponse,
            view(1).metadata(),
            view(1).data(),
        )
        .unwrap();
    assert_eq!((id, next(&mut client)), (1, frames[1].1.clone()));
    client.handle_frame(now, frames[2].1.clone());
    assert!(matches!(
        drain_events(&mut client)[..],
        [Event::Payload {
            stream_id: 1,
            ended: true,
            ..
        }]
    ));

    let id = client
        .send_request(
            RequestKind::RequestResponse,
            view(3).metadata(),
            Bytes::from(vec![b'Z'; 150]),
        )
        .unwrap();
    assert_eq!(id, 3);
    while client.poll_transmit().is_some() {}
    client.handle_frame(now, frames[7].1.clone());

    let id = client
        .send_request(
            RequestKind::Stream { initial_n: 1 },
            view(8).metadata(),
            view(8).data(),
        )
        .unwrap();
    assert_eq!((id, next(&mut client)), (5, frames[8].1.clone()));
    for (dir, frame) in &frames[9..=13] {
        if *dir == Dir::ToClient {
            client.handle_frame(now, frame.clone());
        } else {
            client.send_request_n(5, 1).unwrap();
            assert_eq!(&next(&mut client), frame);
        }
    }
    assert!(!client.is_stream_open(5));

    let id = client
        .send_request(
            RequestKind::RequestResponse,
            view(14).metadata(),
            view(14).data(),
        )
        .unwrap();
    assert_eq!((id, next(&mut client)), (7, frames[14].1.clone()));
    client.handle_frame(now, frames[15].1.clone());
    let events = drain_events(&mut client);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Error {
            stream_id: 7,
            code: ErrorCode::APPLICATION_ERROR,
            ..
        }
    )));

    let id = client
        .send_request(
            RequestKind::FireAndForget,
            view(16).metadata(),
            view(16).data(),
        )
        .unwrap();
    assert_eq!((id, next(&mut client)), (9, frames[16].1.clone()));
    assert!(!client.is_stream_open(9));

    let id = client
        .send_request(
            RequestKind::Stream {
                initial_n: 0x7FFF_FFFF,
            },
            view(17).metadata(),
            view(17).data(),
        )
        .unwrap();
    assert_eq!((id, next(&mut client)), (11, frames[17].1.clone()));
    for f in &frames[18..=20] {
        client.handle_frame(now, f.1.clone());
    }
    assert!(!client.is_stream_open(11));

    client
        .send_metadata_push(view(21).metadata().unwrap())
        .unwrap();
    assert_eq!(next(&mut client), frames[21].1);

    client.handle_timeout(now + Duration::from_millis(1000));
    assert_eq!(next(&mut client), frames[22].1);
    client.handle_frame(now, frames[23].1.clone());
    assert!(client.poll_transmit().is_none());
    assert!(client.is_established());
}
