//! Helpers shared by the integration tests: an in-memory client/server pair
//! with simulated time, and small frame builders.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use rsocket_proto::conn::{Config, Connection, Event, SetupPayload};
use rsocket_proto::{Frame, FrameView};

/// Encodes a typed frame.
pub fn bytes(frame: impl Into<Frame>) -> Bytes {
    frame.into().to_bytes()
}

/// All frames queued on `conn`, as bytes.
pub fn drain_out(conn: &mut Connection) -> Vec<Bytes> {
    std::iter::from_fn(|| conn.poll_transmit())
        .map(|f| f.to_bytes())
        .collect()
}

/// All frames queued on `conn`, decoded.
pub fn drain_frames(conn: &mut Connection) -> Vec<Frame> {
    drain_out(conn)
        .into_iter()
        .map(|b| Frame::decode(b).unwrap())
        .collect()
}

/// All events queued on `conn`.
pub fn drain_events(conn: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| conn.poll_event()).collect()
}

/// A client and a server connection wired back to back in memory.
pub struct Pair {
    pub now: Instant,
    pub client: Connection,
    pub server: Connection,
    pub client_events: Vec<Event>,
    pub server_events: Vec<Event>,
}

impl Pair {
    pub fn new(client: Config, server: Config) -> Self {
        Self::with_setup(client, server, SetupPayload::default())
    }

    pub fn with_setup(client: Config, server: Config, setup: SetupPayload) -> Self {
        let now = Instant::now();
        let mut pair = Self {
            now,
            client: Connection::client(client, setup, now),
            server: Connection::server(server, now),
            client_events: Vec::new(),
            server_events: Vec::new(),
        };
        pair.drive();
        pair
    }

    /// Moves frames both ways until neither side has anything to send, and
    /// collects events.
    pub fn drive(&mut self) {
        loop {
            let mut moved = false;
            while let Some(f) = self.client.poll_transmit() {
                self.server.handle_frame(self.now, f.to_bytes());
                moved = true;
            }
            while let Some(f) = self.server.poll_transmit() {
                self.client.handle_frame(self.now, f.to_bytes());
                moved = true;
            }
            self.client_events
                .extend(std::iter::from_fn(|| self.client.poll_event()));
            self.server_events
                .extend(std::iter::from_fn(|| self.server.poll_event()));
            if !moved {
                break;
            }
        }
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
        self.drive();
    }

    pub fn take_client_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.client_events)
    }

    pub fn take_server_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.server_events)
    }
}

/// The frame of a Request/Payload/Fragment event.
pub fn frame_of(event: &Event) -> Option<&FrameView> {
    match event {
        Event::Request { frame, .. }
        | Event::Payload { frame, .. }
        | Event::Fragment { frame, .. } => Some(frame),
        _ => None,
    }
}
