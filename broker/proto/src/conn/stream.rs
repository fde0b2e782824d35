//! Per-stream state of the four interaction models, seen from one side of
//! the connection: which directions may still carry items, the REQUEST_N
//! credit each way, and fragmented messages in progress.

use crate::fragment::Reassembly;
use crate::frame::{FrameType, MAX_REQUEST_N};

/// The interaction model of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Interaction {
    /// REQUEST_RESPONSE
    RequestResponse,
    /// REQUEST_FNF
    FireAndForget,
    /// REQUEST_STREAM
    Stream,
    /// REQUEST_CHANNEL
    Channel,
}

impl Interaction {
    /// The interaction a request frame of type `t` opens; `None` for frames
    /// that are not requests.
    pub fn of_request(t: FrameType) -> Option<Self> {
        Some(match t {
            FrameType::RequestResponse => Self::RequestResponse,
            FrameType::RequestFnf => Self::FireAndForget,
            FrameType::RequestStream => Self::Stream,
            FrameType::RequestChannel => Self::Channel,
            _ => return None,
        })
    }
}

/// REQUEST_N credit. Credits add up and saturate at 2^31-1, which then
/// means "unbounded" and is never decremented (2^31-1 is what a Reactive
/// Streams `request(Long.MAX_VALUE)` becomes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit(u32);

impl Credit {
    pub(crate) const ZERO: Self = Self(0);

    pub(crate) fn new(n: u32) -> Self {
        Self(n.min(MAX_REQUEST_N))
    }

    /// The credit left (2^31-1 for unbounded).
    pub fn get(self) -> u32 {
        self.0
    }

    /// Whether the credit is unbounded.
    pub fn is_unbounded(self) -> bool {
        self.0 == MAX_REQUEST_N
    }

    pub(crate) fn add(&mut self, n: u32) {
        self.0 = self.0.saturating_add(n).min(MAX_REQUEST_N);
    }

    /// Takes one credit; false when there is none.
    pub(crate) fn take(&mut self) -> bool {
        match self.0 {
            0 => false,
            MAX_REQUEST_N => true,
            _ => {
                self.0 -= 1;
                true
            }
        }
    }
}

/// Whether a fragmented message in progress is the request itself or a PAYLOAD item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MessageRole {
    Request,
    Item,
}

/// A fragmented message arriving from the peer.
#[derive(Debug)]
pub(crate) struct InboundPartial {
    pub(crate) role: MessageRole,
    pub(crate) complete: bool,
    /// Metadata and data received so far.
    pub(crate) len: usize,
    /// Some fragment carried data (metadata may not follow).
    pub(crate) data_started: bool,
    /// Present when the connection delivers whole messages.
    pub(crate) reassembly: Option<Reassembly>,
}

impl InboundPartial {
    /// Bytes this message holds in memory (none when passing fragments through).
    pub(crate) fn buffered(&self) -> usize {
        if self.reassembly.is_some() {
            self.len
        } else {
            0
        }
    }
}

/// A fragmented message this side is sending.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OutboundPartial {
    pub(crate) role: MessageRole,
    pub(crate) complete: bool,
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) interaction: Interaction,
    pub(crate) local_requester: bool,
    /// The peer may still send items (or the rest of its request).
    pub(crate) inbound_open: bool,
    /// This side may still send items (or the rest of its request).
    pub(crate) outbound_open: bool,
    /// Items this side may send.
    pub(crate) send_credit: Credit,
    /// Items the peer may send.
    pub(crate) recv_credit: Credit,
    pub(crate) inbound_partial: Option<InboundPartial>,
    pub(crate) outbound_partial: Option<OutboundPartial>,
}

