//! Routing metadata (`message/x.rsocket.routing.v0`): a sequence of tags,
//! each an 8-bit length and that many bytes of UTF-8.

use bytes::BufMut;

use super::EncodeError;
use crate::error::DecodeError;

/// Iterator over routing tags. Yields an error once and stops if a tag's
/// length points past the end.
#[derive(Clone, Debug)]
pub struct RoutingTags<'a> {
    rest: &'a [u8],
}

impl<'a> RoutingTags<'a> {
    /// Tags of a routing metadata entry.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// The bytes not yet iterated.
    pub(crate) fn rest_bytes(self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for RoutingTags<'a> {
    type Item = Result<&'a [u8], DecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let (&len, after) = self.rest.split_first()?;
        let len = len as usize;
        match after.get(..len) {
            Some(tag) => {
                self.rest = after.get(len..).unwrap_or_default();
                Some(Ok(tag))
            }
            None => {
                let available = after.len();
                self.rest = &[];
                Some(Err(DecodeError::Truncated {
                    needed: len,
                    available,
                }))
            }
        }
    }
}

/// Appends one tag (at most 255 bytes).
pub fn put_tag(buf: &mut impl BufMut, tag: &str) -> Result<(), EncodeError> {
    let len = u8::try_from(tag.len()).map_err(|_| EncodeError::TooLong {
        field: "routing tag",
        len: tag.len(),
    })?;
    buf.put_u8(len);
    buf.put_slice(tag.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        let mut buf = Vec::new();
        for t in ["svc.method", "e=abc", ""] {
            put_tag(&mut buf, t).unwrap();
        }
        let tags: Vec<_> = RoutingTags::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(tags, [&b"svc.method"[..], b"e=abc", b""]);
        assert!(put_tag(&mut buf, &"x".repeat(256)).is_err());
    }

    #[test]
    fn truncated_tag_is_an_error() {
        let mut it = RoutingTags::new(&[5, b'a']);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }
}
