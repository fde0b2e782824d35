//! Fragmentation and reassembly.
//!
//! "PAYLOAD frames and all REQUEST frames may represent a large object and MAY
//! need to be fragmented to fit within the Frame Data size. When this occurs,
//! the F flag indicates if more fragments follow the current frame (or not)."
//!
//! - [`Fragmenter`] splits an outgoing message into frames of at most a given
//!   size, metadata before data, by slicing the message's `Bytes` (no copy).
//! - [`Reassembly`] joins the fragments of one incoming message into a single
//!   frame, refusing to grow past a cap. This is the one place where payload
//!   bytes are copied: a whole message must be contiguous for its consumer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{
    Flags, Frame, FrameType, FrameView, HEADER_LEN, MAX_U24, Payload, RequestChannel, RequestFnf,
    RequestResponse, RequestStream, put_header, put_u24,
};

/// Smallest fragment size accepted: room for a header, the fixed fields of any
/// request and some metadata.
pub const MIN_FRAGMENT_SIZE: usize = 64;

/// What the first frame of a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// REQUEST_RESPONSE
    RequestResponse,
    /// REQUEST_FNF
    RequestFnf,
    /// REQUEST_STREAM with its initial request n
    RequestStream {
        /// Initial request n.
        initial_n: u32,
    },
    /// REQUEST_CHANNEL with its initial request n
    RequestChannel {
        /// Initial request n.
        initial_n: u32,
    },
    /// PAYLOAD; `next` is its (N)ext flag
    Payload {
        /// (N)ext.
        next: bool,
    },
}

impl MessageKind {
    fn fixed_len(self) -> usize {
        match self {
            Self::RequestStream { .. } | Self::RequestChannel { .. } => 4,
            _ => 0,
        }
    }
}

/// Splits one message into frames no longer than `max_frame_len` bytes each
/// (without length prefix).
///
/// The first frame has the message's own type; follow-up fragments are
/// PAYLOAD frames. Every frame but the last has (F)ollows set; (C)omplete, if
/// the message ends its stream, goes on the last frame only. A message that
/// fits yields exactly one frame without (F).
#[derive(Clone, Debug)]
pub struct Fragmenter {
    stream_id: u32,
    kind: MessageKind,
    complete: bool,
    metadata: Option<Bytes>,
    data: Bytes,
    max_frame_len: usize,
    started: bool,
    done: bool,
}

impl Fragmenter {
    /// Fragments `metadata` + `data`. `complete` is the (C) flag of the
    /// message (PAYLOAD and REQUEST_CHANNEL only). `max_frame_len` below
    /// [`MIN_FRAGMENT_SIZE`] is raised to it.
    pub fn new(
        stream_id: u32,
        kind: MessageKind,
        complete: bool,
        metadata: Option<Bytes>,
        data: Bytes,
        max_frame_len: usize,
    ) -> Self {
        Self {
            stream_id,
            kind,
            complete,
            metadata,
            data,
            max_frame_len: max_frame_len.max(MIN_FRAGMENT_SIZE),
            started: false,
            done: false,
        }
    }
}

impl Iterator for Fragmenter {
    type Item = Frame;

    fn next(&mut self) -> Option<Frame> {
        if self.done {
            return None;
        }
        let first = !self.started;
        self.started = true;
        let fixed = HEADER_LEN + if first { self.kind.fixed_len() } else { 0 };
        let mut budget = self.max_frame_len - fixed;

        // "the Metadata MUST be transmitted completely before the Data."
        let mut metadata = None;
        if let Some(rest) = self.metadata.as_mut() {
            let take = rest.len().min(budget - 3);
            metadata = Some(rest.split_to(take));
            budget -= 3 + take;
            if rest.is_empty() {
                self.metadata = None;
            }
        }
        let data = if self.metadata.is_none() {
            let take = self.data.len().min(budget);
            self.data.split_to(take)
        } else {
            Bytes::new()
        };
        let follows = self.metadata.is_some() || !self.data.is_empty();
        self.done = !follows;
        let complete = !follows && self.complete;
        let stream_id = self.stream_id;

        Some(if first {
            match self.kind {
                MessageKind::RequestResponse => RequestResponse {
                    stream_id,
                    follows,
                    metadata,
                    data,
                }
                .into(),
                MessageKind::RequestFnf => RequestFnf {
                    stream_id,
                    follows,
                    metadata,
                    data,
                }
                .into(),
                MessageKind::RequestStream { initial_n } => RequestStream {
                    stream_id,
                    follows,
                    initial_n,
                    metadata,
                    data,
                }
                .into(),
                MessageKind::RequestChannel { initial_n } => RequestChannel {
                    stream_id,
                    follows,
                    complete,
                    initial_n,
                    metadata,
                    data,
                }
                .into(),
                MessageKind::Payload { next } => Payload {
                    stream_id,
                    follows,
                    complete,
                    next,
                    metadata,
                    data,
                }
                .into(),
            }
        } else {
            let next = match self.kind {
                MessageKind::Payload { next } => next,
                _ => true,
            };
            Payload {
                stream_id,
                follows,
                complete,
                next,
                metadata,
                data,
            }
            .into()
        })
    }
}

