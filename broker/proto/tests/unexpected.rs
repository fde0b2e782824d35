//! Connection behaviour: establishment, keepalive, lease, stream ids,
//! credit, and one test per rule of the spec's "Handling the Unexpected"
//! section (named `rule_*`), plus the Ignore flag.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Pair, bytes, drain_events, drain_frames};
use rsocket_proto::conn::{
    ClientSettings, Config, Connection, Event, Interaction, RequestKind, ServerSettings,
    SetupPayload,
};
use rsocket_proto::frame::*;
use rsocket_proto::metadata::build::route;
use rsocket_proto::{ErrorCode, Initiator, SendError};

fn setup_frame() -> Setup {
    Setup {
        version: VERSION,
        keepalive_interval: 1_000,
        max_lifetime: 5_000,
        resume_token: None,
        lease: false,
        metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
        data_mime: Bytes::from_static(b"application/json"),
        metadata: None,
        data: Bytes::new(),
    }
}

fn server_with(config: Config, setup: Setup) -> (Connection, Instant) {
    let now = Instant::now();
    let mut server = Connection::server(config, now);
    server.handle_frame(now, bytes(setup));
    (server, now)
}

fn server() -> (Connection, Instant) {
    let (mut s, now) = server_with(Config::default(), setup_frame());
    assert!(matches!(drain_events(&mut s)[..], [Event::Setup(_)]));
    (s, now)
}

fn rr(stream_id: u32) -> Bytes {
    bytes(RequestResponse {
        stream_id,
        follows: false,
        metadata: Some(route(&["svc"]).unwrap()),
        data: Bytes::from_static(b"x"),
    })
}

/// The first fragment of a REQUEST_RESPONSE (F set, no metadata).
fn rr_first_fragment(stream_id: u32, data: Bytes) -> Bytes {
    bytes(RequestResponse {
        stream_id,
        follows: true,
        metadata: None,
        data,
    })
}

fn stream_req(stream_id: u32, initial_n: u32) -> Bytes {
    bytes(RequestStream {
        stream_id,
        follows: false,
        initial_n,
        metadata: None,
        data: Bytes::new(),
    })
}

fn payload(
    stream_id: u32,
    next: bool,
    complete: bool,
    follows: bool,
    data: &'static [u8],
) -> Bytes {
    bytes(Payload {
        stream_id,
        follows,
        complete,
        next,
        metadata: None,
        data: Bytes::from_static(data),
    })
}

/// Asserts the connection sent exactly one ERROR on stream 0 with `code` and closed.
fn assert_failed(conn: &mut Connection, code: ErrorCode) {
    let frames = drain_frames(conn);
    assert!(
        matches!(&frames[..], [Frame::Error(e)] if e.stream_id == 0 && e.code == code),
        "expected ERROR[{code}] on stream 0, got {frames:?}"
    );
    assert!(conn.is_closed());
    let events = drain_events(conn);
    assert!(
        matches!(events.last(), Some(Event::Closed(e)) if e.code == code && e.initiator == Initiator::Local),
        "{events:?}"
    );
}

/// Asserts a new server refuses `first` (the first frame it reads) with
/// ERROR[`code`] on stream 0 and closes.
fn assert_first_frame_refused(first: Bytes, code: ErrorCode) {
    let now = Instant::now();
    let mut s = Connection::server(Config::default(), now);
    s.handle_frame(now, first);
    assert_failed(&mut s, code);
}

/// Asserts nothing was sent, no event raised, and the frame counted as ignored.
fn assert_ignored(conn: &mut Connection, ignored_before: u64) {
    assert!(drain_frames(conn).is_empty());
    assert!(drain_events(conn).is_empty());
    assert_eq!(conn.stats().frames_ignored, ignored_before + 1);
    assert!(!conn.is_closed());
}

/// Hands `conn` each frame in turn and asserts it ignored every one (see
/// [`assert_ignored`]).
fn assert_frames_ignored(
    conn: &mut Connection,
    now: Instant,
    frames: impl IntoIterator<Item = Bytes>,
) {
    for frame in frames {
        let before = conn.stats().frames_ignored;
        conn.handle_frame(now, frame);
        assert_ignored(conn, before);
    }
}

/// Asserts the connection sent exactly one frame, an ERROR on `stream_id`
/// with `code`; returns it.
fn assert_stream_error(conn: &mut Connection, stream_id: u32, code: ErrorCode) -> ErrorFrame {
    let frames = drain_frames(conn);
    match &frames[..] {
        [Frame::Error(e)] if e.stream_id == stream_id && e.code == code => e.clone(),
        _ => panic!("expected ERROR[{code}] on stream {stream_id}, got {frames:?}"),
    }
}

/// An ERROR frame.
fn error_frame(stream_id: u32, code: ErrorCode, data: &'static [u8]) -> Bytes {
    bytes(ErrorFrame {
        stream_id,
        code,
        data: Bytes::from_static(data),
    })
}

/// `frame` with `bits` set in its flags (the byte after the frame type).
fn with_flag_bits(frame: Bytes, bits: u8) -> Bytes {
    let mut wire = frame.to_vec();
    wire[5] |= bits;
    Bytes::from(wire)
}

/// `frame` moved to stream `stream_id` (its first four bytes), whether or
/// not its type may be sent there.
fn on_stream(frame: Bytes, stream_id: u32) -> Bytes {
    let mut wire = frame.to_vec();
    wire[..4].copy_from_slice(&stream_id.to_be_bytes());
    Bytes::from(wire)
}

/// A server whose peer has opened stream 1 with a REQUEST_STREAM (n = 1),
/// its events taken.
fn server_with_stream() -> (Connection, Instant) {
    let (mut s, now) = server();
    s.handle_frame(now, stream_req(1, 1));
    drain_events(&mut s);
    (s, now)
}

