//! The two ends of a stream as the API hands them out: [`Subscription`]
//! receives items, [`Sink`] sends them.

use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;

use bytes::Bytes;
use rsocket_proto::{ErrorCode, SendError};

use crate::{ClientError, Inner, Payload};

/// The items of a stream, in order. Dropping it before the stream ends
/// cancels what it was receiving.
pub struct Subscription {
    inner: Rc<Inner>,
    id: u32,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("stream_id", &self.id)
            .finish()
    }
}

impl Subscription {
    pub(crate) fn new(inner: Rc<Inner>, id: u32, _streaming: bool) -> Self {
        Self { inner, id }
    }

    /// The stream id.
    pub fn stream_id(&self) -> u32 {
        self.id
    }

    /// The next item; `None` once the stream completed; an error ends it.
    pub async fn next(&mut self) -> Option<Result<Payload, ClientError>> {
        poll_fn(|cx| {
            let mut slots = self.inner.slots.borrow_mut();
            let Some(slot) = slots.get_mut(&self.id) else {
                return Poll::Ready(None);
            };
            if let Some(item) = slot.items.pop_front() {
                return Poll::Ready(Some(item));
            }
            if slot.finished {
                return Poll::Ready(None);
            }
            slot.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Asks for `n` (> 0) more items.
    pub fn request(&self, n: u32) -> Result<(), ClientError> {
        self.inner.conn.borrow_mut().send_request_n(self.id, n)?;
        self.inner.wake_driver();
        Ok(())
    }

    /// Cancels the stream (or, for a channel's responder, the requester's half).
    pub fn cancel(self) {
        // Drop does it.
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let receiving = self
            .inner
            .conn
            .borrow()
            .stream_info(self.id)
            .is_some_and(|i| i.inbound_open);
        if receiving {
            let _ = self.inner.conn.borrow_mut().send_cancel(self.id);
            self.inner.wake_driver();
        }
        let mut slots = self.inner.slots.borrow_mut();
        if let Some(slot) = slots.get_mut(&self.id) {
            slot.items.clear();
            slot.reader = None;
            if slot.writer.is_none() {
                slots.remove(&self.id);
            }
        }
    }
}

/// Sends the items of a stream: a responder's answers, or a channel
/// requester's items. Each item needs credit from the other side; `send`
/// waits for it.
pub struct Sink {
    inner: Rc<Inner>,
    id: u32,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("stream_id", &self.id).finish()
    }
}

impl Sink {
    pub(crate) fn new(inner: Rc<Inner>, id: u32) -> Self {
        Self { inner, id }
    }

    /// The stream id.
    pub fn stream_id(&self) -> u32 {
        self.id
    }

    fn outcome(&self, result: Result<(), SendError>) -> Result<(), ClientError> {
        match result {
            Ok(()) => {
                self.inner.wake_driver();
                Ok(())
            }
            Err(SendError::UnknownStream(_) | SendError::InvalidState { .. }) => {
                Err(ClientError::Cancelled)
            }
            Err(SendError::Closed) => Err(self.inner.closed_error()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends one item once the other side has granted credit for it and
    /// the connection has room (at most about 1 MiB waits unsent; beyond
    /// that, `send` waits for the socket to drain).
    pub async fn send(&self, item: Payload) -> Result<(), ClientError> {
        poll_fn(|cx| {
            if self.inner.unsent() > crate::MAX_UNSENT && self.inner.closed.borrow().is_none() {
                self.inner
                    .send_waiters
                    .borrow_mut()
                    .push(cx.waker().clone());
                self.inner.wake_driver();
                return Poll::Pending;
            }
            let result = self.inner.conn.borrow_mut().send_payload(
                self.id,
                item.metadata.clone(),
                item.data.clone(),
                true,
                false,
            );
            if let Err(SendError::NoCredit(_)) = result {
                if let Some(slot) = self.inner.slots.borrow_mut().get_mut(&self.id) {
                    if slot.send_closed {
                        return Poll::Ready(Err(ClientError::Cancelled));
                    }
                    slot.writer = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                return Poll::Ready(Err(ClientError::Cancelled));
            }
            Poll::Ready(self.outcome(result))
        })
        .await
    }

    /// Whether the other side has credit for another item now.
    pub fn has_credit(&self) -> bool {
        self.inner
            .conn
            .borrow()
            .stream_info(self.id)
            .is_some_and(|i| i.outbound_open && i.send_credit.get() > 0)
    }

    /// Whether the other side cancelled (nothing more can be sent).
    pub fn is_cancelled(&self) -> bool {
        !self
            .inner
            .conn
            .borrow()
            .stream_info(self.id)
            .is_some_and(|i| i.outbound_open)
    }

    /// Ends the stream normally.
    pub fn complete(&self) -> Result<(), ClientError> {
        let result =
            self.inner
                .conn
                .borrow_mut()
                .send_payload(self.id, None, Bytes::new(), false, true);
        self.outcome(result)
    }

    /// Ends the stream with an error.
    pub fn error(&self, code: ErrorCode, message: &str) {
        let _ =
            self.inner
                .conn
                .borrow_mut()
                .send_error(self.id, code, Bytes::from(message.to_owned()));
        self.inner.wake_driver();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // A sink dropped with its direction still open ends it: normally for a
        // channel's requester, with an error for a responder.
        let info = self.inner.conn.borrow().stream_info(self.id);
        if let Some(info) = info
            && info.outbound_open
        {
            if info.local_requester {
                let _ = self.complete();
            } else {
                self.error(
                    ErrorCode::APPLICATION_ERROR,
                    "the responder ended the stream without completing it",
                );
            }
        }
        if let Some(slot) = self.inner.slots.borrow_mut().get_mut(&self.id) {
            slot.writer = None;
        }
    }
}
