//! The fault suite: a real broker on two shards (the `rsbroker` binary),
//! well-behaved requesters and a responder running across its shards, and
//! one case per way a slow, broken or hostile peer can misbehave. Each case
//! asserts that the broker did not panic, that only the offending
//! connection was affected (the well-behaved traffic had no error and its
//! p99 stayed under a bound), that the broker's RSS and descriptors came
//! back to their baseline, and, where the spec asks for one, the ERROR code
//! the offender got.
//!
//! Cases run one at a time (each `Fault` holds the binary's turn while
//! its broker runs); limits are small (see `harness::LIMITS`) so attacks
//! reach them quickly.

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod raw;

use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{Fault, Producer, ProducerConfig};
use raw::{Next, Raw, rr, stream};
use rsbroker_client::metadata::route;
use rsocket_proto::frame::{
    Frame, MAX_REQUEST_N, MetadataPush, Payload, RequestN, RequestResponse,
};
use rsocket_proto::{ErrorCode, FrameType};

const SECOND: Duration = Duration::from_secs(1);

/// A raw connection set up as a plain requester (keepalive 60 s, max
/// lifetime 120 s: the broker never closes it for silence during a case).
fn requester(f: &Fault) -> Raw {
    let mut r = Raw::connect(f.broker.addr);
    r.setup(60_000, 120_000);
    r
}

/// A raw connection that the broker put on shard `shard` (`same`) or on
/// the other one.
fn raw_on(f: &Fault, shard: u16, same: bool) -> Raw {
    for _ in 0..40 {
        let r = Raw::connect(f.broker.addr);
        if (f.conn_of(r.local()).shard == shard) == same {
            return r;
        }
    }
    panic!("40 connections, none where it was wanted");
}

fn producer(f: &Fault, uuid: &'static str, size: usize, fragment_size: usize) -> Producer {
    let p = Producer::start(
        f.broker.addr,
        ProducerConfig {
            uuid,
            service: uuid,
            count: 1_000_000,
            size,
            fragment_size,
            // Its lifetime is shorter than every case that holds it back.
            keepalive: Duration::from_millis(200),
            max_lifetime: SECOND,
        },
    );
    f.conn_of(p.local);
    p
}

/// Reads `n` items of a stream, checking they are items 0.. in order.
fn read_items(r: &mut Raw, stream_id: u32, n: u32, size: usize) {
    let mut next = 0u32;
    let mut item = Vec::new();
    while next < n {
        let f = r.until(10 * SECOND, "a stream item", |f| {
            f.frame_type() == FrameType::Payload && f.stream_id() == stream_id
        });
        item.extend_from_slice(f.data_slice());
        if f.follows() {
            continue;
        }
        assert_eq!(item.len(), size, "item {next}");
        assert_eq!(item[..4], next.to_be_bytes(), "items in order");
        item.clear();
        next += 1;
    }
}

// ------------------------------------------------- the issue's six defects

