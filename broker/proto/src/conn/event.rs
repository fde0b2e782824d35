//! What a connection reports to the application: events and counters.

use bytes::Bytes;

use super::Interaction;
use crate::error::{ConnectionError, ErrorCode, StreamError};
use crate::frame::{FrameView, Lease, Resume, Setup};

/// Something the application must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Server: the client's SETUP was valid and is accepted. The application
    /// may still refuse it with [`Connection::reject_setup`]. If it asked for
    /// LEASE (`lease`), the client sends no request until the application
    /// grants one with [`Connection::send_lease`].
    Setup(Box<Setup>),
    /// Server: a new connection opened with RESUME. Resume the session with
    /// that token ([`Connection::resume_session`]) or refuse
    /// ([`Connection::reject_resume`]).
    ResumeRequested(Box<Resume>),
    /// Client: the server accepted RESUME; lost frames have been queued again.
    Resumed,
    /// The first (or only) frame of a request from the peer. With
    /// `frame.follows()` the rest arrives as [`Event::Fragment`]s.
    Request {
        /// The stream.
        stream_id: u32,
        /// Its interaction model.
        interaction: Interaction,
        /// The request frame (a whole reassembled message when reassembling).
        frame: FrameView,
        /// The stream is already over (fire-and-forget).
        ended: bool,
    },
    /// A follow-up fragment of a message (only when not reassembling).
    Fragment {
        /// The stream.
        stream_id: u32,
        /// The PAYLOAD fragment.
        frame: FrameView,
        /// The stream ended with this fragment.
        ended: bool,
    },
    /// The first (or only) frame of a PAYLOAD message on a stream.
    Payload {
        /// The stream.
        stream_id: u32,
        /// The PAYLOAD frame (a whole reassembled message when reassembling).
        frame: FrameView,
        /// The stream ended with this payload.
        ended: bool,
    },
    /// The peer granted `n` more items.
    RequestN {
        /// The stream.
        stream_id: u32,
        /// Credit added.
        n: u32,
    },
    /// The peer cancelled the stream (or, on a channel, the requester's half of it).
    Cancel {
        /// The stream.
        stream_id: u32,
        /// The whole stream is over.
        ended: bool,
    },
    /// The peer ended the stream with an ERROR.
    Error {
        /// The stream.
        stream_id: u32,
        /// The error code.
        code: ErrorCode,
        /// The error data (usually a UTF-8 message).
        data: Bytes,
    },
    /// This side ended a stream because the peer broke a rule on it; the peer
    /// was sent ERROR (or CANCEL, where this side is the requester).
    StreamError {
        /// The stream.
        stream_id: u32,
        /// What happened.
        error: StreamError,
    },
    /// METADATA_PUSH from the peer.
    MetadataPush(Bytes),
    /// The peer granted a lease.
    Lease(Lease),
    /// The peer sent ERROR[CONNECTION_CLOSE]: no new streams; the connection
    /// closes when the open ones end.
    Closing(ConnectionError),
    /// The connection is closed; frames still queued (a final ERROR) should
    /// be flushed before the transport is closed.
    Closed(ConnectionError),
}

/// Counters for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames handed to `handle_frame`.
    pub frames_received: u64,
    /// Frames queued for transmission.
    pub frames_sent: u64,
    /// Frames ignored under the spec's "handling the unexpected" rules.
    pub frames_ignored: u64,
}
