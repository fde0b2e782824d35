//! The receive buffer of byte-stream transports (TCP, TLS, QUIC streams):
//! the one length-prefix decoder, used by the transports in production and
//! by the fuzz targets, property tests and benchmarks.

use bytes::{Buf, Bytes, BytesMut};

use super::PREFIX_LEN;
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
            let spare = self.spare();
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
}
