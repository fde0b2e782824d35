//! LEASE (0x02): a responder grants its peer the right to send requests.
//!
//! "Lease frames MUST always use Stream ID 0 as they pertain to the Connection."

use bytes::{BufMut, Bytes};

use super::{Flags, FrameType, FrameView, HEADER_LEN, MAX_REQUEST_N, put_header};

/// A LEASE frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Validity of the lease from reception, in milliseconds (31 bits).
    pub ttl: u32,
    /// Requests that may be sent until the next LEASE (31 bits).
    pub number_of_requests: u32,
    /// Optional metadata: the rest of the frame (no length field).
    pub metadata: Option<Bytes>,
}

impl Lease {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        let body = view
            .as_bytes()
            .get(HEADER_LEN + 4..HEADER_LEN + 8)
            .unwrap_or_default();
        let n = body.try_into().map(u32::from_be_bytes).unwrap_or(0);
        Self {
            ttl: view.field() & MAX_REQUEST_N,
            number_of_requests: n & MAX_REQUEST_N,
            metadata: view.metadata(),
        }
    }

    /// Bytes [`Lease::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 8 + self.metadata.as_ref().map_or(0, Bytes::len)
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let flags = if self.metadata.is_some() {
            Flags::METADATA
        } else {
            0
        };
        put_header(buf, 0, FrameType::Lease, flags);
        buf.put_u32(self.ttl & MAX_REQUEST_N);
        buf.put_u32(self.number_of_requests & MAX_REQUEST_N);
        if let Some(m) = &self.metadata {
            buf.put_slice(m);
        }
    }
}
