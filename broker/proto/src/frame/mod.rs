//! RSocket frames: the header, a zero-copy [`FrameView`] for the forwarding
//! hot path, and one typed struct per frame type (one file each) for the
//! control path.
//!
//! Every frame is decoded from a `Bytes` holding exactly one frame (no length
//! prefix; see [`crate::codec`] for that) by slicing, never by copying, and
//! encoded into any `BufMut`.

mod cancel;
mod error;
mod ext;
mod keepalive;
mod lease;
mod metadata_push;
mod payload;
mod request;
mod request_n;
mod resume;
mod setup;
mod view;

pub use cancel::Cancel;
pub use error::ErrorFrame;
pub use ext::Ext;
pub use keepalive::{Keepalive, MAX_POSITION};
pub use lease::Lease;
pub use metadata_push::MetadataPush;
pub use payload::Payload;
pub use request::{RequestChannel, RequestFnf, RequestResponse, RequestStream};
pub use request_n::RequestN;
pub use resume::{Resume, ResumeOk};
pub use setup::Setup;
pub use view::FrameView;

use bytes::{Buf, BufMut, Bytes};

use crate::error::DecodeError;

/// Length of the frame header: stream id (4) + type and flags (2).
pub const HEADER_LEN: usize = 6;
/// Largest stream id (31 bits).
pub const MAX_STREAM_ID: u32 = 0x7FFF_FFFF;
/// Largest REQUEST_N value (31 bits).
pub const MAX_REQUEST_N: u32 = 0x7FFF_FFFF;
/// Largest value of a 24-bit length field (frame length, metadata length).
pub const MAX_U24: usize = 0x00FF_FFFF;
/// The protocol version this implementation speaks.
pub const VERSION: Version = Version { major: 1, minor: 0 };

/// A protocol version as carried by SETUP and RESUME.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}

/// The frame types of RSocket 1.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Sent by the client to start protocol processing.
    Setup = 0x01,
    /// Sent by a responder to grant the ability to send requests.
    Lease = 0x02,
    /// Connection keepalive.
    Keepalive = 0x03,
    /// Request a single response.
    RequestResponse = 0x04,
    /// A single one-way message.
    RequestFnf = 0x05,
    /// Request a completable stream.
    RequestStream = 0x06,
    /// Request a completable stream in both directions.
    RequestChannel = 0x07,
    /// Request N more items.
    RequestN = 0x08,
    /// Cancel an outstanding request.
    Cancel = 0x09,
    /// A payload on a stream.
    Payload = 0x0A,
    /// An error on a stream or the connection.
    Error = 0x0B,
    /// Asynchronous metadata for the connection.
    MetadataPush = 0x0C,
    /// Replaces SETUP to resume a session.
    Resume = 0x0D,
    /// Accepts a RESUME.
    ResumeOk = 0x0E,
    /// Extension frame.
    Ext = 0x3F,
}

impl FrameType {
    /// The frame type for a 6-bit type value, if it is one of the spec's.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x01 => Self::Setup,
            0x02 => Self::Lease,
            0x03 => Self::Keepalive,
            0x04 => Self::RequestResponse,
            0x05 => Self::RequestFnf,
            0x06 => Self::RequestStream,
            0x07 => Self::RequestChannel,
            0x08 => Self::RequestN,
            0x09 => Self::Cancel,
            0x0A => Self::Payload,
            0x0B => Self::Error,
            0x0C => Self::MetadataPush,
            0x0D => Self::Resume,
            0x0E => Self::ResumeOk,
            0x3F => Self::Ext,
            _ => return None,
        })
    }

    /// REQUEST_RESPONSE, REQUEST_FNF, REQUEST_STREAM or REQUEST_CHANNEL.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            Self::RequestResponse | Self::RequestFnf | Self::RequestStream | Self::RequestChannel
        )
    }

    /// Frames that carry a resume position: requests, REQUEST_N, CANCEL, ERROR, PAYLOAD.
    pub fn is_resumable(self) -> bool {
        self.is_request()
            || matches!(
                self,
                Self::RequestN | Self::Cancel | Self::Error | Self::Payload
            )
    }

    /// Whether the M flag announces a 24-bit metadata length field before the
    /// metadata (it does not for LEASE and METADATA_PUSH, whose metadata is
    /// the rest of the frame).
    pub(crate) fn has_metadata_length(self) -> bool {
        matches!(
            self,
            Self::Setup
                | Self::RequestResponse
                | Self::RequestFnf
                | Self::RequestStream
                | Self::RequestChannel
                | Self::Payload
                | Self::Ext
        )
    }
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Setup => "SETUP",
            Self::Lease => "LEASE",
            Self::Keepalive => "KEEPALIVE",
            Self::RequestResponse => "REQUEST_RESPONSE",
            Self::RequestFnf => "REQUEST_FNF",
            Self::RequestStream => "REQUEST_STREAM",
            Self::RequestChannel => "REQUEST_CHANNEL",
            Self::RequestN => "REQUEST_N",
            Self::Cancel => "CANCEL",
            Self::Payload => "PAYLOAD",
            Self::Error => "ERROR",
            Self::MetadataPush => "METADATA_PUSH",
            Self::Resume => "RESUME",
            Self::ResumeOk => "RESUME_OK",
            Self::Ext => "EXT",
        })
    }
}

