//! The connection driver: one task per connection that reads frames into
//! an endpoint, writes what the endpoint has to send, flushes, and closes,
//! whatever the transport. The broker's shard and the client each implement
//! the small [`Endpoint`] side; backpressure is not reading.
//!
//! One pass of the task:
//!
//! 1. read, while the endpoint may take frames, up to
//!    [`READS_PER_TURN`](crate::turns::READS_PER_TURN) reads;
//! 2. let the endpoint act on what arrived ([`Endpoint::before_write`]);
//! 3. take frames while the transport holds less than
//!    [`WRITE_HIGH`](crate::turns::WRITE_HIGH) and flush, up to
//!    [`WRITES_PER_TURN`](crate::turns::WRITES_PER_TURN) flushes;
//! 4. once the endpoint is done (or the peer's bytes were unreadable),
//!    close when everything is written or the close timeout has passed;
//! 5. sleep until the transport, the endpoint's waker, or the endpoint's
//!    next deadline wakes it.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rsocket_proto::{DecodeError, OutFrame};

use crate::turns::{READS_PER_TURN, WRITE_HIGH, WRITES_PER_TURN};
use crate::{FrameIo, TransportError};

/// Why a driven connection ended.
#[derive(Debug)]
pub enum End {
    /// The peer closed its side (end of stream).
    PeerClosed,
    /// Reading failed.
    ReadFailed(TransportError),
    /// Writing failed.
    WriteFailed(TransportError),
    /// This side was done with the connection and closed it.
    Closed,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PeerClosed => f.write_str("the peer closed the connection"),
            Self::ReadFailed(e) => write!(f, "read failed: {e}"),
            Self::WriteFailed(e) => write!(f, "write failed: {e}"),
            Self::Closed => f.write_str("closed by this side"),
        }
    }
}

/// What one pass wrote, and what the transport holds after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Bytes the transport put on the wire in this pass (its framing included).
    pub wire_bytes: u64,
    /// Frames handed to the transport in this pass.
    pub frames: u64,
    /// Bytes queued in the transport and not yet written.
    pub queued: usize,
    /// Bytes the transport's buffers hold beyond their base size.
    pub buffered: usize,
}

/// The side of a connection that is not the transport: the broker's shard
/// or the client's connection state.
pub trait Endpoint {
    /// Called at the start of every pass with the task's waker: the
    /// endpoint wakes it when it has frames to send or may read again.
    fn register(&mut self, waker: &Waker);

    /// Whether to read now; `false` is backpressure (or a connection that
    /// takes no more frames).
    fn may_read(&self) -> bool;

    /// Whole frames read, and the wire bytes the transport read for them.
    /// The endpoint takes the frames out of `frames`.
    fn received(&mut self, now: Instant, frames: &mut Vec<Bytes>, wire_bytes: u64);

    /// The peer's bytes are not RSocket frames: the endpoint sends its
    /// ERROR and closes. Nothing more is read.
    fn unreadable(&mut self, now: Instant, error: DecodeError);

    /// Called after reading and before writing in every pass.
    fn before_write(&mut self) {}

    /// The next frame to send.
    fn poll_transmit(&mut self) -> Option<OutFrame>;

    /// Bytes of frames the endpoint has ready and has not handed over.
    fn pending_bytes(&self) -> usize;

    /// A frame the transport could not take (it is dropped).
    fn unsendable(&mut self, error: TransportError);

    /// The pass's writes are done.
    fn written(&mut self, written: Written);

    /// Whether the endpoint is done with the connection: it closes once
    /// everything is written, or after [`Endpoint::close_timeout`].
    fn is_closed(&self) -> bool;

    /// How long a closed connection waits for the peer to take its last
    /// frames (a peer that does not read would keep it forever).
    fn close_timeout(&self) -> Duration;

    /// When the endpoint next needs a pass without any I/O (keepalives).
    fn next_timeout(&self) -> Option<Instant> {
        None
    }

    /// The connection ended; the transport is closed or gone.
    fn finish(&mut self, end: End);
}

