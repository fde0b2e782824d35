//! The receive buffer of byte-stream transports (TCP, TLS, QUIC streams):
//! the one length-prefix decoder, used by the transports in production and
//! by the fuzz targets, property tests and benchmarks.

use bytes::{Buf, Bytes, BytesMut};

use super::PREFIX_LEN;
use super::pool::{self, Tail};
use crate::error::DecodeError;
use crate::frame::{HEADER_LEN, MAX_U24, get_u24};

/// Smallest receive buffer.
const READ_CHUNK: usize = 64 * 1024;

/// Room kept free at the end of a receive buffer at first: frames of up to
/// 64 KiB of payload never have to move.
const MIN_RESERVE: usize = 64 * 1024 + 64;

/// The reserve grows with the frames seen up to this; longer frames move
/// once, into a buffer of their own size.
const MAX_RESERVE: usize = 1024 * 1024 + 64;

/// Room beyond the reserve a buffer must have to be read into: less, and a
/// read would take too little.
const READ_MIN: usize = 4 * 1024;

/// A frame in progress with at most this many bytes read when the socket
/// runs dry is copied out of the pool's buffer into one of its own, and
/// read on there: a peer that sends the start of a frame and stops holds
/// what it sent, not a pooled buffer. Once more than half the pool is in
/// use, every frame in progress moves out when its socket runs dry.
pub const PARK_COPY: usize = 16 * 1024;

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
/// bytes move once and the reserve grows to its size.
///
/// The buffers come from the thread's [pool](super::pool): a `ReadBuf`
/// holds one only while bytes it read are not yet cut into frames. Once
/// they all are ([`ReadBuf::next_frame`] finds nothing buffered) the buffer
/// goes back, and the next connection to read reads into what is left of
/// it. When the socket has nothing more to read, [`ReadBuf::park`] moves a
/// frame in progress that has little read ([`PARK_COPY`]), or any once the
/// pool is more than half used, into a buffer of its own, where the rest
/// of it is read; otherwise it keeps only the room that frame needs. An idle connection holds no receive buffer at all.
#[derive(Debug)]
pub struct ReadBuf {
    /// From the start of the frame in progress to the end of the buffer;
    /// all of it initialised. Empty (no allocation) when none is held.
    buf: BytesMut,
    /// Initialised bytes of the allocation behind `buf`, from its start.
    size: usize,
    /// Whether `buf` was taken from the pool (else it is empty, or holds a
    /// parked frame in progress in an allocation of its own).
    held: bool,
    filled: usize,
    max_frame: usize,
    reserve: usize,
    /// Bytes of frames in progress moved to a new buffer so far.
    moved: u64,
}

impl ReadBuf {
    /// A buffer for frames of at most `max_frame` bytes (it takes memory
    /// from the pool only when it reads).
    pub fn new(max_frame: usize) -> Self {
        let max_frame = max_frame.clamp(HEADER_LEN, MAX_U24);
        Self {
            buf: BytesMut::new(),
            size: 0,
            held: false,
            filled: 0,
            max_frame,
            reserve: MIN_RESERVE.min(PREFIX_LEN + max_frame),
            moved: 0,
        }
    }

    fn size_for(reserve: usize) -> usize {
        (2 * reserve).max(READ_CHUNK)
    }

    /// Room a buffer must have to be read into for new frames.
    fn room(&self) -> usize {
        self.reserve + READ_MIN
    }

    /// Free space to read into (never empty), or `None` when the thread's
    /// pool is at its limit (wait for it with [`pool::wait`]).
    pub fn spare(&mut self) -> Option<&mut [u8]> {
        self.spare_with(true)
    }