/// The 10 flag bits of a frame header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u16);

impl Flags {
    /// (I)gnore: the frame may be ignored if not understood.
    pub const IGNORE: u16 = 0x200;
    /// (M)etadata present.
    pub const METADATA: u16 = 0x100;
    /// (F)ollows: more fragments follow (requests, PAYLOAD).
    pub const FOLLOWS: u16 = 0x80;
    /// (C)omplete (REQUEST_CHANNEL, PAYLOAD).
    pub const COMPLETE: u16 = 0x40;
    /// (N)ext (PAYLOAD).
    pub const NEXT: u16 = 0x20;
    /// (R)esume enable (SETUP).
    pub const RESUME_ENABLE: u16 = 0x80;
    /// (L)ease (SETUP).
    pub const LEASE: u16 = 0x40;
    /// (R)espond (KEEPALIVE).
    pub const RESPOND: u16 = 0x80;
    /// All 10 flag bits.
    pub const MASK: u16 = 0x3FF;

    /// Whether all bits of `bit` are set.
    #[inline]
    pub fn has(self, bit: u16) -> bool {
        self.0 & bit == bit
    }
}

/// The 6-byte header every frame starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Stream id (31 bits; the reserved top bit is dropped).
    pub stream_id: u32,
    /// Raw 6-bit frame type (may be one this implementation does not know).
    pub frame_type: u8,
    /// The 10 flag bits.
    pub flags: Flags,
}

impl Header {
    /// Reads the header at the start of `frame`.
    #[inline]
    pub fn parse(frame: &[u8]) -> Result<Self, DecodeError> {
        match frame {
            [a, b, c, d, e, f, ..] => {
                let stream_id = u32::from_be_bytes([*a, *b, *c, *d]) & MAX_STREAM_ID;
                let type_flags = u16::from_be_bytes([*e, *f]);
                Ok(Self {
                    stream_id,
                    frame_type: (type_flags >> 10) as u8,
                    flags: Flags(type_flags & Flags::MASK),
                })
            }
            _ => Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                available: frame.len(),
            }),
        }
    }

    /// The known frame type, if any.
    pub fn known_type(&self) -> Option<FrameType> {
        FrameType::from_u8(self.frame_type)
    }
}

/// Writes a frame header.
#[inline]
pub fn put_header(buf: &mut impl BufMut, stream_id: u32, frame_type: FrameType, flags: u16) {
    buf.put_u32(stream_id & MAX_STREAM_ID);
    buf.put_u16(((frame_type as u16) << 10) | (flags & Flags::MASK));
}

/// Writes a 24-bit big-endian length. Callers guarantee `len <= MAX_U24`.
#[inline]
pub fn put_u24(buf: &mut impl BufMut, len: usize) {
    let len = len & MAX_U24;
    buf.put_u8((len >> 16) as u8);
    buf.put_u16(len as u16);
}

/// Reads a 24-bit big-endian length from the start of `bytes`.
#[inline]
pub fn get_u24(bytes: &[u8]) -> Option<usize> {
    match bytes {
        [a, b, c, ..] => Some(((*a as usize) << 16) | ((*b as usize) << 8) | (*c as usize)),
        _ => None,
    }
}

