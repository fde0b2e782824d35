//! Decoding a PAYLOAD or REQUEST_* frame and reading its route allocates
//! nothing; neither does a connection receiving and forwarding a PAYLOAD on
//! an open stream, once its queues have reached their working size.
//!
//! A counting global allocator counts allocations made by this thread while
//! a measured closure runs.
#![allow(unsafe_code)] // a GlobalAlloc implementation is unsafe by definition

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use common::bytes;
use rsocket_proto::OutFrame;
use rsocket_proto::codec::{ReadBuf, put_prefix};
use rsocket_proto::conn::{Config, Connection, Event, RequestKind, SetupPayload};
use rsocket_proto::frame::*;
use rsocket_proto::metadata::RequestMetadata;
use rsocket_proto::metadata::build::{CompositeBuilder, route};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations<T>(f: impl FnOnce() -> T) -> (usize, T) {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (COUNT.with(Cell::get), out)
}

#[test]
fn decoding_requests_and_reading_routes_allocates_nothing() {
    let metadata = CompositeBuilder::new()
        .routing(&["grp!com.example.Echo.hello:1.0", "e=instance-7"])
        .simple_auth("user", "pw")
        .build()
        .unwrap();
    let frames = [
        bytes(RequestResponse {
            stream_id: 1,
            follows: false,
            metadata: Some(metadata.clone()),
            data: Bytes::from(vec![0; 64]),
        }),
        bytes(RequestFnf {
            stream_id: 3,
            follows: false,
            metadata: Some(metadata.clone()),
            data: Bytes::from(vec![0; 64]),
        }),
        bytes(RequestStream {
            stream_id: 5,
            follows: false,
            initial_n: 8,
            metadata: Some(metadata.clone()),
            data: Bytes::new(),
        }),
        bytes(RequestChannel {
            stream_id: 7,
            follows: false,
            complete: false,
            initial_n: 8,
            metadata: Some(metadata.clone()),
            data: Bytes::new(),
        }),
        bytes(Payload {
            stream_id: 9,
            follows: false,
            complete: false,
            next: true,
            metadata: None,
            data: Bytes::from(vec![1; 4096]),
        }),
    ];
    let mut wire = BytesMut::with_capacity(64 * 1024);
    for _ in 0..10 {
        for f in &frames {
            put_prefix(&mut wire, f.len()).unwrap();
            wire.put_slice(f);
        }
    }
    // The thread's receive-buffer pool makes its lists once, when the
    // first buffer goes back to it.
    let mut warm = ReadBuf::new(rsocket_proto::frame::MAX_U24);
    let _ = warm.spare();
    drop(warm);
    // The bytes in the receive buffer as a socket read leaves them.
    let mut buf = ReadBuf::new(rsocket_proto::frame::MAX_U24);
    let spare = buf.spare().unwrap();
    spare[..wire.len()].copy_from_slice(&wire);
    buf.filled(wire.len());
    // The first split turns the receive buffer into a shared one (one
    // allocation per buffer, not per frame).
    buf.next_frame().unwrap().unwrap();

    let (count, routes) = allocations(|| {
        let mut routes = 0;
        while let Some(frame) = buf.next_frame().unwrap() {
            let view = FrameView::parse(frame).unwrap();
            let _ = (view.data(), view.metadata(), view.request_n());
            if let Some(md) = view.metadata_slice() {
                let found = RequestMetadata::scan(md).unwrap();
                let route = found.route().unwrap().unwrap();
                assert_eq!(
                    (route.service, route.method, route.endpoint),
                    (
                        &b"com.example.Echo"[..],
                        Some(&b"hello"[..]),
                        Some(&b"instance-7"[..])
                    )
                );
                assert!(found.auth.is_some());
                routes += 1;
            }
        }
        routes
    });
    assert_eq!(routes, 39);
    assert_eq!(count, 0, "allocations while decoding and routing");
}

#[test]
fn receiving_and_forwarding_a_payload_allocates_nothing_in_steady_state() {
    let now = Instant::now();
    // Server side: an open REQUEST_CHANNEL from the client.
    let mut server = Connection::server(Config::default(), now);
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
    server.handle_frame(now, bytes(setup));
    server.handle_frame(
        now,
        bytes(RequestChannel {
            stream_id: 1,
            follows: false,
            complete: false,
            initial_n: 1,
            metadata: Some(route(&["svc"]).unwrap()),
            data: Bytes::new(),
        }),
    );
    server.send_request_n(1, MAX_REQUEST_N).unwrap();
    // Client side: a stream the broker forwards items onto.
    let mut client = Connection::client(Config::default(), SetupPayload::default(), now);
    let out = client
        .send_request(
            RequestKind::Channel {
                initial_n: 1,
                complete: false,
            },
            None,
            Bytes::new(),
        )
        .unwrap();
    client.handle_frame(
        now,
        bytes(RequestN {
            stream_id: out,
            n: MAX_REQUEST_N,
        }),
    );
    while server.poll_event().is_some() {}
    while server.poll_transmit().is_some() {}
    while client.poll_event().is_some() {}
    while client.poll_transmit().is_some() {}

    let item = bytes(Payload {
        stream_id: 1,
        follows: false,
        complete: false,
        next: true,
        metadata: None,
        data: Bytes::from(vec![5; 64]),
    });
    let round = |server: &mut Connection, client: &mut Connection| {
        server.handle_frame(now, item.clone());
        let Some(Event::Payload { frame, .. }) = server.poll_event() else {
            panic!("no payload")
        };
        client.forward(out, &frame).unwrap();
        let sent: OutFrame = client.poll_transmit().unwrap();
        assert_eq!(sent.len(), item.len());
    };
    for _ in 0..4 {
        round(&mut server, &mut client);
    }
    let (count, ()) = allocations(|| {
        for _ in 0..1000 {
            round(&mut server, &mut client);
        }
    });
    assert_eq!(count, 0, "allocations per received and forwarded PAYLOAD");
}
