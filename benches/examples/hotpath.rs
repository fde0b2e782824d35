//! Runs one hot path of rsocket-proto N times, for instruction counting
//! under callgrind (`perf/proto-instructions.sh`), which is repeatable where
//! wall-clock time on a shared VM is not.
//!
//! `hotpath <path> <iterations>`; paths: `view`, `decode_and_route`,
//! `route_key`, `receive_and_forward`, and through a whole shard (its
//! routing, stream maps and flow control): `shard_route` (where a
//! request-response goes: route lookup and balancer pick, nothing sent),
//! `shard_rr` (a request-response
//! from a requester connection to a responder connection and back) and
//! `shard_stream_item` (one item of a stream with 2^31-1 credit, read and
//! written one at a time) and `shard_stream_16` (16 such items read, then
//! written, as one pass of the runtime takes them).

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use rsbroker_benches::{payload_frame, request_response_64};
use rsbroker_core::{ConnId, Destination, Shard, ShardConfig};
use rsocket_proto::conn::{Config, Connection, Event, Interaction, RequestKind, SetupPayload};
use rsocket_proto::frame::{
    Frame, FrameView, MAX_REQUEST_N, RequestChannel, RequestN, Setup, VERSION,
};
use rsocket_proto::metadata::build::{CompositeBuilder, route};
use rsocket_proto::metadata::{MimeType, RequestMetadata, Route, WellKnownMime};

fn forwarding_pair() -> (Connection, Connection, u32) {
    let now = Instant::now();
    let mut inbound = Connection::server(Config::default(), now);
    let setup = Setup {
        version: VERSION,
        keepalive_interval: 1000,
        max_lifetime: 10_000,
        resume_token: None,
        lease: false,
        metadata_mime: Bytes::new(),
        data_mime: Bytes::new(),
        metadata: None,
        data: Bytes::new(),
    };
    inbound.handle_frame(now, Frame::from(setup).to_bytes());
    let channel = RequestChannel {
        stream_id: 1,
        follows: false,
        complete: false,
        initial_n: 1,
        metadata: None,
        data: Bytes::new(),
    };
    inbound.handle_frame(now, Frame::from(channel).to_bytes());
    inbound.send_request_n(1, MAX_REQUEST_N).expect("request n");
    let mut outbound = Connection::client(Config::default(), SetupPayload::default(), now);
    let id = outbound
        .send_request(
            RequestKind::Channel {
                initial_n: 1,
                complete: false,
            },
            None,
            Bytes::new(),
        )
        .expect("request");
    outbound.handle_frame(
        now,
        Frame::from(RequestN {
            stream_id: id,
            n: MAX_REQUEST_N,
        })
        .to_bytes(),
    );
    while inbound.poll_event().is_some() {}
    while inbound.poll_transmit().is_some() {}
    while outbound.poll_transmit().is_some() {}
    (inbound, outbound, id)
}

/// A shard with a responder of `com.example.Echo` and a requester, both set up.
fn shard_pair() -> (Shard, ConnId, ConnId) {
    let now = Instant::now();
    let mut shard = Shard::new(ShardConfig::new(0, 1), now);
    let setup = |metadata: Option<Bytes>| {
        Frame::from(Setup {
            version: VERSION,
            keepalive_interval: 60_000,
            max_lifetime: 600_000,
            resume_token: None,
            lease: false,
            metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
            data_mime: Bytes::new(),
            metadata,
            data: Bytes::new(),
        })
        .to_bytes()
    };
    let app = CompositeBuilder::new()
        .entry(
            MimeType::WellKnown(WellKnownMime::APPLICATION),
            br#"{"name":"echo","uuid":"echo-1","ip":"127.0.0.1"}"#,
        )
        .entry(
            MimeType::WellKnown(WellKnownMime::SERVICE_REGISTRY),
            br#"{"published":[{"group":"","service":"com.example.Echo","version":""}]}"#,
        )
        .build()
        .expect("the entries fit");
    let responder = shard.open(now);
    shard.handle_frame(now, responder, setup(Some(app)));
    let requester = shard.open(now);
    shard.handle_frame(now, requester, setup(None));
    for c in [responder, requester] {
        while shard.poll_transmit(c).is_some() {}
        shard.written(c);
    }
    shard.take_wakeups();
    (shard, responder, requester)
}