/// Why a fragmented message could not be reassembled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    /// The message grew past the configured cap.
    #[error("fragmented message exceeds the reassembly limit of {max} bytes")]
    TooLarge {
        /// The cap.
        max: usize,
    },
    /// A fragment carried metadata after data had started, or metadata that
    /// did not start in the first fragment.
    #[error("fragment carries metadata after data (metadata must be sent completely before data)")]
    MetadataAfterData,
    /// A follow-up fragment was not a PAYLOAD frame.
    #[error("follow-up fragment is not a PAYLOAD frame")]
    NotPayload,
}

/// One incoming fragmented message being joined.
#[derive(Debug)]
pub struct Reassembly {
    out: BytesMut,
    /// Where the 24-bit metadata length goes, while metadata is still open.
    metadata_len_at: Option<usize>,
    metadata_open: bool,
    has_metadata: bool,
    frame_type: FrameType,
    flags: u16,
    payload_len: usize,
    max: usize,
}

impl Reassembly {
    /// Starts with the first fragment (a request or PAYLOAD with (F)ollows).
    /// `max` caps metadata + data; the whole message must also fit one
    /// frame (16 MiB - 1), so that it can be forwarded as one.
    pub fn start(first: &FrameView, max: usize) -> Result<Self, ReassemblyError> {
        let fixed = first.fixed_fields();
        let overhead = HEADER_LEN + fixed.len() + 3;
        let max = max.min(MAX_U24 - overhead);
        if first.payload_len() > max {
            return Err(ReassemblyError::TooLarge { max });
        }
        // Room for a few more fragments like this one, never more than the cap.
        let capacity = overhead + (first.payload_len() * 4).min(max);
        let mut out = BytesMut::with_capacity(capacity);
        let flags = first.flags().0 & !Flags::FOLLOWS;
        put_header(&mut out, first.stream_id(), first.frame_type(), flags);
        out.put_slice(fixed);
        let mut this = Self {
            out,
            metadata_len_at: None,
            metadata_open: false,
            has_metadata: first.has_metadata(),
            frame_type: first.frame_type(),
            flags,
            payload_len: 0,
            max,
        };
        if let Some(m) = first.metadata_slice() {
            this.metadata_len_at = Some(this.out.len());
            this.out.put_slice(&[0, 0, 0]);
            this.metadata_open = true;
            this.out.put_slice(m);
        }
        this.payload_len = first.payload_len();
        this.push_data(first.data_slice());
        Ok(this)
    }

    /// Bytes of metadata and data gathered so far.
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// The frame type of the message.
    pub fn frame_type(&self) -> FrameType {
        self.frame_type
    }

    fn close_metadata(&mut self) {
        if let Some(at) = self.metadata_len_at.take() {
            let len = self.out.len() - at - 3;
            let mut prefix = [0u8; 3];
            put_u24(&mut &mut prefix[..], len);
            if let Some(slot) = self.out.get_mut(at..at + 3) {
                slot.copy_from_slice(&prefix);
            }
        }
        self.metadata_open = false;
    }