    fn spare_with(&mut self, bounded: bool) -> Option<&mut [u8]> {
        if !self.held && self.filled > 0 {
            return Some(self.spare_own());
        }
        if !self.held {
            let t = pool::take(self.room(), Self::size_for(self.reserve), bounded)?;
            self.buf = t.buf;
            self.size = t.size;
            self.held = true;
        }
        let room = self.buf.len();
        // Where reads of new frames stop.
        let open = room.saturating_sub(self.reserve);
        let frame_end = get_u24(self.buf.get(..self.filled).unwrap_or_default())
            .map(|len| PREFIX_LEN + len.min(self.max_frame));
        let end = match frame_end {
            Some(end) if end > room => {
                // Longer than any frame before it: it moves, once.
                self.reserve = end.clamp(self.reserve, MAX_RESERVE.max(self.reserve));
                self.switch(end, bounded)?;
                return self.spare_with(bounded);
            }
            Some(end) => end.max(open),
            None if open > self.filled => open,
            None => {
                // In the reserve with no frame begun (at most a partial
                // length prefix): the next frame starts in a new buffer.
                self.switch(0, bounded)?;
                return self.spare_with(bounded);
            }
        };
        self.buf.get_mut(self.filled..end)
    }

    /// Room to read the rest of a parked frame into its own buffer: up to
    /// the end of its length prefix, then up to the end of the frame. The
    /// buffer grows with what arrives, to at most four times that (a length
    /// prefix alone does not make the broker allocate the frame), and the
    /// frame is cut from it whole.
    fn spare_own(&mut self) -> &mut [u8] {
        let end = get_u24(self.buf.get(..self.filled).unwrap_or_default())
            .map_or(PREFIX_LEN, |len| PREFIX_LEN + len.min(self.max_frame));
        let len = self.buf.len();
        if self.filled >= end {
            // The frame is whole but not cut yet (a caller that reads on
            // first): the next bytes go after it, in the same buffer.
            self.buf.resize(self.filled + READ_MIN, 0);
            return self.buf.get_mut(self.filled..).unwrap_or_default();
        }
        if len < end && self.filled == len {
            // At most four times what arrived (and at least a read's worth).
            self.buf.resize((4 * len).max(READ_MIN).min(end), 0);
        }
        let stop = self.buf.len().min(end);
        self.buf.get_mut(self.filled..stop).unwrap_or_default()
    }

    /// Moves the frame in progress (`frame_end` bytes long, when known) to
    /// another buffer from the pool; `None` when the pool has none.
    fn switch(&mut self, frame_end: usize, bounded: bool) -> Option<()> {
        let size = Self::size_for(self.reserve).max(frame_end);
        let fresh = pool::take(self.room().max(frame_end), size, bounded)?;
        let mut fresh_buf = fresh.buf;
        if let (Some(dst), Some(src)) = (
            fresh_buf.get_mut(..self.filled),
            self.buf.get(..self.filled),
        ) {
            dst.copy_from_slice(src);
            if frame_end > 0 {
                // Not counted: a length prefix split by the reserve (1 or 2
                // bytes, not part of the frame cut later).
                self.moved += self.filled as u64;
            }
        }
        let old = std::mem::replace(&mut self.buf, fresh_buf);
        let old_size = std::mem::replace(&mut self.size, fresh.size);
        // What is left of the old buffer may still do for another reader.
        pool::give(
            Tail {
                buf: old,
                size: old_size,
            },
            self.room(),
        );
        Some(())
    }

    /// Gives the buffer back when no byte of it is waiting to be cut.
    fn release(&mut self) {
        if self.held && self.filled == 0 {
            self.held = false;
            let buf = std::mem::take(&mut self.buf);
            let size = std::mem::take(&mut self.size);
            pool::give(Tail { buf, size }, self.room());
        }
    }

    /// The socket has nothing more to read for now: gives the buffer back,
    /// or with a frame in progress, what lies beyond that frame, so a
    /// connection waiting for the rest of a frame holds only its room.
    pub fn park(&mut self) {
        if !self.held {
            return;
        }
        if self.filled == 0 {
            self.release();
            return;
        }
        if self.filled <= PARK_COPY || pool::pressed() {
            // Its own buffer, of what was read: the pool's goes back whole.
            let mut own = BytesMut::with_capacity(self.filled);
            own.extend_from_slice(self.buf.get(..self.filled).unwrap_or_default());
            self.moved += self.filled as u64;
            let buf = std::mem::replace(&mut self.buf, own);
            let size = std::mem::take(&mut self.size);
            self.held = false;
            pool::give(Tail { buf, size }, self.room());
            return;
        }
        let Some(len) = get_u24(self.buf.get(..self.filled).unwrap_or_default()) else {
            return;
        };
        let end = PREFIX_LEN + len.min(self.max_frame);
        if end >= self.filled && self.buf.len() >= end + self.room() {
            let rest = self.buf.split_off(end);
            pool::give_part(
                Tail {
                    buf: rest,
                    size: self.size,
                },
                self.room(),
            );
        }
    }

