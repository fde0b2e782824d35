//! Length-prefixed frames cut from data that arrives as shared chunks (QUIC
//! stream data comes out of the protocol state machine as `Bytes` that
//! point into the decrypted datagram).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::PREFIX_LEN;
use crate::error::DecodeError;
use crate::frame::{HEADER_LEN, MAX_U24, get_u24};

/// Cuts length-prefixed frames out of a sequence of chunks.
///
/// A frame that lies inside one chunk is a slice of that chunk: no copy.
/// Only a frame (or a prefix) that spans chunks is assembled, once, in a
/// buffer of its own size, which the cutter holds until the frame is whole.
/// The size limit is checked as soon as the prefix is there, before any of
/// the frame is buffered.
#[derive(Debug)]
pub struct ChunkCutter {
    max_frame: usize,
    /// Bytes of a prefix that spans chunks.
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    /// The frame in progress that spans chunks, and its length.
    partial: BytesMut,
    need: usize,
    assembled: u64,
}

impl ChunkCutter {
    /// A cutter for frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame: max_frame.clamp(HEADER_LEN, MAX_U24),
            prefix: [0; PREFIX_LEN],
            prefix_len: 0,
            partial: BytesMut::new(),
            need: 0,
            assembled: 0,
        }
    }

    /// Bytes held for a frame in progress.
    pub fn buffered(&self) -> usize {
        self.partial.len() + self.prefix_len
    }

    /// Whether no frame is in progress.
    pub fn is_empty(&self) -> bool {
        self.buffered() == 0 && self.need == 0
    }

    /// Bytes copied so far to assemble frames that spanned chunks.
    pub fn assembled_bytes(&self) -> u64 {
        self.assembled
    }

    fn check(&self, len: usize) -> Result<usize, DecodeError> {
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
        Ok(len)
    }

    /// Appends every frame `chunk` completes to `frames`.
    pub fn push(&mut self, mut chunk: Bytes, frames: &mut Vec<Bytes>) -> Result<(), DecodeError> {
        while !chunk.is_empty() {
            if self.need > 0 {
                // A frame that spans chunks: copy what it still needs.
                let take = (self.need - self.partial.len()).min(chunk.len());
                self.partial
                    .put_slice(chunk.get(..take).unwrap_or_default());
                self.assembled += take as u64;
                chunk.advance(take);
                if self.partial.len() == self.need {
                    self.need = 0;
                    frames.push(std::mem::take(&mut self.partial).freeze());
                }
                continue;
            }
            if self.prefix_len > 0 {
                let take = (PREFIX_LEN - self.prefix_len).min(chunk.len());
                if let (Some(dst), Some(src)) = (
                    self.prefix.get_mut(self.prefix_len..self.prefix_len + take),
                    chunk.get(..take),
                ) {
                    dst.copy_from_slice(src);
                }
                self.prefix_len += take;
                chunk.advance(take);
                if self.prefix_len == PREFIX_LEN {
                    self.prefix_len = 0;
                    let len = self.check(get_u24(&self.prefix).unwrap_or(0))?;
                    self.start_partial(len);
                }
                continue;
            }
            let Some(len) = get_u24(&chunk) else {
                // Fewer than three bytes: the prefix spans chunks.
                self.prefix_len = chunk.len();
                if let (Some(dst), Some(src)) = (self.prefix.get_mut(..chunk.len()), chunk.get(..))
                {
                    dst.copy_from_slice(src);
                }
                return Ok(());
            };
            let len = self.check(len)?;
            chunk.advance(PREFIX_LEN);
            if chunk.len() >= len {
                frames.push(chunk.split_to(len));
            } else {
                self.start_partial(len);
            }
        }
        Ok(())
    }

    fn start_partial(&mut self, len: usize) {
        self.need = len;
        self.partial = BytesMut::with_capacity(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OutFrame;
    use crate::codec::put_prefixed;
    use crate::frame::{Frame, Payload};

    fn wire_of(sizes: &[usize]) -> (Bytes, Vec<usize>) {
        let mut wire = BytesMut::new();
        let mut lens = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let f = OutFrame::from_frame(&Frame::from(Payload {
                stream_id: i as u32 + 1,
                follows: false,
                complete: true,
                next: true,
                metadata: None,
                data: Bytes::from(vec![i as u8; n]),
            }));
            lens.push(f.len());
            put_prefixed(&mut wire, &f).unwrap();
        }
        (wire.freeze(), lens)
    }

    #[test]
    fn frames_inside_a_chunk_are_slices_of_it() {
        let (wire, lens) = wire_of(&[0, 10, 1000, 5]);
        let mut c = ChunkCutter::new(MAX_U24);
        let mut frames = Vec::new();
        c.push(wire.clone(), &mut frames).unwrap();
        assert_eq!(frames.iter().map(Bytes::len).collect::<Vec<_>>(), lens);
        let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        for f in &frames {
            assert!(range.contains(&(f.as_ptr() as usize)), "frame was copied");
        }
        assert_eq!(c.assembled_bytes(), 0);
        assert!(c.is_empty());
    }

    #[test]
    fn any_split_gives_the_same_frames() {
        let (wire, lens) = wire_of(&[0, 5, 70_000, 3, 64 * 1024]);
        for size in [1, 2, 3, 4, 7, 1000, 65_536, usize::MAX] {
            let mut c = ChunkCutter::new(MAX_U24);
            let mut frames = Vec::new();
            let mut rest = wire.clone();
            while !rest.is_empty() {
                let n = size.min(rest.len());
                c.push(rest.split_to(n), &mut frames).unwrap();
            }
            assert_eq!(
                frames.iter().map(Bytes::len).collect::<Vec<_>>(),
                lens,
                "{size}"
            );
            let bodies: Vec<Bytes> = frames.clone();
            let mut again = BytesMut::new();
            for f in &bodies {
                crate::codec::put_prefix(&mut again, f.len()).unwrap();
                again.put_slice(f);
            }
            assert_eq!(again.freeze(), wire, "{size}");
            assert!(c.is_empty());
        }
    }

    #[test]
    fn refuses_long_and_short_frames_at_the_prefix() {
        let mut frames = Vec::new();
        let mut c = ChunkCutter::new(100);
        assert_eq!(
            c.push(Bytes::from_static(&[0, 0, 101]), &mut frames),
            Err(DecodeError::FrameTooLarge { len: 101, max: 100 })
        );
        let mut c = ChunkCutter::new(100);
        c.push(Bytes::from_static(&[0]), &mut frames).unwrap();
        assert_eq!(
            c.push(Bytes::from_static(&[0, 2]), &mut frames),
            Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                available: 2
            })
        );
        assert!(frames.is_empty());
    }
}
