//! Resume bookkeeping: implied positions and the bounded buffer of sent frames.
//!
//! "As a Requester or Responder sends REQUEST_RESPONSE, REQUEST_FNF,
//! REQUEST_STREAM, REQUEST_CHANNEL, REQUEST_N, CANCEL, ERROR, or PAYLOAD
//! frames, it maintains a position of that frame within the connection in
//! that direction. [...] The positions are calculated based on the length of
//! encoded frames without the frame length field after any fragmentation is
//! applied."

use std::collections::VecDeque;

use bytes::Bytes;

use crate::out::OutFrame;

/// Sent frames kept for retransmission, and both implied positions.
#[derive(Debug)]
pub(crate) struct ResumeState {
    pub(crate) token: Bytes,
    /// Position after the last resumable frame sent.
    pub(crate) sent_position: u64,
    /// Implied position after the last resumable frame received.
    pub(crate) received_position: u64,
    frames: VecDeque<(u64, OutFrame)>,
    buffered: usize,
    max_buffered: usize,
}

impl ResumeState {
    pub(crate) fn new(token: Bytes, max_buffered: usize) -> Self {
        Self {
            token,
            sent_position: 0,
            received_position: 0,
            frames: VecDeque::new(),
            buffered: 0,
            max_buffered,
        }
    }

    /// The earliest position this side can still resend from.
    pub(crate) fn first_available(&self) -> u64 {
        self.frames
            .front()
            .map_or(self.sent_position, |(pos, _)| *pos)
    }

    /// Records a resumable frame being sent; old frames fall out past the cap.
    pub(crate) fn sent(&mut self, frame: &OutFrame) {
        let len = frame.len();
        self.frames.push_back((self.sent_position, frame.clone()));
        self.sent_position += len as u64;
        self.buffered += len;
        while self.buffered > self.max_buffered {
            match self.frames.pop_front() {
                Some((_, f)) => self.buffered -= f.len(),
                None => break,
            }
        }
    }

    pub(crate) fn received(&mut self, len: usize) {
        self.received_position += len as u64;
    }

    /// Drops frames the peer has confirmed up to `position`.
    pub(crate) fn acknowledge(&mut self, position: u64) {
        while let Some((pos, f)) = self.frames.front() {
            if pos + f.len() as u64 > position {
                break;
            }
            self.buffered -= f.len();
            self.frames.pop_front();
        }
    }

    /// Whether the peer, having received up to `position`, can be caught up
    /// from this buffer: the position must be a frame boundary between the
    /// oldest retained frame and the last one sent.
    pub(crate) fn can_resume_from(&self, position: u64) -> bool {
        if position == self.sent_position {
            return true;
        }
        position >= self.first_available()
            && position < self.sent_position
            && self.frames.iter().any(|(pos, _)| *pos == position)
    }

    /// The frames to resend to a peer that received up to `position`.
    pub(crate) fn frames_from(&mut self, position: u64) -> Vec<OutFrame> {
        self.acknowledge(position);
        self.frames.iter().map(|(_, f)| f.clone()).collect()
    }
}
