//! Establishment: the client's SETUP, and a server's checks of the first
//! frame (SETUP or RESUME, version, keepalive and lifetime values).

use std::time::{Duration, Instant};

use super::resume::ResumeState;
use super::{Config, Connection, Event, Role, SetupPayload, State, ms};
use crate::error::{ConnectionError, ErrorCode};
use crate::frame::{FrameType, FrameView, MAX_U24, Setup, VERSION};
use crate::out::OutFrame;

impl Connection {
    /// A client connection; its SETUP is queued at once.
    ///
    /// "Immediately upon successful connection, the client MUST send either a
    /// SETUP or RESUME frame with Stream ID of 0."
    pub fn client(config: Config, setup: SetupPayload, now: Instant) -> Self {
        let mut conn = Self::new(Role::Client, config, now);
        let resume_token = conn
            .config
            .client
            .resume_token
            .clone()
            .filter(|_| conn.config.resume_buffer > 0);
        let frame = Setup {
            version: VERSION,
            keepalive_interval: ms(conn.config.client.keepalive_interval),
            max_lifetime: ms(conn.config.client.max_lifetime),
            resume_token: resume_token.clone(),
            lease: conn.config.client.lease,
            metadata_mime: conn.config.client.metadata_mime.clone(),
            data_mime: conn.config.client.data_mime.clone(),
            metadata: setup.metadata,
            data: setup.data,
        };
        conn.leases.enabled = conn.config.client.lease;
        conn.resume = resume_token.map(|t| ResumeState::new(t, conn.config.resume_buffer));
        let frame = crate::frame::Frame::from(frame);
        if frame.encoded_len() > MAX_U24 {
            conn.state = State::Closed;
            conn.events.push_back(Event::Closed(ConnectionError::local(
                ErrorCode::INVALID_SETUP,
                "the SETUP payload does not fit one frame (16 MiB)",
            )));
            return conn;
        }
        conn.state = State::SetupSent;
        conn.lifetime.next_keepalive = Some(now + conn.lifetime.keepalive_interval);
        conn.push_control(OutFrame::from_owned(frame));
        conn
    }

    /// A server connection, waiting for SETUP or RESUME.
    pub fn server(config: Config, now: Instant) -> Self {
        Self::new(Role::Server, config, now)
    }

    pub(super) fn on_first_frame(&mut self, view: FrameView) {
        // "Any other frame received that is NOT a SETUP|RESUME frame or a SETUP|RESUME frame with
        // a Stream ID > 0, MUST cause the server to send an ERROR[INVALID_SETUP] and close the connection."
        if view.stream_id() != 0
            || !matches!(view.frame_type(), FrameType::Setup | FrameType::Resume)
        {
            return self.fail(
                ErrorCode::INVALID_SETUP,
                format!(
                    "the first frame must be SETUP or RESUME on stream 0, not {} on stream {}",
                    view.frame_type(),
                    view.stream_id()
                ),
            );
        }
        if view.frame_type() == FrameType::Resume {
            return self.on_resume_offer(view);
        }
        let setup = match Setup::from_view(&view) {
            Ok(s) => s,
            Err(e) => return self.fail(ErrorCode::INVALID_SETUP, format!("malformed SETUP: {e}")),
        };
        if setup.version.major != VERSION.major || setup.version.minor != VERSION.minor {
            return self.fail(
                ErrorCode::UNSUPPORTED_SETUP,
                format!(
                    "protocol version {}.{} is not supported (this server speaks {}.{})",
                    setup.version.major, setup.version.minor, VERSION.major, VERSION.minor
                ),
            );
        }
        if setup.keepalive_interval == 0 || setup.max_lifetime == 0 {
            return self.fail(
                ErrorCode::INVALID_SETUP,
                "keepalive interval and max lifetime must be > 0",
            );
        }
        if let Some(token) = &setup.resume_token {
            // "A server that receives a SETUP frame that has (R)esume Enabled set, but does not support
            // resuming operation, must reject the SETUP with an ERROR[REJECTED_SETUP]."
            if self.config.resume_buffer == 0 {
                return self.fail(
                    ErrorCode::REJECTED_SETUP,
                    "resume is not supported by this server",
                );
            }
            self.resume = Some(ResumeState::new(token.clone(), self.config.resume_buffer));
        }
        self.leases.enabled = setup.lease;
        let (min, max) = self.config.server.peer_lifetime;
        self.lifetime.max = Duration::from_millis(u64::from(setup.max_lifetime))
            .max(min)
            .min(max);
        self.lifetime.keepalive_interval =
            Duration::from_millis(u64::from(setup.keepalive_interval));
        self.state = State::Established;
        self.events.push_back(Event::Setup(Box::new(setup)));
    }

    /// Server: refuses the client's SETUP (after [`Event::Setup`]) with
    /// REJECTED_SETUP, INVALID_SETUP or UNSUPPORTED_SETUP, and closes.
    pub fn reject_setup(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.refuse_establishment(code, message.into());
    }

    /// Nothing the connection did after the SETUP or RESUME counts: queued
    /// frames (a KEEPALIVE echo, answers to early requests) and events are
    /// dropped, and only the ERROR goes out.
    pub(super) fn refuse_establishment(&mut self, code: ErrorCode, message: String) {
        if self.state == State::Closed {
            return;
        }
        self.events.clear();
        self.clear_out();
        self.streams.clear();
        self.inbound_streams = 0;
        self.reassembly_bytes = 0;
        self.fail(code, message);
    }
}
