//! Service keys: `group!service:version`, the form alibaba-rsocket-broker
//! clients hash into binary routing ids, with empty group and version left
//! out. Lookups build the key of a request's route on the stack.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A service's identity in the route table.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceKey(Arc<str>);

impl ServiceKey {
    /// The key of `service` in `group` at `version` (either may be empty).
    pub fn new(group: &str, service: &str, version: &str) -> Self {
        Self(rsocket_proto::metadata::service_key(group, service, version).into())
    }

    /// The service name alone, without group and version.
    pub fn name(&self) -> &str {
        let s = self.as_str();
        let s = s.split_once('!').map_or(s, |(_, rest)| rest);
        s.split_once(':').map_or(s, |(name, _)| name)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The alibaba binary routing service id of this key.
    pub fn binary_id(&self) -> u32 {
        rsocket_proto::metadata::murmur3_32(
            self.0.as_bytes(),
            rsocket_proto::metadata::ALIBABA_SEED,
        )
    }
}

// Hashes as the bytes do, so a map keyed by `ServiceKey` can be searched
// with a `&[u8]` built on the stack.
impl Hash for ServiceKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.as_bytes().hash(state);
    }
}

impl Borrow<[u8]> for ServiceKey {
    fn borrow(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Calls `f` with the key bytes of `name` in `group` at `version`, built
/// without allocating when it fits 256 bytes.
pub fn with_key<R>(group: &[u8], name: &[u8], version: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    if group.is_empty() && version.is_empty() {
        // The key is the name itself.
        return f(name);
    }
    let len = group.len() + name.len() + version.len() + 2;
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= stack.len() {
        &mut stack
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        at += bytes.len();
    };
    if !group.is_empty() {
        put(group);
        put(b"!");
    }
    put(name);
    if !version.is_empty() {
        put(b":");
        put(version);
    }
    f(buf.get(..at).unwrap_or_default())
}

/// The service whose `check` method the broker answers itself.
pub const HEALTH_SERVICE: &str = "com.alibaba.rsocket.health.RSocketServiceHealth";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn key_format_and_borrowed_lookup() {
        assert_eq!(ServiceKey::new("", "svc", "").as_str(), "svc");
        assert_eq!(ServiceKey::new("g", "svc", "1").as_str(), "g!svc:1");
        let mut map = HashMap::new();
        map.insert(ServiceKey::new("g", "com.example.Echo", "1.0"), 7);
        let found = with_key(b"g", b"com.example.Echo", b"1.0", |k| map.get(k).copied());
        assert_eq!(found, Some(7));
        let long = "s".repeat(300);
        map.insert(ServiceKey::new("", &long, ""), 8);
        assert_eq!(
            with_key(b"", long.as_bytes(), b"", |k| map.get(k).copied()),
            Some(8)
        );
        // Longer than the stack buffer, with group and version: built on the heap.
        for len in [250, 251, 252, 253, 300] {
            let name = "n".repeat(len);
            map.insert(ServiceKey::new("g", &name, "2"), len);
            assert_eq!(
                with_key(b"g", name.as_bytes(), b"2", |k| map.get(k).copied()),
                Some(len),
                "a name of {len} bytes"
            );
        }
    }

    #[test]
    fn keys_print_as_written() {
        let key = ServiceKey::new("g", "svc", "1.0");
        assert_eq!(key.to_string(), "g!svc:1.0");
        assert_eq!(format!("{key:?}"), "\"g!svc:1.0\"");
    }

    #[test]
    fn name_drops_group_and_version() {
        for (group, version) in [("", ""), ("g", ""), ("", "1.0"), ("g", "1.0")] {
            let key = ServiceKey::new(group, "com.example.Echo", version);
            assert_eq!(key.name(), "com.example.Echo", "{key}");
        }
    }

    #[test]
    fn binary_id_matches_the_client_hash() {
        let key = ServiceKey::new("", "com.example.Echo", "");
        assert_eq!(
            key.binary_id(),
            rsocket_proto::metadata::service_id("", "com.example.Echo", "")
        );
    }
}
