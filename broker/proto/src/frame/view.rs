//! [`FrameView`]: a validated, zero-copy view of one received frame.

use bytes::{Buf, Bytes};

use super::{Flags, FrameType, HEADER_LEN, Header, MAX_REQUEST_N, Reader, get_u24};
use crate::error::DecodeError;

/// One received frame, checked for structure, with offsets to its parts.
///
/// Parsing reads the header and the fixed fields, and checks every length
/// field against the bytes present; after that, every accessor is a slice of
/// the receive buffer. Forwarding a frame to another connection needs only a
/// new stream id in front of [`FrameView::after_stream_id`].
#[derive(Clone, PartialEq, Eq)]
pub struct FrameView {
    buf: Bytes,
    stream_id: u32,
    frame_type: FrameType,
    flags: Flags,
    has_metadata: bool,
    /// The first 32-bit field after the header where the type has one
    /// (request n, error code, extended type, lease TTL, keepalive interval).
    field: u32,
    metadata_start: u32,
    metadata_len: u32,
    data_start: u32,
}

impl FrameView {
    /// Parses one frame (without length prefix).
    ///
    /// Frame types this implementation does not know are reported as
    /// [`DecodeError::UnknownFrameType`]; [`Header::parse`] still reads their
    /// header so the caller can honour the Ignore flag.
    #[inline]
    pub fn parse(buf: Bytes) -> Result<Self, DecodeError> {
        let header = Header::parse(&buf)?;
        let frame_type = header.known_type().ok_or(DecodeError::UnknownFrameType {
            frame_type: header.frame_type,
        })?;
        let flags = header.flags;
        let body = buf.get(HEADER_LEN..).unwrap_or_default();
        let mut r = Reader::new(body);
        let mut field = 0;
        match frame_type {
            FrameType::Setup => {
                r.skip(4)?; // version
                field = r.u32()?; // keepalive interval
                r.skip(4)?; // max lifetime
                if flags.has(Flags::RESUME_ENABLE) {
                    let token_len = r.u16()? as usize;
                    r.skip(token_len)?;
                }
                let mime_len = r.u8()? as usize;
                r.skip(mime_len)?;
                let mime_len = r.u8()? as usize;
                r.skip(mime_len)?;
            }
            FrameType::Lease => {
                field = r.u32()?;
                r.skip(4)?;
            }
            FrameType::Keepalive | FrameType::ResumeOk => r.skip(8)?,
            FrameType::RequestStream
            | FrameType::RequestChannel
            | FrameType::RequestN
            | FrameType::Error
            | FrameType::Ext => field = r.u32()?,
            FrameType::Resume => {
                r.skip(4)?;
                let token_len = r.u16()? as usize;
                r.skip(token_len)?;
                r.skip(16)?;
            }
            FrameType::RequestResponse
            | FrameType::RequestFnf
            | FrameType::Cancel
            | FrameType::Payload
            | FrameType::MetadataPush => {}
        }
        let fixed_end = HEADER_LEN + r.offset();
        let end = buf.len();
        let rest = end - fixed_end;
        let (has_metadata, metadata_start, metadata_len, data_start) = match frame_type {
            // "This frame only supports Metadata, so the Metadata Length header MUST NOT be included."
            FrameType::MetadataPush => (true, fixed_end, rest, end),
            // LEASE: "the Metadata Length header MUST NOT be included, even if the (M)etadata flag is set true."
            FrameType::Lease if flags.has(Flags::METADATA) => (true, fixed_end, rest, end),
            t if t.has_metadata_length() && flags.has(Flags::METADATA) => {
                let declared =
                    body.get(r.offset()..)
                        .and_then(get_u24)
                        .ok_or(DecodeError::Truncated {
                            needed: fixed_end + 3,
                            available: end,
                        })?;
                let available = rest - 3;
                // "Metadata Length MUST be less than or equal to the Frame Length minus the length of the Frame Header."
                if declared > available {
                    return Err(DecodeError::MetadataLength {
                        declared,
                        available,
                    });
                }
                (true, fixed_end + 3, declared, fixed_end + 3 + declared)
            }
            _ => (false, fixed_end, 0, fixed_end),
        };
        Ok(Self {
            stream_id: header.stream_id,
            frame_type,
            flags,
            has_metadata,
            field,
            metadata_start: metadata_start as u32,
            metadata_len: metadata_len as u32,
            data_start: data_start as u32,
            buf,
        })
    }

    /// Stream id.
    #[inline]
    pub fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// Frame type.
    #[inline]
    pub fn frame_type(&self) -> FrameType {
        self.frame_type
    }

    /// The 10 flag bits as received.
    #[inline]
    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// (F)ollows: more fragments of this message follow.
    ///
    /// "A PAYLOAD with both F and C flags set, implicitly ignores the F flag."
    #[inline]
    pub fn follows(&self) -> bool {
        match self.frame_type {
            FrameType::Payload => {
                self.flags.has(Flags::FOLLOWS) && !self.flags.has(Flags::COMPLETE)
            }
            t if t.is_request() => self.flags.has(Flags::FOLLOWS),
            _ => false,
        }
    }