impl Stream {
    /// A stream this side requested. `initial_n` is the request's initial
    /// request n (stream, channel).
    pub(crate) fn requested(interaction: Interaction, initial_n: u32) -> Self {
        let recv_credit = match interaction {
            Interaction::RequestResponse => Credit::new(1),
            Interaction::FireAndForget => Credit::ZERO,
            Interaction::Stream | Interaction::Channel => Credit::new(initial_n),
        };
        Self {
            interaction,
            local_requester: true,
            inbound_open: interaction != Interaction::FireAndForget,
            outbound_open: true,
            send_credit: Credit::ZERO,
            recv_credit,
            inbound_partial: None,
            outbound_partial: None,
        }
    }

    /// A stream the peer requested.
    pub(crate) fn accepted(interaction: Interaction, initial_n: u32) -> Self {
        let send_credit = match interaction {
            Interaction::RequestResponse => Credit::new(1),
            Interaction::FireAndForget => Credit::ZERO,
            Interaction::Stream | Interaction::Channel => Credit::new(initial_n),
        };
        Self {
            interaction,
            local_requester: false,
            inbound_open: true,
            outbound_open: interaction != Interaction::FireAndForget,
            send_credit,
            recv_credit: Credit::ZERO,
            inbound_partial: None,
            outbound_partial: None,
        }
    }

    /// Whether the stream has ended on this side.
    pub(crate) fn is_done(&self) -> bool {
        !self.inbound_open
            && !self.outbound_open
            && self.inbound_partial.is_none()
            && self.outbound_partial.is_none()
    }

    /// The requester's whole request has been sent (requester) or received (responder).
    pub(crate) fn request_done(&mut self, complete: bool) {
        let requester_keeps_sending = self.interaction == Interaction::Channel && !complete;
        if self.local_requester {
            self.outbound_open = requester_keeps_sending;
        } else {
            self.inbound_open = requester_keeps_sending;
        }
    }

    /// A whole item arrived from the peer.
    pub(crate) fn item_received(&mut self, complete: bool) {
        // "If a PAYLOAD for a REQUEST_RESPONSE is received that does not have
        // a COMPLETE flag set, the implementation MUST assume it is set."
        if complete || self.interaction == Interaction::RequestResponse {
            self.inbound_open = false;
        }
    }

    /// A whole item was sent by this side.
    pub(crate) fn item_sent(&mut self, complete: bool) {
        if complete || self.interaction == Interaction::RequestResponse {
            self.outbound_open = false;
        }
    }

    /// Whether the peer sends items on this stream that this side grants credit for.
    pub(crate) fn receives_items(&self) -> bool {
        match self.interaction {
            Interaction::Stream => self.local_requester,
            Interaction::Channel => true,
            Interaction::RequestResponse | Interaction::FireAndForget => false,
        }
    }

    /// Whether this side sends items on this stream under credit from the peer.
    pub(crate) fn sends_items(&self) -> bool {
        match self.interaction {
            Interaction::Stream => !self.local_requester,
            Interaction::Channel => true,
            Interaction::RequestResponse | Interaction::FireAndForget => false,
        }
    }
}

/// A snapshot of one stream's state, for diagnostics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    /// The interaction model.
    pub interaction: Interaction,
    /// This side sent the request.
    pub local_requester: bool,
    /// The peer may still send.
    pub inbound_open: bool,
    /// This side may still send.
    pub outbound_open: bool,
    /// Items this side may send now.
    pub send_credit: Credit,
    /// Items the peer may send now.
    pub recv_credit: Credit,
}

impl From<&Stream> for StreamInfo {
    fn from(s: &Stream) -> Self {
        Self {
            interaction: s.interaction,
            local_requester: s.local_requester,
            inbound_open: s.inbound_open,
            outbound_open: s.outbound_open,
            send_credit: s.send_credit,
            recv_credit: s.recv_credit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_adds_saturates_and_max_is_unbounded() {
        let mut c = Credit::new(1);
        assert!(c.take());
        assert!(!c.take());
        c.add(3);
        c.add(2);
        assert_eq!(c.get(), 5);
        c.add(u32::MAX);
        assert!(c.is_unbounded());
        for _ in 0..10 {
            assert!(c.take());
        }
        assert!(c.is_unbounded());
    }
}
