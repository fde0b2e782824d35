//! Building composite metadata for a request: a routing entry, an
//! authentication entry, any other entry, in the order they are added.
//!
//! One place for what clients, tests and benchmarks send, so that they
//! write the same bytes the broker reads. Writing never panics: the first
//! input that does not fit its field (a routing tag over 255 bytes, an
//! entry over 16 MiB, a bad MIME type string) is kept and returned by
//! [`CompositeBuilder::build`], and nothing after it is written.
//!
//! ```
//! use rsocket_proto::metadata::build::{CompositeBuilder, route};
//! use rsocket_proto::metadata::{RequestMetadata, WellKnownMime};
//!
//! let md = CompositeBuilder::new()
//!     .routing(&["com.example.Echo.hello", "e=instance-7"])
//!     .bearer("token")
//!     .build()?;
//! let found = RequestMetadata::scan(&md)?;
//! assert!(found.routing.is_some() && found.auth.is_some());
//! assert_eq!(route(&["svc"])?, &[0x80 | WellKnownMime::ROUTING.id(), 0, 0, 4, 3, b's', b'v', b'c'][..]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use bytes::Bytes;

use super::{EncodeError, MimeType, WellKnownMime, put_bearer, put_entry, put_simple, put_tag};

/// Composite metadata with one routing entry holding `tags`: `tags[0]` is
/// the route (`[group!]service[.method][:version]`), further tags refine
/// it (`e=<instance>`, `sticky=1`, `broadcast=1`, ...).
pub fn route(tags: &[&str]) -> Result<Bytes, EncodeError> {
    CompositeBuilder::new().routing(tags).build()
}

/// Composite metadata, entry by entry. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct CompositeBuilder {
    md: Vec<u8>,
    error: Option<EncodeError>,
}

impl CompositeBuilder {
    /// No entries yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry of type `mime` holding `content` as it is.
    pub fn entry(mut self, mime: MimeType<'_>, content: &[u8]) -> Self {
        if self.error.is_none()
            && let Err(e) = put_entry(&mut self.md, mime, content)
        {
            self.error = Some(e);
        }
        self
    }

    /// Appends a routing entry (`message/x.rsocket.routing.v0`) holding
    /// `tags`, each at most 255 bytes.
    pub fn routing(mut self, tags: &[&str]) -> Self {
        let mut routing = Vec::with_capacity(tags.iter().map(|t| 1 + t.len()).sum());
        for t in tags {
            if let Err(e) = put_tag(&mut routing, t) {
                self.error.get_or_insert(e);
                return self;
            }
        }
        self.entry(MimeType::WellKnown(WellKnownMime::ROUTING), &routing)
    }

    /// Appends an authentication entry of the simple type (`username`
    /// at most 65535 bytes).
    pub fn simple_auth(mut self, username: &str, password: &str) -> Self {
        let mut auth = Vec::with_capacity(3 + username.len() + password.len());
        if let Err(e) = put_simple(&mut auth, username, password) {
            self.error.get_or_insert(e);
            return self;
        }
        self.entry(MimeType::WellKnown(WellKnownMime::AUTHENTICATION), &auth)
    }

    /// Appends an authentication entry of the bearer type.
    pub fn bearer(self, token: &str) -> Self {
        let mut auth = Vec::with_capacity(1 + token.len());
        put_bearer(&mut auth, token);
        self.entry(MimeType::WellKnown(WellKnownMime::AUTHENTICATION), &auth)
    }

    /// The metadata, or the first input that did not fit.
    pub fn build(self) -> Result<Bytes, EncodeError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(Bytes::from(self.md)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Auth, CompositeMetadata, RequestMetadata, Route, RoutingTags};

    #[test]
    fn entries_in_the_order_added() {
        let md = CompositeBuilder::new()
            .routing(&["grp!com.example.Echo.hello:1.0", "e=instance-7"])
            .simple_auth("user", "pw")
            .entry(MimeType::Custom("application/x.custom"), b"xyz")
            .bearer("jwt")
            .build()
            .unwrap();
        let entries: Vec<_> = CompositeMetadata::new(&md)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(entries.len(), 4);
        assert!(entries[0].mime.is(WellKnownMime::ROUTING));
        let tags: Vec<_> = RoutingTags::new(entries[0].content)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            tags,
            [&b"grp!com.example.Echo.hello:1.0"[..], b"e=instance-7"]
        );
        assert!(matches!(
            Auth::parse(entries[1].content).unwrap(),
            Auth::Simple {
                username: b"user",
                password: b"pw"
            }
        ));
        assert_eq!(entries[2].mime, MimeType::Custom("application/x.custom"));
        assert_eq!(entries[2].content, b"xyz");
        let found = RequestMetadata::scan(&md).unwrap();
        assert_eq!(
            found.auth,
            Some(entries[1].content),
            "the first auth entry wins"
        );
    }

    #[test]
    fn route_is_one_routing_entry() {
        let md = route(&["svc.m", "sticky=1"]).unwrap();
        assert_eq!(
            md,
            &[
                0xFE, 0, 0, 15, 5, b's', b'v', b'c', b'.', b'm', 8, b's', b't', b'i', b'c', b'k',
                b'y', b'=', b'1'
            ][..]
        );
        let r = RequestMetadata::scan(&md)
            .unwrap()
            .route()
            .unwrap()
            .unwrap();
        assert_eq!(r, Route::from_tags(&md[4..]).unwrap());
        assert!(r.sticky);
        assert_eq!(route(&[]).unwrap(), &[0xFE, 0, 0, 0][..]);
    }

    #[test]
    fn the_first_input_that_does_not_fit_is_the_error() {
        let long = "t".repeat(256);
        let err = CompositeBuilder::new()
            .routing(&["ok", &long])
            .entry(MimeType::Custom(""), b"")
            .build();
        assert_eq!(
            err,
            Err(EncodeError::TooLong {
                field: "routing tag",
                len: 256
            })
        );
        assert_eq!(
            CompositeBuilder::new()
                .bearer("t")
                .entry(MimeType::Custom(""), b"")
                .routing(&[&long])
                .build(),
            Err(EncodeError::TypeLength(0))
        );
        assert_eq!(
            CompositeBuilder::new()
                .simple_auth(&"u".repeat(70_000), "p")
                .build()
                .map_err(|e| matches!(e, EncodeError::TooLong { .. })),
            Err(true)
        );
        assert_eq!(CompositeBuilder::new().build().unwrap(), Bytes::new());
    }
}
