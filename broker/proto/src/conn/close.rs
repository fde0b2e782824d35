//! Closing: ERROR on stream 0 out and in, draining, closing when the
//! open streams end, and lingering after a shut-down.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Connection, Event, State};
use crate::error::{ConnectionError, ErrorCode, Initiator};
use crate::frame::{ErrorFrame, FrameView};
use crate::out::OutFrame;

impl Connection {
    pub(super) fn remote_error(&self, view: &FrameView) -> ConnectionError {
        ConnectionError {
            code: view.error_code().unwrap_or(ErrorCode::CONNECTION_ERROR),
            message: String::from_utf8_lossy(view.data_slice())
                .into_owned()
                .into(),
            initiator: Initiator::Remote,
        }
    }

    /// Stops new streams from the peer (they get ERROR[REJECTED]); open
    /// streams go on. Close with [`Connection::close`] once they are done.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Sends ERROR on stream 0 with `code` and closes at once.
    pub fn close(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.fail(code, message.into());
    }

    /// [`Connection::close`] for a peer that does not read: every frame
    /// not yet written is dropped first, so the ERROR is all that waits.
    pub fn abort(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.clear_out();
        self.fail(code, message.into());
    }

    /// Sends ERROR[CONNECTION_CLOSE]: no new streams either way; the
    /// connection closes when the open streams have ended ("Sender or
    /// Receiver of this frame MUST wait for outstanding streams to terminate
    /// before closing the connection").
    pub fn close_gracefully(&mut self, message: impl Into<String>) {
        if self.state != State::Established || self.close_when_idle {
            return;
        }
        self.announce_close(message.into());
        self.close_when_idle = true;
        self.close_if_idle(Initiator::Local);
    }

    /// Sends ERROR[CONNECTION_CLOSE]; no new streams from the peer from now on.
    pub(super) fn announce_close(&mut self, message: String) {
        let error = ErrorFrame {
            stream_id: 0,
            code: ErrorCode::CONNECTION_CLOSE,
            data: Bytes::from(message),
        };
        self.push_control(OutFrame::from_owned(error));
        self.draining = true;
        self.close_initiator = Initiator::Local;
    }

    /// Sends ERROR[CONNECTION_CLOSE] and closes after `linger`, whatever
    /// is open then. Meanwhile the connection goes on reading: a request
    /// that was already on its way gets ERROR[REJECTED] ("not processed")
    /// instead of no answer, and frames of open streams are handled as
    /// usual. Before establishment it closes at once.
    pub fn shut_down(&mut self, now: Instant, message: impl Into<String>, linger: Duration) {
        self.now = now;
        if self.state != State::Established {
            return self.fail(ErrorCode::CONNECTION_CLOSE, message.into());
        }
        if self.linger_until.is_some() {
            return;
        }
        if self.close_when_idle {
            // ERROR[CONNECTION_CLOSE] went one way or the other already.
            self.draining = true;
            self.close_initiator = Initiator::Local;
        } else {
            self.announce_close(message.into());
        }
        self.linger_until = Some(now + linger);
    }

    pub(super) fn fail(
        &mut self,
        code: ErrorCode,
        message: impl Into<std::borrow::Cow<'static, str>>,
    ) {
        if self.state == State::Closed {
            return;
        }
        let message = message.into();
        if self.state != State::Disconnected {
            let error = ErrorFrame {
                stream_id: 0,
                code,
                data: Bytes::from(message.clone().into_owned()),
            };
            self.push_control(OutFrame::from_owned(error));
        }
        self.state = State::Closed;
        self.events.push_back(Event::Closed(ConnectionError {
            code,
            message,
            initiator: Initiator::Local,
        }));
    }

    pub(super) fn close_remote(&mut self, error: ConnectionError) {
        self.state = State::Closed;
        self.events.push_back(Event::Closed(error));
    }

    pub(super) fn after_stream_end(&mut self) {
        let initiator = self.close_initiator;
        self.close_if_idle(initiator);
    }

    pub(super) fn close_if_idle(&mut self, initiator: Initiator) {
        if self.close_when_idle
            && self.linger_until.is_none()
            && self.streams.is_empty()
            && self.state == State::Established
        {
            self.state = State::Closed;
            self.events.push_back(Event::Closed(ConnectionError {
                code: ErrorCode::CONNECTION_CLOSE,
                message: "closed after the open streams ended".into(),
                initiator,
            }));
        }
    }
}
