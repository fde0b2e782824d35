//! Framing on the transport: the 24-bit length prefix for byte streams (TCP,
//! TLS, QUIC streams) and bare frames for message transports (WebSocket).
//!
//! [`ReadBuf`] is the byte-stream decoder: it resumes across partial reads
//! and cuts whole frames out of the receive buffer with
//! `split_to(..).freeze()`, so after the kernel copy the payload bytes are
//! never copied again. The maximum frame size is checked as soon as the
//! three prefix bytes are there, before any of the frame is buffered.

use bytes::{BufMut, Bytes};

use crate::error::DecodeError;
use crate::frame::{HEADER_LEN, MAX_U24, put_u24};
use crate::out::OutFrame;

mod chunks;
pub mod pool;
mod read_buf;

pub use chunks::ChunkCutter;
pub use read_buf::{PARK_COPY, ReadBuf};

/// Length of the frame length prefix on byte-stream transports.
pub const PREFIX_LEN: usize = 3;

/// Checks a frame that arrived as one transport message (no prefix).
#[derive(Clone, Copy, Debug)]
pub struct Message {
    max_frame_size: usize,
}

impl Default for Message {
    fn default() -> Self {
        Self::new(MAX_U24)
    }
}

impl Message {
    /// A checker that refuses frames longer than `max_frame_size`.
    pub fn new(max_frame_size: usize) -> Self {
        Self {
            max_frame_size: max_frame_size.clamp(HEADER_LEN, MAX_U24),
        }
    }

    /// The frame carried by one message.
    pub fn decode(&self, message: Bytes) -> Result<Bytes, DecodeError> {
        if message.len() > self.max_frame_size {
            return Err(DecodeError::FrameTooLarge {
                len: message.len(),
                max: self.max_frame_size,
            });
        }
        if message.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                available: message.len(),
            });
        }
        Ok(message)
    }
}

/// A frame too long for the 24-bit length prefix (nothing was written).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frame of {0} bytes does not fit a 24-bit length prefix")]
pub struct TooLong(pub usize);

/// Writes the 24-bit length prefix of a frame of `len` bytes.
#[inline]
pub fn put_prefix(buf: &mut impl BufMut, len: usize) -> Result<(), TooLong> {
    if len > MAX_U24 {
        return Err(TooLong(len));
    }
    put_u24(buf, len);
    Ok(())
}

/// Appends a frame with its length prefix (copying its parts).
pub fn put_prefixed(buf: &mut impl BufMut, frame: &OutFrame) -> Result<(), TooLong> {
    put_prefix(buf, frame.len())?;
    for chunk in frame.chunks() {
        buf.put_slice(chunk);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn prefix_refuses_what_24_bits_cannot_say() {
        let mut buf = BytesMut::new();
        assert_eq!(put_prefix(&mut buf, MAX_U24 + 1), Err(TooLong(MAX_U24 + 1)));
        assert!(buf.is_empty());
        put_prefix(&mut buf, MAX_U24).unwrap();
        assert_eq!(&buf[..], &[0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn message_framing_checks_size() {
        let m = Message::new(10);
        assert!(m.decode(Bytes::from_static(&[0; 11])).is_err());
        assert!(m.decode(Bytes::from_static(&[0; 5])).is_err());
        assert_eq!(m.decode(Bytes::from_static(&[0; 6])).unwrap().len(), 6);
    }
}
