//! SETUP (0x01): sent by the client to start protocol processing.
//!
//! "Setup frames MUST always use Stream ID 0 as they pertain to the connection."

use bytes::{BufMut, Bytes};

use super::{
    Flags, FrameType, FrameView, HEADER_LEN, Reader, Version, metadata_flag, payload_len,
    put_header, put_payload,
};
use crate::error::DecodeError;

/// A SETUP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// Protocol version the client speaks.
    pub version: Version,
    /// Time between KEEPALIVE frames the client will send, in milliseconds (31 bits).
    pub keepalive_interval: u32,
    /// Time the client allows the server to not respond before it is assumed dead, in milliseconds (31 bits).
    pub max_lifetime: u32,
    /// Resume identification token; its presence is the (R)esume Enable flag.
    pub resume_token: Option<Bytes>,
    /// (L)ease: the client will honour LEASE.
    pub lease: bool,
    /// MIME type of metadata (US-ASCII, at most 255 bytes).
    pub metadata_mime: Bytes,
    /// MIME type of data (US-ASCII, at most 255 bytes).
    pub data_mime: Bytes,
    /// Setup metadata.
    pub metadata: Option<Bytes>,
    /// Setup data.
    pub data: Bytes,
}

impl Setup {
    pub(crate) fn from_view(view: &FrameView) -> Result<Self, DecodeError> {
        let buf = view.as_bytes();
        let body = buf.get(HEADER_LEN..).unwrap_or_default();
        let mut r = Reader::new(body);
        let major = r.u16()?;
        let minor = r.u16()?;
        let keepalive_interval = r.u32()? & super::MAX_STREAM_ID;
        let max_lifetime = r.u32()? & super::MAX_STREAM_ID;
        let resume_token = if view.flags().has(Flags::RESUME_ENABLE) {
            let len = r.u16()? as usize;
            let start = HEADER_LEN + r.offset();
            r.skip(len)?;
            Some(buf.slice(start..start + len))
        } else {
            None
        };
        let len = r.u8()? as usize;
        let start = HEADER_LEN + r.offset();
        r.skip(len)?;
        let metadata_mime = buf.slice(start..start + len);
        let len = r.u8()? as usize;
        let start = HEADER_LEN + r.offset();
        r.skip(len)?;
        let data_mime = buf.slice(start..start + len);
        Ok(Self {
            version: Version { major, minor },
            keepalive_interval,
            max_lifetime,
            resume_token,
            lease: view.flags().has(Flags::LEASE),
            metadata_mime,
            data_mime,
            metadata: view.metadata(),
            data: view.data(),
        })
    }

    /// The metadata MIME type as text, if it is valid UTF-8.
    pub fn metadata_mime_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.metadata_mime).ok()
    }

    /// The data MIME type as text, if it is valid UTF-8.
    pub fn data_mime_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.data_mime).ok()
    }

    fn token(&self) -> Option<&[u8]> {
        self.resume_token
            .as_deref()
            .map(|t| t.get(..u16::MAX as usize).unwrap_or(t))
    }

    fn mime(m: &Bytes) -> &[u8] {
        m.get(..u8::MAX as usize).unwrap_or(m)
    }

    /// Bytes [`Setup::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + 12
            + self.token().map_or(0, |t| 2 + t.len())
            + 2
            + Self::mime(&self.metadata_mime).len()
            + Self::mime(&self.data_mime).len()
            + payload_len(self.metadata.as_ref(), &self.data)
    }

    /// Writes the frame. Over-long tokens (> 65535 bytes) and MIME types
    /// (> 255 bytes) are cut to their field's limit.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let mut flags = metadata_flag(self.metadata.as_ref());
        if self.resume_token.is_some() {
            flags |= Flags::RESUME_ENABLE;
        }
        if self.lease {
            flags |= Flags::LEASE;
        }
        put_header(buf, 0, FrameType::Setup, flags);
        buf.put_u16(self.version.major);
        buf.put_u16(self.version.minor);
        buf.put_u32(self.keepalive_interval & super::MAX_STREAM_ID);
        buf.put_u32(self.max_lifetime & super::MAX_STREAM_ID);
        if let Some(token) = self.token() {
            buf.put_u16(token.len() as u16);
            buf.put_slice(token);
        }
        for mime in [&self.metadata_mime, &self.data_mime] {
            let mime = Self::mime(mime);
            buf.put_u8(mime.len() as u8);
            buf.put_slice(mime);
        }
        put_payload(buf, self.metadata.as_ref(), &self.data);
    }
}