/// A pair whose client has sent a request of `kind` (no metadata, no data)
/// and the server has received it; with the request's stream id.
fn requested(kind: RequestKind) -> (Pair, u32) {
    let mut pair = Pair::new(Config::default(), Config::default());
    let id = pair.client.send_request(kind, None, Bytes::new()).unwrap();
    pair.drive();
    (pair, id)
}

// ------------------------------------------------------- establishment

#[test]
fn first_frame_must_be_setup_or_resume() {
    assert_first_frame_refused(rr(1), ErrorCode::INVALID_SETUP);
}

#[test]
fn setup_on_nonzero_stream_is_invalid() {
    assert_first_frame_refused(on_stream(bytes(setup_frame()), 1), ErrorCode::INVALID_SETUP);
}

#[test]
fn malformed_setup_is_invalid() {
    let cut_short = bytes(setup_frame()).slice(..20);
    assert_first_frame_refused(cut_short, ErrorCode::INVALID_SETUP);
}

#[test]
fn unsupported_version_is_refused() {
    let setup = Setup {
        version: Version { major: 2, minor: 0 },
        ..setup_frame()
    };
    assert_first_frame_refused(bytes(setup), ErrorCode::UNSUPPORTED_SETUP);
}

/// Only 1.0 is spoken: a minor version above or below it is refused too
/// (the major alone is not enough).
#[test]
fn unsupported_minor_version_is_refused() {
    for version in [
        Version { major: 1, minor: 1 },
        Version { major: 1, minor: 2 },
        Version { major: 0, minor: 2 },
    ] {
        let setup = Setup {
            version,
            ..setup_frame()
        };
        assert_first_frame_refused(bytes(setup), ErrorCode::UNSUPPORTED_SETUP);
    }
}

#[test]
fn zero_keepalive_is_invalid() {
    let setup = Setup {
        keepalive_interval: 0,
        ..setup_frame()
    };
    assert_first_frame_refused(bytes(setup), ErrorCode::INVALID_SETUP);
}

#[test]
fn resume_flag_without_resume_support_is_rejected() {
    let setup = Setup {
        resume_token: Some(Bytes::from_static(b"t")),
        ..setup_frame()
    };
    assert_first_frame_refused(bytes(setup), ErrorCode::REJECTED_SETUP);
}

#[test]
fn resume_without_resume_support_is_rejected() {
    let resume = Resume {
        version: VERSION,
        token: Bytes::from_static(b"t"),
        last_received_server_position: 0,
        first_available_client_position: 0,
    };
    assert_first_frame_refused(bytes(resume), ErrorCode::REJECTED_RESUME);
}

#[test]
fn no_setup_within_timeout_closes() {
    let now = Instant::now();
    let config = Config {
        server: ServerSettings {
            setup_timeout: Duration::from_secs(2),
            ..ServerSettings::default()
        },
        ..Config::default()
    };
    let mut s = Connection::server(config, now);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(2)));
    s.handle_timeout(now + Duration::from_secs(1));
    assert!(!s.is_closed());
    s.handle_timeout(now + Duration::from_secs(2));
    assert_failed(&mut s, ErrorCode::INVALID_SETUP);
}

#[test]
fn application_can_reject_setup() {
    let (mut s, now) = server();
    s.handle_frame(now, rr(1));
    s.reject_setup(ErrorCode::REJECTED_SETUP, "bad token");
    let frames = drain_frames(&mut s);
    // The request's event was discarded with the rejected setup; only the ERROR goes out.
    assert!(
        matches!(&frames[..], [Frame::Error(e)] if e.code == ErrorCode::REJECTED_SETUP && e.message() == "bad token")
    );
    assert!(matches!(drain_events(&mut s)[..], [Event::Closed(_)]));
}

// ------------------------------------------------------------ keepalive

#[test]
fn keepalive_is_echoed_with_r_cleared_and_data_kept() {
    let (mut s, now) = server();
    s.handle_frame(
        now,
        bytes(Keepalive {
            respond: true,
            last_received_position: 0,
            data: Bytes::from_static(b"abc"),
        }),
    );
    let frames = drain_frames(&mut s);
    assert_eq!(
        frames,
        [Frame::Keepalive(Keepalive {
            respond: false,
            last_received_position: 0,
            data: Bytes::from_static(b"abc")
        })]
    );
    s.handle_frame(
        now,
        bytes(Keepalive {
            respond: false,
            last_received_position: 0,
            data: Bytes::new(),
        }),
    );
    assert!(drain_frames(&mut s).is_empty(), "no echo without R");
}

#[test]
fn silent_peer_times_out_after_max_lifetime() {
    let (mut s, now) = server();
    // The client's SETUP said max lifetime 5 s.
    s.handle_timeout(now + Duration::from_millis(4_000));
    s.handle_frame(
        now + Duration::from_millis(4_000),
        bytes(Keepalive {
            respond: false,
            last_received_position: 0,
            data: Bytes::new(),
        }),
    );
    s.handle_timeout(now + Duration::from_millis(8_999));
    assert!(!s.is_closed(), "any frame from the peer proves it alive");
    s.handle_timeout(now + Duration::from_millis(9_000));
    assert_failed(&mut s, ErrorCode::CONNECTION_ERROR);
}

/// Time the transport spends not reading the peer is not the peer's
/// silence: a peer held back by backpressure keeps its connection.
#[test]
fn time_not_reading_the_peer_does_not_count_as_its_silence() {
    let (mut s, now) = server();
    // 2 s of silence, then 60 s not read, then 2.9 s more: 4.9 s < 5 s.
    let paused = now + Duration::from_secs(2);
    s.handle_timeout(paused);
    s.set_reading(paused, false);
    assert!(!s.is_reading());
    let resumed = paused + Duration::from_secs(60);
    for t in 1..=60 {
        s.handle_timeout(paused + Duration::from_secs(t));
    }
    assert!(!s.is_closed(), "closed while it was not read");
    s.set_reading(resumed, true);
    s.handle_timeout(resumed + Duration::from_millis(2_900));
    assert!(!s.is_closed());
    drain_frames(&mut s);
    // ... and the silence before the pause still counts.
    s.handle_timeout(resumed + Duration::from_millis(3_000));
    assert_failed(&mut s, ErrorCode::CONNECTION_ERROR);
}

