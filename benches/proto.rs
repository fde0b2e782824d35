//! Criterion benches of rsocket-proto: frame decode and encode (64 B and
//! 4 KiB PAYLOAD), composite metadata with routing + auth, route parsing,
//! and the decode-and-route path of a 64-byte REQUEST_RESPONSE.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rsbroker_benches::{payload_frame, request_response_64};
use rsocket_proto::OutFrame;
use rsocket_proto::codec::{ReadBuf, put_prefixed};
use rsocket_proto::frame::{Frame, FrameView};
use rsocket_proto::metadata::build::CompositeBuilder;
use rsocket_proto::metadata::{RequestMetadata, Route};

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for len in [64usize, 4096] {
        let frame = payload_frame(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("payload_{len}B/view"), |b| {
            b.iter(|| {
                let v = FrameView::parse(black_box(frame.clone())).unwrap();
                black_box((v.stream_id(), v.data_slice().len()))
            })
        });
        g.bench_function(format!("payload_{len}B/typed"), |b| {
            b.iter(|| black_box(Frame::decode(black_box(frame.clone())).unwrap()))
        });
        // Many frames back to back in one receive buffer, cut by the codec.
        let mut wire = BytesMut::new();
        let out = OutFrame::encoded(frame.clone());
        for _ in 0..64 {
            put_prefixed(&mut wire, &out).unwrap();
        }
        let wire = wire.freeze();
        g.throughput(Throughput::Bytes((len * 64) as u64));
        g.bench_function(format!("payload_{len}B/codec_x64"), |b| {
            // The production receive path in steady state: the bytes go into
            // the receive buffer (as a socket read puts them) and frames are
            // cut out; frames dropped, buffers are recycled.
            let mut buf = ReadBuf::new(rsocket_proto::frame::MAX_U24);
            let mut frames = Vec::with_capacity(64);
            b.iter(|| {
                buf.feed(black_box(&wire), &mut frames).unwrap();
                let n: usize = frames
                    .drain(..)
                    .map(|f| FrameView::parse(f).unwrap().data_slice().len())
                    .sum();
                black_box(n)
            })
        });
    }
    g.finish();
}

