//! PAYLOAD (0x0A): an item on a stream, its completion, or a follow-up fragment.
//!
//! "A PAYLOAD MUST NOT have both (C)omplete and (N)ext empty (false)."

use bytes::{BufMut, Bytes};

use super::{
    Flags, FrameType, FrameView, HEADER_LEN, metadata_flag, payload_len, put_header, put_payload,
};

/// A PAYLOAD frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// Stream id.
    pub stream_id: u32,
    /// (F)ollows: more fragments of this message follow.
    pub follows: bool,
    /// (C)omplete: the stream (or this half of a channel) ends.
    pub complete: bool,
    /// (N)ext: this frame carries an item.
    pub next: bool,
    /// Metadata.
    pub metadata: Option<Bytes>,
    /// Data.
    pub data: Bytes,
}

impl Payload {
    pub(crate) fn from_view(view: &FrameView) -> Self {
        let flags = view.flags();
        Self {
            stream_id: view.stream_id(),
            follows: flags.has(Flags::FOLLOWS),
            complete: flags.has(Flags::COMPLETE),
            next: flags.has(Flags::NEXT),
            metadata: view.metadata(),
            data: view.data(),
        }
    }

    /// Bytes [`Payload::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + payload_len(self.metadata.as_ref(), &self.data)
    }

    /// The flag bits this frame encodes with.
    pub fn flag_bits(&self) -> u16 {
        let mut flags = metadata_flag(self.metadata.as_ref());
        if self.follows {
            flags |= Flags::FOLLOWS;
        }
        if self.complete {
            flags |= Flags::COMPLETE;
        }
        if self.next {
            flags |= Flags::NEXT;
        }
        flags
    }

    /// Writes the frame.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_header(buf, self.stream_id, FrameType::Payload, self.flag_bits());
        put_payload(buf, self.metadata.as_ref(), &self.data);
    }
}
