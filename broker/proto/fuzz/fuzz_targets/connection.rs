//! Arbitrary bytes as a TCP byte stream into a connection: the codec cuts
//! frames, the state machine handles them, and the application side answers
//! requests using more of the input. Nothing panics, everything the
//! connection sends is a valid frame, and ended streams are gone.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rsocket_proto::codec::ReadBuf;
use rsocket_proto::conn::{Config, Connection, Event, RequestKind, SetupPayload};
use rsocket_proto::frame::{Frame, FrameView, Setup, VERSION};
use rsocket_proto::ErrorCode;

fn setup_frame(lease: bool) -> Bytes {
    Frame::from(Setup {
        version: VERSION,
        keepalive_interval: 100,
        max_lifetime: 1000,
        resume_token: None,
        lease,
        metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
        data_mime: Bytes::from_static(b"application/json"),
        metadata: None,
        data: Bytes::new(),
    })
    .to_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((&choices_len, rest)) = rest.split_first() else { return };
    let (choices, stream) = rest.split_at((choices_len as usize).min(rest.len()));
    let mut choices = choices.iter().copied().cycle();

    let config = Config {
        reassemble: mode & 1 != 0,
        fragment_size: if mode & 2 != 0 { 64 } else { 0 },
        max_reassembled_size: 512,
        max_inbound_streams: 16,
        resume_buffer: if mode & 4 != 0 { 256 } else { 0 },
        ..Config::default()
    };
    let mut now = Instant::now();
    let mut conn = if mode & 8 != 0 {
        Connection::client(config, SetupPayload::default(), now)
    } else {
        let mut c = Connection::server(config, now);
        if mode & 16 != 0 {
            c.handle_frame(now, setup_frame(mode & 32 != 0));
        }
        c
    };
    // The receive buffer the transports use, cutting frames as reads arrive.
    let mut buf = ReadBuf::new(4096);
    let mut frames = Vec::new();
    for chunk in stream.chunks(1 + (mode as usize >> 6) * 7) {
        let fed = buf.feed(chunk, &mut frames);
        for frame in frames.drain(..) {
            conn.handle_frame(now, frame);
            while let Some(event) = conn.poll_event() {
                let pick = choices.next().unwrap_or(0);
                match event {
                    Event::Request { stream_id, ended, .. } | Event::Payload { stream_id, ended, .. } | Event::Fragment { stream_id, ended, .. } => {
                        if ended {
                            assert!(!conn.is_stream_open(stream_id));
                            continue;
                        }
                        let _ = match pick % 5 {
                            0 => conn.send_payload(stream_id, None, Bytes::from_static(b"r"), true, pick & 8 != 0),
                            1 => conn.send_request_n(stream_id, u32::from(pick)),
                            2 => conn.send_cancel(stream_id),
                            3 => conn.send_error(stream_id, ErrorCode::APPLICATION_ERROR, Bytes::new()),
                            _ => Ok(()),
                        };
                    }
                    Event::Cancel { stream_id, ended: true } | Event::Error { stream_id, .. } | Event::StreamError { stream_id, .. } => {
                        assert!(!conn.is_stream_open(stream_id));
                    }
                    Event::Setup(s) if s.lease => {
                        let _ = conn.send_lease(now, Duration::from_millis(50), u32::from(pick), None);
                    }
                    _ => {}
                }
            }
            if choices.next().unwrap_or(0) % 7 == 0 {
                let kind = match choices.next().unwrap_or(0) % 4 {
                    0 => RequestKind::RequestResponse,
                    1 => RequestKind::FireAndForget,
                    2 => RequestKind::Stream { initial_n: 3 },
                    _ => RequestKind::Channel { initial_n: 3, complete: false },
                };
                let _ = conn.send_request(kind, Some(Bytes::from_static(b"m")), Bytes::from(vec![1; 100]));
            }
            while let Some(out) = conn.poll_transmit() {
                FrameView::parse(out.to_bytes()).expect("every frame sent is valid");
            }
        }
        if fed.is_err() {
            conn.close(ErrorCode::CONNECTION_ERROR, "bad frame length");
        }
        now += Duration::from_millis(u64::from(choices.next().unwrap_or(0)));
        conn.handle_timeout(now);
        while conn.poll_event().is_some() {}
        while conn.poll_transmit().is_some() {}
    }
});