/// The same frames decoded and encoded by rsocket-rust, in the same run, so
/// perf/RESULTS.md can quote ratios. Both decoders start from a fresh
/// receive buffer holding one frame (the copy into it is not timed).
fn peer(c: &mut Criterion) {
    use rsocket_rust::frame::Frame as PeerFrame;
    use rsocket_rust::utils::Writeable;

    let mut g = c.benchmark_group("peer");
    for len in [64usize, 4096] {
        let frame = payload_frame(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("decode_{len}B/rsbroker"), |b| {
            b.iter_batched(
                || BytesMut::from(&frame[..]),
                |buf| {
                    let v = FrameView::parse(buf.freeze()).unwrap();
                    black_box(v.data_slice().len())
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("decode_{len}B/rsocket-rust"), |b| {
            b.iter_batched(
                || BytesMut::from(&frame[..]),
                |mut buf| black_box(PeerFrame::decode(&mut buf).unwrap()),
                BatchSize::SmallInput,
            )
        });
        let ours = Frame::decode(frame.clone()).unwrap();
        let theirs = PeerFrame::decode(&mut BytesMut::from(&frame[..])).unwrap();
        let mut buf = BytesMut::with_capacity(1 << 20);
        g.bench_function(format!("encode_{len}B/rsbroker"), |b| {
            b.iter(|| {
                if buf.len() > (1 << 19) {
                    buf.clear();
                }
                black_box(&ours).encode(&mut buf);
            })
        });
        g.bench_function(format!("encode_{len}B/rsocket-rust"), |b| {
            b.iter(|| {
                if buf.len() > (1 << 19) {
                    buf.clear();
                }
                black_box(&theirs).write_to(&mut buf);
            })
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for len in [64usize, 4096] {
        let frame = Frame::decode(payload_frame(len)).unwrap();
        g.throughput(Throughput::Bytes(len as u64));
        let mut buf = BytesMut::with_capacity(1 << 20);
        g.bench_function(format!("payload_{len}B/typed"), |b| {
            b.iter(|| {
                if buf.len() > (1 << 19) {
                    buf.clear();
                }
                black_box(&frame).encode(&mut buf);
            })
        });
        g.bench_function(format!("payload_{len}B/out_frame"), |b| {
            b.iter(|| black_box(OutFrame::from_frame(black_box(&frame))))
        });
    }
    g.finish();
}

fn metadata(c: &mut Criterion) {
    let mut g = c.benchmark_group("metadata");
    let md = CompositeBuilder::new()
        .routing(&["group!com.example.Echo.hello:1.0.0"])
        .bearer("eyJhbGciOiJIUzI1NiJ9.e30.sig")
        .build()
        .expect("metadata fits");
    g.bench_function("composite_routing_auth/scan_and_route", |b| {
        b.iter(|| {
            let found = RequestMetadata::scan(black_box(&md)).unwrap();
            let route = found.route().unwrap().unwrap();
            black_box((route.service.len(), found.auth.map(<[u8]>::len)))
        })
    });
    let key = b"group!com.example.Echo.hello:1.0.0";
    g.bench_function("route/parse_key", |b| {
        b.iter(|| black_box(Route::parse_key(black_box(key)).unwrap()))
    });
    g.finish();

    let frame = request_response_64();
    c.bench_function("request_response_64B/decode_and_route", |b| {
        b.iter(|| {
            let v = FrameView::parse(black_box(frame.clone())).unwrap();
            let found = RequestMetadata::scan(v.metadata_slice().unwrap()).unwrap();
            let route = found.route().unwrap().unwrap();
            black_box((
                v.stream_id(),
                route.service.len(),
                route.method.map(<[u8]>::len),
            ))
        })
    });
}

/// One PAYLOAD through the state machines: received on one connection
/// (credit checked, event raised) and forwarded on another (credit checked,
/// new head, shared body).
fn connection(c: &mut Criterion) {
    use std::time::Instant;

    use rsocket_proto::conn::{Config, Connection, Event, RequestKind, SetupPayload};
    use rsocket_proto::frame::{MAX_REQUEST_N, RequestChannel, RequestN, Setup, VERSION};

    let now = Instant::now();
    let mut inbound = Connection::server(Config::default(), now);
    let setup = Setup {
        version: VERSION,
        keepalive_interval: 1000,
        max_lifetime: 10_000,
        resume_token: None,
        lease: false,
        metadata_mime: bytes::Bytes::new(),
        data_mime: bytes::Bytes::new(),
        metadata: None,
        data: bytes::Bytes::new(),
    };
    inbound.handle_frame(now, Frame::from(setup).to_bytes());
    let channel = RequestChannel {
        stream_id: 1,
        follows: false,
        complete: false,
        initial_n: 1,
        metadata: None,
        data: bytes::Bytes::new(),
    };
    inbound.handle_frame(now, Frame::from(channel).to_bytes());
    inbound.send_request_n(1, MAX_REQUEST_N).unwrap();
    let mut outbound = Connection::client(Config::default(), SetupPayload::default(), now);
    let id = outbound
        .send_request(
            RequestKind::Channel {
                initial_n: 1,
                complete: false,
            },
            None,
            bytes::Bytes::new(),
        )
        .unwrap();
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

    let item = payload_frame(64);
    c.bench_function("connection/receive_and_forward_payload_64B", |b| {
        b.iter(|| {
            inbound.handle_frame(now, black_box(item.clone()));
            let Some(Event::Payload { frame, .. }) = inbound.poll_event() else {
                unreachable!()
            };
            outbound.forward(id, &frame).unwrap();
            black_box(outbound.poll_transmit())
        })
    });
    // As a responder answers: a PAYLOAD built from the app's bytes.
    let data = bytes::Bytes::from(vec![7u8; 64]);
    c.bench_function("connection/send_payload_64B", |b| {
        b.iter(|| {
            outbound
                .send_payload(id, None, black_box(data.clone()), true, false)
                .unwrap();
            black_box(outbound.poll_transmit())
        })
    });
    // As the broker forwards: the received frame's buffer moves on.
    c.bench_function("connection/receive_and_forward_payload_64B_by_value", |b| {
        b.iter(|| {
            inbound.handle_frame(now, black_box(item.clone()));
            let Some(Event::Payload { frame, .. }) = inbound.poll_event() else {
                unreachable!()
            };
            outbound.forward(id, frame).unwrap();
            black_box(outbound.poll_transmit())
        })
    });
}

criterion_group!(benches, decode, encode, metadata, connection, peer);
criterion_main!(benches);
