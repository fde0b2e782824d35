//! Runs one hot path of rsocket-proto N times, for instruction counting
//! under callgrind (`perf/proto-instructions.sh`), which is repeatable where
//! wall-clock time on a shared VM is not.
//!
//! `hotpath <path> <iterations>`; paths: `view`, `decode_and_route`,
//! `route_key`, `receive_and_forward`.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use rsbroker_benches::{payload_frame, request_response_64};
use rsocket_proto::conn::{Config, Connection, Event, RequestKind, SetupPayload};
use rsocket_proto::frame::{
    Frame, FrameView, MAX_REQUEST_N, RequestChannel, RequestN, Setup, VERSION,
};
use rsocket_proto::metadata::{RequestMetadata, Route};

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

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "decode_and_route".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let rr = request_response_64();
    let item = payload_frame(64);
    let key = b"group!com.example.Echo.hello:1.0.0";
    let (mut inbound, mut outbound, out_id) = forwarding_pair();
    let now = Instant::now();
    let mut acc = 0usize;
    for _ in 0..n {
        acc += match path.as_str() {
            "view" => FrameView::parse(black_box(rr.clone())).map_or(0, |v| v.data_slice().len()),
            "route_key" => Route::parse_key(black_box(key)).map_or(0, |r| r.service.len()),
            "decode_and_route" => {
                let v = FrameView::parse(black_box(rr.clone())).expect("frame");
                let found = RequestMetadata::scan(v.metadata_slice().unwrap_or_default())
                    .expect("metadata");
                found.route().ok().flatten().map_or(0, |r| r.service.len())
            }
            "receive_and_forward" => {
                inbound.handle_frame(now, black_box(item.clone()));
                let Some(Event::Payload { frame, .. }) = inbound.poll_event() else {
                    panic!("no payload")
                };
                outbound.forward(out_id, &frame).expect("forward");
                outbound.poll_transmit().map_or(0, |f| f.len())
            }
            other => panic!("unknown path {other}"),
        };
    }
    black_box(acc);
}