/// While a peer is not read, the server tells it every keepalive interval
/// (1 s in this SETUP) that it is alive: the peer's KEEPALIVEs wait unread
/// and cannot be echoed.
#[test]
fn a_peer_that_is_not_read_hears_a_keepalive_every_interval() {
    let (mut s, now) = server();
    s.set_reading(now, false);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(1)));
    let mut sent = 0;
    for ms in (100..=3_050).step_by(50) {
        s.handle_timeout(now + Duration::from_millis(ms));
        for f in drain_frames(&mut s) {
            assert!(
                matches!(&f, Frame::Keepalive(k) if !k.respond),
                "a KEEPALIVE without R: {f:?}"
            );
            sent += 1;
        }
    }
    assert_eq!(sent, 3, "one per second");
    s.set_reading(now + Duration::from_millis(3_100), true);
    s.handle_timeout(now + Duration::from_millis(4_500));
    assert!(
        drain_frames(&mut s).is_empty(),
        "none once it is read again"
    );
}

/// After `shut_down` the connection keeps reading until the linger ends:
/// a request already on its way gets ERROR[REJECTED] (not processed), not
/// silence; then it closes.
#[test]
fn shut_down_sends_connection_close_answers_late_requests_then_closes() {
    let (mut s, now) = server();
    s.shut_down(now, "the broker is shutting down", Duration::from_secs(2));
    assert_stream_error(&mut s, 0, ErrorCode::CONNECTION_CLOSE);
    assert!(!s.is_closed());
    s.handle_frame(now + Duration::from_secs(1), rr(1));
    assert_stream_error(&mut s, 1, ErrorCode::REJECTED);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(2)));
    s.handle_timeout(now + Duration::from_millis(1_999));
    assert!(!s.is_closed());
    s.handle_timeout(now + Duration::from_secs(2));
    assert!(s.is_closed());
    assert!(
        drain_events(&mut s)
            .iter()
            .any(|e| matches!(e, Event::Closed(c) if c.code == ErrorCode::CONNECTION_CLOSE))
    );
    assert!(drain_frames(&mut s).is_empty(), "the ERROR went out once");
}

#[test]
fn shut_down_before_setup_closes_at_once() {
    let now = Instant::now();
    let mut s = Connection::server(Config::default(), now);
    s.shut_down(now, "bye", Duration::from_secs(5));
    assert!(s.is_closed());
}

#[test]
fn client_sends_keepalive_every_interval() {
    let config = Config {
        client: ClientSettings {
            keepalive_interval: Duration::from_millis(100),
            max_lifetime: Duration::from_secs(10),
            ..ClientSettings::default()
        },
        ..Config::default()
    };
    let mut pair = Pair::new(config, Config::default());
    for i in 1..=3 {
        pair.now += Duration::from_millis(100);
        pair.client.handle_timeout(pair.now);
        let frames = drain_frames(&mut pair.client);
        assert!(
            matches!(&frames[..], [Frame::Keepalive(k)] if k.respond),
            "tick {i}: {frames:?}"
        );
    }
}

// ---------------------------------------------------------------- lease

#[test]
fn requester_honours_lease() {
    let mut pair = Pair::new(
        Config {
            client: ClientSettings {
                lease: true,
                ..ClientSettings::default()
            },
            ..Config::default()
        },
        Config::default(),
    );
    assert!(pair.server.lease_enabled());
    assert_eq!(
        pair.client
            .send_request(RequestKind::FireAndForget, None, Bytes::new()),
        Err(SendError::NoLease)
    );
    pair.server
        .send_lease(pair.now, Duration::from_secs(10), 1, None)
        .unwrap();
    pair.drive();
    assert!(
        pair.take_client_events()
            .iter()
            .any(|e| matches!(e, Event::Lease(l) if l.number_of_requests == 1))
    );
    pair.client
        .send_request(RequestKind::FireAndForget, None, Bytes::new())
        .unwrap();
    assert_eq!(
        pair.client
            .send_request(RequestKind::FireAndForget, None, Bytes::new()),
        Err(SendError::NoLease)
    );
    // A new lease that then expires.
    pair.server
        .send_lease(pair.now, Duration::from_secs(1), 5, None)
        .unwrap();
    pair.drive();
    pair.advance(Duration::from_secs(2));
    assert_eq!(
        pair.client
            .send_request(RequestKind::FireAndForget, None, Bytes::new()),
        Err(SendError::NoLease)
    );
}

#[test]
fn responder_rejects_requests_beyond_its_lease() {
    let (mut s, now) = server_with(
        Config::default(),
        Setup {
            lease: true,
            ..setup_frame()
        },
    );
    drain_events(&mut s);
    s.handle_frame(now, rr(1));
    assert_stream_error(&mut s, 1, ErrorCode::REJECTED);
    s.send_lease(now, Duration::from_secs(5), 1, None).unwrap();
    drain_frames(&mut s);
    s.handle_frame(now, rr(3));
    assert!(matches!(
        drain_events(&mut s)[..],
        [Event::Request { stream_id: 3, .. }]
    ));
    s.handle_frame(now, rr(5));
    assert_stream_error(&mut s, 5, ErrorCode::REJECTED);
}

// ----------------------------------------------------------- stream ids

