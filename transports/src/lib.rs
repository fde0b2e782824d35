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
//! - [`turns`]: how much a connection driver reads and writes before it
//!   lets the thread's other connections run.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

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

/// How a connection driver (the broker's shard or the client) takes turns
/// with the other connections of its thread.
pub mod turns {
    /// Bytes a connection's transport holds before its driver stops taking
    /// frames from the state machine (they wait there, counted, instead).
    pub const WRITE_HIGH: usize = 256 * 1024;
    /// Reads per connection before it yields to the others: a socket that
    /// never runs dry would otherwise starve every other task on the thread,
    /// the consumers of what it reads included.
    pub const READS_PER_TURN: usize = 4;
    /// Flushes of up to [`WRITE_HIGH`] bytes per connection before it yields.
    pub const WRITES_PER_TURN: usize = 4;
}

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

/// Smallest receive buffer.
const READ_CHUNK: usize = 64 * 1024;

/// Room kept free at the end of a receive buffer at first: frames of up to
/// 64 KiB of payload never have to move.
const MIN_RESERVE: usize = 64 * 1024 + 64;

/// The reserve grows with the frames seen up to this; longer frames move
/// once, into a buffer of their own size.
const MAX_RESERVE: usize = 1024 * 1024 + 64;

/// Used buffers kept for reuse once every frame cut from them is gone.
const SPENT_KEPT: usize = 2;

/// The receive buffer of a byte-stream transport.
///
/// Frames are cut out of it with `split_to(..).freeze()`, so the bytes the
/// kernel wrote are the bytes the broker forwards. A frame is never moved
/// once read, as long as it is no longer than the buffer's reserve (64 KiB
/// of payload at first, then the largest frame seen on the connection):
///
/// - reads stop `reserve` bytes short of the buffer's end, so a frame that
///   starts in a read always fits in what is left;
/// - inside the reserve a read only completes the frame in progress;
/// - when that frame is done the next read goes to another buffer.
///
/// Only a frame longer than any before it can find too little room; its
/// bytes move once and the reserve grows to its size. Buffers are recycled
/// when every frame cut from them has been dropped, so steady traffic
/// neither allocates nor zeroes memory.
#[derive(Debug)]
pub struct ReadBuf {
    /// From the start of the frame in progress to the end of the buffer;
    /// all of it initialised.
    buf: BytesMut,
    /// Initialised bytes of the allocation behind `buf`, from its start.
    size: usize,
    filled: usize,
    max_frame: usize,
    reserve: usize,
    /// Buffers frames may still point into, with their initialised sizes.
    spent: Vec<(BytesMut, usize)>,
    /// Bytes of frames in progress moved to a new buffer so far.
    moved: u64,
}

