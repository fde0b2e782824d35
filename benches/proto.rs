//! Criterion benches of rsocket-proto: frame decode and encode (64 B and
//! 4 KiB PAYLOAD), composite metadata with routing + auth, route parsing,
//! and the decode-and-route path of a 64-byte REQUEST_RESPONSE.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rsbroker_benches::{composite, payload_frame, request_response_64};
use rsocket_proto::OutFrame;
use rsocket_proto::codec::{LengthPrefixed, put_prefixed};
use rsocket_proto::frame::{Frame, FrameView};
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
            put_prefixed(&mut wire, &out);
        }
        let wire = wire.freeze();
        let codec = LengthPrefixed::default();
        g.throughput(Throughput::Bytes((len * 64) as u64));
        g.bench_function(format!("payload_{len}B/codec_x64"), |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let mut n = 0;
                    while let Some(f) = codec.decode(&mut buf).unwrap() {
                        n += FrameView::parse(f).unwrap().data_slice().len();
                    }
                    black_box(n)
                },
                BatchSize::SmallInput,
            )
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
    let md = composite(
        "group!com.example.Echo.hello:1.0.0",
        Some("eyJhbGciOiJIUzI1NiJ9.e30.sig"),
    );
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

criterion_group!(benches, decode, encode, metadata);
criterion_main!(benches);
