//! What an identity may do: the services it may publish and the services
//! it may call, as patterns.
//!
//! A pattern is `*` (every service), a prefix ending in `*`
//! (`com.example.*`), or a service name. A pattern with `!` or `:` in it is
//! matched against the whole key (`group!service:version`), any other
//! against the service name alone, so `com.example.Echo` allows every group
//! and version of that service.

use std::collections::HashSet;
use std::fmt;

use crate::service::ServiceKey;

/// A set of service patterns.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    all: bool,
    exact: HashSet<Box<str>>,
    prefixes: Vec<Box<str>>,
    /// As written, for messages and comparisons.
    written: Vec<String>,
}

impl Patterns {
    /// Every service.
    pub fn all() -> Self {
        Self::new(["*"])
    }

    /// No service.
    pub fn none() -> Self {
        Self::default()
    }

    /// The patterns as written. Empty ones are ignored.
    pub fn new<S: AsRef<str>>(patterns: impl IntoIterator<Item = S>) -> Self {
        let mut p = Self::default();
        for pattern in patterns {
            p.add(pattern.as_ref());
        }
        p
    }

    fn add(&mut self, pattern: &str) {
        let pattern = pattern.trim();
        if pattern.is_empty() || self.written.iter().any(|w| w == pattern) {
            return;
        }
        self.written.push(pattern.to_owned());
        match pattern.strip_suffix('*') {
            Some("") => self.all = true,
            Some(prefix) => self.prefixes.push(prefix.into()),
            None => {
                self.exact.insert(pattern.into());
            }
        }
    }

    /// Adds every pattern of `other`.
    pub fn extend(&mut self, other: &Patterns) {
        for w in &other.written {
            self.add(w);
        }
    }

    /// Whether no service matches.
    pub fn is_empty(&self) -> bool {
        self.written.is_empty()
    }

    /// Whether every service matches.
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// Whether `service` matches one of the patterns.
    #[inline]
    pub fn matches(&self, service: &ServiceKey) -> bool {
        if self.all {
            return true;
        }
        let key = service.as_str();
        let name = service.name();
        let subject = |pattern: &str| {
            if pattern.contains(['!', ':']) {
                key
            } else {
                name
            }
        };
        self.exact.iter().any(|e| subject(e) == &**e)
            || self.prefixes.iter().any(|p| subject(p).starts_with(&**p))
    }

    /// The patterns as written.
    pub fn written(&self) -> &[String] {
        &self.written
    }
}

impl fmt::Debug for Patterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.written).finish()
    }
}

/// What an identity may publish and call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Services it may register (SETUP, or exposed later by METADATA_PUSH).
    pub publish: Patterns,
    /// Services it may send requests to.
    pub call: Patterns,
}

impl Grant {
    /// Everything.
    pub fn all() -> Self {
        Self {
            publish: Patterns::all(),
            call: Patterns::all(),
        }
    }

    /// Publish and call what `publish` and `call` name.
    pub fn new<S: AsRef<str>>(
        publish: impl IntoIterator<Item = S>,
        call: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            publish: Patterns::new(publish),
            call: Patterns::new(call),
        }
    }

    /// Adds what `other` allows.
    pub fn extend(&mut self, other: &Grant) {
        self.publish.extend(&other.publish);
        self.call.extend(&other.call);
    }

    /// Whether it may publish `service`.
    #[inline]
    pub fn may_publish(&self, service: &ServiceKey) -> bool {
        self.publish.matches(service)
    }

    /// Whether it may call `service`.
    #[inline]
    pub fn may_call(&self, service: &ServiceKey) -> bool {
        self.call.matches(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(group: &str, name: &str, version: &str) -> ServiceKey {
        ServiceKey::new(group, name, version)
    }

    #[test]
    fn star_matches_everything_and_nothing_matches_nothing() {
        assert!(Patterns::all().matches(&key("g", "a.B", "1")));
        assert!(Patterns::all().is_all());
        assert!(!Patterns::none().matches(&key("", "a.B", "")));
        assert!(Patterns::none().is_empty());
        assert!(!Patterns::all().is_empty());
        assert_eq!(
            format!("{:?}", Patterns::new(["a.*", "b"])),
            r#"["a.*", "b"]"#
        );
        assert!(!Patterns::new(["a.B"]).is_all());
    }

    #[test]
    fn names_match_every_group_and_version_and_keys_only_their_own() {
        let p = Patterns::new(["com.example.Echo"]);
        assert!(p.matches(&key("", "com.example.Echo", "")));
        assert!(p.matches(&key("g", "com.example.Echo", "2")));
        assert!(!p.matches(&key("", "com.example.Echo2", "")));
        assert!(!p.matches(&key("", "com.example", "")));
        let p = Patterns::new(["g!com.example.Echo:2"]);
        assert!(p.matches(&key("g", "com.example.Echo", "2")));
        assert!(!p.matches(&key("h", "com.example.Echo", "2")));
        assert!(!p.matches(&key("", "com.example.Echo", "")));
    }

    #[test]
    fn prefixes_match_what_starts_with_them() {
        let p = Patterns::new(["com.example.*", "g!org.*"]);
        assert!(p.matches(&key("", "com.example.Echo", "")));
        assert!(p.matches(&key("x", "com.example.Echo", "1")));
        assert!(!p.matches(&key("", "com.other.Echo", "")));
        assert!(p.matches(&key("g", "org.Thing", "")));
        assert!(!p.matches(&key("h", "org.Thing", "")));
        assert!(!p.matches(&key("", "org.Thing", "")));
    }

    #[test]
    fn grants_add_up_and_keep_publish_and_call_apart() {
        let mut g = Grant::new(["a.*"], ["b.C"]);
        assert!(g.may_publish(&key("", "a.X", "")));
        assert!(!g.may_call(&key("", "a.X", "")));
        assert!(g.may_call(&key("", "b.C", "")));
        assert!(!g.may_publish(&key("", "b.C", "")));
        g.extend(&Grant::new(["", " d.E "], ["a.*"]));
        assert!(g.may_publish(&key("", "d.E", "")));
        assert!(g.may_call(&key("", "a.X", "")));
        assert_eq!(g.publish.written(), ["a.*", "d.E"]);
        assert_eq!(g.call.written(), ["b.C", "a.*"]);
        let mut all = Grant::default();
        all.extend(&Grant::all());
        assert_eq!(all, Grant::all());
    }
}
