//! The broker's route syntax: routing tag 0 is
//! `[group!]service[.method][:version]`; further tags `e=<instance id>`
//! (target one instance), `sticky=1`, `m=<method>`, `broadcast=1`, and any
//! other `name=value` tag, readable with [`Route::tag`].
//!
//! Parts are byte slices of the request's metadata: the broker looks names
//! up by their bytes, so the hot path neither copies nor validates UTF-8 (a
//! name that is not valid UTF-8 simply matches no registered service).
//! [`Route`]'s `Display` renders it as text for messages and logs.

use std::fmt;

use memchr::{memchr, memchr2, memrchr};

use super::RoutingTags;
use crate::error::DecodeError;

/// A parsed route, borrowed from the request's metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route<'a> {
    /// Group (before `!`), if any.
    pub group: Option<&'a [u8]>,
    /// `service[.method]` as written, without group and version.
    pub key: &'a [u8],
    /// The service: `key` without its method.
    pub service: &'a [u8],
    /// The method: from an `m=` tag, or else what follows the last `.` of `key`.
    pub method: Option<&'a [u8]>,
    /// Version (after `:`), if any.
    pub version: Option<&'a [u8]>,
    /// `e=<instance id>`: the one instance to route to.
    pub endpoint: Option<&'a [u8]>,
    /// `sticky=1`: keep this requester on the instance it got first.
    pub sticky: bool,
    /// `broadcast=1`: deliver a fire-and-forget to every instance.
    pub broadcast: bool,
    extra_tags: &'a [u8],
}

fn non_empty(s: &[u8]) -> Option<&[u8]> {
    (!s.is_empty()).then_some(s)
}

fn flag(value: &[u8]) -> bool {
    matches!(value, b"1" | b"true")
}

fn split_tag(tag: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = memchr(b'=', tag)?;
    Some((tag.get(..at)?, tag.get(at + 1..)?))
}

impl<'a> Route<'a> {
    /// Parses the content of a routing metadata entry: tag 0 is the route,
    /// later tags refine it.
    // Once per routed request: inlined into its caller whatever else
    // calls it (perf/proto-instructions.sh, decode_and_route).
    #[inline(always)]
    pub fn from_tags(routing: &'a [u8]) -> Result<Self, DecodeError> {
        let mut tags = RoutingTags::new(routing);
        let first = tags.next().ok_or(DecodeError::InvalidLength {
            field: "route",
            len: 0,
        })??;
        let mut route = Self::parse_key(first)?;
        route.extra_tags = tags.clone().rest_bytes();
        if route.extra_tags.is_empty() {
            return Ok(route);
        }
        let mut explicit_method = None;
        for tag in tags {
            let Some((name, value)) = split_tag(tag?) else {
                continue;
            };
            match name {
                b"e" => route.endpoint = non_empty(value),
                b"m" => explicit_method = non_empty(value),
                b"sticky" => route.sticky |= flag(value),
                b"broadcast" => route.broadcast |= flag(value),
                _ => {}
            }
        }
        if let Some(m) = explicit_method {
            route.method = Some(m);
            route.service = route
                .key
                .strip_suffix(m)
                .and_then(|k| k.strip_suffix(b"."))
                .unwrap_or(route.key);
        }
        Ok(route)
    }

    /// Parses `[group!]service[.method][:version]`: the group ends at a `!`
    /// that comes before any `:`, the version starts after the first `:`,
    /// and the method follows the last `.` between them.
    #[inline]
    pub fn parse_key(key: &'a [u8]) -> Result<Self, DecodeError> {
        // One search for the first `!` or `:` settles the common cases
        // (`service.method`, `service:version`) without a second pass.
        let (group, name, version) = match memchr2(b'!', b':', key) {
            None => (None, key, None),
            Some(at) if key.get(at) == Some(&b':') => (
                None,
                key.get(..at).unwrap_or_default(),
                key.get(at + 1..).and_then(non_empty),
            ),
            Some(at) => {
                let group = key.get(..at).and_then(non_empty);
                let rest = key.get(at + 1..).unwrap_or_default();
                match memchr(b':', rest) {
                    Some(c) => (
                        group,
                        rest.get(..c).unwrap_or_default(),
                        rest.get(c + 1..).and_then(non_empty),
                    ),
                    None => (group, rest, None),
                }
            }
        };
        if name.is_empty() {
            return Err(DecodeError::InvalidLength {
                field: "route service",
                len: 0,
            });
        }
        let (service, method) = match memrchr(b'.', name) {
            Some(at) if at > 0 && at + 1 < name.len() => {
                (name.get(..at).unwrap_or(name), name.get(at + 1..))
            }
            _ => (name, None),
        };
        Ok(Self {
            group,
            key: name,
            service,
            method,
            version,
            endpoint: None,
            sticky: false,
            broadcast: false,
            extra_tags: &[],
        })
    }

