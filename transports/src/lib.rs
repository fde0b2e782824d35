//! RSocket frame transports on glommio, for the broker and its client.
//!
//! # Layout
//!
//! - [`FrameIo`]: what the broker and the client need from a connection:
//!   whole frames in, frames out, one flush per pass. TCP implements it
//!   now; TLS, WebSocket and QUIC implement the same trait.
//! - [`tcp`]: TCP with the 24-bit length prefix.
//! - [`ReadBuf`]: the receive buffer frames are cut out of without copying.
//! - [`WriteQueue`]: outgoing frames, small ones coalesced into one write,
//!   large bodies written from their own buffers.
//! - [`ListenAddr`]: `tcp://host:port` and the like.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rsocket_proto::codec::{PREFIX_LEN, TooLong, put_prefix};
use rsocket_proto::frame::{HEADER_LEN, MAX_U24, get_u24};
use rsocket_proto::{DecodeError, OutFrame};

pub mod tcp;

pub use tcp::TcpFrames;

/// Why a connection's byte stream ended.
#[derive(Debug)]
pub enum TransportError {
    /// The socket failed.
    Io(io::Error),
    /// The peer's bytes are not RSocket frames (or exceed the size limit).
    Decode(DecodeError),
    /// A frame this side tried to send cannot be framed.
    TooLong(TooLong),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o error: {e}"),
            Self::Decode(e) => write!(f, "unreadable frame: {e}"),
            Self::TooLong(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TransportError {}

impl From<io::Error> for TransportError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// One connection's frames, as the broker and the client use them.
pub trait FrameIo {
    /// Reads what the socket has and appends every whole frame to `frames`.
    /// `Ready(Ok(true))` when frames were added, `Ready(Ok(false))` at the
    /// end of the stream.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Bytes>,
    ) -> Poll<Result<bool, TransportError>>;

    /// Queues a frame; nothing is written until [`FrameIo::poll_flush`].
    fn queue(&mut self, frame: &OutFrame) -> Result<(), TransportError>;

    /// Bytes queued and not yet written.
    fn queued_bytes(&self) -> usize;

    /// Writes queued frames until done or the socket is full.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>>;

    /// Shuts the connection down for writing (after a flush).
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>>;

    /// The peer's address, where there is one.
    fn peer(&self) -> Option<SocketAddr>;
}

/// Smallest free space a read is given; also the size of a fresh buffer.
const READ_CHUNK: usize = 64 * 1024;

/// The receive buffer of a byte-stream transport.
///
/// Frames are cut out of it with `split_to(..).freeze()`, so the bytes the
/// kernel wrote are the bytes the broker forwards. Its memory is always
/// initialised (a fresh buffer is allocated zeroed, once), so reads go
/// straight into it without clearing it first.
#[derive(Debug)]
pub struct ReadBuf {
    buf: BytesMut,
    filled: usize,
    max_frame: usize,
}

impl ReadBuf {
    /// A buffer for frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: BytesMut::zeroed(READ_CHUNK),
            filled: 0,
            max_frame: max_frame.clamp(HEADER_LEN, MAX_U24),
        }
    }

    /// Free space to read into: at least what the frame in progress still
    /// needs (up to one chunk beyond).
    pub fn spare(&mut self) -> &mut [u8] {
        let needed = match get_u24(self.buf.get(..self.filled).unwrap_or_default()) {
            Some(len) => (PREFIX_LEN + len.min(self.max_frame)).saturating_sub(self.filled),
            None => PREFIX_LEN,
        };
        let want = needed.max(4096);
        if self.buf.len() - self.filled < want {
            // Move the partial frame to a fresh buffer. Earlier frames keep
            // the old one alive for as long as they are referenced.
            let size = (self.filled + needed).max(READ_CHUNK);
            let mut fresh = BytesMut::zeroed(size);
            if let (Some(dst), Some(src)) =
                (fresh.get_mut(..self.filled), self.buf.get(..self.filled))
            {
                dst.copy_from_slice(src);
            }
            self.buf = fresh;
        }
        self.buf.get_mut(self.filled..).unwrap_or_default()
    }

    /// `n` bytes were read into [`ReadBuf::spare`].
    pub fn filled(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.buf.len());
    }

    /// Bytes read and not yet cut into frames.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Whether no partial frame is buffered.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// The next whole frame (without its length prefix), if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        let Some(len) = get_u24(self.buf.get(..self.filled).unwrap_or_default()) else {
            return Ok(None);
        };
        if len > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len < HEADER_LEN {
            return Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                available: len,
            });
        }
        if self.filled < PREFIX_LEN + len {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(PREFIX_LEN + len);
        self.filled -= PREFIX_LEN + len;
        frame.advance(PREFIX_LEN);
        Ok(Some(frame.freeze()))
    }
}

/// Frames waiting to be written.
///
/// Heads and small parts are copied into one batch buffer (one write for
/// many frames); a metadata or data part larger than the copy threshold is
/// written from its own buffer, never copied.
#[derive(Debug)]
pub struct WriteQueue {
    segments: std::collections::VecDeque<Bytes>,
    batch: BytesMut,
    queued: usize,
    copy_threshold: usize,
}

impl Default for WriteQueue {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl WriteQueue {
    /// A queue that copies parts of at most `copy_threshold` bytes.
    pub fn new(copy_threshold: usize) -> Self {
        Self {
            segments: std::collections::VecDeque::new(),
            batch: BytesMut::with_capacity(16 * 1024),
            queued: 0,
            copy_threshold,
        }
    }

