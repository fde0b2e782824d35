//! Errors in three layers, as h2 has them: a small `Copy` [`DecodeError`] for
//! bytes that do not form a frame, [`StreamError`] / [`ConnectionError`] that
//! carry the RSocket error code sent (or received) on the wire, and
//! [`ErrorCode`] itself.

use std::borrow::Cow;
use std::fmt;

/// Why a run of bytes is not a valid frame or metadata entry.
///
/// Kept small and `Copy` so the decoder can return it by value on the hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the fixed fields of the frame or entry need.
    #[error("truncated: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the fixed fields need.
        needed: usize,
        /// Bytes that were there.
        available: usize,
    },
    /// A metadata length field points past the end of its frame.
    #[error("metadata length {declared} exceeds the {available} bytes left in the frame")]
    MetadataLength {
        /// The declared metadata length.
        declared: usize,
        /// Bytes left after the length field.
        available: usize,
    },
    /// A frame type this implementation does not know (the Ignore flag says
    /// whether the peer allows it to be skipped).
    #[error("unknown frame type {frame_type:#04x}")]
    UnknownFrameType {
        /// The 6-bit frame type.
        frame_type: u8,
    },
    /// A length prefix larger than the configured maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum frame size {max}")]
    FrameTooLarge {
        /// The declared frame length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A string field that must be US-ASCII or UTF-8 is not.
    #[error("invalid text in a {field} field")]
    InvalidText {
        /// Which field.
        field: &'static str,
    },
    /// A length field is zero or outside the range its field allows.
    #[error("invalid length {len} for a {field} field")]
    InvalidLength {
        /// Which field.
        field: &'static str,
        /// The offending length.
        len: usize,
    },
}