/// Any frame, decoded into its typed form (the control path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// SETUP
    Setup(Setup),
    /// LEASE
    Lease(Lease),
    /// KEEPALIVE
    Keepalive(Keepalive),
    /// REQUEST_RESPONSE
    RequestResponse(RequestResponse),
    /// REQUEST_FNF
    RequestFnf(RequestFnf),
    /// REQUEST_STREAM
    RequestStream(RequestStream),
    /// REQUEST_CHANNEL
    RequestChannel(RequestChannel),
    /// REQUEST_N
    RequestN(RequestN),
    /// CANCEL
    Cancel(Cancel),
    /// PAYLOAD
    Payload(Payload),
    /// ERROR
    Error(ErrorFrame),
    /// METADATA_PUSH
    MetadataPush(MetadataPush),
    /// RESUME
    Resume(Resume),
    /// RESUME_OK
    ResumeOk(ResumeOk),
    /// EXT
    Ext(Ext),
}

impl Frame {
    /// Decodes one frame (without length prefix).
    pub fn decode(frame: Bytes) -> Result<Self, DecodeError> {
        Self::from_view(&FrameView::parse(frame)?)
    }

    /// The typed form of an already parsed frame.
    pub fn from_view(view: &FrameView) -> Result<Self, DecodeError> {
        Ok(match view.frame_type() {
            FrameType::Setup => Self::Setup(Setup::from_view(view)?),
            FrameType::Lease => Self::Lease(Lease::from_view(view)),
            FrameType::Keepalive => Self::Keepalive(Keepalive::from_view(view)?),
            FrameType::RequestResponse => Self::RequestResponse(RequestResponse::from_view(view)),
            FrameType::RequestFnf => Self::RequestFnf(RequestFnf::from_view(view)),
            FrameType::RequestStream => Self::RequestStream(RequestStream::from_view(view)),
            FrameType::RequestChannel => Self::RequestChannel(RequestChannel::from_view(view)),
            FrameType::RequestN => Self::RequestN(RequestN::from_view(view)),
            FrameType::Cancel => Self::Cancel(Cancel::from_view(view)),
            FrameType::Payload => Self::Payload(Payload::from_view(view)),
            FrameType::Error => Self::Error(ErrorFrame::from_view(view)),
            FrameType::MetadataPush => Self::MetadataPush(MetadataPush::from_view(view)),
            FrameType::Resume => Self::Resume(Resume::from_view(view)?),
            FrameType::ResumeOk => Self::ResumeOk(ResumeOk::from_view(view)?),
            FrameType::Ext => Self::Ext(Ext::from_view(view)),
        })
    }

    /// The stream id of the frame.
    pub fn stream_id(&self) -> u32 {
        match self {
            Self::Setup(_)
            | Self::Lease(_)
            | Self::Keepalive(_)
            | Self::MetadataPush(_)
            | Self::Resume(_)
            | Self::ResumeOk(_) => 0,
            Self::RequestResponse(f) => f.stream_id,
            Self::RequestFnf(f) => f.stream_id,
            Self::RequestStream(f) => f.stream_id,
            Self::RequestChannel(f) => f.stream_id,
            Self::RequestN(f) => f.stream_id,
            Self::Cancel(f) => f.stream_id,
            Self::Payload(f) => f.stream_id,
            Self::Error(f) => f.stream_id,
            Self::Ext(f) => f.stream_id,
        }
    }