/// A requester asks for 2^31-1 items and stops reading its socket. Its
/// stream is held to its buffer, the producer (whose lifetime is shorter
/// than the stall) stays connected and read and goes on serving another
/// requester, the well-behaved traffic is untouched, and RSS stays within
/// twice the per-connection bound plus a fixed overhead.
fn slow_consumer(same_shard: bool) {
    const SIZE: usize = 16 << 10;
    let name = if same_shard {
        "slow-same"
    } else {
        "slow-other"
    };
    let mut f = Fault::start(name, &[]);
    let p = producer(&f, "bulk", SIZE, 0);
    let pshard = f.conn_of(p.local).shard;
    let mut slow = raw_on(&f, pshard, same_shard);
    slow.setup(60_000, 120_000);
    slow.send(stream(1, "bulk", MAX_REQUEST_N)).unwrap();
    let (mut peak_rss, mut peak_held) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < 4 * SECOND {
        peak_rss = peak_rss.max(f.resources().rss);
        peak_held = peak_held.max(f.conn_of(slow.local()).pending_bytes);
        assert!(f.conn_of(p.local).reading, "the producer was held back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(p.closed(), None, "the producer lost its connection");
    f.assert_traffic_unharmed("a consumer that stopped reading");
    // The producer's other streams flow.
    let mut other = requester(&f);
    other.send(stream(1, "bulk", 3)).unwrap();
    read_items(&mut other, 1, 3, SIZE);
    let stream_buffer = 64 << 10;
    assert!(
        peak_held > 0 && peak_held <= stream_buffer + SIZE + 64,
        "the broker held {peak_held} bytes for the consumer (stream buffer {stream_buffer})"
    );
    let per_connection = 256 << 10;
    assert!(
        peak_rss <= f.baseline.rss + 2 * per_connection + (8 << 20),
        "RSS {} MiB, baseline {} MiB",
        peak_rss >> 20,
        f.baseline.rss >> 20
    );
    assert_eq!(f.metric("rsbroker_slow_consumer_pauses"), 0.0);
    // Once it reads, its items arrive, in order.
    read_items(&mut slow, 1, 200, SIZE);
    drop((slow, other, p));
    f.assert_back_to_baseline();
}

#[test]
fn slow_consumer_on_another_shard() {
    slow_consumer(false);
}

#[test]
fn slow_consumer_on_the_producers_shard() {
    slow_consumer(true);
}

/// A producer whose items come in fragments (16 MiB in 1 KiB pieces) is
/// held back (the fragments of one item are not governed by credit) while
/// its consumer does not read. The broker does not take the time it spent not reading the
/// producer for the producer's silence, and tells the producer it is
/// alive meanwhile: with a max lifetime of 1 s on both sides, the producer
/// is still connected after 3 s held back, and goes on once the consumer
/// reads.
#[test]
fn a_producer_held_back_is_not_closed_for_silence() {
    // More than the socket buffers between broker and consumer hold, so
    // that the rest of one item waits in the broker.
    const SIZE: usize = 16 << 20;
    let mut f = Fault::start("held-back", &[]);
    let p = producer(&f, "frag", SIZE, 1024);
    let pshard = f.conn_of(p.local).shard;
    let mut slow = raw_on(&f, pshard, false);
    slow.setup(60_000, 120_000);
    slow.send(stream(1, "frag", MAX_REQUEST_N)).unwrap();
    f.eventually("the producer is held back", 5 * SECOND, |f| {
        !f.conn_of(p.local).reading
    });
    let held_since = Instant::now();
    while held_since.elapsed() < 3 * SECOND {
        assert_eq!(p.closed(), None, "the producer's connection closed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!f.conn_of(p.local).reading, "still held back after 3 s");
    assert!(f.metric("rsbroker_slow_consumer_pauses") >= 1.0);
    f.assert_traffic_unharmed("a producer held back");
    // The item is more than the broker held: the producer was read again
    // as the consumer read.
    read_items(&mut slow, 1, 1, SIZE);
    assert_eq!(p.closed(), None);
    drop(slow);
    f.eventually("the producer is read again", 5 * SECOND, |f| {
        f.conn_of(p.local).reading
    });
    f.broker.collect_lines();
    assert!(
        !f.broker.seen.iter().any(|l| l.contains("max lifetime")),
        "a connection was closed for silence"
    );
    drop(p);
    f.assert_back_to_baseline();
}

/// Requests with F set whose routing metadata never completes, each
/// followed by empty fragments (interleaved over 100 streams, about 5 MB
/// on the wire): every held fragment counts its overhead, so each request
/// is refused with REJECTED at max_reassembled_size and the connection
/// never holds more than max_connection_memory.
#[test]
fn empty_fragments_before_a_route_stay_within_the_limits() {
    let mut f = Fault::start("empty-fragments", &[]);
    let mut a = requester(&f);
    let streams: Vec<u32> = (0..100).map(|i| 2 * i + 1).collect();
    // A composite metadata entry whose header promises 200 bytes.
    a.send_all(streams.iter().map(|&id| {
        Frame::RequestResponse(RequestResponse {
            stream_id: id,
            follows: true,
            metadata: Some(Bytes::from_static(&[0xFE, 0, 0, 200, 1])),
            data: Bytes::new(),
        })
    }))
    .unwrap();
    let mut peak = 0;
    for round in 0..4000 {
        a.send_all(streams.iter().map(|&id| {
            Frame::Payload(Payload {
                stream_id: id,
                follows: true,
                complete: false,
                next: false,
                metadata: Some(Bytes::new()),
                data: Bytes::new(),
            })
        }))
        .unwrap();
        if round % 200 == 0 {
            peak = peak.max(f.resources().rss);
        }
    }
    let mut refused = 0;
    while let Next::Frame(fr) = a.next(2 * SECOND) {
        if fr.frame_type() == FrameType::Error {
            assert_eq!(fr.error_code(), Some(ErrorCode::REJECTED));
            refused += 1;
        }
    }
    assert_eq!(refused, 100, "every request was refused");
    let limit = 4 << 20;
    assert!(
        peak <= f.baseline.rss + 2 * limit + (8 << 20),
        "RSS {} MiB against a baseline of {} MiB",
        peak >> 20,
        f.baseline.rss >> 20
    );
    f.assert_traffic_unharmed("empty fragments");
    // The connection still works.
    a.send(rr(1001, "ctl.echo", "after")).unwrap();
    let answer = a.until(5 * SECOND, "the answer", |fr| fr.stream_id() == 1001);
    assert_eq!(answer.data_slice(), b"after");
    drop(a);
    f.assert_back_to_baseline();
}

/// At the end of a drain the streams still open end with ERROR CANCELED,
/// each connection gets ERROR[CONNECTION_CLOSE], and a request sent after
/// it (already on the wire, as far as the broker can tell) gets ERROR
/// REJECTED on its stream, not silence; then the connection closes and
/// the broker exits 0.
#[test]
fn the_end_of_a_drain_answers_requests_that_race_it() {
    let mut f = Fault::start(
        "drain-end",
        &[
            ("shutdown", "drain_timeout", "\"1s\""),
            ("shutdown", "close_timeout", "\"3s\""),
        ],
    );
    let p = producer(&f, "open", 16, 0);
    let mut c = requester(&f);
    // One item of a stream that never ends: open at the drain deadline.
    c.send(stream(1, "open", 1)).unwrap();
    c.until(5 * SECOND, "the first item", |fr| fr.stream_id() == 1);
    f.broker.signal("TERM");
    c.expect_error(5 * SECOND, 1, ErrorCode::CANCELED);
    c.expect_error(SECOND, 0, ErrorCode::CONNECTION_CLOSE);
    c.send(rr(3, "ctl.echo", "late")).unwrap();
    let why = c.expect_error(2 * SECOND, 3, ErrorCode::REJECTED);
    assert!(why.contains("closing"), "{why}");
    assert!(
        c.closed_within(5 * SECOND),
        "the connection closes after the linger"
    );
    drop(p);
    let (status, _) = f.broker.wait_exit(15 * SECOND);
    assert!(status.success(), "{status}");
}

/// A second broker started on an address the first listens on refuses to
/// start and names the process that holds it; the first goes on.
#[test]
fn a_second_broker_on_the_same_address_refuses_to_start() {
    let mut f = Fault::start("two-brokers", &[]);
    let listen = format!("tcp://{}", f.broker.addr);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rsbroker"))
        .args(["--listen", &listen, "--shards", "1", "--no-admin"])
        .output_with_timeout(10 * SECOND);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second broker started:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", f.broker.pid)) && stderr.contains("already listens"),
        "{stderr}"
    );
    f.assert_traffic_unharmed("a second broker tried the address");
    f.assert_back_to_baseline();
}

/// A command run to completion, or killed after `within`.
trait OutputWithTimeout {
    fn output_with_timeout(&mut self, within: Duration) -> std::process::Output;
}

impl OutputWithTimeout for std::process::Command {
    fn output_with_timeout(&mut self, within: Duration) -> std::process::Output {
        let mut child = self
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starts");
        if common::wait_child(&mut child, within).is_none() {
            let _ = child.kill();
        }
        child.wait_with_output().expect("output")
    }
}

// ------------------------------------------- what the broker already survives

/// Bytes that are not RSocket frames end only their connection, with
/// ERROR CONNECTION_ERROR (or INVALID_SETUP before SETUP).
#[test]
fn malformed_frames() {
    let mut f = Fault::start("malformed", &[]);
    // An unknown frame type without the Ignore flag.
    let mut a = requester(&f);
    // Type 0x20 (none), no flags.
    a.send_bytes(&[0, 0, 6, 0, 0, 0, 1, 0x80, 0]).unwrap();
    a.expect_error(5 * SECOND, 0, ErrorCode::CONNECTION_ERROR);
    assert!(a.closed_within(5 * SECOND));
    // Garbage where SETUP belongs.
    let mut b = Raw::connect(f.broker.addr);
    b.send_bytes(&[0, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
        .unwrap();
    b.expect_error(5 * SECOND, 0, ErrorCode::INVALID_SETUP);
    assert!(b.closed_within(5 * SECOND));
    // A length shorter than a frame header.
    let mut c = requester(&f);
    c.send_bytes(&[0, 0, 2, 0, 0]).unwrap();
    c.expect_error(5 * SECOND, 0, ErrorCode::CONNECTION_ERROR);
    // A frame cut short, then the peer goes away.
    let mut d = requester(&f);
    d.send_bytes(&[0, 1, 0, 0, 0, 0, 1, 0x10, 0, 1, 2]).unwrap();
    drop((a, b, c, d));
    f.assert_traffic_unharmed("malformed frames");
    f.assert_back_to_baseline();
}

/// A length prefix over max_frame_size ends the connection at once; ten
/// connections each sending half of a frame of the maximum size and
/// stalling hold what they sent, and give it back when they go.
#[test]
fn frame_bomb() {
    let mut f = Fault::start("frame-bomb", &[]);
    let mut a = requester(&f);
    a.send_bytes(&[0xFF, 0xFF, 0xFF, 0, 0, 0, 1, 0x10, 0])
        .unwrap();
    a.expect_error(5 * SECOND, 0, ErrorCode::CONNECTION_ERROR);
    let half = vec![0u8; 512 << 10];
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut r = requester(&f);
        // 1 MiB - 1: a PAYLOAD on stream 1 that never completes.
        r.send_bytes(&[0x0F, 0xFF, 0xFF, 0, 0, 0, 1, 0x28, 0])
            .unwrap();
        r.send_bytes(&half).unwrap();
        stalled.push(r);
    }
    std::thread::sleep(SECOND);
    let rss = f.resources().rss;
    assert!(
        rss <= f.baseline.rss + 10 * (2 << 20) + (8 << 20),
        "RSS {} MiB with ten half frames, baseline {} MiB",
        rss >> 20,
        f.baseline.rss >> 20
    );
    f.assert_traffic_unharmed("half frames");
    drop((a, stalled));
    f.assert_back_to_baseline();
}

/// Connections that open and never finish their SETUP, or send it a byte
/// at a time, are closed at setup_timeout (2 s here) with INVALID_SETUP.
#[test]
fn slowloris_and_handshakes_left_open() {
    let mut f = Fault::start("slowloris", &[]);
    let mut idle: Vec<Raw> = (0..50).map(|_| Raw::connect(f.broker.addr)).collect();
    let mut dribble = Raw::connect(f.broker.addr);
    let setup = {
        let mut b = bytes::BytesMut::new();
        rsocket_proto::codec::put_prefixed(
            &mut b,
            &rsocket_proto::OutFrame::from_owned(raw::setup_frame(1000, 5000, None)),
        )
        .unwrap();
        b
    };
    let started = Instant::now();
    for byte in setup.iter().take(setup.len() - 1) {
        dribble.send_bytes(&[*byte]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        if started.elapsed() > 3 * SECOND {
            break;
        }
    }
    for r in idle.iter_mut().take(3) {
        r.expect_error(5 * SECOND, 0, ErrorCode::INVALID_SETUP);
    }
    for r in &mut idle {
        assert!(r.closed_within(5 * SECOND));
    }
    assert!(
        dribble.closed_within(5 * SECOND),
        "the dribbler is closed too"
    );
    f.assert_traffic_unharmed("handshakes left open");
    drop((idle, dribble));
    f.assert_back_to_baseline();
}

/// Fragments in every shape: a routed request whose fragments never end,
/// sent to a responder that does not read (its sender is held back, the
/// memory held stays near the limit), metadata after data (INVALID), and
/// fragments on streams that do not exist (ignored).
#[test]
fn fragment_bombs() {
    let mut f = Fault::start("fragment-bombs", &[]);
    // A responder that registers and never reads.
    let mut sink = Raw::connect(f.broker.addr);
    sink.setup_app("sink", "sink", 60_000, 120_000);
    f.wait_for_app("sink");
    let mut a = Raw::connect(f.broker.addr);
    a.s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    a.setup(60_000, 120_000);
    a.send(Frame::RequestResponse(RequestResponse {
        stream_id: 1,
        follows: true,
        metadata: Some(route(&["sink"])),
        data: Bytes::new(),
    }))
    .unwrap();
    let chunk = Frame::Payload(Payload {
        stream_id: 1,
        follows: true,
        complete: false,
        next: true,
        metadata: None,
        data: Bytes::from(vec![7u8; 16 << 10]),
    });
    let mut peak = 0;
    let started = Instant::now();
    while started.elapsed() < 3 * SECOND {
        if a.send(chunk.clone()).is_err() {
            // The broker stopped reading it: its socket is full.
            std::thread::sleep(Duration::from_millis(50));
        }
        peak = peak.max(f.resources().rss);
    }
    let a_conn = f.conn_of(a.local());
    assert!(!a_conn.reading, "the flooder is held back");
    assert!(
        peak <= f.baseline.rss + 2 * (256 << 10) + (8 << 20),
        "RSS {} MiB, baseline {} MiB",
        peak >> 20,
        f.baseline.rss >> 20
    );
    f.assert_traffic_unharmed("an endless fragmented request");
    // Metadata after data in a fragmented request: INVALID on its stream.
    let mut b = requester(&f);
    b.send(Frame::RequestResponse(RequestResponse {
        stream_id: 1,
        follows: true,
        metadata: Some(route(&["ctl.echo"])),
        data: Bytes::from_static(b"data first"),
    }))
    .unwrap();
    b.send(Frame::Payload(Payload {
        stream_id: 1,
        follows: false,
        complete: true,
        next: true,
        metadata: Some(Bytes::from_static(b"then metadata")),
        data: Bytes::new(),
    }))
    .unwrap();
    b.expect_error(5 * SECOND, 1, ErrorCode::INVALID);
    // Fragments of streams that do not exist are ignored.
    for id in [9, 11, 13] {
        b.send(Frame::Payload(Payload {
            stream_id: id,
            follows: true,
            complete: false,
            next: true,
            metadata: None,
            data: Bytes::from_static(b"stray"),
        }))
        .unwrap();
    }
    b.send(rr(15, "ctl.echo", "still here")).unwrap();
    let answer = b.until(5 * SECOND, "the answer", |fr| fr.stream_id() == 15);
    assert_eq!(answer.data_slice(), b"still here");
    drop((a, b, sink));
    f.assert_back_to_baseline();
}

/// REQUEST_N 0 is an error on its stream (INVALID); 2^31-1 sent again and
/// again saturates instead of overflowing, and the stream goes on.
#[test]
fn request_n_zero_and_max_repeated() {
    let mut f = Fault::start("request-n", &[]);
    let p = producer(&f, "items", 64, 0);
    let mut a = requester(&f);
    a.send(stream(1, "items", 1)).unwrap();
    read_items(&mut a, 1, 1, 64);
    a.send_all((0..1000).map(|_| {
        Frame::RequestN(RequestN {
            stream_id: 1,
            n: MAX_REQUEST_N,
        })
    }))
    .unwrap();
    let mut seen = 0;
    while seen < 2000 {
        let fr = a.until(5 * SECOND, "items", |fr| fr.stream_id() == 1);
        assert_eq!(fr.frame_type(), FrameType::Payload);
        seen += 1;
    }
    a.send(stream(3, "items", 1)).unwrap();
    a.send(Frame::RequestN(RequestN { stream_id: 3, n: 0 }))
        .unwrap();
    a.expect_error(5 * SECOND, 3, ErrorCode::INVALID);
    f.assert_traffic_unharmed("REQUEST_N 0 and 2^31-1");
    drop((a, p));
    f.assert_back_to_baseline();
}

/// Stream ids: a request on a stream in use is ignored, a stream id may be
/// used again once its stream ended, and a requester using the broker's
/// (even) ids ends its connection with CONNECTION_ERROR.
#[test]
fn stream_id_reuse() {
    let mut f = Fault::start("stream-ids", &[]);
    let p = producer(&f, "ids", 16, 0);
    let mut a = requester(&f);
    for round in 0..3 {
        a.send(rr(1, "ctl.echo", &format!("again {round}")))
            .unwrap();
        let fr = a.until(5 * SECOND, "the answer", |fr| fr.stream_id() == 1);
        assert_eq!(fr.data_slice(), format!("again {round}").as_bytes());
    }
    a.send(stream(3, "ids", 1)).unwrap();
    read_items(&mut a, 3, 1, 16);
    // Stream 3 is open: this request is ignored.
    a.send(rr(3, "ctl.echo", "ignored")).unwrap();
    a.send(rr(5, "ctl.echo", "answered")).unwrap();
    let fr = a.until(5 * SECOND, "the answer on 5", |fr| {
        fr.stream_id() == 5 || (fr.stream_id() == 3 && fr.data_slice() == b"ignored")
    });
    assert_eq!(
        fr.stream_id(),
        5,
        "the request on an open stream was answered"
    );
    a.send(rr(2, "ctl.echo", "even")).unwrap();
    a.expect_error(5 * SECOND, 0, ErrorCode::CONNECTION_ERROR);
    assert!(a.closed_within(5 * SECOND));
    f.assert_traffic_unharmed("stream id reuse");
    drop((a, p));
    f.assert_back_to_baseline();
}

/// Connections opened and closed as fast as a client can (some of them
/// apps that register and leave): every descriptor and byte comes back.
#[test]
fn connection_churn() {
    let mut f = Fault::start("churn", &[]);
    for i in 0..300 {
        let mut r = Raw::connect(f.broker.addr);
        if i % 3 == 0 {
            r.setup_app(&format!("churn-{i}"), "churn", 60_000, 120_000);
        } else {
            r.setup(60_000, 120_000);
            r.send(rr(1, "ctl.echo", "x")).unwrap();
        }
        if i % 2 == 0 {
            // Some wait for the answer, some go at once.
            let _ = r.next(Duration::from_millis(200));
        }
    }
    f.assert_traffic_unharmed("connection churn");
    f.eventually("every churned app left", 10 * SECOND, |f| {
        !f.connections()
            .iter()
            .any(|c| c.app.as_deref().is_some_and(|a| a.starts_with("churn")))
    });
    f.assert_back_to_baseline();
}

/// A responder that disappears mid-stream ends its streams with ERROR
/// CANCELED at their requesters; one that freezes (stops reading and
/// writing) is closed at its max lifetime, with the same result.
#[test]
fn responder_killed_and_frozen_mid_stream() {
    let mut f = Fault::start("responder-gone", &[]);
    // Killed: the process's connection just ends.
    let mut killed = Raw::connect(f.broker.addr);
    killed.setup_app("killed", "killed", 60_000, 120_000);
    let mut a = requester(&f);
    f.wait_for_app("killed");
    a.send(stream(1, "killed", 10)).unwrap();
    killed.until(5 * SECOND, "the request", |fr| {
        fr.frame_type() == FrameType::RequestStream
    });
    drop(killed);
    a.expect_error(5 * SECOND, 1, ErrorCode::CANCELED);
    // Frozen: it takes the request and then neither reads nor writes; its
    // lifetime (1 s) runs out.
    let mut frozen = Raw::connect(f.broker.addr);
    frozen.setup_app("frozen", "frozen", 500, 1000);
    f.wait_for_app("frozen");
    a.send(stream(3, "frozen", 10)).unwrap();
    a.expect_error(5 * SECOND, 3, ErrorCode::CANCELED);
    f.assert_traffic_unharmed("responders gone mid-stream");
    drop((a, frozen));
    f.assert_back_to_baseline();
}

/// A peer that goes silent is closed after its max lifetime with
/// CONNECTION_ERROR.
#[test]
fn keepalive_silence() {
    let mut f = Fault::start("silence", &[]);
    let mut a = Raw::connect(f.broker.addr);
    a.setup(500, 1000);
    let started = Instant::now();
    let why = a.expect_error(5 * SECOND, 0, ErrorCode::CONNECTION_ERROR);
    assert!(why.contains("max lifetime"), "{why}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(a.closed_within(5 * SECOND));
    f.assert_traffic_unharmed("a silent peer");
    drop(a);
    f.assert_back_to_baseline();
}

/// Requests beyond max_streams_per_connection are refused with REJECTED,
/// the streams within it go on.
#[test]
fn too_many_streams() {
    let mut f = Fault::start("streams", &[("limits", "max_streams_per_connection", "50")]);
    let p = producer(&f, "many", 16, 0);
    let mut a = requester(&f);
    a.send_all((0..60).map(|i| stream(2 * i + 1, "many", 1)))
        .unwrap();
    let (mut items, mut refused) = (0, 0);
    while items + refused < 60 {
        match a.next(5 * SECOND) {
            Next::Frame(fr) if fr.frame_type() == FrameType::Payload => items += 1,
            Next::Frame(fr) if fr.frame_type() == FrameType::Error => {
                assert_eq!(fr.error_code(), Some(ErrorCode::REJECTED));
                refused += 1;
            }
            other => panic!("{other:?} after {items} items and {refused} refusals"),
        }
    }
    assert_eq!((items, refused), (50, 10));
    f.assert_traffic_unharmed("too many streams");
    drop((a, p));
    f.assert_back_to_baseline();
}

/// METADATA_PUSH with garbage, broken JSON and JSON of the wrong shape,
/// from a requester and from an app, is ignored; both connections go on.
#[test]
fn garbage_metadata_push() {
    let mut f = Fault::start("metadata-push", &[]);
    let mut app = Raw::connect(f.broker.addr);
    app.setup_app("pusher", "pusher", 60_000, 120_000);
    let mut req = requester(&f);
    let junk: Vec<Bytes> = vec![
        Bytes::from_static(&[0xFF, 0x00, 0x13, 0x37]),
        Bytes::from_static(b"{\"type\": \"com.alibaba.rsocket.events.AppStatusEvent\", \"data\""),
        Bytes::from_static(b"{\"type\": 7, \"data\": [1, 2, 3]}"),
        Bytes::from(format!("[{}]", "[".repeat(10_000))),
        Bytes::from(vec![b'a'; 512 << 10]),
    ];
    for c in [&mut app, &mut req] {
        c.send_all(junk.iter().map(|m| {
            Frame::MetadataPush(MetadataPush {
                metadata: m.clone(),
            })
        }))
        .unwrap();
    }
    for (i, c) in [&mut app, &mut req].into_iter().enumerate() {
        c.send(rr(1, "ctl.echo", &format!("alive {i}"))).unwrap();
        let fr = c.until(5 * SECOND, "the answer", |fr| fr.stream_id() == 1);
        assert_eq!(fr.data_slice(), format!("alive {i}").as_bytes());
    }
    f.assert_traffic_unharmed("garbage METADATA_PUSH");
    drop((app, req));
    f.assert_back_to_baseline();
}

/// A SETUP over max_frame_size ends its connection (CONNECTION_ERROR); one
/// within it whose metadata is 900 KiB of garbage is refused with
/// INVALID_SETUP.
#[test]
fn huge_setup() {
    let mut f = Fault::start("huge-setup", &[]);
    let mut a = Raw::connect(f.broker.addr);
    let _ = a.send(raw::setup_frame(
        1000,
        5000,
        Some(Bytes::from(vec![1u8; 2 << 20])),
    ));
    // The broker stops at the length: ERROR CONNECTION_ERROR, unless the
    // bytes it did not read turned its close into a reset that took the
    // ERROR with it.
    match a.next(5 * SECOND) {
        Next::Frame(fr) => assert_eq!(fr.error_code(), Some(ErrorCode::CONNECTION_ERROR)),
        Next::Closed => {}
        Next::Quiet => panic!("an oversized SETUP was neither refused nor closed"),
    }
    assert!(a.closed_within(5 * SECOND));
    let mut b = Raw::connect(f.broker.addr);
    b.send(raw::setup_frame(
        1000,
        5000,
        Some(Bytes::from(vec![0x7Au8; 900 << 10])),
    ))
    .unwrap();
    b.expect_error(5 * SECOND, 0, ErrorCode::INVALID_SETUP);
    assert!(b.closed_within(5 * SECOND));
    f.assert_traffic_unharmed("huge SETUPs");
    drop((a, b));
    f.assert_back_to_baseline();
}

/// SIGHUP with a file that does not parse keeps the configuration in force
/// and says why; nothing else changes.
#[test]
fn sighup_with_a_bad_file() {
    let mut f = Fault::start("sighup", &[]);
    let good = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(&f.config, "[limits\nmax_frame_size = = 3\n").unwrap();
    f.broker.signal("HUP");
    f.broker
        .wait_for("the configuration in force is kept", 10 * SECOND);
    f.assert_traffic_unharmed("a bad reload");
    std::fs::write(&f.config, good).unwrap();
    f.assert_back_to_baseline();
}

/// SIGTERM with the traffic running: the broker drains and exits 0 within
/// its timeouts, without a panic.
#[test]
fn sigterm_under_load() {
    let mut f = Fault::start("sigterm", &[("shutdown", "drain_timeout", "\"2s\"")]);
    let p = producer(&f, "load", 1024, 0);
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut r = requester(&f);
        r.send(stream(1, "load", MAX_REQUEST_N)).unwrap();
        streams.push(r);
    }
    std::thread::sleep(SECOND);
    f.broker.signal("TERM");
    let (status, _) = f.broker.wait_exit(15 * SECOND);
    assert!(status.success(), "{status}");
    for r in &mut streams {
        assert!(r.closed_within(5 * SECOND));
    }
    drop(p);
}

// ------------------------------------------------- idle connections

/// A SETUP from app `i`, publishing a service when `publish`.
fn app_setup(i: usize, publish: bool) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, mime: u8, content: &[u8]) {
        out.push(0x80 | mime);
        out.extend_from_slice(&(content.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(content);
    }
    let mut md = Vec::new();
    entry(
        &mut md,
        0x51,
        format!(r#"{{"name":"idle-app","uuid":"idle-{i}"}}"#).as_bytes(),
    );
    if publish {
        entry(
            &mut md,
            0x54,
            format!(r#"{{"published":[{{"service":"idle.S{}"}}]}}"#, i % 100).as_bytes(),
        );
    }
    let mut body = Vec::new();
    body.extend_from_slice(&0u32.to_be_bytes()); // stream 0
    body.extend_from_slice(&((1u16 << 10) | 0x100).to_be_bytes()); // SETUP, M
    body.extend_from_slice(&[0, 1, 0, 0]); // version 1.0
    body.extend_from_slice(&60_000u32.to_be_bytes());
    body.extend_from_slice(&600_000u32.to_be_bytes());
    for mime in [
        &b"message/x.rsocket.composite-metadata.v0"[..],
        b"application/octet-stream",
    ] {
        body.push(mime.len() as u8);
        body.extend_from_slice(mime);
    }
    body.extend_from_slice(&(md.len() as u32).to_be_bytes()[1..]);
    body.extend_from_slice(&md);
    let mut frame = (body.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Opens `n` app connections (every other one publishing a service) and
/// waits until the broker holds them all.
fn idle_wave(f: &Fault, n: usize, first: usize) -> Vec<std::net::TcpStream> {
    let before = f.connections().len();
    let conns: Vec<_> = (first..first + n)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(f.broker.addr).unwrap();
            std::io::Write::write_all(&mut s, &app_setup(i, i % 2 == 0)).unwrap();
            s
        })
        .collect();
    f.eventually("every app connection to be held", 30 * SECOND, |f| {
        f.connections().len() >= before + n
    });
    conns
}

/// Memory follows traffic, not connection count: after a wave of app
/// connections has come and gone (so the memory it touched is resident),
/// a second wave of idle connections costs the broker a few KiB each. The
/// receive buffer an app's SETUP was read into went back to the shard's
/// pool, and so did the write batch; a broker that keeps them per
/// connection holds over 140 KiB for each. Once the second wave is gone
/// too, the broker is back where the first wave left it: a closed
/// connection keeps nothing.
#[test]
fn idle_connections_after_churn_hold_a_few_kib_each() {
    const N: usize = 2000;
    // What the allocator may still hold of the second wave once it is
    // closed; a closed connection that kept 2 KiB would pass it.
    const WAVE_SLACK: usize = 4 << 20;
    let mut f = Fault::start("idle-connections", &[]);
    let others = f.connections().len();
    let wave = idle_wave(&f, N, 0);
    drop(wave);
    // The memory the first wave touched stays with the allocator (about
    // 12 MiB for 2000 connections, handed back over minutes): the second
    // wave is measured from there.
    f.eventually("the first wave to be closed", 30 * SECOND, |f| {
        f.resources().fds <= f.baseline.fds && f.connections().len() <= others
    });
    f.baseline = f.resources();
    let wave = idle_wave(&f, N, N);
    std::thread::sleep(SECOND);
    let per = f.resources().rss.saturating_sub(f.baseline.rss) / N;
    assert!(
        per <= 16 << 10,
        "{per} bytes per idle connection over the baseline"
    );
    f.assert_traffic_unharmed("two waves of idle app connections");
    drop(wave);
    f.assert_back_within(WAVE_SLACK);
}

/// Peers that send the start of a frame and stop hold what they sent, not
/// the shard's receive buffers: with 8 MiB of them per shard (64 of the
/// usual 128 KiB), 200 connections each stopped in the middle of a 65 KB
/// request would hold them all if each kept the buffer its frame began in,
/// and no connection on the shard could be read. Their frames moved into
/// buffers of their own, the pool was never found empty, the other traffic
/// went on, and each request was answered whole once the rest of it came.
#[test]
fn half_sent_frames_leave_the_receive_buffers_to_others() {
    const N: usize = 200;
    let mut f = Fault::start(
        "half-sent-frames",
        &[("limits", "max_buffered_bytes", "\"16 MiB\"")],
    );
    let data = "x".repeat(65_000);
    let mut wire = bytes::BytesMut::new();
    rsocket_proto::codec::put_prefixed(
        &mut wire,
        &rsocket_proto::OutFrame::from_owned(rr(1, "ctl.echo", &data)),
    )
    .unwrap();
    // Half stop within the first bytes, half past what is always copied.
    let cut = |i: usize| {
        if i.is_multiple_of(2) {
            1 + i % 100
        } else {
            rsocket_proto::codec::PARK_COPY + 1000
        }
    };
    let before = f.connections().len();
    let mut peers: Vec<Raw> = (0..N)
        .map(|i| {
            let mut r = requester(&f);
            r.send_bytes(&wire[..cut(i)]).unwrap();
            r
        })
        .collect();
    f.eventually("every peer to be held", 30 * SECOND, |f| {
        f.connections().len() >= before + N
    });
    std::thread::sleep(SECOND);
    f.assert_traffic_unharmed("200 connections stopped mid-frame");
    assert_eq!(
        f.metric("rsbroker_receive_pool_exhausted"),
        0.0,
        "a read found the receive buffers all in use"
    );
    let pooled = f.metric("rsbroker_receive_pool_bytes");
    assert!(
        pooled <= f64::from(16 << 20),
        "{pooled} bytes of receive buffers"
    );
    assert!(
        f.metric("rsbroker_buffered_bytes") >= (N / 2 * rsocket_proto::codec::PARK_COPY) as f64,
        "the frames in progress count as held for their connections"
    );
    // One at a time: together they would be more than the responder's
    // max_connection_memory.
    for (i, r) in peers.iter_mut().enumerate() {
        r.send_bytes(&wire[cut(i)..]).unwrap();
        let answer = r.until(10 * SECOND, "the echo", |fr| fr.stream_id() == 1);
        assert!(
            answer.data_slice() == data.as_bytes(),
            "peer {i}: {} bytes back, not the request's data",
            answer.data_slice().len()
        );
    }
    f.assert_traffic_unharmed("the frames completed");
    drop(peers);
    f.assert_back_to_baseline();
}