#[test]
fn client_uses_odd_ids_and_server_even_ids() {
    let mut pair = Pair::new(Config::default(), Config::default());
    let c: Vec<u32> = (0..3)
        .map(|_| {
            pair.client
                .send_request(RequestKind::RequestResponse, None, Bytes::new())
                .unwrap()
        })
        .collect();
    let s: Vec<u32> = (0..3)
        .map(|_| {
            pair.server
                .send_request(RequestKind::RequestResponse, None, Bytes::new())
                .unwrap()
        })
        .collect();
    assert_eq!(c, [1, 3, 5]);
    assert_eq!(s, [2, 4, 6]);
    pair.drive();
    assert_eq!(
        pair.take_server_events()
            .iter()
            .filter(|e| matches!(e, Event::Request { .. }))
            .count(),
        3
    );
    assert_eq!(
        pair.take_client_events()
            .iter()
            .filter(|e| matches!(e, Event::Request { .. }))
            .count(),
        3
    );
}

#[test]
fn request_with_the_wrong_parity_ends_the_connection() {
    let (mut s, now) = server();
    s.handle_frame(now, rr(2));
    assert_failed(&mut s, ErrorCode::CONNECTION_ERROR);
}

#[test]
fn request_on_stream_zero_ends_the_connection() {
    let (mut s, now) = server();
    s.handle_frame(now, rr(0));
    assert_failed(&mut s, ErrorCode::CONNECTION_ERROR);
}

#[test]
fn too_many_streams_are_rejected() {
    let (mut s, now) = server_with(
        Config {
            max_inbound_streams: 1,
            ..Config::default()
        },
        setup_frame(),
    );
    drain_events(&mut s);
    s.handle_frame(now, rr(1));
    s.handle_frame(now, rr(3));
    assert_stream_error(&mut s, 3, ErrorCode::REJECTED);
    s.send_payload(1, None, Bytes::new(), true, true).unwrap();
    s.handle_frame(now, rr(5));
    assert!(
        drain_events(&mut s)
            .iter()
            .any(|e| matches!(e, Event::Request { stream_id: 5, .. }))
    );
}

// --------------------------------------------------------------- credit

#[test]
fn request_n_credit_adds_up_and_bounds_the_responder() {
    let (mut s, now) = server();
    s.handle_frame(now, stream_req(1, 2));
    drain_events(&mut s);
    for _ in 0..2 {
        s.send_payload(1, None, Bytes::new(), true, false).unwrap();
    }
    assert_eq!(
        s.send_payload(1, None, Bytes::new(), true, false),
        Err(SendError::NoCredit(1))
    );
    s.handle_frame(now, bytes(RequestN { stream_id: 1, n: 3 }));
    s.handle_frame(now, bytes(RequestN { stream_id: 1, n: 2 }));
    assert_eq!(s.stream_info(1).unwrap().send_credit.get(), 5);
    for _ in 0..5 {
        s.send_payload(1, None, Bytes::new(), true, false).unwrap();
    }
    assert_eq!(
        s.send_payload(1, None, Bytes::new(), true, false),
        Err(SendError::NoCredit(1))
    );
    // Completion needs no credit.
    s.send_payload(1, None, Bytes::new(), false, true).unwrap();
    assert!(!s.is_stream_open(1));
}

#[test]
fn credit_saturates_at_max_and_is_then_unbounded() {
    let (mut s, now) = server();
    s.handle_frame(now, stream_req(1, 5));
    s.handle_frame(
        now,
        bytes(RequestN {
            stream_id: 1,
            n: MAX_REQUEST_N,
        }),
    );
    let credit = s.stream_info(1).unwrap().send_credit;
    assert_eq!(credit.get(), MAX_REQUEST_N);
    for _ in 0..100 {
        s.send_payload(1, None, Bytes::new(), true, false).unwrap();
    }
    assert!(s.stream_info(1).unwrap().send_credit.is_unbounded());
}

#[test]
fn request_n_of_zero_is_invalid() {
    let (mut s, now) = server_with_stream();
    s.handle_frame(now, bytes(RequestN { stream_id: 1, n: 0 }));
    assert_stream_error(&mut s, 1, ErrorCode::INVALID);
    assert!(matches!(
        drain_events(&mut s)[..],
        [Event::StreamError { stream_id: 1, .. }]
    ));
    assert!(!s.is_stream_open(1));
    let mut pair = Pair::new(Config::default(), Config::default());
    let id = pair
        .client
        .send_request(RequestKind::Stream { initial_n: 1 }, None, Bytes::new())
        .unwrap();
    assert!(matches!(
        pair.client.send_request_n(id, 0),
        Err(SendError::InvalidArgument(_))
    ));
}

#[test]
fn initial_request_n_of_zero_is_invalid() {
    let (mut s, now) = server();
    s.handle_frame(now, stream_req(1, 0));
    assert_stream_error(&mut s, 1, ErrorCode::INVALID);
    assert!(drain_events(&mut s).is_empty());
}

#[test]
fn payload_beyond_granted_credit_ends_the_stream() {
    let (mut pair, id) = requested(RequestKind::Stream { initial_n: 1 });
    // A misbehaving responder: two items against one credit.
    pair.client
        .handle_frame(pair.now, payload(id, true, false, false, b"1"));
    pair.client
        .handle_frame(pair.now, payload(id, true, false, false, b"2"));
    let frames = drain_frames(&mut pair.client);
    assert_eq!(
        frames,
        [Frame::Cancel(Cancel { stream_id: id })],
        "the requester cancels"
    );
    let events = drain_events(&mut pair.client);
    assert!(
        matches!(&events[..], [Event::Payload { .. }, Event::StreamError { stream_id, .. }] if *stream_id == id)
    );
}