    fn push_data(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.close_metadata();
            self.out.put_slice(data);
        }
    }

    /// Adds a follow-up fragment. Returns the whole message once a fragment
    /// without (F)ollows (or with F and C: "A PAYLOAD with both F and C flags
    /// set, implicitly ignores the F flag") arrives.
    pub fn push(&mut self, fragment: &FrameView) -> Result<Option<FrameView>, ReassemblyError> {
        if fragment.frame_type() != FrameType::Payload {
            return Err(ReassemblyError::NotPayload);
        }
        let len = self.payload_len + fragment.payload_len();
        if len > self.max {
            return Err(ReassemblyError::TooLarge { max: self.max });
        }
        if let Some(m) = fragment.metadata_slice() {
            if !self.metadata_open && !m.is_empty() {
                return Err(ReassemblyError::MetadataAfterData);
            }
            self.out.put_slice(m);
        }
        self.payload_len = len;
        self.push_data(fragment.data_slice());
        if fragment.follows() {
            return Ok(None);
        }
        self.close_metadata();
        let mut flags = self.flags;
        if fragment.complete()
            && matches!(
                self.frame_type,
                FrameType::Payload | FrameType::RequestChannel
            )
        {
            flags |= Flags::COMPLETE;
        }
        if fragment.next() && self.frame_type == FrameType::Payload {
            flags |= Flags::NEXT;
        }
        if self.has_metadata {
            flags |= Flags::METADATA;
        }
        let mut out = std::mem::take(&mut self.out);
        let type_flags = ((self.frame_type as u16) << 10) | flags;
        if let Some(slot) = out.get_mut(4..6) {
            slot.copy_from_slice(&type_flags.to_be_bytes());
        }
        // The frame was built from parsed parts; parsing it back cannot fail,
        // but a failure is reported rather than trusted.
        FrameView::parse(out.freeze())
            .map(Some)
            .map_err(|_| ReassemblyError::NotPayload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(frame: Frame) -> FrameView {
        FrameView::parse(frame.to_bytes()).unwrap()
    }

    #[test]
    fn small_message_is_one_frame() {
        let frames: Vec<_> = Fragmenter::new(
            1,
            MessageKind::RequestResponse,
            false,
            Some(Bytes::from_static(b"md")),
            Bytes::from_static(b"data"),
            1024,
        )
        .collect();
        assert_eq!(
            frames,
            vec![Frame::from(RequestResponse {
                stream_id: 1,
                follows: false,
                metadata: Some(Bytes::from_static(b"md")),
                data: Bytes::from_static(b"data"),
            })]
        );
    }

    #[test]
    fn fragments_respect_size_and_order_and_reassemble() {
        let metadata = Bytes::from(vec![b'm'; 150]);
        let data = Bytes::from(vec![b'd'; 300]);
        let frames: Vec<_> = Fragmenter::new(
            7,
            MessageKind::RequestChannel { initial_n: 5 },
            true,
            Some(metadata.clone()),
            data.clone(),
            64,
        )
        .collect();
        assert!(frames.len() > 5);
        for (i, f) in frames.iter().enumerate() {
            assert!(
                f.encoded_len() <= 64,
                "frame {i} is {} bytes",
                f.encoded_len()
            );
        }
        let views: Vec<_> = frames.into_iter().map(view).collect();
        assert_eq!(views[0].frame_type(), FrameType::RequestChannel);
        assert!(views[0].follows());
        assert!(!views[0].complete(), "C only on the last fragment");
        assert!(
            views[1..]
                .iter()
                .all(|v| v.frame_type() == FrameType::Payload)
        );
        let last = views.last().unwrap();
        assert!(!last.follows() && last.complete());

        let mut r = Reassembly::start(&views[0], 1 << 20).unwrap();
        let mut done = None;
        for v in &views[1..] {
            done = r.push(v).unwrap();
        }
        let whole = done.unwrap();
        assert_eq!(whole.frame_type(), FrameType::RequestChannel);
        assert_eq!(whole.request_n(), 5);
        assert!(whole.complete() && !whole.follows());
        assert_eq!(whole.metadata().unwrap(), metadata);
        assert_eq!(whole.data(), data);
    }

    #[test]
    fn reassembly_enforces_cap() {
        let frames: Vec<_> = Fragmenter::new(
            1,
            MessageKind::Payload { next: true },
            true,
            None,
            Bytes::from(vec![0; 200]),
            64,
        )
        .map(view)
        .collect();
        let mut r = Reassembly::start(&frames[0], 100).unwrap();
        let err = frames[1..].iter().find_map(|f| r.push(f).err());
        assert_eq!(err, Some(ReassemblyError::TooLarge { max: 100 }));
    }

    #[test]
    fn metadata_after_data_is_refused() {
        let first = view(
            Payload {
                stream_id: 1,
                follows: true,
                complete: false,
                next: true,
                metadata: Some(Bytes::from_static(b"m")),
                data: Bytes::from_static(b"d"),
            }
            .into(),
        );
        let second = view(
            Payload {
                stream_id: 1,
                follows: false,
                complete: false,
                next: true,
                metadata: Some(Bytes::from_static(b"late")),
                data: Bytes::new(),
            }
            .into(),
        );
        let mut r = Reassembly::start(&first, 1000).unwrap();
        assert_eq!(
            r.push(&second).unwrap_err(),
            ReassemblyError::MetadataAfterData
        );
    }

    #[test]
    fn follows_and_complete_ends_the_message() {
        let first = view(
            Payload {
                stream_id: 3,
                follows: true,
                complete: false,
                next: true,
                metadata: None,
                data: Bytes::from_static(b"ab"),
            }
            .into(),
        );
        let last = view(
            Payload {
                stream_id: 3,
                follows: true,
                complete: true,
                next: true,
                metadata: None,
                data: Bytes::from_static(b"cd"),
            }
            .into(),
        );
        let mut r = Reassembly::start(&first, 1000).unwrap();
        let whole = r.push(&last).unwrap().expect("F+C completes");
        assert_eq!(whole.data_slice(), b"abcd");
        assert!(whole.complete() && whole.next() && !whole.follows());
    }
}