/// An RSocket error code (`ERROR` frame, 32 bits).
///
/// Application-defined codes (0x301..=0xFFFFFFFE) are representable too, so
/// this is a newtype rather than an enum.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Reserved.
    pub const RESERVED: Self = Self(0x0000_0000);
    /// The SETUP frame is invalid for the server. Stream ID MUST be 0.
    pub const INVALID_SETUP: Self = Self(0x0000_0001);
    /// Some (or all) of the parameters of the SETUP are unsupported. Stream ID MUST be 0.
    pub const UNSUPPORTED_SETUP: Self = Self(0x0000_0002);
    /// The server rejected the setup. Stream ID MUST be 0.
    pub const REJECTED_SETUP: Self = Self(0x0000_0003);
    /// The server rejected the resume. Stream ID MUST be 0.
    pub const REJECTED_RESUME: Self = Self(0x0000_0004);
    /// The connection is being terminated now. Stream ID MUST be 0.
    pub const CONNECTION_ERROR: Self = Self(0x0000_0101);
    /// The connection is being terminated once outstanding streams finish. Stream ID MUST be 0.
    pub const CONNECTION_CLOSE: Self = Self(0x0000_0102);
    /// Application layer error (onError). Stream ID MUST be > 0.
    pub const APPLICATION_ERROR: Self = Self(0x0000_0201);
    /// The responder rejected the request without processing it. Stream ID MUST be > 0.
    pub const REJECTED: Self = Self(0x0000_0202);
    /// The responder canceled the request; it may have started processing. Stream ID MUST be > 0.
    pub const CANCELED: Self = Self(0x0000_0203);
    /// The request is invalid. Stream ID MUST be > 0.
    pub const INVALID: Self = Self(0x0000_0204);
    /// Reserved for extension use.
    pub const RESERVED_EXT: Self = Self(0xFFFF_FFFF);

    /// The spec's name of the code, if it has one.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::RESERVED => "RESERVED",
            Self::INVALID_SETUP => "INVALID_SETUP",
            Self::UNSUPPORTED_SETUP => "UNSUPPORTED_SETUP",
            Self::REJECTED_SETUP => "REJECTED_SETUP",
            Self::REJECTED_RESUME => "REJECTED_RESUME",
            Self::CONNECTION_ERROR => "CONNECTION_ERROR",
            Self::CONNECTION_CLOSE => "CONNECTION_CLOSE",
            Self::APPLICATION_ERROR => "APPLICATION_ERROR",
            Self::REJECTED => "REJECTED",
            Self::CANCELED => "CANCELED",
            Self::INVALID => "INVALID",
            Self::RESERVED_EXT => "RESERVED_EXT",
            _ => return None,
        })
    }

    /// Codes that may only appear on stream 0.
    pub fn is_connection_level(self) -> bool {
        matches!(
            self,
            Self::INVALID_SETUP
                | Self::UNSUPPORTED_SETUP
                | Self::REJECTED_SETUP
                | Self::REJECTED_RESUME
                | Self::CONNECTION_ERROR
                | Self::CONNECTION_CLOSE
        )
    }

    /// Codes that answer a SETUP or RESUME.
    pub fn is_setup_rejection(self) -> bool {
        matches!(
            self,
            Self::INVALID_SETUP
                | Self::UNSUPPORTED_SETUP
                | Self::REJECTED_SETUP
                | Self::REJECTED_RESUME
        )
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({:#x})", self.0),
            None => write!(f, "ErrorCode({:#x})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Which side of the connection started an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initiator {
    /// This side detected the problem and told the peer.
    Local,
    /// The peer sent the ERROR.
    Remote,
}

/// An error that ends one stream, and the code that went (or came) over the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code} on stream: {message}")]
pub struct StreamError {
    /// The RSocket error code.
    pub code: ErrorCode,
    /// Human-readable reason, sent as the ERROR frame's data.
    pub message: Cow<'static, str>,
    /// Who raised it.
    pub initiator: Initiator,
}

impl StreamError {
    /// A stream error raised by this side.
    pub fn local(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            initiator: Initiator::Local,
        }
    }
}

/// An error that ends the whole connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code} on connection: {message}")]
pub struct ConnectionError {
    /// The RSocket error code (stream 0).
    pub code: ErrorCode,
    /// Human-readable reason, sent as the ERROR frame's data.
    pub message: Cow<'static, str>,
    /// Who raised it.
    pub initiator: Initiator,
}

impl ConnectionError {
    /// A connection error raised by this side.
    pub fn local(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            initiator: Initiator::Local,
        }
    }
}

/// Why a local call on the connection (send a request, a payload, ...) was refused.
///
/// Nothing is sent when one of these is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The connection is closed or closing.
    #[error("connection is closed")]
    Closed,
    /// The connection has not finished its SETUP / RESUME exchange.
    #[error("connection is not established")]
    NotEstablished,
    /// No stream with this id is open on this connection.
    #[error("stream {0} is not open")]
    UnknownStream(u32),
    /// The stream is open but this frame is not allowed in its current state.
    #[error("stream {stream_id}: {reason}")]
    InvalidState {
        /// The stream.
        stream_id: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The peer has not granted the credit (REQUEST_N) this PAYLOAD needs.
    #[error("stream {0} has no credit from its peer")]
    NoCredit(u32),
    /// The peer's LEASE does not allow another request now.
    #[error("no lease: the peer allows no further requests now")]
    NoLease,
    /// All stream ids of this side are in use.
    #[error("no stream id available")]
    StreamIdsExhausted,
    /// An argument is out of range (zero request-n, oversized metadata, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [(ErrorCode, &str, bool); 12] = [
        (ErrorCode::RESERVED, "RESERVED", false),
        (ErrorCode::INVALID_SETUP, "INVALID_SETUP", true),
        (ErrorCode::UNSUPPORTED_SETUP, "UNSUPPORTED_SETUP", true),
        (ErrorCode::REJECTED_SETUP, "REJECTED_SETUP", true),
        (ErrorCode::REJECTED_RESUME, "REJECTED_RESUME", true),
        (ErrorCode::CONNECTION_ERROR, "CONNECTION_ERROR", true),
        (ErrorCode::CONNECTION_CLOSE, "CONNECTION_CLOSE", true),
        (ErrorCode::APPLICATION_ERROR, "APPLICATION_ERROR", false),
        (ErrorCode::REJECTED, "REJECTED", false),
        (ErrorCode::CANCELED, "CANCELED", false),
        (ErrorCode::INVALID, "INVALID", false),
        (ErrorCode::RESERVED_EXT, "RESERVED_EXT", false),
    ];

    #[test]
    fn codes_have_the_specs_names_and_levels() {
        for (code, name, connection_level) in ALL {
            assert_eq!(code.name(), Some(name));
            assert_eq!(code.to_string(), format!("{name}({:#x})", code.0));
            assert_eq!(code.is_connection_level(), connection_level, "{name}");
        }
        let app = ErrorCode(0x301);
        assert_eq!(app.name(), None);
        assert_eq!(format!("{app:?}"), "ErrorCode(0x301)");
        assert!(!app.is_connection_level());
    }
}