impl ReadBuf {
    /// A buffer for frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        let max_frame = max_frame.clamp(HEADER_LEN, MAX_U24);
        let reserve = MIN_RESERVE.min(PREFIX_LEN + max_frame);
        let size = Self::size_for(reserve);
        Self {
            buf: BytesMut::zeroed(size),
            size,
            filled: 0,
            max_frame,
            reserve,
            spent: Vec::new(),
            moved: 0,
        }
    }

    fn size_for(reserve: usize) -> usize {
        (2 * reserve).max(READ_CHUNK)
    }

    /// Free space to read into (never empty).
    pub fn spare(&mut self) -> &mut [u8] {
        let room = self.buf.len();
        // Where reads of new frames stop.
        let open = room.saturating_sub(self.reserve);
        let frame_end = get_u24(self.buf.get(..self.filled).unwrap_or_default())
            .map(|len| PREFIX_LEN + len.min(self.max_frame));
        let end = match frame_end {
            Some(end) if end > room => {
                // Longer than any frame before it: it moves, once.
                self.reserve = end.clamp(self.reserve, MAX_RESERVE.max(self.reserve));
                self.switch(end);
                return self.spare();
            }
            Some(end) => end.max(open),
            None if open > self.filled => open,
            None => {
                // In the reserve with no frame begun (at most a partial
                // length prefix): the next frame starts in a new buffer.
                self.switch(0);
                return self.spare();
            }
        };
        self.buf.get_mut(self.filled..end).unwrap_or_default()
    }

    /// Moves the frame in progress (`frame_end` bytes long, when known) to
    /// a new or recycled buffer.
    fn switch(&mut self, frame_end: usize) {
        let size = Self::size_for(self.reserve).max(frame_end);
        let (mut fresh, fresh_size) = self
            .reclaim(size)
            .unwrap_or_else(|| (BytesMut::zeroed(size), size));
        if let (Some(dst), Some(src)) = (fresh.get_mut(..self.filled), self.buf.get(..self.filled))
        {
            dst.copy_from_slice(src);
            if frame_end > 0 {
                // Not counted: a length prefix split by the reserve (1 or 2
                // bytes, not part of the frame cut later).
                self.moved += self.filled as u64;
            }
        }
        let mut old = std::mem::replace(&mut self.buf, fresh);
        let old_size = std::mem::replace(&mut self.size, fresh_size);
        old.clear();
        if self.spent.len() >= SPENT_KEPT {
            self.spent.remove(0);
        }
        self.spent.push((old, old_size));
    }

    /// A spent buffer of at least `size` bytes no frame points into any more.
    fn reclaim(&mut self, size: usize) -> Option<(BytesMut, usize)> {
        let i = self
            .spent
            .iter_mut()
            .position(|(b, n)| *n >= size && b.try_reclaim(*n))?;
        let (mut b, n) = self.spent.swap_remove(i);
        if b.capacity() < n {
            return None;
        }
        // SAFETY: `try_reclaim` succeeded, so `b` is the only handle to its
        // allocation and now starts at the allocation's start, with at
        // least `n` bytes of capacity (checked above). The first `n` bytes
        // of that allocation were initialised when it was created with
        // `BytesMut::zeroed(n)`, and since then they have only been written
        // by reads; nothing de-initialises memory, so they are initialised.
        #[allow(unsafe_code)]
        unsafe {
            b.set_len(n);
        }
        Some((b, n))
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

    /// Bytes of the current buffer beyond the size it starts with: what a
    /// frame longer than usual costs while it arrives (and, once the
    /// reserve has grown for such frames, what every buffer costs more).
    pub fn oversize(&self) -> usize {
        let base = Self::size_for(MIN_RESERVE.min(PREFIX_LEN + self.max_frame));
        self.size.saturating_sub(base)
    }

    /// Bytes of frames in progress that were moved between buffers (each
    /// time a frame longer than any before it arrived).
    pub fn moved_bytes(&self) -> u64 {
        self.moved
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

    /// Fills `out` with the queued parts in order (sealing the batch
    /// first), for one vectored write; returns how many it filled.
    pub fn slices<'a>(&'a mut self, out: &mut [std::io::IoSlice<'a>]) -> usize {
        self.seal();
        let mut filled = 0;
        for (slot, part) in out.iter_mut().zip(self.segments.iter()) {
            *slot = std::io::IoSlice::new(part);
            filled += 1;
        }
        filled
    }

    /// `n` bytes from the front were written (they may span parts).
    pub fn advance(&mut self, mut n: usize) {
        self.queued = self.queued.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.segments.pop_front();
            } else {
                front.advance(n);
                n = 0;
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

    /// Feeds `wire` to a ReadBuf the way a socket would: each read takes at
    /// most `chunks[i]` bytes (cycling) of what `spare` offers. Returns the
    /// frames and the address ranges the "kernel" wrote.
    fn read_all(
        rb: &mut ReadBuf,
        wire: &[u8],
        chunks: &[usize],
        keep_every: usize,
    ) -> (Vec<Bytes>, Vec<(usize, usize)>) {
        let mut frames = Vec::new();
        let mut written: Vec<(usize, usize)> = Vec::new();
        let mut rest = wire;
        let mut i = 0;
        while !rest.is_empty() {
            let spare = rb.spare();
            assert!(!spare.is_empty());
            let n = spare
                .len()
                .min(rest.len())
                .min(chunks[i % chunks.len()].max(1));
            i += 1;
            spare[..n].copy_from_slice(&rest[..n]);
            let at = spare.as_ptr() as usize;
            match written.last_mut() {
                Some((start, len)) if *start + *len == at => *len += n,
                _ => written.push((at, n)),
            }
            rb.filled(n);
            rest = &rest[n..];
            while let Some(f) = rb.next_frame().unwrap() {
                // Frames kept alive pin their buffer; the others are
                // copied and dropped, so buffers get recycled.
                if frames.len() % keep_every.max(1) == 0 {
                    frames.push(f);
                } else {
                    frames.push(Bytes::copy_from_slice(&f));
                }
            }
        }
        (frames, written)
    }

    fn wire_of(lens: &[usize]) -> (Vec<u8>, Vec<usize>) {
        let mut q = WriteQueue::new(usize::MAX);
        for &len in lens {
            q.push_prefixed(&frame(len)).unwrap();
        }
        let mut wire = Vec::new();
        while let Some(f) = q.front() {
            let n = f.len();
            wire.extend_from_slice(f);
            q.advance(n);
        }
        // A PAYLOAD frame is a 6-byte header and its data.
        (wire, lens.iter().map(|l| l + 6).collect())
    }

    #[test]
    fn read_buf_frames_of_64k_sit_where_the_socket_wrote_them() {
        let lens = vec![65_536; 40];
        let (wire, expected) = wire_of(&lens);
        // Reads as large as the buffer offers, and awkward small ones.
        for chunks in [vec![usize::MAX], vec![1000, 7, 65_000, 3, 131_072]] {
            let mut rb = ReadBuf::new(MAX_U24);
            let (frames, written) = read_all(&mut rb, &wire, &chunks, 1);
            assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
            for f in &frames {
                let (start, end) = (f.as_ptr() as usize, f.as_ptr() as usize + f.len());
                assert!(
                    written.iter().any(|&(s, n)| s <= start && end <= s + n),
                    "every frame lies in memory one run of reads wrote"
                );
                assert!(f[6..].iter().all(|&b| b == 7));
            }
            assert_eq!(rb.moved_bytes(), 0, "no byte was moved");
        }
    }

    #[test]
    fn read_buf_moves_a_longer_frame_once_then_never() {
        let mut lens = vec![100; 700];
        lens.extend([200_000; 3]);
        lens.extend([100; 10]);
        let (wire, expected) = wire_of(&lens);
        let mut rb = ReadBuf::new(MAX_U24);
        let (frames, _) = read_all(&mut rb, &wire, &[usize::MAX], 1);
        assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
        let moved = rb.moved_bytes();
        assert!(moved > 0 && moved < 200_006, "one partial move: {moved}");
    }

    #[test]
    fn read_buf_recycles_its_buffers_once_frames_are_dropped() {
        let (wire, _) = wire_of(&vec![1000; 2000]);
        let mut rb = ReadBuf::new(MAX_U24);
        let mut seen = std::collections::HashSet::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let spare = rb.spare();
            seen.insert(spare.as_ptr() as usize & !0xffff);
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            rb.filled(n);
            rest = &rest[n..];
            while rb.next_frame().unwrap().is_some() {}
        }
        // 2 MB went through; without reuse that is 30-odd buffers.
        assert!(seen.len() <= 4, "{} buffers", seen.len());
    }

    proptest::proptest! {
        #[test]
        fn read_buf_cuts_any_frames_in_any_reads(
            lens in proptest::collection::vec(0usize..=65_536, 1..30),
            chunks in proptest::collection::vec(1usize..100_000, 1..8),
            keep_every in 1usize..4,
        ) {
            let (wire, expected) = wire_of(&lens);
            let mut rb = ReadBuf::new(MAX_U24);
            let (frames, _) = read_all(&mut rb, &wire, &chunks, keep_every);
            proptest::prop_assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
            for (f, len) in frames.iter().zip(&lens) {
                proptest::prop_assert!(f[6..].iter().all(|&b| b == 7) && f.len() == len + 6);
            }
            proptest::prop_assert!(rb.is_empty());
            proptest::prop_assert_eq!(rb.moved_bytes(), 0);
        }
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

    proptest::proptest! {
        /// Vectored writes that stop anywhere, even inside a part, put the
        /// same bytes on the wire, in order, as one write per part did.
        #[test]
        fn vectored_writes_of_any_length_keep_the_wire_intact(
            lens in proptest::collection::vec(0usize..20_000, 1..12),
            cuts in proptest::collection::vec(1usize..30_000, 1..40),
        ) {
            let mut expected = WriteQueue::new(usize::MAX);
            let mut q = WriteQueue::new(4096);
            for (i, &len) in lens.iter().enumerate() {
                let mut f = frame(len);
                if i % 2 == 1 {
                    f = frame(len + 5000);
                }
                expected.push_prefixed(&f).unwrap();
                q.push_prefixed(&f).unwrap();
            }
            let mut want = Vec::new();
            while let Some(f) = expected.front() {
                let f = f.to_vec();
                expected.advance(f.len());
                want.extend_from_slice(&f);
            }
            let mut wire = Vec::new();
            let mut cut = cuts.iter().cycle();
            loop {
                let mut iov = [std::io::IoSlice::new(&[]); 4];
                let parts = q.slices(&mut iov);
                if parts == 0 {
                    break;
                }
                let limit = *cut.next().unwrap();
                let mut n = 0;
                for part in &iov[..parts] {
                    let take = part.len().min(limit - n);
                    wire.extend_from_slice(&part[..take]);
                    n += take;
                    if n == limit {
                        break;
                    }
                }
                q.advance(n);
            }
            proptest::prop_assert_eq!(wire, want);
            proptest::prop_assert!(q.is_empty());
        }
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
