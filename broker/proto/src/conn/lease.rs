//! LEASE: the windows granted each way and the requests they allow.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Connection, Event, State, ms};
use crate::error::SendError;
use crate::frame::{FrameView, Lease, MAX_U24};
use crate::out::OutFrame;

/// A lease: requests left, until when.
#[derive(Clone, Copy, Debug)]
struct LeaseWindow {
    expires: Instant,
    remaining: u32,
}

impl LeaseWindow {
    fn new(now: Instant, ttl_ms: u32, requests: u32) -> Self {
        Self {
            expires: now + Duration::from_millis(u64::from(ttl_ms)),
            remaining: requests,
        }
    }

    fn take(lease: &mut Option<Self>, now: Instant) -> bool {
        match lease {
            Some(w) if w.remaining > 0 && now < w.expires => {
                w.remaining -= 1;
                true
            }
            _ => false,
        }
    }

    fn available(lease: &Option<Self>, now: Instant) -> bool {
        matches!(lease, Some(w) if w.remaining > 0 && now < w.expires)
    }

    /// When the window runs out, if it still allows requests.
    fn expiry(lease: &Option<Self>) -> Option<Instant> {
        lease.filter(|l| l.remaining > 0).map(|l| l.expires)
    }
}

/// The leases of a connection both ways, once SETUP asked for them.
#[derive(Debug, Default)]
pub(super) struct Leases {
    /// LEASE semantics were negotiated in SETUP.
    pub(super) enabled: bool,
    /// What the peer granted this side.
    peer: Option<LeaseWindow>,
    /// What this side granted the peer.
    granted: Option<LeaseWindow>,
}

impl Leases {
    /// Whether this side may send a request now.
    pub(super) fn may_request(&self, now: Instant) -> bool {
        !self.enabled || LeaseWindow::available(&self.peer, now)
    }

    /// This side sends a request: it uses one of the peer's lease.
    pub(super) fn requested(&mut self, now: Instant) {
        if self.enabled {
            LeaseWindow::take(&mut self.peer, now);
        }
    }

    /// The peer sends a request: whether the lease granted allows it (one
    /// is used).
    pub(super) fn admit(&mut self, now: Instant) -> bool {
        !self.enabled || LeaseWindow::take(&mut self.granted, now)
    }

    /// When the next lease that still allows requests runs out.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        let peer = LeaseWindow::expiry(&self.peer);
        let granted = LeaseWindow::expiry(&self.granted);
        peer.into_iter().chain(granted).min()
    }

    /// "When a LEASE expires due to time, the value of the Number of
    /// Requests that a Requester may make is implicitly 0."
    pub(super) fn expire(&mut self, now: Instant) {
        for lease in [&mut self.peer, &mut self.granted].into_iter().flatten() {
            if now >= lease.expires {
                lease.remaining = 0;
            }
        }
    }
}

impl Connection {
    /// Whether LEASE semantics were negotiated.
    pub fn lease_enabled(&self) -> bool {
        self.leases.enabled
    }

    pub(super) fn on_lease(&mut self, view: FrameView) {
        if view.stream_id() != 0 || !self.leases.enabled {
            return self.ignore();
        }
        let lease = Lease::from_view(&view);
        let requests = lease.number_of_requests & crate::frame::MAX_REQUEST_N;
        self.leases.peer = Some(LeaseWindow::new(self.now, lease.ttl, requests));
        self.events.push_back(Event::Lease(lease));
    }

    /// Grants the peer a lease of `number_of_requests` requests for `ttl`.
    /// Only valid when LEASE was negotiated in SETUP.
    pub fn send_lease(
        &mut self,
        now: Instant,
        ttl: Duration,
        number_of_requests: u32,
        metadata: Option<Bytes>,
    ) -> Result<(), SendError> {
        if !self.is_established() {
            return Err(if self.state == State::Closed {
                SendError::Closed
            } else {
                SendError::NotEstablished
            });
        }
        if metadata
            .as_ref()
            .is_some_and(|m| m.len() > MAX_U24 - crate::frame::HEADER_LEN - 8)
        {
            return Err(SendError::InvalidArgument(
                "metadata does not fit one frame",
            ));
        }
        if !self.leases.enabled {
            return Err(SendError::InvalidArgument(
                "LEASE was not negotiated in SETUP",
            ));
        }
        self.now = now;
        let lease = Lease {
            ttl: ms(ttl),
            number_of_requests,
            metadata,
        };
        self.leases.granted = Some(LeaseWindow::new(now, lease.ttl, lease.number_of_requests));
        self.push_control(OutFrame::from_owned(lease));
        Ok(())
    }
}
