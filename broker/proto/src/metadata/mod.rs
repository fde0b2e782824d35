//! Metadata extensions: composite metadata, well-known MIME types, routing
//! tags, authentication, per-stream data MIME types, the broker's route
//! syntax and the alibaba binary routing entry; [`build`] writes a
//! request's composite metadata.
//!
//! Parsers borrow from the frame's bytes and allocate nothing; turn a
//! borrowed slice back into a shared `Bytes` with `Bytes::slice_ref` when it
//! must outlive the frame.

mod auth;
mod binary_routing;
pub mod build;
mod composite;
mod data_mime;
mod mime;
mod route;
mod routing;

pub use auth::{Auth, WellKnownAuth, put_bearer, put_custom_auth, put_simple};
pub use binary_routing::{ALIBABA_SEED, BinaryRouting, handler_id, murmur3_32, service_id};
pub use composite::{CompositeMetadata, Entry, entry_len, put_entry};
pub use data_mime::{AcceptMimeTypes, parse_mime, put_mime};
pub use mime::{MimeType, WellKnownMime};
pub use route::{Route, service_key};
pub use routing::{RoutingTags, put_tag};

/// Why metadata could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A MIME or auth type string is empty or longer than 128 bytes.
    #[error("type string must be 1 to 128 bytes, got {0}")]
    TypeLength(usize),
    /// A MIME or auth type string is not US-ASCII.
    #[error("type string must be US-ASCII")]
    NotAscii,
    /// A length does not fit its field.
    #[error("{field} of {len} bytes does not fit its length field")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// The length.
        len: usize,
    },
}

/// The entries of a request's composite metadata that the broker acts on,
/// found in one pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestMetadata<'a> {
    /// Content of the routing entry (`message/x.rsocket.routing.v0`), if any.
    pub routing: Option<&'a [u8]>,
    /// Content of the binary routing entry (0x50), if any.
    pub binary_routing: Option<&'a [u8]>,
    /// Content of the authentication entry, if any.
    pub auth: Option<&'a [u8]>,
    /// Content of the per-stream data MIME entry (0x7A), if any.
    pub data_mime: Option<&'a [u8]>,
    /// Content of the accepted data MIME types entry (0x7B), if any.
    pub accept_mimes: Option<&'a [u8]>,
}

impl<'a> RequestMetadata<'a> {
    /// Scans composite metadata; the first entry of each kind wins.
    // Once per routed request: inlined into its caller whatever else
    // calls it (perf/proto-instructions.sh, decode_and_route).
    #[inline(always)]
    pub fn scan(composite: &'a [u8]) -> Result<Self, crate::DecodeError> {
        let mut found = Self::default();
        let mut entries = CompositeMetadata::new(composite);
        while let Some((id, content)) = entries.next_by_id()? {
            let slot = match id {
                Some(WellKnownMime::ROUTING) => &mut found.routing,
                Some(WellKnownMime::BINARY_ROUTING) => &mut found.binary_routing,
                Some(WellKnownMime::AUTHENTICATION) => &mut found.auth,
                Some(WellKnownMime::MIME_TYPE) => &mut found.data_mime,
                Some(WellKnownMime::ACCEPT_MIME_TYPES) => &mut found.accept_mimes,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(content);
            }
        }
        Ok(found)
    }

    /// The route: from the routing tags, or else from the routing text of
    /// the binary routing entry.
    #[inline]
    pub fn route(&self) -> Result<Option<Route<'a>>, crate::DecodeError> {
        if let Some(tags) = self.routing {
            return Route::from_tags(tags).map(Some);
        }
        if let Some(bin) = self.binary_routing {
            let bin = BinaryRouting::parse(bin)?;
            if !bin.routing_text.is_empty() {
                return Route::parse_key(bin.routing_text).map(|mut r| {
                    r.sticky |= bin.sticky();
                    Some(r)
                });
            }
        }
        Ok(None)
    }
}