    /// Bytes held for the frame in progress (and any whole frames not yet
    /// cut): its room in a pooled buffer, or its own buffer once parked.
    /// What lies beyond it in a pooled buffer is the shard's, not the
    /// connection's: it goes to the next reader.
    pub fn frame_bytes(&self) -> usize {
        if self.filled == 0 {
            return 0;
        }
        if !self.held {
            return self.buf.len();
        }
        let end = get_u24(self.buf.get(..self.filled).unwrap_or_default())
            .map_or(0, |len| PREFIX_LEN + len.min(self.max_frame));
        end.max(self.filled).min(self.buf.len())
    }

    /// Whether the frame in progress has been moved into a buffer of its
    /// own (parked with little of it read).
    #[cfg(test)]
    fn is_parked_own(&self) -> bool {
        !self.held && self.filled > 0
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

    /// Bytes of frames in progress that were moved between buffers (each
    /// time a frame longer than any before it arrived).
    pub fn moved_bytes(&self) -> u64 {
        self.moved
    }

    /// The next whole frame (without its length prefix), if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        let Some(len) = get_u24(self.buf.get(..self.filled).unwrap_or_default()) else {
            self.release();
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

    /// Takes `data` as a socket read would (in as many reads as the buffer
    /// needs) and appends every whole frame to `frames`. For callers that
    /// hold the bytes already: tests, fuzz targets, benchmarks, and
    /// transports whose bytes come out of a decryption or a message.
    pub fn feed(&mut self, mut data: &[u8], frames: &mut Vec<Bytes>) -> Result<(), DecodeError> {
        loop {
            while let Some(frame) = self.next_frame()? {
                frames.push(frame);
            }
            if data.is_empty() {
                return Ok(());
            }
            // Unbounded: these bytes are here already and cannot wait.
            let Some(spare) = self.spare_with(false) else {
                return Ok(());
            };
            let n = spare.len().min(data.len());
            let (now, later) = data.split_at(n);
            if let Some(dst) = spare.get_mut(..n) {
                dst.copy_from_slice(now);
            }
            self.filled(n);
            data = later;
        }
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if self.held {
            self.filled = 0;
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OutFrame;
    use crate::codec::put_prefixed;
    use crate::frame::{Frame, Payload};

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
        let mut bytes = Vec::new();
        for len in [10, 70_000, 5] {
            put_prefixed(&mut bytes, &frame(len)).unwrap();
        }
        let mut rb = ReadBuf::new(MAX_U24);
        let mut frames = Vec::new();
        for chunk in bytes.chunks(1000) {
            let mut chunk = chunk;
            while !chunk.is_empty() {
                let spare = rb.spare().unwrap();
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
            let spare = rb.spare().unwrap();
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
        let mut wire = Vec::new();
        for &len in lens {
            put_prefixed(&mut wire, &frame(len)).unwrap();
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
            let spare = rb.spare().unwrap();
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
        rb.spare().unwrap()[..3].copy_from_slice(&[0, 1, 0]);
        rb.filled(3);
        assert_eq!(
            rb.next_frame(),
            Err(DecodeError::FrameTooLarge { len: 256, max: 100 })
        );
    }

    #[test]
    fn feed_cuts_the_same_frames_as_reads() {
        let (wire, expected) = wire_of(&[0, 5, 70_000, 64 * 1024, 3]);
        for chunk in [1, 2, 3, 1000, 100_000, usize::MAX] {
            let mut rb = ReadBuf::new(MAX_U24);
            let mut frames = Vec::new();
            for part in wire.chunks(chunk.min(wire.len())) {
                rb.feed(part, &mut frames).unwrap();
            }
            assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
            assert!(rb.is_empty());
        }
    }

    #[test]
    fn feed_refuses_short_and_long_frames() {
        let mut rb = ReadBuf::new(100);
        let mut frames = Vec::new();
        assert_eq!(
            rb.feed(&[0, 0, 5, 0, 0, 0, 0, 0], &mut frames),
            Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                available: 5
            })
        );
        let mut rb = ReadBuf::new(100);
        assert_eq!(
            rb.feed(&[0, 0, 101], &mut frames),
            Err(DecodeError::FrameTooLarge { len: 101, max: 100 })
        );
        assert!(frames.is_empty());
    }

    /// Reads `bytes` into `rb` as one socket read (as much as it offers).
    fn read_in(rb: &mut ReadBuf, bytes: &[u8]) {
        read_with(rb, bytes, |_| {});
    }

    /// Reads `bytes` as a transport does: frames are cut before each read.
    fn read_cutting(rb: &mut ReadBuf, bytes: &[u8], frames: &mut Vec<Bytes>) {
        read_with(rb, bytes, |rb| frames.extend(frames_of(rb)));
        frames.extend(frames_of(rb));
    }

    /// Reads `bytes` in as many reads as `spare` asks for, calling `before`
    /// ahead of each.
    fn read_with(rb: &mut ReadBuf, mut bytes: &[u8], mut before: impl FnMut(&mut ReadBuf)) {
        while !bytes.is_empty() {
            before(rb);
            let spare = rb.spare().unwrap();
            assert!(!spare.is_empty());
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            rb.filled(n);
            bytes = &bytes[n..];
        }
    }

    fn frames_of(rb: &mut ReadBuf) -> Vec<Bytes> {
        std::iter::from_fn(|| rb.next_frame().unwrap()).collect()
    }

    #[test]
    fn read_buf_gives_its_buffer_back_once_every_frame_is_cut() {
        let (wire, expected) = wire_of(&[10, 20]);
        let mut rb = ReadBuf::new(MAX_U24);
        assert_eq!(pool::stats().held, 0, "nothing held before a read");
        read_in(&mut rb, &wire);
        assert_eq!(pool::stats().held, 1);
        let frames = frames_of(&mut rb);
        assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
        assert_eq!(
            pool::stats().held,
            0,
            "given back with no frame in progress"
        );
        assert_eq!(rb.frame_bytes(), 0);
        // Parking with nothing buffered holds nothing either; read on
        // without cutting, a parked frame's buffer takes the next bytes
        // after it.
        read_in(&mut rb, &wire[..2]);
        rb.park();
        read_in(&mut rb, &wire[2..]);
        assert!(
            rb.frame_bytes() <= wire.len() + 4096,
            "{}",
            rb.frame_bytes()
        );
        assert_eq!(frames_of(&mut rb).len(), 2);
        rb.park();
        assert_eq!(pool::stats().held, 0);
    }

    #[test]
    fn read_buf_parks_a_frame_begun_with_little_read_in_a_buffer_of_its_own() {
        let (wire, expected) = wire_of(&[60_000, 30]);
        let end = PREFIX_LEN + expected[0];
        for cut in [1, 2, 3, 100, 10_000, PARK_COPY] {
            let mut rb = ReadBuf::new(MAX_U24);
            read_in(&mut rb, &wire[..cut]);
            assert!(frames_of(&mut rb).is_empty());
            rb.park();
            assert!(rb.is_parked_own(), "cut at {cut}");
            assert_eq!(pool::stats().held, 0, "the pool's buffer went back");
            assert!(rb.frame_bytes() >= cut && rb.frame_bytes() <= cut.max(4096));
            assert_eq!(rb.moved_bytes(), cut as u64);
            // A prefix alone does not make it allocate the frame: its
            // buffer grows to four times what arrived, at least 4 KiB, at
            // most the frame (or the prefix, until that is whole).
            read_in(&mut rb, &wire[cut..cut + 1]);
            let grown = if cut < PREFIX_LEN {
                PREFIX_LEN
            } else {
                (4 * cut).max(4096).min(end)
            };
            assert_eq!(rb.frame_bytes(), grown, "held for {} bytes", cut + 1);
            if grown > cut + 2 {
                read_in(&mut rb, &wire[cut + 1..cut + 2]);
                assert_eq!(rb.frame_bytes(), grown, "no growth while it has room");
            }
            let mut frames = Vec::new();
            let at = if grown > cut + 2 { cut + 2 } else { cut + 1 };
            read_cutting(&mut rb, &wire[at..], &mut frames);
            assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
            assert!(frames[0][6..].iter().all(|&b| b == 7));
            assert!(frames[1][6..].iter().all(|&b| b == 7));
            assert!(rb.is_empty() && !rb.is_parked_own());
            assert_eq!(pool::stats().held, 0);
        }
    }

    #[test]
    fn read_buf_keeps_a_frame_with_much_read_in_the_pool_and_counts_its_room() {
        let (wire, expected) = wire_of(&[60_000]);
        let mut rb = ReadBuf::new(MAX_U24);
        read_in(&mut rb, &wire[..PARK_COPY + 1]);
        rb.park();
        assert!(!rb.is_parked_own(), "not copied");
        assert_eq!(pool::stats().held, 1);
        assert_eq!(rb.frame_bytes(), wire.len(), "the frame's room");
        read_in(&mut rb, &wire[PARK_COPY + 1..]);
        let frames = frames_of(&mut rb);
        assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
        assert_eq!(rb.moved_bytes(), 0);
    }

    #[test]
    fn read_buf_parked_in_the_pool_gives_back_what_lies_beyond_its_frame() {
        // 60 KB: the rest of the buffer past the frame is room enough for
        // another reader, and goes back. 65 KB: it is not, and stays.
        for (len, split) in [(60_000, true), (65_000, false)] {
            // A thread of its own: a pool of its own.
            std::thread::spawn(move || {
                let (wire, _) = wire_of(&[len]);
                let mut rb = ReadBuf::new(MAX_U24);
                read_in(&mut rb, &wire[..PARK_COPY + 1]);
                rb.park();
                let s = pool::stats();
                assert_eq!(
                    (s.held, s.tails, s.spent),
                    (1, usize::from(split), 0),
                    "{len}"
                );
                assert_eq!(rb.frame_bytes(), wire.len(), "the frame's room, {len}");
            })
            .join()
            .unwrap();
        }
    }

    #[test]
    fn read_buf_waits_while_the_pool_is_at_its_limit() {
        pool::configure(200 * 1024);
        let (wire, _) = wire_of(&[60_000]);
        let mut a = ReadBuf::new(MAX_U24);
        read_in(&mut a, &wire[..PARK_COPY + 1]);
        let mut b = ReadBuf::new(MAX_U24);
        assert!(b.spare().is_none(), "no buffer past the limit");
        drop(a);
        assert!(b.spare().is_some(), "one came back");
    }

    #[test]
    fn read_buf_moves_every_parked_frame_out_of_a_pool_half_used() {
        pool::configure(400 * 1024);
        let (wire, expected) = wire_of(&[60_000]);
        let park = || {
            let mut rb = ReadBuf::new(MAX_U24);
            read_in(&mut rb, &wire[..PARK_COPY + 1]);
            rb.park();
            rb
        };
        // The first two fit in one buffer, the third needs a second one.
        let (a, b) = (park(), park());
        assert!(!a.is_parked_own() && !b.is_parked_own(), "kept in the pool");
        assert_eq!(pool::stats().allocated, 1);
        let mut c = park();
        assert_eq!(pool::stats().allocated, 2);
        assert!(c.is_parked_own(), "moved out once over half is used");
        assert_eq!(c.frame_bytes(), PARK_COPY + 1);
        let mut frames = Vec::new();
        read_cutting(&mut c, &wire[PARK_COPY + 1..], &mut frames);
        assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
        assert!(frames[0][6..].iter().all(|&x| x == 7));
        drop((a, b));
    }
}
