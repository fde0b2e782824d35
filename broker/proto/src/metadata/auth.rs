//! Authentication metadata (`message/x.rsocket.authentication.v0`): a
//! well-known auth type id (simple, bearer) or a custom type string, then the
//! credentials.
//!
//! Simple: a 16-bit username length, the username, then the password.
//! Bearer: the token. A custom type string's length byte holds length - 1.

use bytes::BufMut;

use super::EncodeError;
use crate::error::DecodeError;

/// Well-known authentication type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WellKnownAuth;

impl WellKnownAuth {
    /// `simple`: username and password.
    pub const SIMPLE: u8 = 0x00;
    /// `bearer`: a token.
    pub const BEARER: u8 = 0x01;
}

/// Parsed authentication metadata, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth<'a> {
    /// Simple authentication.
    Simple {
        /// UTF-8 username.
        username: &'a [u8],
        /// UTF-8 password.
        password: &'a [u8],
    },
    /// Bearer token (for the broker: a JWT).
    Bearer {
        /// The token.
        token: &'a [u8],
    },
    /// A well-known id this implementation has no format for.
    WellKnown {
        /// The 7-bit id.
        id: u8,
        /// The payload.
        payload: &'a [u8],
    },
    /// A custom auth type named by string.
    Custom {
        /// The auth type (US-ASCII).
        auth_type: &'a str,
        /// The payload.
        payload: &'a [u8],
    },
}

impl<'a> Auth<'a> {
    /// Parses authentication metadata.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let (&first, rest) = bytes.split_first().ok_or(DecodeError::Truncated {
            needed: 1,
            available: 0,
        })?;
        if first & 0x80 != 0 {
            return Ok(match first & 0x7F {
                WellKnownAuth::SIMPLE => {
                    let (len, rest) =
                        rest.split_first_chunk::<2>()
                            .ok_or(DecodeError::Truncated {
                                needed: 3,
                                available: bytes.len(),
                            })?;
                    let len = u16::from_be_bytes(*len) as usize;
                    let username = rest.get(..len).ok_or(DecodeError::Truncated {
                        needed: 3 + len,
                        available: bytes.len(),
                    })?;
                    Self::Simple {
                        username,
                        password: rest.get(len..).unwrap_or_default(),
                    }
                }
                WellKnownAuth::BEARER => Self::Bearer { token: rest },
                id => Self::WellKnown { id, payload: rest },
            });
        }
        let len = first as usize + 1;
        let name = rest.get(..len).ok_or(DecodeError::Truncated {
            needed: 1 + len,
            available: bytes.len(),
        })?;
        let auth_type = std::str::from_utf8(name)
            .ok()
            .filter(|s| s.is_ascii())
            .ok_or(DecodeError::InvalidText { field: "auth type" })?;
        Ok(Self::Custom {
            auth_type,
            payload: rest.get(len..).unwrap_or_default(),
        })
    }
}

/// Appends simple authentication.
pub fn put_simple(
    buf: &mut impl BufMut,
    username: &str,
    password: &str,
) -> Result<(), EncodeError> {
    let len = u16::try_from(username.len()).map_err(|_| EncodeError::TooLong {
        field: "username",
        len: username.len(),
    })?;
    buf.put_u8(0x80 | WellKnownAuth::SIMPLE);
    buf.put_u16(len);
    buf.put_slice(username.as_bytes());
    buf.put_slice(password.as_bytes());
    Ok(())
}

/// Appends bearer authentication.
pub fn put_bearer(buf: &mut impl BufMut, token: &str) {
    buf.put_u8(0x80 | WellKnownAuth::BEARER);
    buf.put_slice(token.as_bytes());
}

/// Appends a custom authentication type and its payload.
pub fn put_custom_auth(
    buf: &mut impl BufMut,
    auth_type: &str,
    payload: &[u8],
) -> Result<(), EncodeError> {
    if auth_type.is_empty() || auth_type.len() > 128 {
        return Err(EncodeError::TypeLength(auth_type.len()));
    }
    if !auth_type.is_ascii() {
        return Err(EncodeError::NotAscii);
    }
    buf.put_u8((auth_type.len() - 1) as u8);
    buf.put_slice(auth_type.as_bytes());
    buf.put_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_bearer_custom_round_trip() {
        let mut buf = Vec::new();
        put_simple(&mut buf, "user", "pw").unwrap();
        assert_eq!(buf, b"\x80\x00\x04userpw");
        assert_eq!(
            Auth::parse(&buf).unwrap(),
            Auth::Simple {
                username: b"user",
                password: b"pw"
            }
        );

        buf.clear();
        put_bearer(&mut buf, "T0K3N");
        assert_eq!(Auth::parse(&buf).unwrap(), Auth::Bearer { token: b"T0K3N" });

        buf.clear();
        put_custom_auth(&mut buf, "x.api-key", b"k").unwrap();
        assert_eq!(
            Auth::parse(&buf).unwrap(),
            Auth::Custom {
                auth_type: "x.api-key",
                payload: b"k"
            }
        );
        assert_eq!(
            Auth::parse(&[0x85, 1]).unwrap(),
            Auth::WellKnown {
                id: 5,
                payload: &[1]
            }
        );
    }

    #[test]
    fn malformed_auth_is_an_error() {
        assert!(Auth::parse(&[]).is_err());
        assert!(Auth::parse(&[0x80, 0]).is_err());
        assert!(Auth::parse(&[0x80, 0, 5, b'a']).is_err());
        assert!(Auth::parse(&[3, b'a']).is_err());
    }
}
