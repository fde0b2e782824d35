//! The four request frames: REQUEST_RESPONSE (0x04), REQUEST_FNF (0x05),
//! REQUEST_STREAM (0x06) and REQUEST_CHANNEL (0x07).
//!
//! "When REQUEST_RESPONSE, REQUEST_FNF, REQUEST_STREAM, or REQUEST_CHANNEL
//! frames need to be fragmented, the first frame is the REQUEST_* frame with
//! the (F)ollows flag set, followed by a sequence of PAYLOAD frames."

use bytes::{BufMut, Bytes};

use super::{
    Flags, FrameType, FrameView, HEADER_LEN, MAX_REQUEST_N, metadata_flag, payload_len, put_header,
    put_payload,
};

macro_rules! single_request {
    ($(#[$doc:meta])* $name:ident, $frame_type:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            /// Stream id.
            pub stream_id: u32,
            /// (F)ollows: more fragments follow as PAYLOAD frames.
            pub follows: bool,
            /// Metadata.
            pub metadata: Option<Bytes>,
            /// Data.
            pub data: Bytes,
        }

        impl $name {
            pub(crate) fn from_view(view: &FrameView) -> Self {
                Self {
                    stream_id: view.stream_id(),
                    follows: view.flags().has(Flags::FOLLOWS),
                    metadata: view.metadata(),
                    data: view.data(),
                }
            }

            /// Bytes `encode` writes.
            pub fn encoded_len(&self) -> usize {
                HEADER_LEN + payload_len(self.metadata.as_ref(), &self.data)
            }

            /// Writes the frame.
            pub fn encode(&self, buf: &mut impl BufMut) {
                let mut flags = metadata_flag(self.metadata.as_ref());
                if self.follows {
                    flags |= Flags::FOLLOWS;
                }
                put_header(buf, self.stream_id, $frame_type, flags);
                put_payload(buf, self.metadata.as_ref(), &self.data);
            }
        }
    };
}

single_request!(
    /// A REQUEST_RESPONSE frame: request a single response.
    RequestResponse,
    FrameType::RequestResponse
);

single_request!(
    /// A REQUEST_FNF frame: a single one-way message.
    RequestFnf,
    FrameType::RequestFnf
);

/// A REQUEST_STREAM frame: request a completable stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestStream {
    /// Stream id.
    pub stream_id: u32,
    /// (F)ollows: more fragments follow as PAYLOAD frames.
    pub follows: bool,
    /// Initial request n (31 bits). "Value MUST be > 0."
    pub initial_n: u32,
    /// Metadata.
    pub metadata: Option<Bytes>,
    /// Data.
    pub data: Bytes,
}

impl RequestStream {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        Self {
            stream_id: view.stream_id(),
            follows: view.flags().has(Flags::FOLLOWS),
            initial_n: view.request_n(),
            metadata: view.metadata(),
            data: view.data(),
        }
    }

    /// Bytes [`RequestStream::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 4 + payload_len(self.metadata.as_ref(), &self.data)
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let mut flags = metadata_flag(self.metadata.as_ref());
        if self.follows {
            flags |= Flags::FOLLOWS;
        }
        put_header(buf, self.stream_id, FrameType::RequestStream, flags);
        buf.put_u32(self.initial_n & MAX_REQUEST_N);
        put_payload(buf, self.metadata.as_ref(), &self.data);
    }
}

/// A REQUEST_CHANNEL frame: request a completable stream in both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestChannel {
    /// Stream id.
    pub stream_id: u32,
    /// (F)ollows: more fragments follow as PAYLOAD frames.
    pub follows: bool,
    /// (C)omplete: the requester sends nothing after this message.
    pub complete: bool,
    /// Initial request n (31 bits). "Value MUST be > 0."
    pub initial_n: u32,
    /// Metadata.
    pub metadata: Option<Bytes>,
    /// Data.
    pub data: Bytes,
}

impl RequestChannel {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        Self {
            stream_id: view.stream_id(),
            follows: view.flags().has(Flags::FOLLOWS),
            complete: view.flags().has(Flags::COMPLETE),
            initial_n: view.request_n(),
            metadata: view.metadata(),
            data: view.data(),
        }
    }

    /// Bytes [`RequestChannel::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 4 + payload_len(self.metadata.as_ref(), &self.data)
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let mut flags = metadata_flag(self.metadata.as_ref());
        if self.follows {
            flags |= Flags::FOLLOWS;
        }
        if self.complete {
            flags |= Flags::COMPLETE;
        }
        put_header(buf, self.stream_id, FrameType::RequestChannel, flags);
        buf.put_u32(self.initial_n & MAX_REQUEST_N);
        put_payload(buf, self.metadata.as_ref(), &self.data);
    }
}