#[test]
fn channel_requester_waits_for_request_n() {
    let mut pair = Pair::new(Config::default(), Config::default());
    let id = pair
        .client
        .send_request(
            RequestKind::Channel {
                initial_n: 1,
                complete: false,
            },
            None,
            Bytes::from_static(b"first"),
        )
        .unwrap();
    pair.drive();
    assert_eq!(
        pair.client
            .send_payload(id, None, Bytes::new(), true, false),
        Err(SendError::NoCredit(id))
    );
    pair.server.send_request_n(id, 2).unwrap();
    pair.drive();
    pair.client
        .send_payload(id, None, Bytes::from_static(b"a"), true, false)
        .unwrap();
    pair.client
        .send_payload(id, None, Bytes::from_static(b"b"), true, true)
        .unwrap();
    pair.server
        .send_payload(id, None, Bytes::from_static(b"r"), true, true)
        .unwrap();
    pair.drive();
    assert_eq!(pair.client.stream_count(), 0);
    assert_eq!(pair.server.stream_count(), 0);
    let items: Vec<_> = pair
        .take_server_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Request { frame, .. } | Event::Payload { frame, .. } => Some(frame.data()),
            _ => None,
        })
        .collect();
    assert_eq!(
        items,
        [
            Bytes::from_static(b"first"),
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b")
        ]
    );
}

#[test]
fn cancel_ends_the_stream_at_the_responder() {
    let (mut pair, id) = requested(RequestKind::Stream { initial_n: 10 });
    pair.client.send_cancel(id).unwrap();
    pair.drive();
    assert!(
        pair.take_server_events()
            .iter()
            .any(|e| matches!(e, Event::Cancel { stream_id, ended: true } if *stream_id == id))
    );
    assert_eq!(
        pair.server
            .send_payload(id, None, Bytes::new(), true, false),
        Err(SendError::UnknownStream(id))
    );
}

#[test]
fn cancel_aborts_a_partial_message() {
    for reassemble in [false, true] {
        let (mut s, now) = server_with(
            Config {
                reassemble,
                ..Config::default()
            },
            setup_frame(),
        );
        drain_events(&mut s);
        s.handle_frame(
            now,
            bytes(RequestChannel {
                stream_id: 1,
                follows: true,
                complete: false,
                initial_n: 1,
                metadata: None,
                data: Bytes::from_static(b"part"),
            }),
        );
        s.handle_frame(now, payload(1, true, false, true, b"more"));
        s.handle_frame(now, bytes(Cancel { stream_id: 1 }));
        assert!(!s.is_stream_open(1), "reassemble={reassemble}");
        assert!(drain_events(&mut s).iter().any(|e| matches!(
            e,
            Event::Cancel {
                stream_id: 1,
                ended: true
            }
        )));
        // The rest of the aborted message is now a PAYLOAD on an unknown stream.
        s.handle_frame(now, payload(1, true, false, false, b"end"));
        assert!(drain_events(&mut s).is_empty());
    }
}

#[test]
fn fragmented_message_over_the_cap_ends_the_stream() {
    let (mut s, now) = server_with(
        Config {
            max_reassembled_size: 10,
            reassemble: true,
            ..Config::default()
        },
        setup_frame(),
    );
    drain_events(&mut s);
    s.handle_frame(now, rr_first_fragment(1, Bytes::from_static(b"123456")));
    s.handle_frame(now, payload(1, true, false, true, b"789012"));
    assert_stream_error(&mut s, 1, ErrorCode::REJECTED);
    assert!(!s.is_stream_open(1));
}

#[test]
fn pass_through_delivers_fragments_and_reassembly_delivers_messages() {
    let data = Bytes::from(vec![9u8; 500]);
    for reassemble in [false, true] {
        let config = Config {
            fragment_size: 64,
            reassemble,
            ..Config::default()
        };
        let mut pair = Pair::new(config.clone(), config);
        pair.take_server_events();
        let id = pair
            .client
            .send_request(
                RequestKind::RequestResponse,
                Some(route(&["svc"]).unwrap()),
                data.clone(),
            )
            .unwrap();
        pair.drive();
        let events = pair.take_server_events();
        let fragments = events
            .iter()
            .filter(|e| matches!(e, Event::Fragment { .. }))
            .count();
        if reassemble {
            assert_eq!(fragments, 0);
            assert!(
                matches!(&events[..], [Event::Request { frame, .. }] if frame.data() == data && !frame.follows()),
                "{events:?}"
            );
        } else {
            assert!(fragments >= 7, "{fragments}");
            assert!(
                matches!(events.last(), Some(Event::Fragment { frame, .. }) if !frame.follows())
            );
        }
        pair.server
            .send_payload(id, None, data.clone(), true, true)
            .unwrap();
        pair.drive();
        assert_eq!(pair.server.stream_count() + pair.client.stream_count(), 0);
    }
}

// ------------------------------------------------- handling the unexpected

/// "If a PAYLOAD for a REQUEST_RESPONSE is received that does not have a
/// COMPLETE flag set, the implementation MUST assume it is set and act accordingly."
#[test]
fn rule_response_without_complete_is_complete() {
    let (mut pair, id) = requested(RequestKind::RequestResponse);
    pair.client
        .handle_frame(pair.now, payload(id, true, false, false, b"r"));
    assert!(matches!(
        drain_events(&mut pair.client)[..],
        [Event::Payload { ended: true, .. }]
    ));
    assert!(!pair.client.is_stream_open(id));
}

/// "Reassembly of PAYLOADs and REQUEST_CHANNELs MUST assume the possibility
/// of an infinite stream." The cap bounds one message, never the stream.
#[test]
fn rule_reassembly_assumes_an_infinite_stream() {
    let config = Config {
        fragment_size: 64,
        reassemble: true,
        max_reassembled_size: 1000,
        ..Config::default()
    };
    let mut pair = Pair::new(config.clone(), config);
    let id = pair
        .client
        .send_request(
            RequestKind::Channel {
                initial_n: 1,
                complete: false,
            },
            None,
            Bytes::from(vec![1; 900]),
        )
        .unwrap();
    pair.drive();
    pair.server.send_request_n(id, MAX_REQUEST_N).unwrap();
    pair.drive();
    for _ in 0..200 {
        pair.client
            .send_payload(id, None, Bytes::from(vec![2; 900]), true, false)
            .unwrap();
    }
    pair.drive();
    let items = pair
        .take_server_events()
        .iter()
        .filter(|e| matches!(e, Event::Payload { frame, .. } if frame.data().len() == 900))
        .count();
    assert_eq!(
        items, 200,
        "180 kB through a channel whose messages are capped at 1000 bytes"
    );
}

