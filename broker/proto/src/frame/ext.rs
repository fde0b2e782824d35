//! EXT (0x3F): extension frames.
//!
//! "(I)gnore: Can the frame be ignored if not understood?" The connection
//! ignores an EXT with I set and treats one without it as a connection error.

use bytes::{BufMut, Bytes};

use super::{
    Flags, FrameType, FrameView, HEADER_LEN, MAX_REQUEST_N, metadata_flag, payload_len, put_header,
    put_payload,
};

/// An EXT frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext {
    /// Stream id.
    pub stream_id: u32,
    /// (I)gnore if not understood.
    pub ignore: bool,
    /// Extended type (31 bits).
    pub extended_type: u32,
    /// Metadata.
    pub metadata: Option<Bytes>,
    /// Data.
    pub data: Bytes,
}

impl Ext {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        Self {
            stream_id: view.stream_id(),
            ignore: view.ignore(),
            extended_type: view.field() & MAX_REQUEST_N,
            metadata: view.metadata(),
            data: view.data(),
        }
    }

    /// Bytes [`Ext::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 4 + payload_len(self.metadata.as_ref(), &self.data)
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let mut flags = metadata_flag(self.metadata.as_ref());
        if self.ignore {
            flags |= Flags::IGNORE;
        }
        put_header(buf, self.stream_id, FrameType::Ext, flags);
        buf.put_u32(self.extended_type & MAX_REQUEST_N);
        put_payload(buf, self.metadata.as_ref(), &self.data);
    }
}
