//! CANCEL (0x09): cancels an outstanding request, or a partly sent fragmented message.

use bytes::BufMut;

use super::{FrameType, FrameView, HEADER_LEN, put_header};

/// A CANCEL frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancel {
    /// Stream id.
    pub stream_id: u32,
}

impl Cancel {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        Self {
            stream_id: view.stream_id(),
        }
    }

    /// Bytes [`Cancel::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_header(buf, self.stream_id, FrameType::Cancel, 0);
    }
}
