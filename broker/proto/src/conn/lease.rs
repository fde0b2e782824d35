//! LEASE: the windows granted each way and the requests they allow.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Connection, Event, State, ms};
use crate::error::SendError;
use crate::frame::{FrameView, Lease, MAX_U24};
use crate::out::OutFrame;

#[derive(Clone, Copy, Debug)]
pub(super) struct LeaseWindow {
    expires: Instant,
    remaining: u32,
}

impl LeaseWindow {
    pub(super) fn take(lease: &mut Option<Self>, now: Instant) -> bool {
        match lease {
            Some(w) if w.remaining > 0 && now < w.expires => {
                w.remaining -= 1;
                true
            }
            _ => false,
        }
    }

    pub(super) fn available(lease: &Option<Self>, now: Instant) -> bool {
        matches!(lease, Some(w) if w.remaining > 0 && now < w.expires)
    }

    /// When the window runs out, if it still allows requests.
    fn expiry(lease: &Option<Self>) -> Option<Instant> {
        lease.filter(|l| l.remaining > 0).map(|l| l.expires)
    }
}

impl Connection {
    /// Whether LEASE semantics were negotiated.
    pub fn lease_enabled(&self) -> bool {
        self.lease_enabled
    }

    /// When the next lease that still allows requests runs out.
    pub(super) fn next_lease_expiry(&self) -> Option<Instant> {
        let peer = LeaseWindow::expiry(&self.peer_lease);
        let granted = LeaseWindow::expiry(&self.granted_lease);
        peer.into_iter().chain(granted).min()
    }

    /// "When a LEASE expires due to time, the value of the Number of
    /// Requests that a Requester may make is implicitly 0."
    pub(super) fn expire_leases(&mut self, now: Instant) {
        for lease in [&mut self.peer_lease, &mut self.granted_lease]
            .into_iter()
            .flatten()
        {
            if now >= lease.expires {
                lease.remaining = 0;
            }
        }
    }

    pub(super) fn on_lease(&mut self, view: FrameView) {
        if view.stream_id() != 0 || !self.lease_enabled {
            return self.ignore();
        }
        let lease = Lease::from_view(&view);
        self.peer_lease = Some(LeaseWindow {
            expires: self.now + Duration::from_millis(u64::from(lease.ttl)),
            remaining: lease.number_of_requests & crate::frame::MAX_REQUEST_N,
        });
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
        if !self.lease_enabled {
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
        self.granted_lease = Some(LeaseWindow {
            expires: now + Duration::from_millis(u64::from(lease.ttl)),
            remaining: lease.number_of_requests,
        });
        self.push_control(OutFrame::from_owned(lease));
        Ok(())
    }
}
