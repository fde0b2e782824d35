//! Property tests: encode -> decode is the identity for every frame type,
//! arbitrary bytes never panic anywhere a peer's bytes reach, any chunking
//! of a byte stream decodes the same as one chunk, and fragmentation
//! followed by reassembly gives back the message.

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rsocket_proto::codec::{ReadBuf, put_prefixed};
use rsocket_proto::conn::{Config, Connection, RequestKind, SetupPayload};
use rsocket_proto::fragment::{Fragmenter, MessageKind, Reassembly};
use rsocket_proto::frame::*;
use rsocket_proto::metadata::{
    AcceptMimeTypes, Auth, BinaryRouting, CompositeMetadata, RequestMetadata, Route, RoutingTags,
    parse_mime,
};
use rsocket_proto::{ErrorCode, OutFrame};

fn blob(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn opt_blob(max: usize) -> impl Strategy<Value = Option<Bytes>> {
    prop::option::of(blob(max))
}

fn u31() -> impl Strategy<Value = u32> {
    0..=MAX_STREAM_ID
}

fn stream_id() -> impl Strategy<Value = u32> {
    1..=MAX_STREAM_ID
}

fn position() -> impl Strategy<Value = u64> {
    0..=MAX_POSITION
}

fn version() -> impl Strategy<Value = Version> {
    (any::<u16>(), any::<u16>()).prop_map(|(major, minor)| Version { major, minor })
}

prop_compose! {
    fn setup()(version in version(), keepalive_interval in u31(), max_lifetime in u31(),
               resume_token in opt_blob(300), lease in any::<bool>(),
               metadata_mime in blob(256), data_mime in blob(256),
               metadata in opt_blob(200), data in blob(200)) -> Frame {
        Setup { version, keepalive_interval, max_lifetime, resume_token, lease,
                metadata_mime, data_mime, metadata, data }.into()
    }
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        setup(),
        (u31(), u31(), opt_blob(100)).prop_map(|(ttl, number_of_requests, metadata)| Lease {
            ttl,
            number_of_requests,
            metadata
        }
        .into()),
        (any::<bool>(), position(), blob(100)).prop_map(
            |(respond, last_received_position, data)| Keepalive {
                respond,
                last_received_position,
                data
            }
            .into()
        ),
        (stream_id(), any::<bool>(), opt_blob(100), blob(100)).prop_map(
            |(stream_id, follows, metadata, data)| RequestResponse {
                stream_id,
                follows,
                metadata,
                data
            }
            .into()
        ),
        (stream_id(), any::<bool>(), opt_blob(100), blob(100)).prop_map(
            |(stream_id, follows, metadata, data)| RequestFnf {
                stream_id,
                follows,
                metadata,
                data
            }
            .into()
        ),
        (stream_id(), any::<bool>(), u31(), opt_blob(100), blob(100)).prop_map(
            |(stream_id, follows, initial_n, metadata, data)| RequestStream {
                stream_id,
                follows,
                initial_n,
                metadata,
                data
            }
            .into()
        ),
        (
            stream_id(),
            any::<bool>(),
            any::<bool>(),
            u31(),
            opt_blob(100),
            blob(100)
        )
            .prop_map(
                |(stream_id, follows, complete, initial_n, metadata, data)| RequestChannel {
                    stream_id,
                    follows,
                    complete,
                    initial_n,
                    metadata,
                    data
                }
                .into()
            ),
        (stream_id(), u31()).prop_map(|(stream_id, n)| RequestN { stream_id, n }.into()),
        stream_id().prop_map(|stream_id| Cancel { stream_id }.into()),
        (
            stream_id(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            opt_blob(100),
            blob(100)
        )
            .prop_map(
                |(stream_id, follows, complete, next, metadata, data)| Payload {
                    stream_id,
                    follows,
                    complete,
                    next,
                    metadata,
                    data
                }
                .into()
            ),
        (u31(), any::<u32>(), blob(100)).prop_map(|(stream_id, code, data)| ErrorFrame {
            stream_id,
            code: ErrorCode(code),
            data
        }
        .into()),
        blob(100).prop_map(|metadata| MetadataPush { metadata }.into()),
        (version(), blob(300), position(), position()).prop_map(|(version, token, last, first)| {
            Resume {
                version,
                token,
                last_received_server_position: last,
                first_available_client_position: first,
            }
            .into()
        }),
        position().prop_map(|p| ResumeOk {
            last_received_client_position: p
        }
        .into()),
        (u31(), any::<bool>(), u31(), opt_blob(100), blob(100)).prop_map(
            |(stream_id, ignore, extended_type, metadata, data)| Ext {
                stream_id,
                ignore,
                extended_type,
                metadata,
                data
            }
            .into()
        ),
    ]
}

/// Reads everything a peer's bytes can reach in the frame and metadata parsers.
fn exercise_parsers(bytes: Bytes) {
    let _ = Header::parse(&bytes);
    let Ok(view) = FrameView::parse(bytes) else {
        return;
    };
    let _ = (
        view.follows(),
        view.complete(),
        view.next(),
        view.request_n(),
        view.error_code(),
        view.payload_len(),
    );
    let _ = (
        view.fixed_fields(),
        view.data(),
        view.after_stream_id(),
        format!("{view:?}"),
    );
    let _ = Frame::from_view(&view);
    for md in [view.metadata_slice().unwrap_or_default(), view.data_slice()] {
        CompositeMetadata::new(md).for_each(drop);
        RoutingTags::new(md).for_each(drop);
        AcceptMimeTypes::new(md).for_each(drop);
        let _ = (
            Route::from_tags(md),
            Route::parse_key(md),
            Auth::parse(md),
            BinaryRouting::parse(md),
            parse_mime(md),
        );
        if let Ok(found) = RequestMetadata::scan(md) {
            let _ = found.route();
        }
    }
}

fn established_server(config: Config) -> (Connection, Instant) {
    let now = Instant::now();
    let mut server = Connection::server(config, now);
    let setup = Setup {
        version: VERSION,
        keepalive_interval: 1000,
        max_lifetime: 10_000,
        resume_token: None,
        lease: false,
        metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
        data_mime: Bytes::from_static(b"application/json"),
        metadata: None,
        data: Bytes::new(),
    };
    server.handle_frame(now, Frame::from(setup).to_bytes());
    (server, now)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_decode_is_identity(frame in frame()) {
        let bytes = frame.to_bytes();
        prop_assert_eq!(bytes.len(), frame.encoded_len());
        prop_assert_eq!(&Frame::decode(bytes.clone()).unwrap(), &frame);
        prop_assert_eq!(OutFrame::from_frame(&frame).to_bytes(), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parsers(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        exercise_parsers(Bytes::from(bytes));
    }

    #[test]
    fn mutated_frames_never_panic_the_parsers(frame in frame(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>()) {
        let mut bytes = frame.to_bytes().to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let cut = cut.index(bytes.len() + 1);
        exercise_parsers(Bytes::from(bytes[..cut].to_vec()));
        exercise_parsers(Bytes::from(bytes));
    }

    #[test]
    fn arbitrary_frames_never_panic_a_connection(
        frames in prop::collection::vec(
            (prop_oneof![frame().prop_map(|f| f.to_bytes().to_vec()), prop::collection::vec(any::<u8>(), 0..64)],
             prop::sample::select(vec![None, Some(0u8), Some(1), Some(2), Some(3), Some(5)])),
            0..40),
        reassemble in any::<bool>(),
        as_client in any::<bool>(),
    ) {
        let config = Config { reassemble, max_reassembled_size: 4096, max_inbound_streams: 8, ..Config::default() };
        let (mut conn, now) = if as_client {
            let now = Instant::now();
            (Connection::client(config, SetupPayload::default(), now), now)
        } else {
            established_server(config)
        };
        let mut closed_events = 0;
        for (i, (mut f, id)) in frames.into_iter().enumerate() {
            // Most frames land on a handful of stream ids so that stream states are exercised.
            if let (Some(id), true) = (id, f.len() >= 4) {
                f[..4].copy_from_slice(&u32::from(id).to_be_bytes());
            }
            conn.handle_frame(now + Duration::from_millis(i as u64), Bytes::from(f));
            while let Some(event) = conn.poll_event() {
                match event {
                    rsocket_proto::Event::Request { stream_id, ended: true, .. }
                    | rsocket_proto::Event::Payload { stream_id, ended: true, .. }
                    | rsocket_proto::Event::Fragment { stream_id, ended: true, .. }
                    | rsocket_proto::Event::Cancel { stream_id, ended: true }
                    | rsocket_proto::Event::Error { stream_id, .. }
                    | rsocket_proto::Event::StreamError { stream_id, .. } => {
                        prop_assert!(!conn.is_stream_open(stream_id));
                    }
                    rsocket_proto::Event::Request { stream_id, ended: false, .. } => {
                        prop_assert!(conn.is_stream_open(stream_id));
                    }
                    rsocket_proto::Event::Closed(_) => closed_events += 1,
                    _ => {}
                }
            }
            prop_assert!(conn.stream_count() <= 8 + 64, "bounded by the inbound limit plus local streams");
            while let Some(out) = conn.poll_transmit() {
                // Everything the connection sends must itself be a valid frame.
                prop_assert!(FrameView::parse(out.to_bytes()).is_ok());
            }
        }
        prop_assert!(closed_events <= 1);
        prop_assert_eq!(closed_events == 1, conn.is_closed());
    }

    #[test]
    fn any_chunking_decodes_the_same(frames in prop::collection::vec(frame(), 1..8), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20)) {
        let mut wire = BytesMut::new();
        for f in &frames {
            put_prefixed(&mut wire, &OutFrame::from_frame(f)).unwrap();
        }
        let wire = wire.freeze();
        let decode_all = |chunks: Vec<&[u8]>| {
            let mut buf = ReadBuf::new(rsocket_proto::frame::MAX_U24);
            let mut out = Vec::new();
            for c in chunks {
                buf.feed(c, &mut out).unwrap();
            }
            assert!(buf.is_empty());
            out
        };
        let whole = decode_all(vec![&wire[..]]);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain([wire.len()]) {
            chunks.push(&wire[last..p]);
            last = p;
        }
        let chunked = decode_all(chunks);
        prop_assert_eq!(&whole, &chunked);
        let decoded: Vec<Frame> = whole.into_iter().map(|b| Frame::decode(b).unwrap()).collect();
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn arbitrary_byte_streams_never_panic_the_codec(stream in prop::collection::vec(any::<u8>(), 0..2000), max in 6usize..5000) {
        let mut buf = ReadBuf::new(max);
        let mut frames = Vec::new();
        let _ = buf.feed(&stream, &mut frames);
        for frame in frames {
            prop_assert!(frame.len() <= max);
            exercise_parsers(frame);
        }
    }

    #[test]
    fn fragmentation_then_reassembly_is_identity(
        metadata in opt_blob(600), data in blob(1500), mtu in 64usize..400,
        kind in prop_oneof![Just(0u8), Just(1), Just(2), Just(3), Just(4)], complete in any::<bool>(),
    ) {
        let kind = match kind {
            0 => MessageKind::RequestResponse,
            1 => MessageKind::RequestFnf,
            2 => MessageKind::RequestStream { initial_n: 9 },
            3 => MessageKind::RequestChannel { initial_n: 9 },
            _ => MessageKind::Payload { next: true },
        };
        let complete = complete && matches!(kind, MessageKind::RequestChannel { .. } | MessageKind::Payload { .. });
        let frames: Vec<FrameView> = Fragmenter::new(5, kind, complete, metadata.clone(), data.clone(), mtu)
            .map(|f| FrameView::parse(f.to_bytes()).unwrap())
            .collect();
        for f in &frames {
            prop_assert!(f.len() <= mtu);
        }
        let whole = if frames.len() == 1 {
            prop_assert!(!frames[0].follows());
            frames[0].clone()
        } else {
            let mut r = Reassembly::start(&frames[0], usize::MAX).unwrap();
            let mut whole = None;
            for (i, f) in frames[1..].iter().enumerate() {
                prop_assert_eq!(f.follows(), i + 2 < frames.len());
                whole = r.push(f).unwrap();
            }
            whole.unwrap()
        };
        prop_assert_eq!(whole.metadata(), metadata);
        prop_assert_eq!(whole.data(), data);
        prop_assert_eq!(whole.complete(), complete);
        prop_assert!(!whole.follows());
    }
}

/// Random operations on a client/server pair: every call the model says is
/// valid succeeds, every other call is refused, no call makes the peer
/// complain, and once every stream has been ended both maps are empty.
#[derive(Clone, Debug)]
enum Op {
    Request(bool, u8, bool),
    Payload(bool, usize, bool, bool),
    RequestN(bool, usize, u32),
    Cancel(bool, usize),
    Error(bool, usize),
    Drive,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<bool>(), 0u8..4, any::<bool>()).prop_map(|(side, k, c)| Op::Request(side, k, c)),
        (any::<bool>(), any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(side, s, n, c)| Op::Payload(side, s, n, c)),
        (any::<bool>(), any::<usize>(), 0u32..5).prop_map(|(side, s, n)| Op::RequestN(side, s, n)),
        (any::<bool>(), any::<usize>()).prop_map(|(side, s)| Op::Cancel(side, s)),
        (any::<bool>(), any::<usize>()).prop_map(|(side, s)| Op::Error(side, s)),
        Just(Op::Drive),
    ]
}

fn pick(conn: &Connection, s: usize) -> Option<u32> {
    let mut ids: Vec<u32> = conn.open_streams().collect();
    ids.sort_unstable();
    (!ids.is_empty()).then(|| ids[s % ids.len()])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_interactions_follow_the_model(ops in prop::collection::vec(op(), 0..60), fragment in any::<bool>(), reassemble in any::<bool>()) {
        use rsocket_proto::conn::Interaction;
        let config = Config { fragment_size: if fragment { 64 } else { 0 }, reassemble, ..Config::default() };
        let mut pair = common::Pair::new(config.clone(), config);
        let body = Bytes::from(vec![7u8; 150]);
        for op in ops {
            match op {
                Op::Request(side, kind, complete) => {
                    let kind = match kind {
                        0 => RequestKind::RequestResponse,
                        1 => RequestKind::FireAndForget,
                        2 => RequestKind::Stream { initial_n: 2 },
                        _ => RequestKind::Channel { initial_n: 2, complete },
                    };
                    let conn = if side { &mut pair.client } else { &mut pair.server };
                    conn.send_request(kind, Some(body.clone()), body.clone()).unwrap();
                }
                Op::Payload(side, s, next, complete) => {
                    let conn = if side { &mut pair.client } else { &mut pair.server };
                    let Some(id) = pick(conn, s) else { continue };
                    let info = conn.stream_info(id).unwrap();
                    // A response to REQUEST_RESPONSE always completes.
                    let complete_eff = complete || (info.interaction == Interaction::RequestResponse && !info.local_requester);
                    let valid = info.outbound_open && (next || complete_eff) && (!next || info.send_credit.get() > 0);
                    let data = if next { body.clone() } else { Bytes::new() };
                    let result = conn.send_payload(id, None, data, next, complete);
                    prop_assert_eq!(result.is_ok(), valid, "{:?} {:?}", info, result);
                }
                Op::RequestN(side, s, n) => {
                    let conn = if side { &mut pair.client } else { &mut pair.server };
                    let Some(id) = pick(conn, s) else { continue };
                    let info = conn.stream_info(id).unwrap();
                    let receives = match info.interaction {
                        Interaction::Stream => info.local_requester,
                        Interaction::Channel => true,
                        _ => false,
                    };
                    let valid = n > 0 && receives && info.inbound_open;
                    let result = conn.send_request_n(id, n);
                    prop_assert_eq!(result.is_ok(), valid, "{:?} {:?}", info, result);
                }
                Op::Cancel(side, s) => {
                    let conn = if side { &mut pair.client } else { &mut pair.server };
                    let Some(id) = pick(conn, s) else { continue };
                    let info = conn.stream_info(id).unwrap();
                    let valid = info.local_requester || info.interaction == Interaction::Channel;
                    prop_assert_eq!(conn.send_cancel(id).is_ok(), valid, "{:?}", info);
                }
                Op::Error(side, s) => {
                    let conn = if side { &mut pair.client } else { &mut pair.server };
                    let Some(id) = pick(conn, s) else { continue };
                    conn.send_error(id, ErrorCode::APPLICATION_ERROR, Bytes::new()).unwrap();
                }
                Op::Drive => pair.drive(),
            }
        }
        pair.drive();
        // Neither side broke a rule, so no stream ended in a protocol error.
        for e in pair.client_events.iter().chain(&pair.server_events) {
            prop_assert!(!matches!(e, rsocket_proto::Event::StreamError { .. } | rsocket_proto::Event::Closed(_)), "{:?}", e);
        }
        // End everything that is left, from the requester side.
        for requester_is_client in [true, false] {
            let conn = if requester_is_client { &mut pair.client } else { &mut pair.server };
            let ids: Vec<u32> = conn.open_streams().filter(|id| conn.stream_info(*id).unwrap().local_requester).collect();
            for id in ids {
                conn.send_cancel(id).unwrap();
            }
        }
        pair.drive();
        prop_assert_eq!(pair.client.stream_count(), 0);
        prop_assert_eq!(pair.server.stream_count(), 0);
    }
}
