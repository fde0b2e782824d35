//! [`OutFrame`]: one outgoing frame as a small inline head plus up to two
//! borrowed `Bytes` parts, so metadata and data are never copied on the way
//! out and control frames need no allocation.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{Flags, Frame, FrameType, FrameView, MAX_REQUEST_N, put_header, put_u24};

/// Capacity of the inline head: the largest fixed part written inline
/// (KEEPALIVE and LEASE: 14 bytes) with room to spare.
const HEAD_CAP: usize = 24;

/// One frame ready for the transport (without length prefix): `head`, then
/// `metadata`, then `data`, back to back.
#[derive(Clone, PartialEq, Eq)]
pub struct OutFrame {
    head: [u8; HEAD_CAP],
    head_len: u8,
    metadata: Bytes,
    data: Bytes,
}

impl OutFrame {
    fn with_head((head, head_len): ([u8; HEAD_CAP], u8), metadata: Bytes, data: Bytes) -> Self {
        Self {
            head,
            head_len,
            metadata,
            data,
        }
    }

    /// A received frame sent on under another stream id: a new 4-byte stream
    /// id followed by the original bytes (type, flags and the rest).
    pub fn forward(stream_id: u32, view: &FrameView) -> Self {
        Self::forwarded(stream_id, view.after_stream_id())
    }

    /// [`OutFrame::forward`] taking the received frame's buffer.
    pub fn forward_owned(stream_id: u32, view: FrameView) -> Self {
        Self::forwarded(stream_id, view.into_after_stream_id())
    }

    /// A received REQUEST_STREAM or REQUEST_CHANNEL sent on under another
    /// stream id with another initial request n: a new 10-byte head
    /// (stream id, the original type and flags, `initial_n`) followed by
    /// the original bytes after the initial request n.
    pub fn forward_with_request_n(stream_id: u32, view: FrameView, initial_n: u32) -> Self {
        let mut rest = view.into_bytes();
        let type_and_flags = rest
            .get(4..6)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map_or(0, u16::from_be_bytes);
        let skip = rest.len().min(10);
        bytes::Buf::advance(&mut rest, skip);
        Self::with_head(
            head(|w| {
                w.put_u32(stream_id & crate::frame::MAX_STREAM_ID);
                w.put_u16(type_and_flags);
                w.put_u32(initial_n & MAX_REQUEST_N);
            }),
            Bytes::new(),
            rest,
        )
    }

    fn forwarded(stream_id: u32, after_stream_id: Bytes) -> Self {
        Self::with_head(
            head(|w| w.put_u32(stream_id & crate::frame::MAX_STREAM_ID)),
            Bytes::new(),
            after_stream_id,
        )
    }

    /// A frame whose bytes are already encoded.
    pub fn encoded(bytes: Bytes) -> Self {
        Self {
            head: [0; HEAD_CAP],
            head_len: 0,
            metadata: Bytes::new(),
            data: bytes,
        }
    }

    /// The outgoing form of a typed frame; metadata and data are shared, not copied.
    pub fn from_frame(frame: &Frame) -> Self {
        Self::from(frame.clone())
    }

    /// [`OutFrame::from_frame`] taking the frame, so its buffers move
    /// instead of being shared.
    pub fn from_owned(frame: impl Into<Frame>) -> Self {
        Self::from(frame.into())
    }

    /// Length of the frame in bytes (without length prefix).
    #[inline]
    pub fn len(&self) -> usize {
        self.head_len as usize + self.metadata.len() + self.data.len()
    }

    /// Always false: every frame has at least a header.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The inline head.
    #[inline]
    pub fn head(&self) -> &[u8] {
        self.head.get(..self.head_len as usize).unwrap_or_default()
    }

    /// The frame in order as up to three slices (some may be empty).
    #[inline]
    pub fn chunks(&self) -> [&[u8]; 3] {
        [self.head(), &self.metadata, &self.data]
    }

    /// The shared (not inline) parts: metadata and data.
    #[inline]
    pub fn shared_parts(&self) -> (&Bytes, &Bytes) {
        (&self.metadata, &self.data)
    }

    /// The stream id the frame goes out on.
    pub fn stream_id(&self) -> u32 {
        let first4 = self.chunks().into_iter().flatten().take(4).copied();
        let mut id = 0u32;
        for b in first4 {
            id = (id << 8) | u32::from(b);
        }
        id & crate::frame::MAX_STREAM_ID
    }

    /// The whole frame copied into one buffer (tests, message transports).
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.len());
        for chunk in self.chunks() {
            buf.put_slice(chunk);
        }
        buf.freeze()
    }
}