/// `frame` with its stream id replaced.
fn on_stream(frame: &Bytes, stream_id: u32) -> Bytes {
    let mut b = bytes::BytesMut::from(&frame[..]);
    b[..4].copy_from_slice(&stream_id.to_be_bytes());
    b.freeze()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "decode_and_route".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let rr = request_response_64();
    let item = payload_frame(64);
    let key = b"group!com.example.Echo.hello:1.0.0";
    let (mut inbound, mut outbound, out_id) = forwarding_pair();
    let now = Instant::now();
    let (mut shard, responder, requester) = shard_pair();
    let answer = payload_frame(64);
    let complete_answer = {
        let mut b = bytes::BytesMut::from(&answer[..]);
        b[5] |= 0x40; // C
        b.freeze()
    };
    let mut item_stream = 0u32;
    if path.starts_with("shard_stream") {
        let request = rsocket_proto::frame::RequestStream {
            stream_id: 1,
            follows: false,
            initial_n: MAX_REQUEST_N,
            metadata: Some(route(&["com.example.Echo.items"]).expect("the route fits")),
            data: Bytes::new(),
        };
        shard.handle_frame(now, requester, Frame::from(request).to_bytes());
        let f = shard.poll_transmit(responder).expect("the request");
        item_stream = u32::from_be_bytes(f.head()[..4].try_into().expect("4 bytes"));
        shard.written(responder);
        // The first items, one at a time, so that the broker has passed on
        // a full window of credit (a responder sends only what it is granted).
        for _ in 0..8 {
            shard.handle_frame(now, responder, on_stream(&answer, item_stream));
            while shard.poll_transmit(requester).is_some() {}
            shard.written(requester);
        }
        while shard.poll_transmit(responder).is_some() {}
        shard.written(responder);
    }
    let rr_metadata = FrameView::parse(rr.clone())
        .ok()
        .and_then(|v| v.metadata())
        .unwrap_or_default();
    let mut s = ShardPaths {
        shard: &mut shard,
        requester,
        responder,
        item_stream,
    };
    // Each path runs in a function of its own, so what the compiler
    // inlines into one path does not depend on the others.
    let acc = match path.as_str() {
        "view" => view(&rr, n),
        "route_key" => route_key(key, n),
        "decode_and_route" => decode_and_route(&rr, n),
        "receive_and_forward" => receive_and_forward(&mut inbound, &mut outbound, out_id, &item, n),
        "shard_route" => shard_route(&mut s, &rr_metadata, n),
        "shard_rr" => shard_rr(&mut s, &rr, &complete_answer, n),
        "shard_stream_16" => shard_stream_16(&mut s, &answer, n),
        "shard_stream_item" => shard_stream_item(&mut s, &answer, n),
        other => panic!("unknown path {other}"),
    };
    black_box(acc);
}

/// A shard set up with a requester and a responder (and, for the stream
/// paths, a stream between them).
struct ShardPaths<'a> {
    shard: &'a mut Shard,
    requester: ConnId,
    responder: ConnId,
    item_stream: u32,
}

#[inline(never)]
fn view(rr: &Bytes, n: usize) -> usize {
    (0..n)
        .map(|_| FrameView::parse(black_box(rr.clone())).map_or(0, |v| v.data_slice().len()))
        .sum()
}

#[inline(never)]
fn route_key(key: &[u8], n: usize) -> usize {
    (0..n)
        .map(|_| Route::parse_key(black_box(key)).map_or(0, |r| r.service.len()))
        .sum()
}