thread_local! {
    /// The frames of the read in progress on this thread.
    static FRAMES: std::cell::RefCell<Vec<Bytes>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Drives `io` for `endpoint` until the connection ends.
pub async fn drive<E: Endpoint, T: FrameIo>(mut endpoint: E, mut io: T) {
    let mut unreadable = false;
    let mut wire = io.wire_bytes();
    // Once the endpoint is done: when to stop waiting for the last frames.
    let mut close_at: Option<Instant> = None;
    let mut timer: Option<glommio::timer::Timer> = None;
    let mut armed: Option<Instant> = None;
    poll_fn(|cx| {
        endpoint.register(cx.waker());
        // Read, a few times: a socket that never runs dry would otherwise
        // keep this task reading and starve every other task on the
        // thread, the consumers of what it reads included.
        let mut reads = 0;
        // The frames of one read go in the thread's one list: an idle
        // connection holds none.
        let mut frames = FRAMES.with_borrow_mut(std::mem::take);
        while !unreadable && endpoint.may_read() {
            if reads == READS_PER_TURN {
                cx.waker().wake_by_ref();
                break;
            }
            reads += 1;
            match io.poll_read(cx, &mut frames) {
                Poll::Ready(Ok(true)) => {
                    let read = io.wire_bytes().read;
                    let bytes = read.saturating_sub(wire.read);
                    wire.read = read;
                    endpoint.received(Instant::now(), &mut frames, bytes);
                    frames.clear();
                }
                Poll::Ready(Ok(false)) => {
                    endpoint.finish(End::PeerClosed);
                    FRAMES.set(frames);
                    return Poll::Ready(());
                }
                Poll::Ready(Err(TransportError::Decode(e))) => {
                    endpoint.unreadable(Instant::now(), e);
                    unreadable = true;
                }
                Poll::Ready(Err(e)) => {
                    endpoint.finish(End::ReadFailed(e));
                    FRAMES.set(frames);
                    return Poll::Ready(());
                }
                Poll::Pending => break,
            }
        }
        frames.clear();
        FRAMES.set(frames);
        endpoint.before_write();
        // Write: take frames while the transport has room and flush; when a
        // flush empties the transport and the endpoint holds more, go again
        // (nothing else would wake this task for them).
        let mut rounds = 0;
        let mut sent = 0;
        loop {
            while io.queued_bytes() < WRITE_HIGH {
                let Some(frame) = endpoint.poll_transmit() else {
                    break;
                };
                match io.queue(&frame) {
                    Ok(()) => sent += 1,
                    Err(e) => endpoint.unsendable(e),
                }
            }
            match io.poll_flush(cx) {
                Poll::Pending => break,
                Poll::Ready(Ok(())) => {
                    if endpoint.pending_bytes() == 0 {
                        break;
                    }
                    rounds += 1;
                    if rounds == WRITES_PER_TURN {
                        // Let the other connections have the core; come back soon.
                        cx.waker().wake_by_ref();
                        break;
                    }
                }
                Poll::Ready(Err(e)) => {
                    endpoint.finish(End::WriteFailed(e));
                    return Poll::Ready(());
                }
            }
        }
        let written = io.wire_bytes().written;
        endpoint.written(Written {
            wire_bytes: written.saturating_sub(wire.written),
            frames: sent,
            queued: io.queued_bytes(),
            buffered: io.buffered_bytes(),
        });
        wire.written = written;
        // Close once the endpoint is done and everything is written, or once
        // the peer has had the close timeout to take it.
        let mut deadline = endpoint.next_timeout();
        if unreadable || endpoint.is_closed() {
            let now = Instant::now();
            // The earliest deadline so far: an endpoint that shortens its
            // timeout (a graceful close turned into an abort) is closed sooner.
            let at = close_at.map_or(now + endpoint.close_timeout(), |a| {
                a.min(now + endpoint.close_timeout())
            });
            close_at = Some(at);
            if endpoint.pending_bytes() + io.queued_bytes() == 0 || now >= at {
                let _ = io.poll_close(cx);
                endpoint.finish(End::Closed);
                return Poll::Ready(());
            }
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        // Wake for the next deadline. Deadlines mostly move later (every
        // frame received pushes keepalive timeouts back); re-arming on each
        // pass would cost a timer update per pass, so the timer moves only
        // to an earlier deadline or once it has fired (a wake-up that comes
        // early finds nothing due and arms it again).
        // The clock is read only when there is a deadline: most passes of a
        // busy connection have none.
        let now = deadline.map(|_| Instant::now());
        if let (Some(at), Some(now)) = (deadline, now)
            && armed.is_none_or(|a| at < a || a <= now)
        {
            let t = timer.get_or_insert_with(|| {
                glommio::timer::Timer::new(at.saturating_duration_since(now))
            });
            t.reset(at.saturating_duration_since(now));
            armed = Some(at);
            if Pin::new(t).poll(cx).is_ready() {
                armed = None;
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    })
    .await
}