/// "A PAYLOAD with both F and C flags set, implicitly ignores the F flag."
#[test]
fn rule_follows_with_complete_ignores_follows() {
    let (mut pair, id) = requested(RequestKind::Stream { initial_n: 5 });
    pair.client
        .handle_frame(pair.now, payload(id, true, true, true, b"last"));
    let events = drain_events(&mut pair.client);
    assert!(
        matches!(&events[..], [Event::Payload { frame, ended: true, .. }] if !frame.follows()),
        "{events:?}"
    );
}

/// "Flag bits not specified for a particular frame MUST be ignored."
#[test]
fn rule_unspecified_flag_bits_are_ignored() {
    let (mut s, now) = server_with_stream();
    // F, C, N on a REQUEST_N.
    let request_n = bytes(RequestN { stream_id: 1, n: 4 });
    s.handle_frame(now, with_flag_bits(request_n, 0xE0));
    assert!(matches!(
        drain_events(&mut s)[..],
        [Event::RequestN { stream_id: 1, n: 4 }]
    ));
    s.handle_frame(now, with_flag_bits(bytes(Cancel { stream_id: 1 }), 0xFF));
    assert!(matches!(
        drain_events(&mut s)[..],
        [Event::Cancel {
            stream_id: 1,
            ended: true
        }]
    ));
}

/// "Receiving a Request frame on a Stream ID that is already in use MUST be ignored."
#[test]
fn rule_request_on_stream_in_use_is_ignored() {
    let (mut s, now) = server_with_stream();
    assert_frames_ignored(&mut s, now, [rr(1)]);
    assert_eq!(s.stream_info(1).unwrap().interaction, Interaction::Stream);
}

/// "Receiving a CANCEL on an unknown Stream ID (including 0) MUST be ignored."
#[test]
fn rule_cancel_on_unknown_stream_is_ignored() {
    let (mut s, now) = server();
    let cancels = [0, 7].map(|stream_id| bytes(Cancel { stream_id }));
    assert_frames_ignored(&mut s, now, cancels);
}

/// "Receiving an ERROR on an unknown Stream ID MUST be ignored."
#[test]
fn rule_error_on_unknown_stream_is_ignored() {
    let (mut s, now) = server();
    let error = error_frame(9, ErrorCode::APPLICATION_ERROR, b"");
    assert_frames_ignored(&mut s, now, [error]);
}

/// "Receiving a PAYLOAD on an unknown Stream ID (including 0) MUST be ignored."
#[test]
fn rule_payload_on_unknown_stream_is_ignored() {
    let (mut s, now) = server();
    let payloads = [0, 11].map(|id| payload(id, true, true, false, b"x"));
    assert_frames_ignored(&mut s, now, payloads);
}

/// "Receiving a METADATA_PUSH with a non-0 Stream ID MUST be ignored."
#[test]
fn rule_metadata_push_on_nonzero_stream_is_ignored() {
    let (mut s, now) = server();
    let push = bytes(MetadataPush {
        metadata: Bytes::from_static(b"m"),
    });
    assert_frames_ignored(&mut s, now, [on_stream(push.clone(), 1)]);
    s.handle_frame(now, push);
    assert!(matches!(&drain_events(&mut s)[..], [Event::MetadataPush(m)] if m == "m"));
}

/// "A server MUST ignore a SETUP frame after it has accepted a previous SETUP."
#[test]
fn rule_server_ignores_second_setup() {
    let (mut s, now) = server();
    let second = bytes(Setup {
        version: Version { major: 9, minor: 9 },
        ..setup_frame()
    });
    assert_frames_ignored(&mut s, now, [second]);
}

/// "A server MUST ignore an ERROR[INVALID_SETUP|UNSUPPORTED_SETUP|REJECTED_SETUP|REJECTED_RESUME] frame."
#[test]
fn rule_server_ignores_setup_errors() {
    let (mut s, now) = server();
    let codes = [
        ErrorCode::INVALID_SETUP,
        ErrorCode::UNSUPPORTED_SETUP,
        ErrorCode::REJECTED_SETUP,
        ErrorCode::REJECTED_RESUME,
    ];
    assert_frames_ignored(&mut s, now, codes.map(|code| error_frame(0, code, b"")));
}

/// "A client MUST ignore an ERROR[INVALID_SETUP|UNSUPPORTED_SETUP|REJECTED_SETUP|REJECTED_RESUME]
/// frame after it has completed connection establishment." Before that, it ends the connection.
#[test]
fn rule_client_ignores_setup_errors_after_establishment() {
    let mut pair = Pair::new(Config::default(), Config::default());
    pair.client
        .handle_frame(pair.now, error_frame(0, ErrorCode::REJECTED_SETUP, b"no"));
    assert!(
        pair.client.is_closed(),
        "no sign of acceptance yet: the setup was rejected"
    );

    // A response is the sign of acceptance.
    let (mut pair, id) = requested(RequestKind::RequestResponse);
    pair.server
        .send_payload(id, None, Bytes::new(), true, true)
        .unwrap();
    pair.drive();
    let invalid_setup = error_frame(0, ErrorCode::INVALID_SETUP, b"");
    assert_frames_ignored(&mut pair.client, pair.now, [invalid_setup]);
}

/// "A client MUST ignore a SETUP frame."
#[test]
fn rule_client_ignores_setup() {
    let mut pair = Pair::new(Config::default(), Config::default());
    assert_frames_ignored(&mut pair.client, pair.now, [bytes(setup_frame())]);
}

// ---------------------------------------------------------- ignore flag

