//! Closing: ERROR on stream 0 out and in, draining, closing when the
//! open streams end, and lingering after a shut-down.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Connection, Event, State};
use crate::error::{ConnectionError, ErrorCode, Initiator};
use crate::frame::{ErrorFrame, FrameView};
use crate::out::OutFrame;

/// How far an established connection is with closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Closing {
    /// New streams are welcome both ways.
    Open,
    /// No new streams from the peer ([`Connection::drain`]); the
    /// application closes when it is done.
    Draining,
    /// ERROR[CONNECTION_CLOSE] went one way or the other (sent by the
    /// initiator): no new streams, and the connection closes when the last
    /// open stream ends.
    WhenIdle(Initiator),
    /// After [`Connection::shut_down`]: ERROR[CONNECTION_CLOSE] went, and
    /// the connection closes at this instant whatever is open then.
    Lingering(Instant),
}

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
        if self.closing == Closing::Open {
            self.closing = Closing::Draining;
        }
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
        if !self.is_established()
            || matches!(self.closing, Closing::WhenIdle(_) | Closing::Lingering(_))
        {
            return;
        }
        self.announce_close(message.into());
        self.closing = Closing::WhenIdle(Initiator::Local);
        self.close_if_idle();
    }

    /// Sends ERROR[CONNECTION_CLOSE].
    fn announce_close(&mut self, message: String) {
        let error = ErrorFrame {
            stream_id: 0,
            code: ErrorCode::CONNECTION_CLOSE,
            data: Bytes::from(message),
        };
        self.push_control(OutFrame::from_owned(error));
    }

    /// Sends ERROR[CONNECTION_CLOSE] and closes after `linger`, whatever
    /// is open then. Meanwhile the connection goes on reading: a request
    /// that was already on its way gets ERROR[REJECTED] ("not processed")
    /// instead of no answer, and frames of open streams are handled as
    /// usual. Before establishment it closes at once.
    pub fn shut_down(&mut self, now: Instant, message: impl Into<String>, linger: Duration) {
        self.now = now;
        if !self.is_established() {
            return self.fail(ErrorCode::CONNECTION_CLOSE, message.into());
        }
        match self.closing {
            Closing::Lingering(_) => return,
            // ERROR[CONNECTION_CLOSE] went one way or the other already.
            Closing::WhenIdle(_) => {}
            Closing::Open | Closing::Draining => self.announce_close(message.into()),
        }
        self.closing = Closing::Lingering(now + linger);
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

    /// The peer sent ERROR[CONNECTION_CLOSE] (`error`): no new streams, and
    /// the connection closes when the open ones have ended.
    pub(super) fn on_close_requested(&mut self, error: ConnectionError) {
        // "Sender or Receiver of this frame MUST wait for outstanding streams to terminate
        // before closing the connection."
        if !matches!(self.closing, Closing::Lingering(_)) {
            self.closing = Closing::WhenIdle(Initiator::Remote);
        }
        self.events.push_back(Event::Closing(error.clone()));
        if self.streams.is_empty() {
            self.close_remote(error);
        }
    }

    /// Whether new streams from the peer are refused because a close has begun.
    pub(super) fn refuses_new_streams(&self) -> bool {
        self.closing != Closing::Open
    }

    /// When a shut-down closes the connection, if one is under way.
    pub(super) fn linger_deadline(&self) -> Option<Instant> {
        match self.closing {
            Closing::Lingering(until) => Some(until),
            _ => None,
        }
    }

    pub(super) fn after_stream_end(&mut self) {
        self.close_if_idle();
    }

    fn close_if_idle(&mut self) {
        if let Closing::WhenIdle(initiator) = self.closing
            && self.streams.is_empty()
            && self.is_established()
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
