//! Forwarding through a relay, the way the broker uses the state machine:
//! requester A <-> [server side SA | relay | client side CB] <-> responder B.
//! The relay passes every frame on with only its stream id replaced
//! (`forward_request` / `forward`); A and B reassemble, the relay does not.

mod common;

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use common::{bytes, drain_events};
use rsocket_proto::ErrorCode;
use rsocket_proto::conn::{Config, Connection, Event, RequestKind, SetupPayload};
use rsocket_proto::frame::{Cancel, Frame, FrameView, Payload};

struct Relay {
    now: Instant,
    a: Connection,
    sa: Connection,
    cb: Connection,
    b: Connection,
    /// SA stream id -> CB stream id, and back.
    down: HashMap<u32, u32>,
    up: HashMap<u32, u32>,
    a_events: Vec<Event>,
    b_events: Vec<Event>,
}

fn wire(from: &mut Connection, to: &mut Connection, now: Instant) -> bool {
    let mut moved = false;
    while let Some(f) = from.poll_transmit() {
        to.handle_frame(now, f.to_bytes());
        moved = true;
    }
    moved
}

impl Relay {
    fn new(fragment_size: usize) -> Self {
        let now = Instant::now();
        let ends = Config {
            fragment_size,
            reassemble: true,
            ..Config::default()
        };
        let middle = Config {
            fragment_size,
            ..Config::default()
        };
        let mut r = Self {
            now,
            a: Connection::client(ends.clone(), SetupPayload::default(), now),
            sa: Connection::server(middle.clone(), now),
            cb: Connection::client(middle, SetupPayload::default(), now),
            b: Connection::server(ends, now),
            down: HashMap::new(),
            up: HashMap::new(),
            a_events: Vec::new(),
            b_events: Vec::new(),
        };
        r.drive();
        r.a_events.clear();
        r.b_events.clear();
        r
    }

    fn relay_events(&mut self) -> bool {
        let mut moved = false;
        while let Some(e) = self.sa.poll_event() {
            moved = true;
            match e {
                Event::Request {
                    stream_id, frame, ..
                } => {
                    let id = self.cb.forward_request(&frame).unwrap();
                    self.down.insert(stream_id, id);
                    self.up.insert(id, stream_id);
                }
                Event::Fragment {
                    stream_id, frame, ..
                }
                | Event::Payload {
                    stream_id, frame, ..
                } => self.cb.forward(self.down[&stream_id], &frame).unwrap(),
                Event::RequestN { stream_id, n } => {
                    let f = bytes(rsocket_proto::frame::RequestN { stream_id, n });
                    self.cb
                        .forward(self.down[&stream_id], FrameView::parse(f).unwrap())
                        .unwrap()
                }
                Event::Cancel { stream_id, .. } => {
                    self.cb.send_cancel(self.down[&stream_id]).unwrap()
                }
                Event::Error {
                    stream_id,
                    code,
                    data,
                } => self
                    .cb
                    .send_error(self.down[&stream_id], code, data)
                    .unwrap(),
                Event::Setup(_) => {}
                other => panic!("relay SA: {other:?}"),
            }
        }
        while let Some(e) = self.cb.poll_event() {
            moved = true;
            match e {
                Event::Fragment {
                    stream_id, frame, ..
                }
                | Event::Payload {
                    stream_id, frame, ..
                } => self.sa.forward(self.up[&stream_id], &frame).unwrap(),
                Event::RequestN { stream_id, n } => {
                    let f = bytes(rsocket_proto::frame::RequestN { stream_id, n });
                    self.sa
                        .forward(self.up[&stream_id], FrameView::parse(f).unwrap())
                        .unwrap()
                }
                Event::Cancel { stream_id, .. } => {
                    let f = bytes(Cancel { stream_id });
                    self.sa
                        .forward(self.up[&stream_id], FrameView::parse(f).unwrap())
                        .unwrap()
                }
                Event::Error {
                    stream_id,
                    code,
                    data,
                } => self.sa.send_error(self.up[&stream_id], code, data).unwrap(),
                other => panic!("relay CB: {other:?}"),
            }
        }
        moved
    }