    /// Queues a frame with its length prefix.
    pub fn push_prefixed(&mut self, frame: &OutFrame) -> Result<(), TooLong> {
        put_prefix(&mut self.batch, frame.len())?;
        self.push_parts(frame);
        self.queued += PREFIX_LEN + frame.len();
        Ok(())
    }

    /// Queues a frame as it is (message transports frame it themselves).
    pub fn push_bare(&mut self, frame: &OutFrame) {
        self.push_parts(frame);
        self.queued += frame.len();
    }

    fn push_parts(&mut self, frame: &OutFrame) {
        self.batch.put_slice(frame.head());
        let (metadata, data) = frame.shared_parts();
        for part in [metadata, data] {
            if part.len() <= self.copy_threshold {
                self.batch.put_slice(part);
            } else {
                self.seal();
                self.segments.push_back(part.clone());
            }
        }
    }

    fn seal(&mut self) {
        if !self.batch.is_empty() {
            self.segments.push_back(self.batch.split().freeze());
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// The next bytes to write (sealing the batch first).
    pub fn front(&mut self) -> Option<&[u8]> {
        if self.segments.is_empty() {
            self.seal();
        }
        self.segments.front().map(|b| &b[..])
    }

    /// `n` bytes of the front were written.
    pub fn advance(&mut self, n: usize) {
        self.queued = self.queued.saturating_sub(n);
        if let Some(front) = self.segments.front_mut() {
            if n >= front.len() {
                self.segments.pop_front();
            } else {
                front.advance(n);
            }
        }
    }

    /// The shared parts queued right now, for tests that check nothing was copied.
    pub fn segments(&self) -> impl Iterator<Item = &Bytes> {
        self.segments.iter()
    }
}

/// Where to listen: a transport and an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// `tcp://host:port`
    Tcp(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?}: expected scheme://host:port"))?;
        if scheme != "tcp" {
            return Err(format!(
                "{s:?}: unsupported transport {scheme:?} (supported: tcp)"
            ));
        }
        let addr = rest
            .to_socket_addrs()
            .map_err(|e| format!("{s:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{s:?}: the host resolves to no address"))?;
        Ok(Self::Tcp(addr))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsocket_proto::frame::{Frame, Payload};

    fn frame(len: usize) -> OutFrame {
        OutFrame::from_frame(&Frame::from(Payload {
            stream_id: 1,
            follows: false,
            complete: false,
            next: true,
            metadata: None,
            data: Bytes::from(vec![7; len]),
        }))
    }

    #[test]
    fn read_buf_cuts_frames_across_reads_without_copying_them() {
        let mut wire = WriteQueue::new(usize::MAX);
        for len in [10, 70_000, 5] {
            wire.push_prefixed(&frame(len)).unwrap();
        }
        let bytes: Vec<u8> = std::iter::from_fn(|| {
            let f = wire.front()?.to_vec();
            wire.advance(f.len());
            Some(f)
        })
        .flatten()
        .collect();
        let mut rb = ReadBuf::new(MAX_U24);
        let mut frames = Vec::new();
        for chunk in bytes.chunks(1000) {
            let mut chunk = chunk;
            while !chunk.is_empty() {
                let spare = rb.spare();
                let n = spare.len().min(chunk.len());
                spare[..n].copy_from_slice(&chunk[..n]);
                rb.filled(n);
                chunk = &chunk[n..];
                while let Some(f) = rb.next_frame().unwrap() {
                    frames.push(f);
                }
            }
        }
        let lens: Vec<usize> = frames.iter().map(Bytes::len).collect();
        assert_eq!(lens, [16, 70_006, 11]);
        assert!(rb.is_empty());
    }

    #[test]
    fn read_buf_refuses_oversized_frames() {
        let mut rb = ReadBuf::new(100);
        rb.spare()[..3].copy_from_slice(&[0, 1, 0]);
        rb.filled(3);
        assert_eq!(
            rb.next_frame(),
            Err(DecodeError::FrameTooLarge { len: 256, max: 100 })
        );
    }

    #[test]
    fn write_queue_shares_large_parts_and_copies_small_ones() {
        let mut q = WriteQueue::new(4096);
        let small = frame(100);
        let big = frame(65_536);
        q.push_prefixed(&small).unwrap();
        q.push_prefixed(&big).unwrap();
        q.push_prefixed(&small).unwrap();
        assert_eq!(q.len(), 3 * 3 + 2 * 106 + 65_542);
        let (_, big_data) = big.shared_parts();
        q.front();
        assert!(
            q.segments().any(|s| s.as_ptr() == big_data.as_ptr()),
            "the big body is queued by reference"
        );
        let mut total = 0;
        while let Some(f) = q.front() {
            let n = f.len().min(1000);
            total += n;
            q.advance(n);
        }
        assert_eq!(total, 3 * 3 + 2 * 106 + 65_542);
        assert!(q.is_empty());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "tcp://127.0.0.1:9999".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("127.0.0.1:9999".parse().unwrap()))
        );
        assert!(
            "udp://127.0.0.1:1"
                .parse::<ListenAddr>()
                .unwrap_err()
                .contains("unsupported")
        );
        assert!("127.0.0.1:1".parse::<ListenAddr>().is_err());
    }
}