#[inline(never)]
fn decode_and_route(rr: &Bytes, n: usize) -> usize {
    (0..n)
        .map(|_| {
            let v = FrameView::parse(black_box(rr.clone())).expect("frame");
            let found =
                RequestMetadata::scan(v.metadata_slice().unwrap_or_default()).expect("metadata");
            found.route().ok().flatten().map_or(0, |r| r.service.len())
        })
        .sum()
}

#[inline(never)]
fn receive_and_forward(
    inbound: &mut Connection,
    outbound: &mut Connection,
    out_id: u32,
    item: &Bytes,
    n: usize,
) -> usize {
    let now = Instant::now();
    let mut acc = 0;
    for _ in 0..n {
        inbound.handle_frame(now, black_box(item.clone()));
        let Some(Event::Payload { frame, .. }) = inbound.poll_event() else {
            panic!("no payload")
        };
        outbound.forward(out_id, &frame).expect("forward");
        acc += outbound.poll_transmit().map_or(0, |f| f.len());
    }
    acc
}

#[inline(never)]
fn shard_route(s: &mut ShardPaths<'_>, metadata: &[u8], n: usize) -> usize {
    let mut acc = 0;
    for _ in 0..n {
        let to = s.shard.destination(
            s.requester,
            Interaction::RequestResponse,
            black_box(metadata),
        );
        acc += match to {
            Ok(Destination::Instances { targets, .. }) => targets.len(),
            other => panic!("the request is not routed: {other:?}"),
        };
    }
    acc
}

#[inline(never)]
fn shard_rr(s: &mut ShardPaths<'_>, rr: &Bytes, complete_answer: &Bytes, n: usize) -> usize {
    let now = Instant::now();
    let mut stream_id = 1u32;
    let mut acc = 0;
    for _ in 0..n {
        stream_id = if stream_id > 1 << 30 {
            1
        } else {
            stream_id + 2
        };
        s.shard
            .handle_frame(now, s.requester, on_stream(rr, stream_id));
        let Some(f) = s.shard.poll_transmit(s.responder) else {
            let e = s.shard.poll_transmit(s.requester).map(|f| f.to_bytes());
            panic!("no request at the responder; the requester got {e:?}")
        };
        let id = u32::from_be_bytes(f.head()[..4].try_into().expect("4 bytes"));
        s.shard.written(s.responder);
        s.shard
            .handle_frame(now, s.responder, on_stream(complete_answer, id));
        let out = s.shard.poll_transmit(s.requester).map_or(0, |f| f.len());
        s.shard.written(s.requester);
        acc += s.shard.take_wakeups().len() + out;
    }
    acc
}

#[inline(never)]
fn shard_stream_16(s: &mut ShardPaths<'_>, answer: &Bytes, n: usize) -> usize {
    let now = Instant::now();
    let mut acc = 0;
    for _ in 0..n {
        for _ in 0..16 {
            s.shard
                .handle_frame(now, s.responder, on_stream(answer, s.item_stream));
        }
        let mut out = 0;
        while let Some(f) = s.shard.poll_transmit(s.requester) {
            out += f.len();
        }
        assert_eq!(out, 16 * 64, "every item went through");
        s.shard.written(s.requester);
        while s.shard.poll_transmit(s.responder).is_some() {}
        s.shard.written(s.responder);
        acc += s.shard.take_wakeups().len() + out;
    }
    acc
}

#[inline(never)]
fn shard_stream_item(s: &mut ShardPaths<'_>, answer: &Bytes, n: usize) -> usize {
    let now = Instant::now();
    let mut acc = 0;
    for _ in 0..n {
        s.shard
            .handle_frame(now, s.responder, on_stream(answer, s.item_stream));
        let out = s.shard.poll_transmit(s.requester).map_or(0, |f| f.len());
        s.shard.written(s.requester);
        // Credit the broker passes on, now and then.
        while s.shard.poll_transmit(s.responder).is_some() {}
        s.shard.written(s.responder);
        acc += s.shard.take_wakeups().len() + out;
    }
    acc
}
