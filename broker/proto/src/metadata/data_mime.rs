//! Per-stream data MIME types: `message/x.rsocket.mime-type.v0` (0x7A, one
//! type) and `message/x.rsocket.accept-mime-types.v0` (0x7B, a list). Each
//! type is a well-known id (high bit set) or a length - 1 byte and a string.

use bytes::BufMut;

use super::{EncodeError, MimeType, WellKnownMime};
use crate::error::DecodeError;

fn read_one(bytes: &[u8]) -> Result<(MimeType<'_>, &[u8]), DecodeError> {
    let (&first, rest) = bytes.split_first().ok_or(DecodeError::Truncated {
        needed: 1,
        available: 0,
    })?;
    if first & 0x80 != 0 {
        let id = WellKnownMime::from_low_bits(first);
        return Ok((MimeType::WellKnown(id), rest));
    }
    let len = first as usize + 1;
    let name = rest.get(..len).ok_or(DecodeError::Truncated {
        needed: 1 + len,
        available: bytes.len(),
    })?;
    let name = std::str::from_utf8(name)
        .ok()
        .filter(|s| s.is_ascii())
        .ok_or(DecodeError::InvalidText {
            field: "data MIME type",
        })?;
    Ok((MimeType::Custom(name), rest.get(len..).unwrap_or_default()))
}

/// Parses a data MIME type entry (0x7A).
pub fn parse_mime(bytes: &[u8]) -> Result<MimeType<'_>, DecodeError> {
    read_one(bytes).map(|(m, _)| m)
}

/// Iterator over an accepted data MIME types entry (0x7B).
#[derive(Clone, Debug)]
pub struct AcceptMimeTypes<'a> {
    rest: &'a [u8],
}

impl<'a> AcceptMimeTypes<'a> {
    /// Types listed in `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
}

impl<'a> Iterator for AcceptMimeTypes<'a> {
    type Item = Result<MimeType<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        Some(match read_one(self.rest) {
            Ok((mime, rest)) => {
                self.rest = rest;
                Ok(mime)
            }
            Err(e) => {
                self.rest = &[];
                Err(e)
            }
        })
    }
}

/// Appends one MIME type (id if well known, else the string).
pub fn put_mime(buf: &mut impl BufMut, mime: MimeType<'_>) -> Result<(), EncodeError> {
    match mime.well_known() {
        Some(id) => buf.put_u8(0x80 | id.id()),
        None => {
            let name = mime.as_str().unwrap_or_default();
            if name.is_empty() || name.len() > 128 {
                return Err(EncodeError::TypeLength(name.len()));
            }
            if !name.is_ascii() {
                return Err(EncodeError::NotAscii);
            }
            buf.put_u8((name.len() - 1) as u8);
            buf.put_slice(name.as_bytes());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_list_round_trip() {
        let mut buf = Vec::new();
        put_mime(&mut buf, MimeType::Custom("application/json")).unwrap();
        assert_eq!(buf, [0x85]);
        assert!(
            parse_mime(&buf)
                .unwrap()
                .is(WellKnownMime::APPLICATION_JSON)
        );

        buf.clear();
        put_mime(
            &mut buf,
            MimeType::WellKnown(WellKnownMime::APPLICATION_CBOR),
        )
        .unwrap();
        put_mime(&mut buf, MimeType::Custom("application/x.mine")).unwrap();
        let list: Vec<_> = AcceptMimeTypes::new(&buf)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            list,
            [
                MimeType::WellKnown(WellKnownMime::APPLICATION_CBOR),
                MimeType::Custom("application/x.mine")
            ]
        );
    }

    #[test]
    fn truncated_string_is_an_error() {
        assert!(parse_mime(&[5, b'a']).is_err());
        assert!(parse_mime(&[]).is_err());
    }
}
