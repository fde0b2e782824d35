//! Sending: local requests, payloads and stream frames, frames forwarded
//! from another connection, and the queue of frames to transmit.

use std::collections::VecDeque;

use bytes::Bytes;

use super::stream::Stream;
use super::{Connection, Interaction, Role, State};
use crate::error::{ErrorCode, SendError};
use crate::fragment::{Fragmenter, MIN_FRAGMENT_SIZE, MessageKind};
use crate::frame::{
    Cancel, ErrorFrame, FrameType, FrameView, MAX_STREAM_ID, MAX_U24, MetadataPush, RequestN,
};
use crate::out::OutFrame;

/// A received frame handed to [`Connection::forward_request`] or
/// [`Connection::forward`]: by reference, its body is shared with the
/// receive buffer (one more reference); by value, the buffer itself moves.
pub trait ForwardFrame {
    /// The frame.
    fn view(&self) -> &FrameView;
    /// The outgoing frame: `stream_id`, then the received bytes after the stream id.
    fn into_out(self, stream_id: u32) -> OutFrame;
    /// The outgoing REQUEST_STREAM or REQUEST_CHANNEL with `initial_n` in
    /// place of the received initial request n.
    fn into_out_with_request_n(self, stream_id: u32, initial_n: u32) -> OutFrame;
}

impl ForwardFrame for &FrameView {
    fn view(&self) -> &FrameView {
        self
    }
    fn into_out(self, stream_id: u32) -> OutFrame {
        OutFrame::forward(stream_id, self)
    }
    fn into_out_with_request_n(self, stream_id: u32, initial_n: u32) -> OutFrame {
        OutFrame::forward_with_request_n(stream_id, self.clone(), initial_n)
    }
}

impl ForwardFrame for FrameView {
    fn view(&self) -> &FrameView {
        self
    }
    fn into_out(self, stream_id: u32) -> OutFrame {
        OutFrame::forward_owned(stream_id, self)
    }
    fn into_out_with_request_n(self, stream_id: u32, initial_n: u32) -> OutFrame {
        OutFrame::forward_with_request_n(stream_id, self, initial_n)
    }
}

/// What a local request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// REQUEST_RESPONSE
    RequestResponse,
    /// REQUEST_FNF
    FireAndForget,
    /// REQUEST_STREAM with its initial request n (> 0)
    Stream {
        /// Initial request n.
        initial_n: u32,
    },
    /// REQUEST_CHANNEL with its initial request n (> 0); `complete` if the
    /// requester sends nothing after the request.
    Channel {
        /// Initial request n.
        initial_n: u32,
        /// The requester's half is complete with this request.
        complete: bool,
    },
}

/// Frames queued for the transport, and where the outgoing byte stream
/// stands.
#[derive(Debug, Default)]
pub(super) struct TransmitQueue {
    frames: VecDeque<OutFrame>,
    /// Bytes of the frames queued.
    bytes: usize,
    /// Bytes ever queued, and ever taken (or dropped unsent): positions in
    /// the outgoing byte stream.
    queued_total: u64,
    sent_total: u64,
}

impl TransmitQueue {
    #[inline]
    fn push(&mut self, frame: OutFrame) {
        self.bytes += frame.len();
        self.queued_total += frame.len() as u64;
        self.frames.push_back(frame);
    }

    #[inline]
    fn pop(&mut self) -> Option<OutFrame> {
        let Some(frame) = self.frames.pop_front() else {
            self.let_go_of_burst();
            return None;
        };
        self.bytes -= frame.len();
        self.sent_total += frame.len() as u64;
        Some(frame)
    }

    /// Drops every frame; they count as taken.
    fn clear(&mut self) {
        self.frames.clear();
        self.sent_total += self.bytes as u64;
        self.bytes = 0;
        self.let_go_of_burst();
    }

    /// Empty, the queue gives back the room a burst of frames took.
    #[inline]
    fn let_go_of_burst(&mut self) {
        if self.frames.capacity() > super::TABLE_KEPT {
            self.frames = VecDeque::new();
        }
    }

    pub(super) fn room(&self) -> usize {
        self.frames.capacity()
    }
}

