//! ERROR (0x0B): an error on a stream (id > 0) or on the connection (id 0).
//!
//! "Error Data SHOULD be a UTF-8 encoded string. The string MUST NOT be null terminated."

use bytes::{BufMut, Bytes};

use super::{FrameType, FrameView, HEADER_LEN, put_header};
use crate::error::ErrorCode;

/// An ERROR frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Stream id (0 for the connection).
    pub stream_id: u32,
    /// Error code.
    pub code: ErrorCode,
    /// Error data, usually a UTF-8 message.
    pub data: Bytes,
}

impl ErrorFrame {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        Self {
            stream_id: view.stream_id(),
            code: ErrorCode(view.field()),
            data: view.data(),
        }
    }

    /// The error data as text (lossy for invalid UTF-8).
    pub fn message(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.data)
    }

    /// Bytes [`ErrorFrame::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 4 + self.data.len()
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_header(buf, self.stream_id, FrameType::Error, 0);
        buf.put_u32(self.code.0);
        buf.put_slice(&self.data);
    }
}