    /// (C)omplete on PAYLOAD and REQUEST_CHANNEL.
    #[inline]
    pub fn complete(&self) -> bool {
        matches!(
            self.frame_type,
            FrameType::Payload | FrameType::RequestChannel
        ) && self.flags.has(Flags::COMPLETE)
    }

    /// (N)ext on PAYLOAD.
    #[inline]
    pub fn next(&self) -> bool {
        self.frame_type == FrameType::Payload && self.flags.has(Flags::NEXT)
    }

    /// (I)gnore.
    #[inline]
    pub fn ignore(&self) -> bool {
        self.flags.has(Flags::IGNORE)
    }

    /// Whether the frame carries metadata (possibly empty).
    #[inline]
    pub fn has_metadata(&self) -> bool {
        self.has_metadata
    }

    /// The metadata, borrowed.
    #[inline]
    pub fn metadata_slice(&self) -> Option<&[u8]> {
        if !self.has_metadata {
            return None;
        }
        let start = self.metadata_start as usize;
        self.buf.get(start..start + self.metadata_len as usize)
    }

    /// The metadata as a slice of the receive buffer.
    #[inline]
    pub fn metadata(&self) -> Option<Bytes> {
        self.has_metadata.then(|| {
            let start = self.metadata_start as usize;
            self.buf.slice(start..start + self.metadata_len as usize)
        })
    }

    /// The data, borrowed (empty for frames without data).
    #[inline]
    pub fn data_slice(&self) -> &[u8] {
        self.buf.get(self.data_start as usize..).unwrap_or_default()
    }

    /// The data as a slice of the receive buffer.
    #[inline]
    pub fn data(&self) -> Bytes {
        self.buf.slice(self.data_start as usize..)
    }

    /// The metadata and the data, taking the frame's buffer for the data:
    /// a frame without metadata changes no reference count.
    #[inline]
    pub fn into_parts(self) -> (Option<Bytes>, Bytes) {
        let metadata = self.metadata();
        let mut data = self.buf;
        data.advance(self.data_start as usize);
        (metadata, data)
    }

    /// Bytes of metadata plus data: what counts against a reassembly cap.
    #[inline]
    pub fn payload_len(&self) -> usize {
        let metadata = if self.has_metadata {
            self.metadata_len as usize
        } else {
            0
        };
        metadata + (self.buf.len() - self.data_start as usize)
    }

    /// Initial request n (REQUEST_STREAM, REQUEST_CHANNEL) or n (REQUEST_N);
    /// 0 for other frames.
    #[inline]
    pub fn request_n(&self) -> u32 {
        match self.frame_type {
            FrameType::RequestStream | FrameType::RequestChannel | FrameType::RequestN => {
                self.field & MAX_REQUEST_N
            }
            _ => 0,
        }
    }

    /// The error code of an ERROR frame.
    #[inline]
    pub fn error_code(&self) -> Option<crate::ErrorCode> {
        (self.frame_type == FrameType::Error).then_some(crate::ErrorCode(self.field))
    }

    /// The raw first 32-bit field after the header (0 where there is none).
    #[inline]
    pub(crate) fn field(&self) -> u32 {
        self.field
    }

    /// The type-specific fixed fields between the header and the metadata
    /// (or data): request n, error code, SETUP's parameters, ...
    pub fn fixed_fields(&self) -> &[u8] {
        let end = match (self.has_metadata, self.frame_type.has_metadata_length()) {
            (true, true) => self.metadata_start as usize - 3,
            (true, false) => self.metadata_start as usize,
            (false, _) => self.data_start as usize,
        };
        self.buf.get(HEADER_LEN..end).unwrap_or_default()
    }

    /// A copy of the frame in a buffer of its own: to hold a frame for long
    /// without keeping the whole receive buffer it was cut from alive.
    pub fn detached(&self) -> Self {
        Self {
            buf: Bytes::copy_from_slice(&self.buf),
            ..self.clone()
        }
    }

    /// The whole frame.
    #[inline]
    pub fn as_bytes(&self) -> &Bytes {
        &self.buf
    }

    /// The whole frame, consuming the view.
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        self.buf
    }

    /// Length of the frame in bytes (without a length prefix).
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Always false: a parsed frame has at least its header.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Everything after the stream id: type, flags and the rest, unchanged.
    /// A forwarded frame is a new 4-byte stream id followed by this.
    #[inline]
    pub fn after_stream_id(&self) -> Bytes {
        self.buf.slice(4..)
    }

    /// [`FrameView::after_stream_id`], taking the frame's buffer instead of
    /// sharing it: no reference count changes hands.
    #[inline]
    pub fn into_after_stream_id(self) -> Bytes {
        let mut buf = self.buf;
        buf.advance(4);
        buf
    }
}

impl std::fmt::Debug for FrameView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameView")
            .field("stream_id", &self.stream_id)
            .field("type", &self.frame_type)
            .field("flags", &format_args!("{:#05x}", self.flags.0))
            .field("metadata_len", &self.metadata_slice().map(<[u8]>::len))
            .field("data_len", &self.data_slice().len())
            .finish()
    }
}
