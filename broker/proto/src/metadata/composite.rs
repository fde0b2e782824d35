//! Composite metadata (`message/x.rsocket.composite-metadata.v0`): any number
//! of entries, each a MIME type (well-known id or string) and a 24-bit
//! length-prefixed content.
//!
//! A string MIME type's length byte holds length - 1 (0 is never a valid
//! length), as every RSocket implementation writes it.

use bytes::BufMut;

use super::{EncodeError, MimeType, WellKnownMime, put_mime};
use crate::error::DecodeError;
use crate::frame::{MAX_U24, get_u24, put_u24};

/// One composite metadata entry, borrowed from the metadata bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The entry's MIME type.
    pub mime: MimeType<'a>,
    /// The entry's content.
    pub content: &'a [u8],
}

/// An entry as its well-known id (if any) and content.
pub(crate) type IdEntry<'a> = (Option<WellKnownMime>, &'a [u8]);

/// Iterator over the entries of composite metadata. Yields an error once
/// and then stops if the bytes are malformed.
#[derive(Clone, Debug)]
pub struct CompositeMetadata<'a> {
    rest: &'a [u8],
    total: usize,
}

impl<'a> CompositeMetadata<'a> {
    /// Entries of `metadata`.
    pub fn new(metadata: &'a [u8]) -> Self {
        Self {
            rest: metadata,
            total: metadata.len(),
        }
    }

    /// The content of the first entry of type `mime`.
    pub fn find(self, mime: WellKnownMime) -> Result<Option<&'a [u8]>, DecodeError> {
        for entry in self {
            let entry = entry?;
            if entry.mime.is(mime) {
                return Ok(Some(entry.content));
            }
        }
        Ok(None)
    }

    /// The next entry as its well-known id (`None` for a MIME type string
    /// that names no well-known type) and content: the scan the broker does
    /// per request, without building a [`MimeType`].
    #[inline]
    pub(crate) fn next_by_id(&mut self) -> Result<Option<IdEntry<'a>>, DecodeError> {
        let Some((&first, after)) = self.rest.split_first() else {
            return Ok(None);
        };
        if first & 0x80 == 0 {
            let entry = self.read_entry()?;
            return Ok(Some((entry.mime.well_known(), entry.content)));
        }
        let len = get_u24(after).ok_or_else(|| self.truncated(4))?;
        let content = after
            .get(3..3 + len)
            .ok_or_else(|| self.truncated(4 + len))?;
        self.rest = after.get(3 + len..).unwrap_or_default();
        Ok(Some((Some(WellKnownMime::from_low_bits(first)), content)))
    }

    fn truncated(&self, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            needed: self.total - self.rest.len() + needed,
            available: self.total,
        }
    }

    #[inline]
    fn read_entry(&mut self) -> Result<Entry<'a>, DecodeError> {
        let (&first, after) = self.rest.split_first().ok_or_else(|| self.truncated(1))?;
        let (mime, after) = if first & 0x80 != 0 {
            (
                MimeType::WellKnown(WellKnownMime::from_low_bits(first)),
                after,
            )
        } else {
            let len = (first as usize) + 1;
            let name = after.get(..len).ok_or_else(|| self.truncated(1 + len))?;
            let name = std::str::from_utf8(name)
                .ok()
                .filter(|s| s.is_ascii())
                .ok_or(DecodeError::InvalidText {
                    field: "composite metadata MIME type",
                })?;
            (MimeType::Custom(name), after.get(len..).unwrap_or_default())
        };
        let header = self.rest.len() - after.len();
        let len = get_u24(after).ok_or_else(|| self.truncated(header + 3))?;
        let content = after
            .get(3..3 + len)
            .ok_or_else(|| self.truncated(header + 3 + len))?;
        self.rest = after.get(3 + len..).unwrap_or_default();
        Ok(Entry { mime, content })
    }
}

impl<'a> Iterator for CompositeMetadata<'a> {
    type Item = Result<Entry<'a>, DecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let entry = self.read_entry();
        if entry.is_err() {
            self.rest = &[];
        }
        Some(entry)
    }
}

/// Bytes [`put_entry`] writes.
pub fn entry_len(mime: MimeType<'_>, content_len: usize) -> usize {
    let mime_len = match mime {
        MimeType::WellKnown(_) => 1,
        MimeType::Custom(s) => match WellKnownMime::from_name(s.as_bytes()) {
            Some(_) => 1,
            None => 1 + s.len(),
        },
    };
    mime_len + 3 + content_len
}

/// Appends one entry. A string MIME type that names a well-known type is
/// written as its id.
pub fn put_entry(
    buf: &mut impl BufMut,
    mime: MimeType<'_>,
    content: &[u8],
) -> Result<(), EncodeError> {
    if content.len() > MAX_U24 {
        return Err(EncodeError::TooLong {
            field: "composite metadata entry",
            len: content.len(),
        });
    }
    put_mime(buf, mime)?;
    put_u24(buf, content.len());
    buf.put_slice(content);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ids_and_strings() {
        let mut buf = Vec::new();
        put_entry(
            &mut buf,
            MimeType::WellKnown(WellKnownMime::ROUTING),
            b"\x04echo",
        )
        .unwrap();
        put_entry(&mut buf, MimeType::Custom("application/x.custom"), b"xyz").unwrap();
        let entries: Vec<_> = CompositeMetadata::new(&buf)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[0].mime.is(WellKnownMime::ROUTING));
        assert_eq!(entries[0].content, b"\x04echo");
        assert_eq!(entries[1].mime, MimeType::Custom("application/x.custom"));
        assert_eq!(entries[1].content, b"xyz");
        assert_eq!(
            entry_len(MimeType::Custom("application/x.custom"), 3),
            1 + 20 + 3 + 3
        );
    }

    #[test]
    fn known_strings_are_written_as_ids() {
        let mut buf = Vec::new();
        put_entry(
            &mut buf,
            MimeType::Custom("message/x.rsocket.routing.v0"),
            b"",
        )
        .unwrap();
        assert_eq!(buf, [0xFE, 0, 0, 0]);
    }

    #[test]
    fn truncated_entry_is_an_error_then_iteration_stops() {
        let bytes = [0xFE, 0, 0, 9, 1, 2];
        let mut it = CompositeMetadata::new(&bytes);
        assert!(matches!(
            it.next(),
            Some(Err(DecodeError::Truncated { .. }))
        ));
        assert!(it.next().is_none());
    }

    #[test]
    fn rejects_bad_type_strings() {
        let mut buf = Vec::new();
        assert_eq!(
            put_entry(&mut buf, MimeType::Custom(""), b""),
            Err(EncodeError::TypeLength(0))
        );
        let long = "a".repeat(129);
        assert_eq!(
            put_entry(&mut buf, MimeType::Custom(&long), b""),
            Err(EncodeError::TypeLength(129))
        );
        assert_eq!(
            put_entry(&mut buf, MimeType::Custom("tëxt/x"), b""),
            Err(EncodeError::NotAscii)
        );
    }
}