#[test]
fn ext_with_ignore_is_ignored_and_without_is_a_connection_error() {
    let (mut s, now) = server();
    let ext = |ignore| {
        bytes(Ext {
            stream_id: 1,
            ignore,
            extended_type: 5,
            metadata: None,
            data: Bytes::new(),
        })
    };
    assert_frames_ignored(&mut s, now, [ext(true)]);
    s.handle_frame(now, ext(false));
    assert_failed(&mut s, ErrorCode::CONNECTION_ERROR);
}

#[test]
fn unknown_frame_type_honours_the_ignore_flag() {
    let (mut s, now) = server();
    // Type 0x10, I set.
    assert_frames_ignored(&mut s, now, [Bytes::from_static(&[0, 0, 0, 1, 0x42, 0x00])]);
    s.handle_frame(now, Bytes::from_static(&[0, 0, 0, 1, 0x40, 0x00])); // type 0x10, I clear
    assert_failed(&mut s, ErrorCode::CONNECTION_ERROR);
}

// ------------------------------------------------------- malformed input

#[test]
fn malformed_request_gets_an_error_on_its_stream() {
    let (mut s, now) = server();
    s.handle_frame(
        now,
        Bytes::from_static(&[0, 0, 0, 1, 0x11, 0x00, 0, 0, 9, 1]),
    ); // metadata length 9, 1 byte left
    let e = assert_stream_error(&mut s, 1, ErrorCode::INVALID);
    assert!(e.message().contains("metadata length"), "{e:?}");
    assert!(!s.is_closed());
}

#[test]
fn malformed_frames_end_only_their_stream() {
    let (mut s, now) = server();
    s.handle_frame(now, stream_req(1, 1));
    s.handle_frame(now, stream_req(3, 1));
    drain_events(&mut s);
    // PAYLOAD with M on stream 3 whose metadata length points past the frame.
    s.handle_frame(
        now,
        Bytes::from_static(&[0, 0, 0, 3, 0x29, 0x00, 0xFF, 0xFF, 0xFF]),
    );
    assert_stream_error(&mut s, 3, ErrorCode::INVALID);
    assert!(matches!(
        drain_events(&mut s)[..],
        [Event::StreamError { stream_id: 3, .. }]
    ));
    assert!(!s.is_stream_open(3));
    assert!(s.is_stream_open(1), "other streams are untouched");
    // A REQUEST_N too short for its n.
    s.handle_frame(now, Bytes::from_static(&[0, 0, 0, 1, 0x20, 0x00, 0, 0]));
    assert_stream_error(&mut s, 1, ErrorCode::INVALID);
    assert!(!s.is_closed());
}

#[test]
fn resume_after_setup_is_a_connection_error() {
    let (mut s, now) = server();
    s.handle_frame(
        now,
        bytes(Resume {
            version: VERSION,
            token: Bytes::new(),
            last_received_server_position: 0,
            first_available_client_position: 0,
        }),
    );
    assert_failed(&mut s, ErrorCode::CONNECTION_ERROR);
}

// ---------------------------------------------------------- closing

#[test]
fn connection_close_waits_for_streams_then_closes() {
    let (mut s, now) = server_with_stream();
    s.handle_frame(now, error_frame(0, ErrorCode::CONNECTION_CLOSE, b"bye"));
    assert!(matches!(drain_events(&mut s)[..], [Event::Closing(_)]));
    assert!(!s.is_closed());
    s.handle_frame(now, stream_req(3, 1));
    assert_stream_error(&mut s, 3, ErrorCode::REJECTED);
    s.send_payload(1, None, Bytes::new(), true, true).unwrap();
    assert!(s.is_closed());
    assert!(
        matches!(drain_events(&mut s).last(), Some(Event::Closed(e)) if e.initiator == Initiator::Remote)
    );
}

#[test]
fn connection_error_from_peer_closes() {
    let (mut s, now) = server();
    s.handle_frame(now, error_frame(0, ErrorCode::CONNECTION_ERROR, b"boom"));
    assert!(s.is_closed());
    assert!(drain_frames(&mut s).is_empty(), "no ERROR answers an ERROR");
    assert!(matches!(&drain_events(&mut s)[..], [Event::Closed(e)] if e.message == "boom"));
}

#[test]
fn drain_rejects_new_streams_only() {
    let (mut s, now) = server_with_stream();
    s.drain();
    s.handle_frame(now, rr(3));
    assert_stream_error(&mut s, 3, ErrorCode::REJECTED);
    s.send_payload(1, None, Bytes::new(), true, true).unwrap();
    assert!(!s.is_closed());
}

#[test]
fn setup_payload_reaches_the_server() {
    let setup = SetupPayload {
        metadata: Some(Bytes::from_static(b"app")),
        data: Bytes::from_static(b"d"),
    };
    let mut pair = Pair::with_setup(Config::default(), Config::default(), setup);
    let events = pair.take_server_events();
    assert!(
        matches!(&events[..], [Event::Setup(s)] if s.metadata.as_deref() == Some(&b"app"[..]) && s.data == "d")
    );
}

#[test]
fn pass_through_neither_caps_nor_buffers_large_messages() {
    let (mut s, now) = server_with(
        Config {
            max_reassembled_size: 10,
            ..Config::default()
        },
        setup_frame(),
    );
    drain_events(&mut s);
    s.handle_frame(now, rr_first_fragment(1, Bytes::from(vec![1; 100])));
    for _ in 0..10 {
        s.handle_frame(now, payload(1, true, false, true, &[2; 100]));
    }
    s.handle_frame(now, payload(1, true, false, false, b"end"));
    let events = drain_events(&mut s);
    assert_eq!(events.len(), 12, "every fragment is handed on: {events:?}");
    assert!(drain_frames(&mut s).is_empty());
    assert!(
        s.is_stream_open(1),
        "the request is complete, the response is due"
    );
}