    fn drive(&mut self) {
        loop {
            let mut moved = wire(&mut self.a, &mut self.sa, self.now);
            moved |= wire(&mut self.sa, &mut self.a, self.now);
            moved |= wire(&mut self.cb, &mut self.b, self.now);
            moved |= wire(&mut self.b, &mut self.cb, self.now);
            moved |= self.relay_events();
            self.a_events.extend(drain_events(&mut self.a));
            self.b_events.extend(drain_events(&mut self.b));
            if !moved {
                break;
            }
        }
    }

    fn stream_counts(&self) -> [usize; 4] {
        [
            self.a.stream_count(),
            self.sa.stream_count(),
            self.cb.stream_count(),
            self.b.stream_count(),
        ]
    }
}

fn items(events: &[Event]) -> Vec<Bytes> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Request { frame, .. } | Event::Payload { frame, .. }
                if frame.next() || frame.frame_type() != rsocket_proto::FrameType::Payload =>
            {
                Some(frame.data())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn all_four_models_through_the_relay_with_fragments() {
    let mut r = Relay::new(64);
    let big = |b: u8| Bytes::from(vec![b; 300]);

    let rr =
        r.a.send_request(
            RequestKind::RequestResponse,
            Some(Bytes::from(vec![b'm'; 100])),
            big(1),
        )
        .unwrap();
    r.a.send_request(RequestKind::FireAndForget, None, big(2))
        .unwrap();
    let st =
        r.a.send_request(RequestKind::Stream { initial_n: 2 }, None, big(3))
            .unwrap();
    let ch =
        r.a.send_request(
            RequestKind::Channel {
                initial_n: 1,
                complete: false,
            },
            None,
            big(4),
        )
        .unwrap();
    r.drive();
    let got = items(&r.b_events);
    assert_eq!(
        got,
        [big(1), big(2), big(3), big(4)],
        "B saw each whole request"
    );
    let b_ids: Vec<(u32, rsocket_proto::Interaction)> = r
        .b_events
        .iter()
        .filter_map(|e| match e {
            Event::Request {
                stream_id,
                interaction,
                ..
            } => Some((*stream_id, *interaction)),
            _ => None,
        })
        .collect();
    r.b_events.clear();
    let b_rr = b_ids[0].0;
    let b_st = b_ids[2].0;
    let b_ch = b_ids[3].0;

    r.b.send_payload(b_rr, Some(Bytes::from(vec![b'r'; 90])), big(5), true, true)
        .unwrap();
    r.b.send_payload(b_st, None, big(6), true, false).unwrap();
    r.b.send_payload(b_st, None, big(7), true, false).unwrap();
    assert_eq!(
        r.b.send_payload(b_st, None, big(8), true, false),
        Err(rsocket_proto::SendError::NoCredit(b_st))
    );
    r.b.send_request_n(b_ch, 2).unwrap();
    r.b.send_payload(b_ch, None, big(9), true, true).unwrap();
    r.drive();
    assert_eq!(items(&r.a_events), [big(5), big(6), big(7), big(9)]);
    let rr_md = r.a_events.iter().find_map(|e| match e {
        Event::Payload {
            stream_id, frame, ..
        } if *stream_id == rr => frame.metadata(),
        _ => None,
    });
    assert_eq!(rr_md, Some(Bytes::from(vec![b'r'; 90])));

    // The stream's credit arrives end to end; the channel's requester finishes.
    r.a.send_request_n(st, 1).unwrap();
    r.a.send_payload(ch, None, big(10), true, false).unwrap();
    r.a.send_payload(ch, None, big(11), true, true).unwrap();
    r.drive();
    r.b.send_payload(b_st, None, big(8), true, true).unwrap();
    r.drive();
    assert_eq!(
        r.stream_counts(),
        [0, 0, 0, 0],
        "every stream ended on all four connections"
    );
}

#[test]
fn responder_aborting_a_fragmented_payload_ends_the_stream_everywhere() {
    let mut r = Relay::new(0);
    let id =
        r.a.send_request(RequestKind::Stream { initial_n: 5 }, None, Bytes::new())
            .unwrap();
    r.drive();
    let cb_id = r.down[&1];
    // B starts a fragmented item and gives up half-way.
    let first = Payload {
        stream_id: cb_id,
        follows: true,
        complete: false,
        next: true,
        metadata: None,
        data: Bytes::from_static(b"half"),
    };
    r.cb.handle_frame(r.now, bytes(first));
    r.cb.handle_frame(r.now, bytes(Cancel { stream_id: cb_id }));
    r.drive();
    assert!(
        r.a_events
            .iter()
            .any(|e| matches!(e, Event::Cancel { stream_id, ended: true } if *stream_id == id)),
        "{:?}",
        r.a_events
    );
    assert_eq!(
        r.a.stream_count() + r.sa.stream_count() + r.cb.stream_count(),
        0
    );
}

#[test]
fn channel_responder_can_cancel_only_the_requesters_half() {
    let mut r = Relay::new(0);
    let id =
        r.a.send_request(
            RequestKind::Channel {
                initial_n: 5,
                complete: false,
            },
            None,
            Bytes::new(),
        )
        .unwrap();
    r.drive();
    let Some(Event::Request {
        stream_id: b_id, ..
    }) = r.b_events.first().cloned()
    else {
        panic!()
    };
    r.b.send_cancel(b_id).unwrap();
    r.drive();
    assert!(
        r.a_events
            .iter()
            .any(|e| matches!(e, Event::Cancel { stream_id, ended: false } if *stream_id == id))
    );
    assert!(matches!(
        r.a.send_payload(id, None, Bytes::new(), true, false),
        Err(rsocket_proto::SendError::InvalidState { .. })
    ));
    r.b.send_payload(b_id, None, Bytes::from_static(b"still"), true, true)
        .unwrap();
    r.drive();
    assert_eq!(r.stream_counts(), [0, 0, 0, 0]);
}

/// A relay with one stream open, and a PAYLOAD carrying `data` that the
/// responder side (CB) received on it: the relay, the received bytes and
/// the frame's view.
fn payload_received_by_cb(data: Bytes) -> (Relay, Bytes, FrameView) {
    let mut r = Relay::new(0);
    r.a.send_request(RequestKind::Stream { initial_n: 1 }, None, Bytes::new())
        .unwrap();
    r.drive();
    let item = bytes(Payload {
        stream_id: r.down[&1],
        follows: false,
        complete: true,
        next: true,
        metadata: None,
        data,
    });
    r.cb.handle_frame(r.now, item.clone());
    let Some(Event::Payload { frame, .. }) = r.cb.poll_event() else {
        panic!("no PAYLOAD event")
    };
    (r, item, frame)
}

#[test]
fn forwarded_frames_are_not_copied() {
    let (mut r, item, frame) = payload_received_by_cb(Bytes::from(vec![7; 4096]));
    r.sa.forward(1, &frame).unwrap();
    let out = r.sa.poll_transmit().unwrap();
    let (_, body) = out.shared_parts();
    assert_eq!(out.head(), &[0, 0, 0, 1], "a new stream id in front");
    assert_eq!(
        body.as_ptr(),
        item[4..].as_ptr(),
        "the body is the received bytes, not a copy"
    );
}

#[test]
fn a_frame_forwarded_by_value_moves_its_buffer() {
    let (mut r, item, frame) = payload_received_by_cb(Bytes::from(vec![7; 64]));
    let received_body = item[4..].as_ptr();
    drop(item);
    // Only the view holds the received buffer now; forwarding it by value
    // hands that buffer to the outgoing frame.
    r.sa.forward(1, frame).unwrap();
    let out = r.sa.poll_transmit().unwrap();
    assert_eq!(out.head(), &[0, 0, 0, 1], "a new stream id in front");
    let (_, body) = out.shared_parts();
    assert_eq!(
        body.as_ptr(),
        received_body,
        "the received bytes, not a copy"
    );
    let mut body = body.clone();
    drop(out);
    // The body is the last reference to its buffer. Forwarded by reference,
    // the caller's view would still share it.
    assert!(body.is_unique(), "the forwarded body is the only reference");
    assert_eq!(&body.split_off(body.len() - 64)[..], &[7; 64][..]);
}

#[test]
fn forward_accepts_what_receive_accepts() {
    let mut r = Relay::new(0);
    r.a.send_request(RequestKind::RequestResponse, None, Bytes::new())
        .unwrap();
    r.a.send_request(RequestKind::RequestResponse, None, Bytes::new())
        .unwrap();
    r.drive();
    // A response without N or C, and an ERROR with a connection-level code on a stream.
    let (c1, c2) = (r.down[&1], r.down[&3]);
    r.cb.handle_frame(
        r.now,
        bytes(Payload {
            stream_id: c1,
            follows: false,
            complete: false,
            next: false,
            metadata: None,
            data: Bytes::new(),
        }),
    );
    let err = rsocket_proto::frame::ErrorFrame {
        stream_id: c2,
        code: ErrorCode::CONNECTION_ERROR,
        data: Bytes::new(),
    };
    r.cb.handle_frame(r.now, Frame::from(err).to_bytes());
    let events = drain_events(&mut r.cb);
    let Event::Payload { frame, .. } = &events[0] else {
        panic!()
    };
    r.sa.forward(1, frame).unwrap();
    let Event::Error { .. } = &events[1] else {
        panic!()
    };
    let view = FrameView::parse(bytes(rsocket_proto::frame::ErrorFrame {
        stream_id: c2,
        code: ErrorCode::CONNECTION_ERROR,
        data: Bytes::new(),
    }))
    .unwrap();
    r.sa.forward(3, &view).unwrap();
    assert_eq!(r.sa.stream_count(), 0);
}

/// A relay may grant the responder less than the requester asked for: the
/// forwarded REQUEST_STREAM carries the granted n (the rest of the frame
/// unchanged, its body not copied), and the relay's side of the stream
/// accepts exactly that many items until it grants more.
#[test]
fn a_forwarded_request_can_grant_less_than_was_asked() {
    let now = Instant::now();
    let mut cb = Connection::client(Config::default(), SetupPayload::default(), now);
    let mut b = Connection::server(Config::default(), now);
    wire(&mut cb, &mut b, now);
    drain_events(&mut b);
    let request = bytes(rsocket_proto::frame::RequestStream {
        stream_id: 7,
        follows: false,
        initial_n: 1_000_000,
        metadata: Some(Bytes::from_static(b"md")),
        data: Bytes::from(vec![5; 2048]),
    });
    let view = FrameView::parse(request.clone()).unwrap();
    let id = cb.forward_request_granting(view, Some(3)).unwrap();
    let out = cb.poll_transmit().unwrap();
    let (_, body) = out.shared_parts();
    assert_eq!(
        body.as_ptr(),
        request[10..].as_ptr(),
        "the body is not copied"
    );
    b.handle_frame(now, out.to_bytes());
    let Some(Event::Request { frame, .. }) = b.poll_event() else {
        panic!("no request at the responder")
    };
    assert_eq!(frame.request_n(), 3);
    assert_eq!(frame.stream_id(), id);
    assert_eq!(frame.metadata_slice(), Some(&b"md"[..]));
    assert_eq!(frame.data_slice(), &[5; 2048][..]);
    assert_eq!(cb.stream_info(id).unwrap().recv_credit.get(), 3);
    // Without a grant the request goes as it came.
    let view = FrameView::parse(request.clone()).unwrap();
    let id2 = cb.forward_request_granting(view, None).unwrap();
    assert_eq!(cb.stream_info(id2).unwrap().recv_credit.get(), 1_000_000);
    b.handle_frame(now, cb.poll_transmit().unwrap().to_bytes());
    let Some(Event::Request { frame, .. }) = b.poll_event() else {
        panic!("no request at the responder")
    };
    assert_eq!(frame.request_n(), 1_000_000);
}
