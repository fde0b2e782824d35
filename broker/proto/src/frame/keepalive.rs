//! KEEPALIVE (0x03): connection liveness, and the resume position of its sender.
//!
//! "Reception of a KEEPALIVE frame with the (R)espond flag set MUST cause a
//! client or server to send back a KEEPALIVE with the (R)espond flag NOT set.
//! The data in the received KEEPALIVE MUST be echoed back in the generated KEEPALIVE."

use bytes::{BufMut, Bytes};

use super::{Flags, FrameType, FrameView, HEADER_LEN, put_header};
use crate::error::DecodeError;

/// Largest resume position (63 bits).
pub const MAX_POSITION: u64 = 0x7FFF_FFFF_FFFF_FFFF;

/// A KEEPALIVE frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// (R)espond: the peer must echo this frame.
    pub respond: bool,
    /// Resume: last received position of the sender (0 when resume is not used).
    pub last_received_position: u64,
    /// Data, echoed back by the peer.
    pub data: Bytes,
}

impl Keepalive {
    pub(crate) fn from_view(view: &FrameView) -> Result<Self, DecodeError> {
        let pos = view
            .as_bytes()
            .get(HEADER_LEN..HEADER_LEN + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or(DecodeError::Truncated {
                needed: HEADER_LEN + 8,
                available: view.len(),
            })?;
        Ok(Self {
            respond: view.flags().has(Flags::RESPOND),
            last_received_position: pos & MAX_POSITION,
            data: view.data(),
        })
    }

    /// Bytes [`Keepalive::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 8 + self.data.len()
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_header(
            buf,
            0,
            FrameType::Keepalive,
            if self.respond { Flags::RESPOND } else { 0 },
        );
        buf.put_u64(self.last_received_position & MAX_POSITION);
        buf.put_slice(&self.data);
    }
}
