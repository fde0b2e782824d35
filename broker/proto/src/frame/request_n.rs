//! REQUEST_N (0x08): grants the peer credit for N more PAYLOADs.
//!
//! "Request N: ... Value MUST be > 0." Credits are cumulative.

use bytes::BufMut;

use super::{FrameType, FrameView, HEADER_LEN, MAX_REQUEST_N, put_header};

/// A REQUEST_N frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestN {
    /// Stream id.
    pub stream_id: u32,
    /// Number of items (31 bits; 0 is invalid on the wire and rejected by the connection).
    pub n: u32,
}

impl RequestN {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        Self {
            stream_id: view.stream_id(),
            n: view.request_n(),
        }
    }

    /// Bytes [`RequestN::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 4
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_header(buf, self.stream_id, FrameType::RequestN, 0);
        buf.put_u32(self.n & MAX_REQUEST_N);
    }
}
