//! Keepalive and lifetime: KEEPALIVE frames out and in, the peer's max
//! lifetime, and time spent not reading the peer.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Connection, Event, Role, State};
use crate::error::{ConnectionError, ErrorCode};
use crate::frame::{FrameView, Keepalive};
use crate::out::OutFrame;

/// When the peer was last heard and how long it may stay silent, and when
/// this side sends its KEEPALIVEs.
#[derive(Debug)]
pub(super) struct Lifetime {
    /// How long the peer may stay silent (a server: until SETUP, the setup
    /// timeout; then what the client asked for, clamped).
    pub(super) max: Duration,
    pub(super) keepalive_interval: Duration,
    pub(super) last_received: Instant,
    /// Client: its next KEEPALIVE.
    pub(super) next_keepalive: Option<Instant>,
    /// Since when the transport has not been reading the peer's frames:
    /// that time is not the peer's silence.
    pub(super) reading_paused_since: Option<Instant>,
    /// Server: when to tell a peer that is not being read that this side
    /// is alive (it cannot see that peer's KEEPALIVEs to answer them).
    pub(super) next_liveness: Option<Instant>,
}

impl Lifetime {
    pub(super) fn new(max: Duration, keepalive_interval: Duration, now: Instant) -> Self {
        Self {
            max,
            keepalive_interval,
            last_received: now,
            next_keepalive: None,
            reading_paused_since: None,
            next_liveness: None,
        }
    }
}

impl Connection {
    /// The transport stops reading the peer's frames (to hold it back) or
    /// starts again. Time spent not reading is not the peer's silence: the
    /// max lifetime does not run out meanwhile, and a server tells the
    /// peer it is alive every keepalive interval, since the peer's own
    /// KEEPALIVEs wait unread.
    pub fn set_reading(&mut self, now: Instant, reading: bool) {
        match (reading, self.lifetime.reading_paused_since) {
            (false, None) => {
                self.lifetime.reading_paused_since = Some(now);
                if self.role == Role::Server {
                    self.lifetime.next_liveness = Some(now + self.lifetime.keepalive_interval);
                }
            }
            (true, Some(since)) => {
                // The peer's silence resumes where the pause found it.
                let silent_before = since.saturating_duration_since(self.lifetime.last_received);
                self.lifetime.last_received = now
                    .checked_sub(silent_before)
                    .unwrap_or(self.lifetime.last_received);
                self.lifetime.reading_paused_since = None;
                self.lifetime.next_liveness = None;
            }
            _ => {}
        }
    }

    /// Whether the transport is told to read (see [`Connection::set_reading`]).
    pub fn is_reading(&self) -> bool {
        self.lifetime.reading_paused_since.is_none()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let lifetime = self.lifetime.last_received + self.lifetime.max;
        // The peer cannot be heard while it is not read: no lifetime then.
        let peer_lifetime = Some(lifetime).filter(|_| self.lifetime.reading_paused_since.is_none());
        match self.state {
            State::AwaitingSetup | State::ResumeOffered | State::AwaitingResumeOk => Some(lifetime),
            State::Established | State::SetupSent => [
                peer_lifetime,
                self.lifetime.next_liveness,
                self.linger_deadline(),
                self.lifetime.next_keepalive,
                self.leases.next_expiry(),
            ]
            .into_iter()
            .flatten()
            .min(),
            State::Disconnected | State::Closed => None,
        }
    }

    /// Time has passed: send due KEEPALIVEs, close a connection whose peer
    /// has been silent past the max lifetime (or never sent SETUP).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        match self.state {
            State::AwaitingSetup | State::ResumeOffered => {
                if now >= self.lifetime.last_received + self.lifetime.max {
                    self.fail(
                        ErrorCode::INVALID_SETUP,
                        format!(
                            "no SETUP or RESUME within {} ms",
                            self.lifetime.max.as_millis()
                        ),
                    );
                }
            }
            State::Established | State::SetupSent | State::AwaitingResumeOk => {
                self.leases.expire(now);
                if self.linger_deadline().is_some_and(|t| now >= t) {
                    self.state = State::Closed;
                    self.events.push_back(Event::Closed(ConnectionError::local(
                        ErrorCode::CONNECTION_CLOSE,
                        "closed by this side (ERROR[CONNECTION_CLOSE] was sent)",
                    )));
                    return;
                }
                if self.lifetime.reading_paused_since.is_none()
                    && now >= self.lifetime.last_received + self.lifetime.max
                {
                    self.fail(
                        ErrorCode::CONNECTION_ERROR,
                        format!(
                            "no frame from the peer for {} ms (max lifetime)",
                            self.lifetime.max.as_millis()
                        ),
                    );
                    return;
                }
                // Telling a peer that is not read that this side is alive
                // asks for nothing back (no R); the client's own asks for
                // an echo.
                self.lifetime.next_liveness =
                    self.keepalive_if_due(self.lifetime.next_liveness, now, false);
                self.lifetime.next_keepalive =
                    self.keepalive_if_due(self.lifetime.next_keepalive, now, true);
            }
            State::Disconnected | State::Closed => {}
        }
    }

    /// Sends a KEEPALIVE (with R if `respond`) once `due` has come, on an
    /// established connection; returns when the next one is due.
    pub(super) fn keepalive_if_due(
        &mut self,
        due: Option<Instant>,
        now: Instant,
        respond: bool,
    ) -> Option<Instant> {
        match due {
            Some(t) if now >= t && self.is_established() => {
                let position = self.resume.as_ref().map_or(0, |r| r.received_position);
                let frame = Keepalive {
                    respond,
                    last_received_position: position,
                    data: Bytes::new(),
                };
                self.push_control(OutFrame::from_owned(frame));
                Some(now + self.lifetime.keepalive_interval)
            }
            other => other,
        }
    }

    pub(super) fn on_keepalive(&mut self, view: FrameView) {
        if view.stream_id() != 0 {
            return self.ignore();
        }
        let Ok(keepalive) = Keepalive::from_view(&view) else {
            return self.fail(ErrorCode::CONNECTION_ERROR, "malformed KEEPALIVE");
        };
        if let Some(r) = self.resume.as_mut() {
            r.acknowledge(keepalive.last_received_position);
        }
        if keepalive.respond {
            let position = self.resume.as_ref().map_or(0, |r| r.received_position);
            let echo = Keepalive {
                respond: false,
                last_received_position: position,
                // A copy: the echo must not pin the peer's receive buffer.
                data: Bytes::copy_from_slice(&keepalive.data),
            };
            self.push_control(OutFrame::from_owned(echo));
        }
    }
}
