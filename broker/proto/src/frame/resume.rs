//! RESUME (0x0D) and RESUME_OK (0x0E): resuming a session on a new transport.
//!
//! "RESUME frames MUST always use Stream ID 0 as they pertain to the connection."

use bytes::{BufMut, Bytes};

use super::keepalive::MAX_POSITION;
use super::{FrameType, FrameView, HEADER_LEN, Reader, Version, put_header};
use crate::error::DecodeError;

/// A RESUME frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    /// Protocol version.
    pub version: Version,
    /// The token of the original SETUP.
    pub token: Bytes,
    /// Last implied position the client received from the server.
    pub last_received_server_position: u64,
    /// Earliest position the client can rewind to and resend from.
    pub first_available_client_position: u64,
}

impl Resume {
    pub(crate) fn from_view(view: &FrameView) -> Result<Self, DecodeError> {
        let buf = view.as_bytes();
        let mut r = Reader::new(buf.get(HEADER_LEN..).unwrap_or_default());
        let major = r.u16()?;
        let minor = r.u16()?;
        let len = r.u16()? as usize;
        let start = HEADER_LEN + r.offset();
        r.skip(len)?;
        let token = buf.slice(start..start + len);
        let last = r.u64()? & MAX_POSITION;
        let first = r.u64()? & MAX_POSITION;
        Ok(Self {
            version: Version { major, minor },
            token,
            last_received_server_position: last,
            first_available_client_position: first,
        })
    }

    fn token(&self) -> &[u8] {
        self.token.get(..u16::MAX as usize).unwrap_or(&self.token)
    }

    /// Bytes [`Resume::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 4 + 2 + self.token().len() + 16
    }

    /// Writes the frame (a token over 65535 bytes is cut to that length).
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_header(buf, 0, FrameType::Resume, 0);
        buf.put_u16(self.version.major);
        buf.put_u16(self.version.minor);
        let token = self.token();
        buf.put_u16(token.len() as u16);
        buf.put_slice(token);
        buf.put_u64(self.last_received_server_position & MAX_POSITION);
        buf.put_u64(self.first_available_client_position & MAX_POSITION);
    }
}

/// A RESUME_OK frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeOk {
    /// Last implied position the server received from the client.
    pub last_received_client_position: u64,
}

impl ResumeOk {
    pub(crate) fn from_view(view: &FrameView) -> Result<Self, DecodeError> {
        let mut r = Reader::new(view.as_bytes().get(HEADER_LEN..).unwrap_or_default());
        Ok(Self {
            last_received_client_position: r.u64()? & MAX_POSITION,
        })
    }

    /// Bytes [`ResumeOk::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 8
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_header(buf, 0, FrameType::ResumeOk, 0);
        buf.put_u64(self.last_received_client_position & MAX_POSITION);
    }
}
