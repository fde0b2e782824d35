//! METADATA_PUSH (0x0C): asynchronous metadata for the connection.
//!
//! "METADATA_PUSH frames MUST always use Stream ID 0 as they pertain to the
//! Connection." Its metadata is the rest of the frame, without a length field.

use bytes::{BufMut, Bytes};

use super::{Flags, FrameType, FrameView, HEADER_LEN, put_header};

/// A METADATA_PUSH frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataPush {
    /// The metadata.
    pub metadata: Bytes,
}

impl MetadataPush {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        Self {
            metadata: view.metadata().unwrap_or_default(),
        }
    }

    /// Bytes [`MetadataPush::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.metadata.len()
    }

    /// Writes the frame (the M flag is always set).
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_header(buf, 0, FrameType::MetadataPush, Flags::METADATA);
        buf.put_slice(&self.metadata);
    }
}