impl From<Frame> for OutFrame {
    /// The outgoing form of a typed frame, taking its metadata and data
    /// buffers (no reference-count traffic).
    fn from(frame: Frame) -> Self {
        fn md(m: Option<Bytes>) -> Bytes {
            m.unwrap_or_default()
        }
        fn m_flag(m: &Option<Bytes>) -> u16 {
            if m.is_some() { Flags::METADATA } else { 0 }
        }
        fn put_md_len(w: &mut &mut [u8], m: &Option<Bytes>) {
            if let Some(m) = m {
                put_u24(w, m.len());
            }
        }
        match frame {
            Frame::Payload(f) => Self::with_head(
                head(|w| {
                    put_header(w, f.stream_id, FrameType::Payload, f.flag_bits());
                    put_md_len(w, &f.metadata);
                }),
                md(f.metadata),
                f.data,
            ),
            Frame::RequestResponse(f) => Self::with_head(
                head(|w| {
                    let flags = m_flag(&f.metadata) | if f.follows { Flags::FOLLOWS } else { 0 };
                    put_header(w, f.stream_id, FrameType::RequestResponse, flags);
                    put_md_len(w, &f.metadata);
                }),
                md(f.metadata),
                f.data,
            ),
            Frame::RequestFnf(f) => Self::with_head(
                head(|w| {
                    let flags = m_flag(&f.metadata) | if f.follows { Flags::FOLLOWS } else { 0 };
                    put_header(w, f.stream_id, FrameType::RequestFnf, flags);
                    put_md_len(w, &f.metadata);
                }),
                md(f.metadata),
                f.data,
            ),
            Frame::RequestStream(f) => Self::with_head(
                head(|w| {
                    let flags = m_flag(&f.metadata) | if f.follows { Flags::FOLLOWS } else { 0 };
                    put_header(w, f.stream_id, FrameType::RequestStream, flags);
                    w.put_u32(f.initial_n & MAX_REQUEST_N);
                    put_md_len(w, &f.metadata);
                }),
                md(f.metadata),
                f.data,
            ),
            Frame::RequestChannel(f) => Self::with_head(
                head(|w| {
                    let flags = m_flag(&f.metadata)
                        | if f.follows { Flags::FOLLOWS } else { 0 }
                        | if f.complete { Flags::COMPLETE } else { 0 };
                    put_header(w, f.stream_id, FrameType::RequestChannel, flags);
                    w.put_u32(f.initial_n & MAX_REQUEST_N);
                    put_md_len(w, &f.metadata);
                }),
                md(f.metadata),
                f.data,
            ),
            Frame::Ext(f) => Self::with_head(
                head(|w| {
                    let flags = m_flag(&f.metadata) | if f.ignore { Flags::IGNORE } else { 0 };
                    put_header(w, f.stream_id, FrameType::Ext, flags);
                    w.put_u32(f.extended_type & MAX_REQUEST_N);
                    put_md_len(w, &f.metadata);
                }),
                md(f.metadata),
                f.data,
            ),
            Frame::RequestN(f) => {
                Self::with_head(head(|w| f.encode(w)), Bytes::new(), Bytes::new())
            }
            Frame::Cancel(f) => Self::with_head(head(|w| f.encode(w)), Bytes::new(), Bytes::new()),
            Frame::ResumeOk(f) => {
                Self::with_head(head(|w| f.encode(w)), Bytes::new(), Bytes::new())
            }
            Frame::Error(f) => Self::with_head(
                head(|w| {
                    put_header(w, f.stream_id, FrameType::Error, 0);
                    w.put_u32(f.code.0);
                }),
                Bytes::new(),
                f.data,
            ),
            Frame::Keepalive(f) => Self::with_head(
                head(|w| {
                    put_header(
                        w,
                        0,
                        FrameType::Keepalive,
                        if f.respond { Flags::RESPOND } else { 0 },
                    );
                    w.put_u64(f.last_received_position & crate::frame::MAX_POSITION);
                }),
                Bytes::new(),
                f.data,
            ),
            Frame::Lease(f) => Self::with_head(
                head(|w| {
                    put_header(w, 0, FrameType::Lease, m_flag(&f.metadata));
                    w.put_u32(f.ttl & MAX_REQUEST_N);
                    w.put_u32(f.number_of_requests & MAX_REQUEST_N);
                }),
                Bytes::new(),
                md(f.metadata),
            ),
            Frame::MetadataPush(f) => Self::with_head(
                head(|w| put_header(w, 0, FrameType::MetadataPush, Flags::METADATA)),
                Bytes::new(),
                f.metadata,
            ),
            Frame::Setup(_) | Frame::Resume(_) => Self::encoded(frame.to_bytes()),
        }
    }
}

/// An inline head written by `write`, with its length.
fn head(write: impl FnOnce(&mut &mut [u8])) -> ([u8; HEAD_CAP], u8) {
    let mut head = [0u8; HEAD_CAP];
    let mut w: &mut [u8] = &mut head;
    write(&mut w);
    let len = (HEAD_CAP - w.len()) as u8;
    (head, len)
}

impl std::fmt::Debug for OutFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutFrame")
            .field("head", &self.head())
            .field("metadata_len", &self.metadata.len())
            .field("data_len", &self.data.len())
            .finish()
    }
}
