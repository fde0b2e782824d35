//! Resume bookkeeping: implied positions and the bounded buffer of sent frames.
//!
//! "As a Requester or Responder sends REQUEST_RESPONSE, REQUEST_FNF,
//! REQUEST_STREAM, REQUEST_CHANNEL, REQUEST_N, CANCEL, ERROR, or PAYLOAD
//! frames, it maintains a position of that frame within the connection in
//! that direction. [...] The positions are calculated based on the length of
//! encoded frames without the frame length field after any fragmentation is
//! applied."

use std::collections::VecDeque;

use bytes::Bytes;

use std::time::Instant;

use super::{Connection, Event, Role, State};
use crate::error::{ConnectionError, ErrorCode, SendError};
use crate::frame::{FrameType, FrameView, Resume, ResumeOk, VERSION};
use crate::out::OutFrame;

/// Sent frames kept for retransmission, and both implied positions.
#[derive(Debug)]
pub(crate) struct ResumeState {
    pub(crate) token: Bytes,
    /// Position after the last resumable frame sent.
    pub(crate) sent_position: u64,
    /// Implied position after the last resumable frame received.
    pub(crate) received_position: u64,
    frames: VecDeque<(u64, OutFrame)>,
    buffered: usize,
    max_buffered: usize,
}

impl ResumeState {
    pub(crate) fn new(token: Bytes, max_buffered: usize) -> Self {
        Self {
            token,
            sent_position: 0,
            received_position: 0,
            frames: VecDeque::new(),
            buffered: 0,
            max_buffered,
        }
    }

    /// The earliest position this side can still resend from.
    pub(crate) fn first_available(&self) -> u64 {
        self.frames
            .front()
            .map_or(self.sent_position, |(pos, _)| *pos)
    }

    /// Records a resumable frame being sent; old frames fall out past the cap.
    pub(crate) fn sent(&mut self, frame: &OutFrame) {
        let len = frame.len();
        self.frames.push_back((self.sent_position, frame.clone()));
        self.sent_position += len as u64;
        self.buffered += len;
        while self.buffered > self.max_buffered {
            match self.frames.pop_front() {
                Some((_, f)) => self.buffered -= f.len(),
                None => break,
            }
        }
    }

    pub(crate) fn received(&mut self, len: usize) {
        self.received_position += len as u64;
    }

    /// Drops frames the peer has confirmed up to `position`.
    pub(crate) fn acknowledge(&mut self, position: u64) {
        while let Some((pos, f)) = self.frames.front() {
            if pos + f.len() as u64 > position {
                break;
            }
            self.buffered -= f.len();
            self.frames.pop_front();
        }
    }

    /// Whether the peer, having received up to `position`, can be caught up
    /// from this buffer: the position must be a frame boundary between the
    /// oldest retained frame and the last one sent.
    pub(crate) fn can_resume_from(&self, position: u64) -> bool {
        if position == self.sent_position {
            return true;
        }
        position >= self.first_available()
            && position < self.sent_position
            && self.frames.iter().any(|(pos, _)| *pos == position)
    }

    /// The frames to resend to a peer that received up to `position`.
    pub(crate) fn frames_from(&mut self, position: u64) -> Vec<OutFrame> {
        self.acknowledge(position);
        self.frames.iter().map(|(_, f)| f.clone()).collect()
    }
}

// The session on a connection.
impl Connection {
    pub(super) fn on_resume_offer(&mut self, view: FrameView) {
        // "MUST send an ERROR[REJECTED_RESUME] frame if the server does not support resuming operation."
        if self.config.resume_buffer == 0 {
            return self.fail(
                ErrorCode::REJECTED_RESUME,
                "resume is not supported by this server",
            );
        }
        match Resume::from_view(&view) {
            Ok(resume) => {
                self.state = State::ResumeOffered;
                self.events
                    .push_back(Event::ResumeRequested(Box::new(resume)));
            }
            Err(e) => self.fail(ErrorCode::INVALID_SETUP, format!("malformed RESUME: {e}")),
        }
    }

