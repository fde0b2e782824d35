//! Framing on the transport: the 24-bit length prefix for byte streams (TCP,
//! TLS, QUIC streams) and bare frames for message transports (WebSocket).
//!
//! The decoder resumes across partial reads: it cuts whole frames out of the
//! receive buffer with `split_to(..).freeze()`, so after the kernel copy the
//! payload bytes are never copied again. The maximum frame size is checked as
//! soon as the three prefix bytes are there, before any of the frame is
//! buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::frame::{HEADER_LEN, MAX_U24, get_u24, put_u24};
use crate::out::OutFrame;

/// Length of the frame length prefix on byte-stream transports.
pub const PREFIX_LEN: usize = 3;

/// Cuts length-prefixed frames out of a byte stream.
#[derive(Clone, Copy, Debug)]
pub struct LengthPrefixed {
    max_frame_size: usize,
}

impl Default for LengthPrefixed {
    fn default() -> Self {
        Self::new(MAX_U24)
    }
}

impl LengthPrefixed {
    /// A decoder that refuses frames longer than `max_frame_size` bytes
    /// (clamped to what 24 bits can express, 16 MiB - 1).
    pub fn new(max_frame_size: usize) -> Self {
        Self {
            max_frame_size: max_frame_size.clamp(HEADER_LEN, MAX_U24),
        }
    }

    /// The configured maximum.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Takes the next whole frame off the front of `buf`, or returns `None`
    /// when more bytes are needed. After an error the stream cannot be
    /// resynchronised: the caller closes the connection.
    #[inline]
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
        let Some(len) = get_u24(buf) else {
            return Ok(None);
        };
        if len > self.max_frame_size {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame_size,
            });
        }
        if len < HEADER_LEN {
            return Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                available: len,
            });
        }
        if buf.len() < PREFIX_LEN + len {
            // Buffer sizing is the transport's call (see `bytes_needed`): a
            // peer's 3-byte prefix must not make this side allocate 16 MiB.
            return Ok(None);
        }
        buf.advance(PREFIX_LEN);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// Bytes still missing before the frame at the front of `buf` is whole
    /// (0 when a whole frame is there; at least 1 while the prefix is incomplete).
    pub fn bytes_needed(&self, buf: &[u8]) -> usize {
        match get_u24(buf) {
            Some(len) => (PREFIX_LEN + len).saturating_sub(buf.len()),
            None => PREFIX_LEN - buf.len(),
        }
    }
}

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

    fn prefixed(frame: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, frame.len() as u8];
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn decodes_across_partial_reads() {
        let frame = [0u8, 0, 0, 1, 0x24, 0, 0xAA, 0xBB];
        let wire = prefixed(&frame);
        let codec = LengthPrefixed::default();
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            assert_eq!(codec.decode(&mut buf).unwrap(), None, "byte {i}");
            buf.put_u8(*b);
        }
        assert_eq!(codec.decode(&mut buf).unwrap().as_deref(), Some(&frame[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_oversized_frame_as_soon_as_prefix_arrives() {
        let codec = LengthPrefixed::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 101][..]);
        assert_eq!(
            codec.decode(&mut buf),
            Err(DecodeError::FrameTooLarge { len: 101, max: 100 })
        );
    }

    #[test]
    fn rejects_frame_shorter_than_header() {
        let codec = LengthPrefixed::default();
        let mut buf = BytesMut::from(&[0u8, 0, 5, 0, 0, 0, 0, 0][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn bytes_needed_counts_prefix_and_body() {
        let codec = LengthPrefixed::default();
        assert_eq!(codec.bytes_needed(&[]), 3);
        assert_eq!(codec.bytes_needed(&[0, 0]), 1);
        assert_eq!(codec.bytes_needed(&[0, 0, 10, 1]), 9);
        assert_eq!(codec.bytes_needed(&[0, 0, 1, 1]), 0);
    }

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