impl Connection {
    /// The next frame to write, if any.
    pub fn poll_transmit(&mut self) -> Option<OutFrame> {
        self.out.pop()
    }

    /// Where the outgoing byte stream stands: bytes ever queued, and bytes
    /// ever taken by [`Connection::poll_transmit`]. A frame queued when the
    /// first was `q` has been taken once the second reaches `q`.
    pub fn transmit_positions(&self) -> (u64, u64) {
        (self.out.queued_total, self.out.sent_total)
    }

    /// Drops every frame waiting to be written.
    pub(super) fn clear_out(&mut self) {
        self.out.clear();
    }

    /// Bytes queued for transmission.
    pub fn pending_bytes(&self) -> usize {
        self.out.bytes
    }

    pub(super) fn check_can_request(&self) -> Result<(), SendError> {
        match self.state {
            State::Established | State::SetupSent => {}
            State::Disconnected | State::AwaitingResumeOk if self.resume.is_some() => {}
            State::Closed => return Err(SendError::Closed),
            _ => return Err(SendError::NotEstablished),
        }
        if self.refuses_new_streams() {
            return Err(SendError::Closed);
        }
        if !self.leases.may_request(self.now) {
            return Err(SendError::NoLease);
        }
        Ok(())
    }

    pub(super) fn check_open(&self) -> Result<(), SendError> {
        match self.state {
            State::Established | State::SetupSent => Ok(()),
            State::Disconnected | State::AwaitingResumeOk if self.resume.is_some() => Ok(()),
            State::Closed => Err(SendError::Closed),
            _ => Err(SendError::NotEstablished),
        }
    }