    pub(super) fn on_resume_reply(&mut self, view: FrameView) {
        match view.frame_type() {
            FrameType::ResumeOk => {
                let Ok(ok) = ResumeOk::from_view(&view) else {
                    return self.fail(ErrorCode::CONNECTION_ERROR, "malformed RESUME_OK");
                };
                let position = ok.last_received_client_position;
                let Some(r) = self.resume.as_mut() else {
                    return self.ignore();
                };
                if !r.can_resume_from(position) {
                    return self.fail(
                        ErrorCode::CONNECTION_ERROR,
                        format!(
                            "cannot resume: frames from position {position} are no longer buffered"
                        ),
                    );
                }
                let frames = r.frames_from(position);
                self.state = State::Established;
                self.lifetime.next_keepalive = Some(self.now + self.lifetime.keepalive_interval);
                for f in frames {
                    self.transmit(f);
                }
                self.events.push_back(Event::Resumed);
            }
            FrameType::Error if view.stream_id() == 0 => {
                let error = self.remote_error(&view);
                self.close_remote(error);
            }
            _ => self.ignore(),
        }
    }

    /// Server: refuses a RESUME (after [`Event::ResumeRequested`]) with REJECTED_RESUME, and closes.
    pub fn reject_resume(&mut self, message: impl Into<String>) {
        self.refuse_establishment(ErrorCode::REJECTED_RESUME, message.into());
    }

    /// Server: continues this (disconnected) session on the transport that
    /// offered `resume`. On success RESUME_OK and the frames the client
    /// missed are queued; on failure nothing changes and the error says why
    /// (refuse the offer with [`Connection::reject_resume`]).
    pub fn resume_session(&mut self, resume: &Resume, now: Instant) -> Result<(), ConnectionError> {
        let refuse = |m: String| Err(ConnectionError::local(ErrorCode::REJECTED_RESUME, m));
        if resume.version != VERSION {
            return refuse(format!(
                "protocol version {}.{} is not supported",
                resume.version.major, resume.version.minor
            ));
        }
        if !matches!(self.state, State::Disconnected | State::Established) {
            return refuse("the session is not resumable".into());
        }
        let Some(r) = self.resume.as_mut() else {
            return refuse("the session was not set up for resumption".into());
        };
        if r.token != resume.token {
            return refuse("unknown resume token".into());
        }
        if resume.first_available_client_position > r.received_position {
            return refuse(format!(
                "the client no longer has frames from position {} on",
                r.received_position
            ));
        }
        if !r.can_resume_from(resume.last_received_server_position) {
            return refuse(format!(
                "frames from position {} are no longer buffered",
                resume.last_received_server_position
            ));
        }
        let ok = ResumeOk {
            last_received_client_position: r.received_position,
        };
        let frames = r.frames_from(resume.last_received_server_position);
        self.clear_out();
        self.state = State::Established;
        self.now = now;
        self.lifetime.last_received = now;
        self.push_control(OutFrame::from_owned(ok));
        for f in frames {
            self.transmit(f);
        }
        Ok(())
    }

    /// The transport is gone. With resume enabled the session is kept
    /// (returns true) until [`Connection::resume`] (client) or
    /// [`Connection::resume_session`] (server); otherwise the connection closes.
    pub fn transport_lost(&mut self) -> bool {
        if self.state == State::Closed {
            return false;
        }
        self.clear_out();
        if self.resume.is_some()
            && matches!(
                self.state,
                State::Established | State::SetupSent | State::AwaitingResumeOk
            )
        {
            self.state = State::Disconnected;
            return true;
        }
        self.state = State::Closed;
        self.events.push_back(Event::Closed(ConnectionError::local(
            ErrorCode::CONNECTION_ERROR,
            "the transport closed",
        )));
        false
    }

    /// Client: starts resuming a disconnected session on a new transport by
    /// queueing RESUME.
    pub fn resume(&mut self, now: Instant) -> Result<(), SendError> {
        if self.role != Role::Client || self.state != State::Disconnected {
            return Err(SendError::InvalidArgument(
                "only a disconnected client session can resume",
            ));
        }
        let Some(r) = self.resume.as_ref() else {
            return Err(SendError::InvalidArgument("resume is not enabled"));
        };
        let frame = Resume {
            version: VERSION,
            token: r.token.clone(),
            last_received_server_position: r.received_position,
            first_available_client_position: r.first_available(),
        };
        self.now = now;
        self.lifetime.last_received = now;
        self.state = State::AwaitingResumeOk;
        self.push_control(OutFrame::from_owned(frame));
        Ok(())
    }
}
