//! The binary routing entry (`message/x.rsocket.binary-routing.v0`, 0x50)
//! that alibaba-rsocket-broker clients send as a fast path: 32-bit service id
//! and handler id, optionally 32 bits of flags (bit 0: sticky) and the
//! routing key as text.
//!
//! Ids are MurmurHash3 (x86, 32-bit, seed 104729) of `group!service:version`
//! and of `service.method`, computed as those clients compute them.

use bytes::BufMut;

use super::route::service_key;
use crate::error::DecodeError;

/// The seed alibaba-rsocket-broker clients hash service and handler ids with.
pub const ALIBABA_SEED: u32 = 104_729;

/// A parsed binary routing entry, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BinaryRouting<'a> {
    /// Hash of `group!service:version`.
    pub service_id: u32,
    /// Hash of `service.method`.
    pub handler_id: u32,
    /// Flags (0 when the entry has none); bit 0 is sticky.
    pub flags: u32,
    /// The routing key as text (may be empty).
    pub routing_text: &'a [u8],
}

impl<'a> BinaryRouting<'a> {
    /// Parses an 8-byte (ids only) or 12+-byte (ids, flags, text) entry.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let word = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
        };
        let (Some(service_id), Some(handler_id)) = (word(0), word(4)) else {
            return Err(DecodeError::Truncated {
                needed: 8,
                available: bytes.len(),
            });
        };
        if bytes.len() == 8 {
            return Ok(Self {
                service_id,
                handler_id,
                flags: 0,
                routing_text: &[],
            });
        }
        let flags = word(8).ok_or(DecodeError::InvalidLength {
            field: "binary routing",
            len: bytes.len(),
        })?;
        Ok(Self {
            service_id,
            handler_id,
            flags,
            routing_text: bytes.get(12..).unwrap_or_default(),
        })
    }

    /// Sticky flag (bit 0).
    pub fn sticky(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Writes the entry content (always with flags).
    pub fn put(&self, buf: &mut impl BufMut) {
        buf.put_u32(self.service_id);
        buf.put_u32(self.handler_id);
        buf.put_u32(self.flags);
        buf.put_slice(self.routing_text);
    }
}

/// MurmurHash3 x86 32-bit, as the Java port those clients use computes it:
/// body blocks are read unsigned, little-endian; tail bytes are
/// sign-extended (which only matters for bytes >= 0x80).
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut hash = seed;
    let mut blocks = data.chunks_exact(4);
    for block in blocks.by_ref() {
        let Ok(block) = <[u8; 4]>::try_from(block) else {
            continue;
        };
        let mut k = u32::from_le_bytes(block);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        hash ^= k;
        hash = hash
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let signed = |i: usize| tail.get(i).map_or(0, |b| *b as i8 as i32 as u32);
        let mut k = 0u32;
        if tail.len() >= 3 {
            k ^= signed(2) << 16;
        }
        if tail.len() >= 2 {
            k ^= signed(1) << 8;
        }
        k ^= signed(0);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        hash ^= k;
    }
    hash ^= data.len() as u32;
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// The service id of `group!service:version` (empty group and version are left out).
pub fn service_id(group: &str, service: &str, version: &str) -> u32 {
    murmur3_32(
        service_key(group, service, version).as_bytes(),
        ALIBABA_SEED,
    )
}

/// The handler id of `service.method`.
pub fn handler_id(service: &str, method: &str) -> u32 {
    let mut key = String::with_capacity(service.len() + method.len() + 1);
    key.push_str(service);
    key.push('.');
    key.push_str(method);
    murmur3_32(key.as_bytes(), ALIBABA_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_reference_values() {
        // Reference values of MurmurHash3_x86_32 (smhasher) for ASCII input.
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514E_28B7);
        assert_eq!(murmur3_32(b"hello", 0), 0x248B_FA47);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2E4F_F723
        );
    }

    #[test]
    fn parses_short_and_long_forms() {
        let short = [0, 0, 0, 1, 0, 0, 0, 2];
        let b = BinaryRouting::parse(&short).unwrap();
        assert_eq!(
            (b.service_id, b.handler_id, b.flags, b.routing_text),
            (1, 2, 0, &[][..])
        );
        let mut long = Vec::new();
        BinaryRouting {
            service_id: 7,
            handler_id: 9,
            flags: 1,
            routing_text: b"svc.m",
        }
        .put(&mut long);
        let b = BinaryRouting::parse(&long).unwrap();
        assert!(b.sticky());
        assert_eq!(b.routing_text, b"svc.m");
        assert!(BinaryRouting::parse(&long[..10]).is_err());
        assert!(BinaryRouting::parse(&long[..5]).is_err());
    }
}