    pub(super) fn allocate_stream_id(&mut self) -> Result<u32, SendError> {
        let first = match self.role {
            Role::Client => 1,
            Role::Server => 2,
        };
        // "The Requester MUST re-use IDs by wrapping and restarting at ID 1 for client, and ID 2
        // for server [...] The Requester MUST skip IDs still in use."
        for _ in 0..=self.streams.len() {
            let id = self.next_stream_id;
            self.next_stream_id = if id > MAX_STREAM_ID - 2 {
                first
            } else {
                id + 2
            };
            if !self.streams.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(SendError::StreamIdsExhausted)
    }

    pub(super) fn mtu(&self) -> usize {
        match self.config.fragment_size {
            0 => MAX_U24,
            n => n.clamp(MIN_FRAGMENT_SIZE, MAX_U24),
        }
    }

    /// Starts a request; returns its stream id. The message is fragmented
    /// if it is larger than the fragment size.
    pub fn send_request(
        &mut self,
        kind: RequestKind,
        metadata: Option<Bytes>,
        data: Bytes,
    ) -> Result<u32, SendError> {
        self.check_can_request()?;
        let (interaction, initial_n, complete, message) = match kind {
            RequestKind::RequestResponse => (
                Interaction::RequestResponse,
                0,
                false,
                MessageKind::RequestResponse,
            ),
            RequestKind::FireAndForget => (
                Interaction::FireAndForget,
                0,
                false,
                MessageKind::RequestFnf,
            ),
            RequestKind::Stream { initial_n } => (
                Interaction::Stream,
                initial_n,
                false,
                MessageKind::RequestStream { initial_n },
            ),
            RequestKind::Channel {
                initial_n,
                complete,
            } => (
                Interaction::Channel,
                initial_n,
                complete,
                MessageKind::RequestChannel { initial_n },
            ),
        };
        if matches!(interaction, Interaction::Stream | Interaction::Channel) && initial_n == 0 {
            return Err(SendError::InvalidArgument("initial request n must be > 0"));
        }
        let id = self.allocate_stream_id()?;
        self.leases.requested(self.now);
        let stream = Stream::sent_request(interaction, initial_n, complete, false);
        if !stream.is_done() {
            self.streams.insert(id, stream);
        }
        for frame in Fragmenter::new(id, message, complete, metadata, data, self.mtu()) {
            self.push_stream_frame(OutFrame::from_owned(frame));
        }
        Ok(id)
    }

    /// Sends an item (`next`), the end of the stream (`complete`), or both.
    /// An item needs REQUEST_N credit from the peer.
    pub fn send_payload(
        &mut self,
        stream_id: u32,
        metadata: Option<Bytes>,
        data: Bytes,
        next: bool,
        complete: bool,
    ) -> Result<(), SendError> {
        self.check_open()?;
        if !next && (metadata.is_some() || !data.is_empty()) {
            return Err(SendError::InvalidArgument(
                "a PAYLOAD without next carries no data",
            ));
        }
        // A response to REQUEST_RESPONSE is always N|C.
        let complete = complete
            || self.streams.get(&stream_id).is_some_and(|s| {
                s.interaction == Interaction::RequestResponse && !s.local_requester
            });
        let done = self
            .sending_on(stream_id)?
            .send_payload(stream_id, next, complete, false)?;
        for frame in Fragmenter::new(
            stream_id,
            MessageKind::Payload { next },
            complete,
            metadata,
            data,
            self.mtu(),
        ) {
            self.push_stream_frame(OutFrame::from_owned(frame));
        }
        if done {
            self.end_stream(stream_id);
        }
        Ok(())
    }

    /// Grants the peer `n` (> 0) more items.
    pub fn send_request_n(&mut self, stream_id: u32, n: u32) -> Result<(), SendError> {
        self.check_open()?;
        self.on_send_request_n(stream_id, n)?;
        self.push_stream_frame(OutFrame::from_owned(RequestN { stream_id, n }));
        Ok(())
    }

    /// Cancels a stream this side requested (or, on a channel this side
    /// answers, the requester's half of it; or a fragmented message this side
    /// was sending).
    pub fn send_cancel(&mut self, stream_id: u32) -> Result<(), SendError> {
        self.check_open()?;
        let done = self.on_send_cancel(stream_id)?;
        self.push_stream_frame(OutFrame::from_owned(Cancel { stream_id }));
        if done {
            self.end_stream(stream_id);
        }
        Ok(())
    }

    /// Ends a stream with ERROR (a stream-level code: APPLICATION_ERROR,
    /// REJECTED, CANCELED, INVALID or an application code).
    pub fn send_error(
        &mut self,
        stream_id: u32,
        code: ErrorCode,
        data: Bytes,
    ) -> Result<(), SendError> {
        self.check_open()?;
        if code.is_connection_level() {
            return Err(SendError::InvalidArgument(
                "connection-level error code on a stream",
            ));
        }
        // An error message longer than a frame can hold is cut.
        let data = data.slice(..data.len().min(MAX_U24 - crate::frame::HEADER_LEN - 4));
        self.on_send_error(stream_id)?;
        self.push_stream_frame(OutFrame::from_owned(ErrorFrame {
            stream_id,
            code,
            data,
        }));
        self.end_stream(stream_id);
        Ok(())
    }

    /// Sends METADATA_PUSH.
    pub fn send_metadata_push(&mut self, metadata: Bytes) -> Result<(), SendError> {
        if !self.is_established() {
            return Err(if self.state == State::Closed {
                SendError::Closed
            } else {
                SendError::NotEstablished
            });
        }
        if metadata.len() > MAX_U24 - crate::frame::HEADER_LEN {
            return Err(SendError::InvalidArgument(
                "metadata does not fit one frame",
            ));
        }
        self.push_control(OutFrame::from_owned(MetadataPush { metadata }));
        Ok(())
    }

    /// Sends a request received on another connection: allocates a stream id
    /// here and writes the frame with only the stream id replaced. Further
    /// fragments follow with [`Connection::forward`].
    pub fn forward_request(&mut self, received: impl ForwardFrame) -> Result<u32, SendError> {
        self.forward_request_granting(received, None)
    }

    /// [`Connection::forward_request`], granting the responder `initial_n`
    /// items (> 0) instead of the initial request n the request carries
    /// (REQUEST_STREAM and REQUEST_CHANNEL; other requests carry none).
    pub fn forward_request_granting(
        &mut self,
        received: impl ForwardFrame,
        initial_n: Option<u32>,
    ) -> Result<u32, SendError> {
        self.check_can_request()?;
        let frame = received.view();
        let Some(interaction) = Interaction::of_request(frame.frame_type()) else {
            return Err(SendError::InvalidArgument("not a request frame"));
        };
        if frame.len() > MAX_U24 {
            return Err(SendError::InvalidArgument(
                "frame does not fit a 24-bit length",
            ));
        }
        let carries_n = matches!(interaction, Interaction::Stream | Interaction::Channel);
        let initial_n = match initial_n {
            Some(n) if carries_n => n.min(crate::frame::MAX_REQUEST_N),
            _ => frame.request_n(),
        };
        if carries_n && initial_n == 0 {
            return Err(SendError::InvalidArgument("initial request n must be > 0"));
        }
        let rewrite = carries_n && initial_n != frame.request_n();
        let id = self.allocate_stream_id()?;
        self.leases.requested(self.now);
        let stream =
            Stream::sent_request(interaction, initial_n, frame.complete(), frame.follows());
        if !stream.is_done() {
            self.streams.insert(id, stream);
        }
        let out = if rewrite {
            received.into_out_with_request_n(id, initial_n)
        } else {
            received.into_out(id)
        };
        self.push_stream_frame(out);
        Ok(id)
    }

    /// Sends a PAYLOAD, REQUEST_N, CANCEL or ERROR received on another
    /// connection on `stream_id` here, with only the stream id replaced.
    pub fn forward(
        &mut self,
        stream_id: u32,
        received: impl ForwardFrame,
    ) -> Result<(), SendError> {
        self.check_open()?;
        let frame = received.view();
        if frame.len() > MAX_U24 {
            return Err(SendError::InvalidArgument(
                "frame does not fit a 24-bit length",
            ));
        }
        let done = match frame.frame_type() {
            FrameType::Payload => {
                let (next, complete, follows) = (frame.next(), frame.complete(), frame.follows());
                self.sending_on(stream_id)?
                    .send_payload(stream_id, next, complete, follows)?
            }
            FrameType::RequestN => {
                self.on_send_request_n(stream_id, frame.request_n())?;
                false
            }
            FrameType::Cancel => self.on_send_cancel(stream_id)?,
            FrameType::Error => self.on_send_error(stream_id)?,
            _ => {
                return Err(SendError::InvalidArgument(
                    "only PAYLOAD, REQUEST_N, CANCEL and ERROR are forwarded on a stream",
                ));
            }
        };
        self.push_stream_frame(received.into_out(stream_id));
        if done {
            self.end_stream(stream_id);
        }
        Ok(())
    }

    /// Stream `id`, which this side is about to send on.
    #[inline]
    fn sending_on(&mut self, id: u32) -> Result<&mut Stream, SendError> {
        self.streams
            .get_mut(&id)
            .ok_or(SendError::UnknownStream(id))
    }

    /// Applies a REQUEST_N this side sends.
    fn on_send_request_n(&mut self, id: u32, n: u32) -> Result<(), SendError> {
        if n == 0 {
            return Err(SendError::InvalidArgument("request n must be > 0"));
        }
        self.sending_on(id)?.send_request_n(id, n)
    }

    /// Applies a CANCEL this side sends; returns whether the stream is now over.
    pub(super) fn on_send_cancel(&mut self, id: u32) -> Result<bool, SendError> {
        self.with_stream(id, |s| s.send_cancel(id))
            .ok_or(SendError::UnknownStream(id))?
    }

    /// Applies an ERROR this side sends; the stream is over.
    pub(super) fn on_send_error(&mut self, id: u32) -> Result<bool, SendError> {
        self.with_stream(id, Stream::send_error)
            .ok_or(SendError::UnknownStream(id))?;
        Ok(true)
    }

    /// Queues a frame on a stream (counted for resumption).
    pub(super) fn push_stream_frame(&mut self, frame: OutFrame) {
        if let Some(r) = self.resume.as_mut() {
            r.sent(&frame);
        }
        if !matches!(self.state, State::Disconnected | State::AwaitingResumeOk) {
            self.transmit(frame);
        }
    }

    /// Queues a connection-level frame (never resent after a resume).
    pub(super) fn push_control(&mut self, frame: OutFrame) {
        if self.state != State::Disconnected {
            self.transmit(frame);
        }
    }

    pub(super) fn transmit(&mut self, frame: OutFrame) {
        self.stats.frames_sent += 1;
        self.out.push(frame);
    }
}