#[test]
fn pass_through_refuses_metadata_after_data() {
    let (mut s, now) = server();
    s.handle_frame(now, rr_first_fragment(1, Bytes::from_static(b"d")));
    s.handle_frame(
        now,
        bytes(Payload {
            stream_id: 1,
            follows: false,
            complete: false,
            next: true,
            metadata: Some(Bytes::from_static(b"late")),
            data: Bytes::new(),
        }),
    );
    let frames = drain_frames(&mut s);
    assert!(
        matches!(&frames[..], [Frame::Error(e)] if e.code == ErrorCode::INVALID && e.message().contains("metadata after data")),
        "{frames:?}"
    );
    assert!(!s.is_stream_open(1));
}

#[test]
fn reassembly_memory_is_bounded_across_streams() {
    let config = Config {
        reassemble: true,
        max_reassembly_memory: 1000,
        ..Config::default()
    };
    let (mut s, now) = server_with(config, setup_frame());
    drain_events(&mut s);
    // Requests that never finish: each holds 400 bytes.
    for id in [1, 3] {
        s.handle_frame(now, rr_first_fragment(id, Bytes::from(vec![0; 400])));
    }
    assert!(drain_frames(&mut s).is_empty());
    s.handle_frame(now, rr_first_fragment(5, Bytes::from(vec![0; 400])));
    assert_stream_error(&mut s, 5, ErrorCode::REJECTED);
    // Cancelling one frees its share.
    s.handle_frame(now, bytes(Cancel { stream_id: 1 }));
    s.handle_frame(now, rr_first_fragment(7, Bytes::from(vec![0; 400])));
    assert!(drain_frames(&mut s).is_empty());
    assert!(s.is_stream_open(7));
}

#[test]
fn request_response_answers_are_always_complete() {
    let (mut s, now) = server();
    s.handle_frame(now, rr(1));
    drain_events(&mut s);
    s.send_payload(1, None, Bytes::from_static(b"r"), true, false)
        .unwrap();
    let frames = drain_frames(&mut s);
    assert!(
        matches!(&frames[..], [Frame::Payload(p)] if p.next && p.complete),
        "{frames:?}"
    );
    assert!(!s.is_stream_open(1));
}

#[test]
fn payload_without_next_carries_no_data() {
    let (mut s, now) = server();
    s.handle_frame(now, stream_req(1, 1));
    assert!(matches!(
        s.send_payload(1, None, Bytes::from_static(b"lost"), false, true),
        Err(SendError::InvalidArgument(_))
    ));
    s.send_payload(1, None, Bytes::new(), false, true).unwrap();
}

#[test]
fn graceful_close_waits_for_open_streams() {
    let (mut pair, id) = requested(RequestKind::Stream { initial_n: 1 });
    pair.server.close_gracefully("draining");
    pair.drive();
    assert!(!pair.server.is_closed() && !pair.client.is_closed());
    assert!(
        pair.take_client_events()
            .iter()
            .any(|e| matches!(e, Event::Closing(c) if c.code == ErrorCode::CONNECTION_CLOSE))
    );
    assert_eq!(
        pair.client
            .send_request(RequestKind::FireAndForget, None, Bytes::new()),
        Err(SendError::Closed)
    );
    pair.server
        .send_payload(id, None, Bytes::from_static(b"last"), true, true)
        .unwrap();
    pair.drive();
    assert!(pair.server.is_closed() && pair.client.is_closed());
    assert!(
        matches!(pair.take_server_events().last(), Some(Event::Closed(e)) if e.initiator == Initiator::Local)
    );
    assert!(
        matches!(pair.take_client_events().last(), Some(Event::Closed(e)) if e.initiator == Initiator::Remote)
    );
}

#[test]
fn client_learns_of_a_rejected_setup_even_after_a_keepalive_echo() {
    let now = Instant::now();
    let mut client = Connection::client(Config::default(), SetupPayload::default(), now);
    let mut server = Connection::server(Config::default(), now);
    server.handle_frame(now, client.poll_transmit().unwrap().to_bytes());
    server.handle_frame(
        now,
        bytes(Keepalive {
            respond: true,
            last_received_position: 0,
            data: Bytes::new(),
        }),
    );
    drain_events(&mut server);
    server.reject_setup(ErrorCode::REJECTED_SETUP, "not allowed");
    let frames = drain_frames(&mut server);
    assert!(
        matches!(&frames[..], [Frame::Error(e)] if e.code == ErrorCode::REJECTED_SETUP),
        "only the ERROR: {frames:?}"
    );
    // Even had the echo gone out first, a KEEPALIVE does not confirm a SETUP.
    client.handle_frame(
        now,
        bytes(Keepalive {
            respond: false,
            last_received_position: 0,
            data: Bytes::new(),
        }),
    );
    client.handle_frame(now, frames[0].to_bytes());
    assert!(client.is_closed());
}

#[test]
fn lease_expiry_is_a_timeout() {
    let mut pair = Pair::new(
        Config {
            client: ClientSettings {
                lease: true,
                ..ClientSettings::default()
            },
            ..Config::default()
        },
        Config::default(),
    );
    pair.server
        .send_lease(pair.now, Duration::from_secs(3), 10, None)
        .unwrap();
    pair.drive();
    let deadline = pair.client.poll_timeout().unwrap();
    assert!(deadline <= pair.now + Duration::from_secs(3));
    pair.client.handle_timeout(deadline);
    assert_eq!(
        pair.client
            .send_request(RequestKind::FireAndForget, None, Bytes::new()),
        Err(SendError::NoLease)
    );
}

#[test]
fn malformed_stream_frames_on_stream_zero_are_ignored() {
    let (mut s, now) = server();
    let frames = [
        &[0, 0, 0, 0, 0x29, 0x00, 0xFF, 0xFF, 0xFF][..],
        &[0, 0, 0, 0, 0x20, 0x00, 0, 0],
    ];
    assert_frames_ignored(&mut s, now, frames.map(Bytes::copy_from_slice));
}
