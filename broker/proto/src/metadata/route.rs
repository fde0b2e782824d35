//! The broker's route syntax: routing tag 0 is
//! `[group!]service[.method][:version]`; further tags `e=<instance id>`
//! (target one instance), `sticky=1`, `m=<method>`, `broadcast=1`, and any
//! other `name=value` tag, readable with [`Route::tag`].

use super::RoutingTags;
use crate::error::DecodeError;

/// A parsed route, borrowed from the request's metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route<'a> {
    /// Group (before `!`), if any.
    pub group: Option<&'a str>,
    /// `service[.method]` as written, without group and version.
    pub key: &'a str,
    /// The service: `key` without its method.
    pub service: &'a str,
    /// The method: from an `m=` tag, or else what follows the last `.` of `key`.
    pub method: Option<&'a str>,
    /// Version (after `:`), if any.
    pub version: Option<&'a str>,
    /// `e=<instance id>`: the one instance to route to.
    pub endpoint: Option<&'a str>,
    /// `sticky=1`: keep this requester on the instance it got first.
    pub sticky: bool,
    /// `broadcast=1`: deliver a fire-and-forget to every instance.
    pub broadcast: bool,
    extra_tags: &'a [u8],
}

fn text(bytes: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidText { field: "routing tag" })
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn flag(value: &str) -> bool {
    matches!(value, "1" | "true")
}

impl<'a> Route<'a> {
    /// Parses the content of a routing metadata entry: tag 0 is the route,
    /// later tags refine it.
    pub fn from_tags(routing: &'a [u8]) -> Result<Self, DecodeError> {
        let mut tags = RoutingTags::new(routing);
        let first = tags.next().ok_or(DecodeError::InvalidLength { field: "route", len: 0 })??;
        let mut route = Self::parse_key(first)?;
        route.extra_tags = tags.clone().rest_bytes();
        let mut explicit_method = None;
        for tag in tags {
            let tag = text(tag?)?;
            let Some((name, value)) = tag.split_once('=') else { continue };
            match name {
                "e" => route.endpoint = non_empty(value),
                "m" => explicit_method = non_empty(value),
                "sticky" => route.sticky |= flag(value),
                "broadcast" => route.broadcast |= flag(value),
                _ => {}
            }
        }
        if let Some(m) = explicit_method {
            route.method = Some(m);
            route.service = route.key.strip_suffix(m).and_then(|k| k.strip_suffix('.')).unwrap_or(route.key);
        }
        Ok(route)
    }

    /// Parses `[group!]service[.method][:version]`.
    pub fn parse_key(key: &'a [u8]) -> Result<Self, DecodeError> {
        let s = text(key)?;
        let (group, rest) = match s.split_once('!') {
            Some((g, rest)) => (non_empty(g), rest),
            None => (None, s),
        };
        let (key, version) = match rest.split_once(':') {
            Some((k, v)) => (k, non_empty(v)),
            None => (rest, None),
        };
        if key.is_empty() {
            return Err(DecodeError::InvalidLength { field: "route service", len: 0 });
        }
        let (service, method) = match key.rsplit_once('.') {
            Some((svc, m)) if !svc.is_empty() && !m.is_empty() => (svc, Some(m)),
            _ => (key, None),
        };
        Ok(Self {
            group,
            key,
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
    pub fn tag(&self, name: &str) -> Option<&'a str> {
        RoutingTags::new(self.extra_tags).filter_map(Result::ok).find_map(|t| {
            let t = std::str::from_utf8(t).ok()?;
            let (n, v) = t.split_once('=')?;
            (n == name).then_some(v)
        })
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

    #[test]
    fn full_syntax() {
        let buf = tags(&["grp!com.example.Echo.hello:1.0.0", "e=inst-1", "sticky=1", "h=k42"]);
        let r = Route::from_tags(&buf).unwrap();
        assert_eq!(r.group, Some("grp"));
        assert_eq!(r.key, "com.example.Echo.hello");
        assert_eq!(r.service, "com.example.Echo");
        assert_eq!(r.method, Some("hello"));
        assert_eq!(r.version, Some("1.0.0"));
        assert_eq!(r.endpoint, Some("inst-1"));
        assert!(r.sticky && !r.broadcast);
        assert_eq!(r.tag("h"), Some("k42"));
        assert_eq!(r.tag("x"), None);
    }

    #[test]
    fn bare_service() {
        let buf = tags(&["echo"]);
        let r = Route::from_tags(&buf).unwrap();
        assert_eq!((r.group, r.service, r.method, r.version), (None, "echo", None, None));
    }

    #[test]
    fn explicit_method_tag_decides_the_split() {
        let buf = tags(&["com.example.Echo", "m=hello"]);
        let r = Route::from_tags(&buf).unwrap();
        assert_eq!((r.service, r.method), ("com.example.Echo", Some("hello")));
        let buf = tags(&["com.example.Echo.hello", "m=hello", "broadcast=1"]);
        let r = Route::from_tags(&buf).unwrap();
        assert_eq!((r.service, r.method), ("com.example.Echo", Some("hello")));
        assert!(r.broadcast);
    }

    #[test]
    fn invalid_routes() {
        assert!(Route::from_tags(&[]).is_err());
        assert!(Route::from_tags(&tags(&[""])).is_err());
        assert!(Route::from_tags(&tags(&["g!:1"])).is_err());
        assert!(Route::parse_key(&[0xFF, 0xFE]).is_err());
        assert!(Route::from_tags(&[9, b'a']).is_err());
    }
}