    /// The value of a `name=value` tag after tag 0, if present.
    pub fn tag(&self, name: &str) -> Option<&'a [u8]> {
        RoutingTags::new(self.extra_tags)
            .filter_map(Result::ok)
            .filter_map(split_tag)
            .find_map(|(n, v)| (n == name.as_bytes()).then_some(v))
    }
}

/// The service key `[group!]service[:version]` (an empty group or version
/// is left out): how SETUP registers a service and a route names it.
pub fn service_key(group: &str, service: &str, version: &str) -> String {
    let mut key = String::with_capacity(group.len() + service.len() + version.len() + 2);
    if !group.is_empty() {
        key.push_str(group);
        key.push('!');
    }
    key.push_str(service);
    if !version.is_empty() {
        key.push(':');
        key.push_str(version);
    }
    key
}

impl fmt::Display for Route<'_> {
    /// `[group!]key[:version]`, with invalid UTF-8 replaced.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(g) = self.group {
            write!(f, "{}!", String::from_utf8_lossy(g))?;
        }
        f.write_str(&String::from_utf8_lossy(self.key))?;
        if let Some(v) = self.version {
            write!(f, ":{}", String::from_utf8_lossy(v))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::put_tag;

    fn tags(list: &[&str]) -> Vec<u8> {
        let mut buf = Vec::new();
        for t in list {
            put_tag(&mut buf, t).unwrap();
        }
        buf
    }

    fn s(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn full_syntax() {
        let buf = tags(&[
            "grp!com.example.Echo.hello:1.0.0",
            "e=inst-1",
            "sticky=1",
            "h=k42",
        ]);
        let r = Route::from_tags(&buf).unwrap();
        assert_eq!(r.group.map(s), Some("grp"));
        assert_eq!(s(r.key), "com.example.Echo.hello");
        assert_eq!(s(r.service), "com.example.Echo");
        assert_eq!(r.method.map(s), Some("hello"));
        assert_eq!(r.version.map(s), Some("1.0.0"));
        assert_eq!(r.endpoint.map(s), Some("inst-1"));
        assert!(r.sticky && !r.broadcast);
        assert_eq!(r.tag("h").map(s), Some("k42"));
        assert_eq!(r.tag("x"), None);
        assert_eq!(r.to_string(), "grp!com.example.Echo.hello:1.0.0");
    }

    #[test]
    fn separators_in_group_and_version() {
        let r = Route::parse_key(b"region.dc1!com.example.Echo.m").unwrap();
        assert_eq!(
            (r.group.map(s), s(r.service), r.method.map(s)),
            (Some("region.dc1"), "com.example.Echo", Some("m"))
        );
        let r = Route::parse_key(b"svc:1.2!x").unwrap();
        assert_eq!(
            (r.group, s(r.key), r.method, r.version.map(s)),
            (None, "svc", None, Some("1.2!x"))
        );
        let r = Route::parse_key(b".svc.").unwrap();
        assert_eq!((s(r.service), r.method), (".svc.", None));
    }

    #[test]
    fn bare_service() {
        let buf = tags(&["echo"]);
        let r = Route::from_tags(&buf).unwrap();
        assert_eq!(
            (r.group, s(r.service), r.method, r.version),
            (None, "echo", None, None)
        );
    }

    #[test]
    fn explicit_method_tag_decides_the_split() {
        let buf = tags(&["com.example.Echo", "m=hello"]);
        let r = Route::from_tags(&buf).unwrap();
        assert_eq!(
            (s(r.service), r.method.map(s)),
            ("com.example.Echo", Some("hello"))
        );
        let buf = tags(&["com.example.Echo.hello", "m=hello", "broadcast=1"]);
        let r = Route::from_tags(&buf).unwrap();
        assert_eq!(
            (s(r.service), r.method.map(s)),
            ("com.example.Echo", Some("hello"))
        );
        assert!(r.broadcast);
    }

    #[test]
    fn invalid_routes() {
        assert!(Route::from_tags(&[]).is_err());
        assert!(Route::from_tags(&tags(&[""])).is_err());
        assert!(Route::from_tags(&tags(&["g!:1"])).is_err());
        assert!(Route::from_tags(&[9, b'a']).is_err());
        // Not UTF-8: parsed, displayed lossily, and will match no service.
        let r = Route::parse_key(&[0xFF, b'.', b'm']).unwrap();
        assert_eq!(r.to_string(), "\u{FFFD}.m");
    }
}
