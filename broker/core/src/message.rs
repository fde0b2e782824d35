//! Messages between shards. Each pair of shards has a FIFO queue, so a
//! stream's `Open` always arrives before the frames that follow it.

use bytes::Bytes;
use rsocket_proto::{ErrorCode, FrameView};

use crate::ids::{ConnId, StreamRef};
use crate::routes::RouteUpdate;

/// Something for the other side of a forwarded stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// A frame (PAYLOAD, or any frame of a fragmented message), passed on with
    /// only its stream id replaced.
    Frame(FrameView),
    /// REQUEST_N.
    RequestN(u32),
    /// CANCEL.
    Cancel,
    /// ERROR.
    Error {
        /// Code.
        code: ErrorCode,
        /// Data.
        data: Bytes,
    },
}

/// A message from one shard to another (or to itself).
#[derive(Clone, Debug)]
pub enum Message {
    /// Start a stream on connection `to` with this request frame, on behalf
    /// of the requester's stream `origin`.
    Open {
        /// Requester's stream.
        origin: StreamRef,
        /// Responder connection.
        to: ConnId,
        /// The request (first frame, if fragmented).
        frame: FrameView,
        /// For REQUEST_STREAM and REQUEST_CHANNEL: the credit to grant the
        /// responder, in place of the request's own initial request n.
        credit: Option<u32>,
    },
    /// From the requester's side of a stream to the responder's.
    ToResponder {
        /// Requester's stream (identifies the stream on `to`).
        origin: StreamRef,
        /// Responder connection.
        to: ConnId,
        /// What to pass on.
        signal: Signal,
    },
    /// From the responder's side of a stream to the requester's.
    ToRequester {
        /// Requester's stream.
        to: StreamRef,
        /// What to pass on.
        signal: Signal,
    },
    /// The responder side of `to` is gone: its connection closed, or was
    /// gone before the request reached it. The requester's shard retries
    /// or ends the stream with `code`.
    Gone {
        /// Requester's stream.
        to: StreamRef,
        /// REJECTED when the request never reached the responder, CANCELED when it may have.
        code: ErrorCode,
        /// What happened, for the requester.
        reason: String,
    },
    /// A route table change.
    Route(RouteUpdate),
    /// Stop reading connection `conn`: a connection it feeds is full.
    /// Counted: each `Pause` is undone by one `Resume`.
    Pause {
        /// The connection (with its generation: a reused slot is not it).
        conn: ConnId,
    },
    /// Undoes one `Pause`.
    Resume {
        /// The connection.
        conn: ConnId,
    },
    /// Shard `from` has handled `bytes` of frames this shard sent it
    /// (see [`crate::flow::MeshFlow`]).
    Acked {
        /// The shard that handled them.
        from: u16,
        /// Their bytes, as [`Message::frame_bytes`] counts them.
        bytes: usize,
    },
}

impl Message {
    /// The bytes of the frame this message carries (0 for none).
    pub fn frame_bytes(&self) -> usize {
        match self {
            Self::Open { frame, .. } => frame.len(),
            Self::ToResponder {
                signal: Signal::Frame(f),
                ..
            }
            | Self::ToRequester {
                signal: Signal::Frame(f),
                ..
            } => f.len(),
            _ => 0,
        }
    }
}
