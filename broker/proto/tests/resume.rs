//! Resumption: implied positions, the bounded buffer of sent frames,
//! RESUME / RESUME_OK / REJECTED_RESUME.

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::{Pair, drain_events, drain_frames};
use rsocket_proto::ErrorCode;
use rsocket_proto::conn::{ClientSettings, Config, Connection, Event, RequestKind};
use rsocket_proto::frame::{Frame, FrameType, FrameView};

fn configs(buffer: usize) -> (Config, Config) {
    (
        Config {
            resume_buffer: buffer,
            client: ClientSettings {
                resume_token: Some(Bytes::from_static(b"session-1")),
                ..ClientSettings::default()
            },
            ..Config::default()
        },
        Config {
            resume_buffer: buffer,
            ..Config::default()
        },
    )
}

fn items(events: &[Event]) -> Vec<Bytes> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Payload { frame, .. } => Some(frame.data()),
            _ => None,
        })
        .collect()
}

/// Offers the client's RESUME to a fresh server connection and returns the parsed offer.
fn offer(
    client: &mut Connection,
    server_config: &Config,
    now: Instant,
) -> (Connection, rsocket_proto::frame::Resume) {
    client.resume(now).unwrap();
    let resume_bytes = client.poll_transmit().unwrap().to_bytes();
    assert_eq!(
        FrameView::parse(resume_bytes.clone()).unwrap().frame_type(),
        FrameType::Resume
    );
    assert!(
        client.poll_transmit().is_none(),
        "nothing but RESUME before RESUME_OK"
    );
    let mut fresh = Connection::server(server_config.clone(), now);
    fresh.handle_frame(now, resume_bytes);
    let events = drain_events(&mut fresh);
    let [Event::ResumeRequested(resume)] = &events[..] else {
        panic!("{events:?}")
    };
    (fresh, (**resume).clone())
}

#[test]
fn resume_after_transport_loss_loses_nothing() {
    let (client_config, server_config) = configs(1 << 20);
    let mut pair = Pair::new(client_config, server_config.clone());
    let id = pair
        .client
        .send_request(RequestKind::Stream { initial_n: 100 }, None, Bytes::new())
        .unwrap();
    pair.drive();
    for i in 0..5u8 {
        pair.server
            .send_payload(id, None, Bytes::from(vec![i]), true, false)
            .unwrap();
    }
    pair.drive();
    assert_eq!(items(&pair.take_client_events()).len(), 5);

    // Five more items are queued but the transport dies before they are written.
    for i in 5..10u8 {
        pair.server
            .send_payload(id, None, Bytes::from(vec![i]), true, false)
            .unwrap();
    }
    assert!(pair.server.transport_lost());
    assert!(pair.client.transport_lost());
    // The client keeps working while disconnected; its frames wait in the buffer.
    pair.client.send_request_n(id, 50).unwrap();
    assert!(pair.client.poll_transmit().is_none());

    let (_fresh, resume) = offer(&mut pair.client, &server_config, pair.now);
    pair.server.resume_session(&resume, pair.now).unwrap();
    pair.drive();

    let client_events = pair.take_client_events();
    assert!(
        matches!(client_events.first(), Some(Event::Resumed)),
        "{client_events:?}"
    );
    let got: Vec<u8> = items(&client_events).iter().map(|b| b[0]).collect();
    assert_eq!(
        got,
        (5..10).collect::<Vec<_>>(),
        "exactly the lost items, once, in order"
    );
    assert!(
        pair.take_server_events()
            .iter()
            .any(|e| matches!(e, Event::RequestN { n: 50, .. }))
    );

    // The stream goes on normally afterwards.
    pair.server
        .send_payload(id, None, Bytes::from_static(b"end"), true, true)
        .unwrap();
    pair.drive();
    assert_eq!(pair.client.stream_count() + pair.server.stream_count(), 0);
}

#[test]
fn unknown_token_is_rejected() {
    let (client_config, server_config) = configs(1 << 20);
    let mut pair = Pair::new(client_config, server_config.clone());
    pair.client.transport_lost();
    let (mut fresh, mut resume) = offer(&mut pair.client, &server_config, pair.now);
    resume.token = Bytes::from_static(b"someone-else");
    let err = pair.server.resume_session(&resume, pair.now).unwrap_err();
    assert_eq!(err.code, ErrorCode::REJECTED_RESUME);
    fresh.reject_resume(err.message.clone());
    let frames = drain_frames(&mut fresh);
    assert!(matches!(&frames[..], [Frame::Error(e)] if e.code == ErrorCode::REJECTED_RESUME));
    pair.client.handle_frame(
        pair.now,
        Frame::from(match &frames[0] {
            Frame::Error(e) => e.clone(),
            _ => unreachable!(),
        })
        .to_bytes(),
    );
    assert!(pair.client.is_closed());
    assert!(
        matches!(drain_events(&mut pair.client).last(), Some(Event::Closed(e)) if e.code == ErrorCode::REJECTED_RESUME)
    );
}

#[test]
fn frames_past_the_buffer_cannot_be_resumed() {
    let (client_config, server_config) = configs(64);
    let mut pair = Pair::new(client_config, server_config.clone());
    let id = pair
        .client
        .send_request(RequestKind::Stream { initial_n: 100 }, None, Bytes::new())
        .unwrap();
    pair.drive();
    for _ in 0..20 {
        pair.server
            .send_payload(id, None, Bytes::from_static(b"0123456789"), true, false)
            .unwrap();
    }
    // None of those reached the client; a 64-byte buffer kept only the last few.
    pair.server.transport_lost();
    pair.client.transport_lost();
    let (_fresh, resume) = offer(&mut pair.client, &server_config, pair.now);
    let err = pair.server.resume_session(&resume, pair.now).unwrap_err();
    assert_eq!(err.code, ErrorCode::REJECTED_RESUME);
    assert!(
        err.message.contains("no longer buffered"),
        "{}",
        err.message
    );
}

#[test]
fn keepalive_carries_the_received_position() {
    let (client_config, server_config) = configs(1 << 20);
    let mut pair = Pair::new(client_config, server_config);
    let id = pair
        .client
        .send_request(RequestKind::Stream { initial_n: 10 }, None, Bytes::new())
        .unwrap();
    pair.drive();
    pair.server
        .send_payload(id, None, Bytes::from_static(b"abc"), true, false)
        .unwrap();
    pair.drive();
    pair.client.handle_frame(
        pair.now,
        Frame::from(rsocket_proto::frame::Keepalive {
            respond: true,
            last_received_position: 0,
            data: Bytes::new(),
        })
        .to_bytes(),
    );
    let frames = drain_frames(&mut pair.client);
    // 9 bytes of PAYLOAD ("abc" after a 6-byte header) were received by the client.
    assert!(
        matches!(&frames[..], [Frame::Keepalive(k)] if !k.respond && k.last_received_position == 9),
        "{frames:?}"
    );
}
