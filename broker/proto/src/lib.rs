//! Sans-IO RSocket 1.0: everything about the protocol, nothing about sockets,
//! threads or clocks (time is passed in), in the style of quinn-proto.
//!
//! # Layout
//!
//! - [`frame`]: every frame type of the spec, a zero-copy [`FrameView`] for
//!   forwarding and typed structs for the control path.
//! - [`codec`]: the 24-bit length prefix of byte-stream transports, decoded
//!   across partial reads, and bare frames for message transports.
//! - [`fragment`]: splitting outgoing messages and reassembling incoming ones.
//! - [`metadata`]: composite metadata, well-known MIME types, routing,
//!   authentication, per-stream MIME types, the broker's route syntax and
//!   binary routing.
//! - [`conn`]: the connection state machine for both roles: SETUP/RESUME,
//!   streams of the four interaction models, REQUEST_N, LEASE, KEEPALIVE.
//! - [`out`]: outgoing frames as an inline head plus shared `Bytes` parts.
//! - [`error`]: decode errors, stream and connection errors, error codes.
//!
//! No function here panics on bytes from the network.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod codec;
pub mod conn;
pub mod error;
pub mod fragment;
pub mod frame;
pub mod metadata;
pub mod out;

pub use conn::{
    Config, Connection, Event, ForwardFrame, Interaction, RequestKind, Role, SetupPayload,
};
pub use error::{ConnectionError, DecodeError, ErrorCode, Initiator, SendError, StreamError};
pub use frame::{Frame, FrameType, FrameView};
pub use out::OutFrame;
