//! Per-stream state of the four interaction models, seen from one side of
//! the connection: which directions may still carry items, the REQUEST_N
//! credit each way, and fragmented messages in progress.

use crate::error::{ErrorCode, SendError};
use crate::fragment::Reassembly;
use crate::frame::{FrameType, FrameView, MAX_REQUEST_N};

/// A rule the peer broke on a stream: the code and message its ERROR (or
/// the refusal of its request) carries.
pub(crate) type Violation = (ErrorCode, String);

/// What a connection that reassembles allows one more fragment to hold:
/// the cap on one message, and the room left under the cap on all of them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReassemblyLimits {
    pub(crate) max_message: usize,
    pub(crate) room: usize,
}

impl ReassemblyLimits {
    /// The one check of the connection's reassembly memory: `added` more
    /// bytes must fit the room left.
    fn check_room(self, added: usize) -> Result<(), Violation> {
        if added > self.room {
            let msg = "too many fragmented messages in progress on this connection";
            return Err((ErrorCode::REJECTED, msg.into()));
        }
        Ok(())
    }
}

/// A follow-up fragment as its stream took it.
#[derive(Debug)]
pub(crate) struct Continued {
    /// The whole message, when reassembling and this fragment ended it.
    pub(crate) whole: Option<FrameView>,
    /// This fragment ended the message, which was the request or an item.
    pub(crate) finished: Option<MessageRole>,
}

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
    /// The message whose first fragment is `view` (`complete`: its C flag),
    /// reassembled within `limits` when the connection reassembles.
    pub(crate) fn start(
        role: MessageRole,
        view: &FrameView,
        complete: bool,
        limits: Option<ReassemblyLimits>,
    ) -> Result<Self, Violation> {
        let reassembly = match limits {
            Some(limits) => {
                limits.check_room(view.payload_len())?;
                let r = Reassembly::start(view, limits.max_message)
                    .map_err(|e| (ErrorCode::REJECTED, e.to_string()))?;
                Some(r)
            }
            None => None,
        };
        Ok(Self {
            role,
            complete,
            len: view.payload_len(),
            data_started: !view.data_slice().is_empty(),
            reassembly,
        })
    }

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

    /// A stream this side opens with a request (`follows`: the first
    /// fragment of it; `complete`: its C flag).
    pub(crate) fn sent_request(
        interaction: Interaction,
        initial_n: u32,
        complete: bool,
        follows: bool,
    ) -> Self {
        let mut stream = Self::requested(interaction, initial_n);
        if follows {
            stream.outbound_partial = Some(OutboundPartial {
                role: MessageRole::Request,
                complete,
            });
        } else {
            stream.request_done(complete);
        }
        stream
    }

    /// Bytes the stream's inbound message holds for reassembly.
    #[inline]
    pub(crate) fn buffered(&self) -> usize {
        self.inbound_partial
            .as_ref()
            .map_or(0, InboundPartial::buffered)
    }

    /// Whether a fragmented message from the peer is in progress.
    pub(crate) fn is_receiving_fragments(&self) -> bool {
        self.inbound_partial.is_some()
    }

    /// The peer's request (or item) is fragmented; `partial` is its start.
    pub(crate) fn begin_inbound(&mut self, partial: InboundPartial) {
        self.inbound_partial = Some(partial);
    }

    /// A follow-up fragment of the inbound message in progress.
    pub(crate) fn continue_inbound(
        &mut self,
        view: &FrameView,
        limits: Option<ReassemblyLimits>,
    ) -> Result<Continued, Violation> {
        let Some(partial) = self.inbound_partial.as_mut() else {
            let msg = "no fragmented message is in progress";
            return Err((ErrorCode::INVALID, msg.into()));
        };
        let added = view.payload_len();
        match limits {
            Some(limits) if partial.reassembly.is_some() => {
                let max = limits.max_message;
                if partial.len + added > max {
                    let msg =
                        format!("fragmented message exceeds the reassembly limit of {max} bytes");
                    return Err((ErrorCode::REJECTED, msg));
                }
                limits.check_room(added)?;
            }
            _ => {
                // "When fragmented, the Metadata MUST be transmitted completely before the Data."
                if partial.data_started && view.metadata_slice().is_some_and(|m| !m.is_empty()) {
                    let msg = "fragment carries metadata after data";
                    return Err((ErrorCode::INVALID, msg.into()));
                }
            }
        }
        partial.len += added;
        partial.data_started |= !view.data_slice().is_empty();
        partial.complete |= view.complete();
        let whole = match partial.reassembly.as_mut().map(|r| r.push(view)) {
            Some(Err(e)) => return Err((ErrorCode::INVALID, e.to_string())),
            Some(Ok(whole)) => whole,
            None => None,
        };
        let mut finished = None;
        if !view.follows()
            && let Some(p) = self.inbound_partial.take()
        {
            match p.role {
                MessageRole::Request => self.request_done(p.complete),
                MessageRole::Item => self.item_received(p.complete),
            }
            finished = Some(p.role);
        }
        Ok(Continued { whole, finished })
    }

    /// The peer sent CANCEL: whether the stream is over now, or `None`
    /// when the CANCEL means nothing here (ignored).
    pub(crate) fn peer_cancel(&mut self) -> Option<bool> {
        // "If the sender wants to cancel sending a fragmented sequence, it MAY send a CANCEL frame
        // without finishing delivery of the fragments."
        let aborted_partial = self.inbound_partial.take().is_some();
        if !self.local_requester || aborted_partial {
            // "Upon receiving a CANCEL, the stream is terminated on the Responder."
            return Some(true);
        }
        if self.interaction == Interaction::Channel {
            // The channel's responder no longer wants the requester's items.
            self.outbound_open = false;
            self.outbound_partial = None;
            return Some(self.is_done());
        }
        None
    }

    /// The peer granted `n` items: whether the grant counts (`false`: the
    /// stream sends it no items, ignored).
    pub(crate) fn peer_request_n(&mut self, n: u32) -> Result<bool, Violation> {
        if !self.sends_items() || !self.outbound_open {
            return Ok(false);
        }
        // "Request N: ... Value MUST be > 0."
        if n == 0 {
            return Err((ErrorCode::INVALID, "REQUEST_N with n = 0".into()));
        }
        self.send_credit.add(n);
        Ok(true)
    }

    /// The peer sent a PAYLOAD that starts an item (not a follow-up
    /// fragment): `Ok(false)` when it is to be ignored.
    pub(crate) fn peer_item(&mut self, next: bool, complete: bool) -> Result<bool, Violation> {
        if !self.inbound_open {
            return Ok(false);
        }
        if !next && !complete && self.interaction != Interaction::RequestResponse {
            // "A PAYLOAD MUST NOT have both (C)omplete and (N)ext empty (false)."
            return Ok(false);
        }
        if next && !self.recv_credit.take() {
            let msg = "PAYLOAD sent without REQUEST_N credit";
            return Err((ErrorCode::INVALID, msg.into()));
        }
        Ok(true)
    }

    /// This side sends a PAYLOAD (`follows`: a fragment with more to
    /// come): whether the stream is over now.
    pub(crate) fn send_payload(
        &mut self,
        id: u32,
        next: bool,
        complete: bool,
        follows: bool,
    ) -> Result<bool, SendError> {
        if let Some(partial) = self.outbound_partial.as_mut() {
            partial.complete |= complete;
            if !follows {
                let p = *partial;
                self.outbound_partial = None;
                match p.role {
                    MessageRole::Request => self.request_done(p.complete),
                    MessageRole::Item => self.item_sent(p.complete),
                }
            }
            return Ok(self.is_done());
        }
        if !self.outbound_open {
            return Err(SendError::InvalidState {
                stream_id: id,
                reason: "the stream is complete for sending",
            });
        }
        // A forwarded response to REQUEST_RESPONSE without C completes it,
        // as it does where it was received.
        if !next && !complete && self.interaction != Interaction::RequestResponse {
            return Err(SendError::InvalidArgument(
                "a PAYLOAD needs next or complete",
            ));
        }
        if next && !self.send_credit.take() {
            return Err(SendError::NoCredit(id));
        }
        if follows {
            self.outbound_partial = Some(OutboundPartial {
                role: MessageRole::Item,
                complete,
            });
        } else {
            self.item_sent(complete);
        }
        Ok(self.is_done())
    }

    /// This side grants the peer `n` (> 0) items.
    pub(crate) fn send_request_n(&mut self, id: u32, n: u32) -> Result<(), SendError> {
        if !self.receives_items() || !self.inbound_open {
            return Err(SendError::InvalidState {
                stream_id: id,
                reason: "no items are expected on this stream",
            });
        }
        self.recv_credit.add(n);
        Ok(())
    }

    /// This side sends CANCEL: whether the stream is over now.
    pub(crate) fn send_cancel(&mut self, id: u32) -> Result<bool, SendError> {
        if self.local_requester || self.outbound_partial.is_some() {
            self.inbound_open = false;
            self.outbound_open = false;
            self.inbound_partial = None;
            self.outbound_partial = None;
        } else if self.interaction == Interaction::Channel {
            self.inbound_open = false;
            self.inbound_partial = None;
        } else {
            return Err(SendError::InvalidState {
                stream_id: id,
                reason: "only the requester cancels this stream",
            });
        }
        Ok(self.is_done())
    }

    /// This side sends ERROR: the stream is over.
    pub(crate) fn send_error(&mut self) {
        self.inbound_open = false;
        self.outbound_open = false;
        self.inbound_partial = None;
        self.outbound_partial = None;
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
    use crate::frame::{Frame, Payload};
    use bytes::Bytes;

    fn fragment(len: usize, follows: bool) -> FrameView {
        let frame = Frame::from(Payload {
            stream_id: 1,
            follows,
            complete: false,
            next: true,
            metadata: None,
            data: Bytes::from(vec![b'x'; len]),
        });
        FrameView::parse(frame.to_bytes()).unwrap()
    }

    #[test]
    fn a_follow_up_fragment_is_held_to_the_room_left() {
        let limits = |room| {
            Some(ReassemblyLimits {
                max_message: 1 << 20,
                room,
            })
        };
        let first = fragment(100, true);
        let partial = InboundPartial::start(MessageRole::Item, &first, false, limits(100)).unwrap();
        let mut stream = Stream::accepted(Interaction::Stream, 1);
        stream.begin_inbound(partial);
        assert_eq!(stream.buffered(), 100);
        // 50 more bytes where only 49 are left: REJECTED, nothing taken.
        let (code, _) = stream
            .continue_inbound(&fragment(50, true), limits(49))
            .unwrap_err();
        assert_eq!(code, ErrorCode::REJECTED);
        assert_eq!(stream.buffered(), 100);
        // Where they fit, they are held, and the last fragment ends it.
        let done = stream
            .continue_inbound(&fragment(50, false), limits(50))
            .unwrap();
        assert_eq!(done.finished, Some(MessageRole::Item));
        assert_eq!(done.whole.map(|w| w.data_slice().len()), Some(150));
        assert_eq!(stream.buffered(), 0);
    }

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