    /// Bytes [`Frame::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Setup(f) => f.encoded_len(),
            Self::Lease(f) => f.encoded_len(),
            Self::Keepalive(f) => f.encoded_len(),
            Self::RequestResponse(f) => f.encoded_len(),
            Self::RequestFnf(f) => f.encoded_len(),
            Self::RequestStream(f) => f.encoded_len(),
            Self::RequestChannel(f) => f.encoded_len(),
            Self::RequestN(f) => f.encoded_len(),
            Self::Cancel(f) => f.encoded_len(),
            Self::Payload(f) => f.encoded_len(),
            Self::Error(f) => f.encoded_len(),
            Self::MetadataPush(f) => f.encoded_len(),
            Self::Resume(f) => f.encoded_len(),
            Self::ResumeOk(f) => f.encoded_len(),
            Self::Ext(f) => f.encoded_len(),
        }
    }

    /// Writes the frame (without length prefix).
    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Self::Setup(f) => f.encode(buf),
            Self::Lease(f) => f.encode(buf),
            Self::Keepalive(f) => f.encode(buf),
            Self::RequestResponse(f) => f.encode(buf),
            Self::RequestFnf(f) => f.encode(buf),
            Self::RequestStream(f) => f.encode(buf),
            Self::RequestChannel(f) => f.encode(buf),
            Self::RequestN(f) => f.encode(buf),
            Self::Cancel(f) => f.encode(buf),
            Self::Payload(f) => f.encode(buf),
            Self::Error(f) => f.encode(buf),
            Self::MetadataPush(f) => f.encode(buf),
            Self::Resume(f) => f.encode(buf),
            Self::ResumeOk(f) => f.encode(buf),
            Self::Ext(f) => f.encode(buf),
        }
    }

    /// Encodes into a new `Bytes`.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = bytes::BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }
}

macro_rules! impl_from_frame {
    ($($variant:ident),*) => {$(
        impl From<$variant> for Frame {
            fn from(f: $variant) -> Self { Self::$variant(f) }
        }
    )*};
}
impl_from_frame!(
    Setup,
    Lease,
    Keepalive,
    RequestResponse,
    RequestFnf,
    RequestStream,
    RequestChannel,
    RequestN,
    Cancel,
    Payload,
    MetadataPush,
    Resume,
    ResumeOk,
    Ext
);

impl From<ErrorFrame> for Frame {
    fn from(f: ErrorFrame) -> Self {
        Self::Error(f)
    }
}

/// Length of metadata (with its 24-bit length field when the frame type has
/// one) plus data.
#[inline]
pub(crate) fn payload_len(metadata: Option<&Bytes>, data: &Bytes) -> usize {
    metadata.map_or(0, |m| 3 + m.len()) + data.len()
}

/// Writes optional length-prefixed metadata followed by data.
#[inline]
pub(crate) fn put_payload(buf: &mut impl BufMut, metadata: Option<&Bytes>, data: &Bytes) {
    if let Some(m) = metadata {
        put_u24(buf, m.len());
        buf.put_slice(m);
    }
    buf.put_slice(data);
}

/// The M flag for an optional metadata.
#[inline]
pub(crate) fn metadata_flag(metadata: Option<&Bytes>) -> u16 {
    if metadata.is_some() {
        Flags::METADATA
    } else {
        0
    }
}

/// Big-endian reads over a slice that report truncation instead of panicking.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    total: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            total: bytes.len(),
        }
    }

    pub(crate) fn offset(&self) -> usize {
        self.total - self.bytes.len()
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.bytes.len() < n {
            Err(DecodeError::Truncated {
                needed: self.offset() + n,
                available: self.total,
            })
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.bytes.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.bytes.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.bytes.get_u32())
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.bytes.get_u64())
    }

    pub(crate) fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        self.need(n)?;
        self.bytes.advance(n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_types_print_and_resume_as_the_spec_says() {
        let names = [
            (FrameType::Setup, "SETUP", false),
            (FrameType::Lease, "LEASE", false),
            (FrameType::Keepalive, "KEEPALIVE", false),
            (FrameType::RequestResponse, "REQUEST_RESPONSE", true),
            (FrameType::RequestN, "REQUEST_N", true),
            (FrameType::Cancel, "CANCEL", true),
            (FrameType::Payload, "PAYLOAD", true),
            (FrameType::Error, "ERROR", true),
            (FrameType::MetadataPush, "METADATA_PUSH", false),
            (FrameType::Resume, "RESUME", false),
            (FrameType::ResumeOk, "RESUME_OK", false),
        ];
        for (t, name, resumable) in names {
            assert_eq!(t.to_string(), name);
            // "Frames that are resumable: REQUEST_*, REQUEST_N, CANCEL, ERROR, PAYLOAD."
            assert_eq!(t.is_resumable(), resumable, "{name}");
        }
        for t in [
            FrameType::Keepalive,
            FrameType::RequestN,
            FrameType::Error,
            FrameType::Cancel,
        ] {
            assert!(!t.has_metadata_length(), "{t} has no metadata length field");
        }
    }
}
