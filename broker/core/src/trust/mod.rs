//! Who may connect, and what they may publish and call.
//!
//! A SETUP proves an identity with a bearer JWT ([`jwt`]), a user name and
//! secret (simple authentication, against the credentials file), or the
//! client certificate mutual TLS verified; or with nothing, which is
//! allowed only when the config allows anonymous connections. The identity
//! then gets a [`Grant`]: what its token claims (`publish`, `call`), what
//! the config says for its name, and what its roles allow; an identity none
//! of those names gets the config's grant for every authenticated identity.
//!
//! [`Trust`] is built from the config by the server and replaced whole on
//! reload; every shard holds the same one. Verified tokens are cached per
//! shard ([`TokenCache`]), keyed by the whole token.

pub mod failures;
pub mod grants;
pub mod jwt;
pub mod limits;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use failures::{FailedSetups, FailureLimits, RefusalLog};
pub use grants::{Grant, Patterns};
pub use jwt::{Jwt, JwtRules, Verified};
pub use limits::{AppLimits, AppUsage, AppUsages, Limit};

/// How an identity was proved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// No credentials (allowed by the config).
    Anonymous,
    /// A bearer JWT.
    Bearer,
    /// Simple authentication: user name and secret.
    Simple,
    /// The client certificate of mutual TLS.
    Certificate,
}

impl Method {
    /// As the logs and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Anonymous => "anonymous",
            Method::Bearer => "jwt",
            Method::Simple => "simple",
            Method::Certificate => "certificate",
        }
    }
}

/// Who a connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The name: the token's `sub`, the user name, or the certificate's
    /// common name; `anonymous` for no credentials.
    pub name: Arc<str>,
    /// How it was proved.
    pub method: Method,
    /// Roles its token named.
    pub roles: Vec<String>,
    /// What its token says it may do.
    pub claimed: Option<Grant>,
    /// When its credentials stop being valid (Unix seconds, the config's
    /// clock skew included).
    pub expires: Option<u64>,
}

impl Identity {
    fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            method: Method::Anonymous,
            roles: Vec::new(),
            claimed: None,
            expires: None,
        }
    }

    fn named(name: &str, method: Method) -> Self {
        Self {
            name: name.into(),
            method,
            roles: Vec::new(),
            claimed: None,
            expires: None,
        }
    }
}

/// What a SETUP and its transport offer as proof.
#[derive(Clone, Copy, Debug, Default)]
pub struct Credentials<'a> {
    /// A bearer token.
    pub bearer: Option<&'a [u8]>,
    /// Simple authentication: user name and secret.
    pub simple: Option<(&'a [u8], &'a [u8])>,
    /// The verified client certificate's common name.
    pub certificate: Option<&'a str>,
}

/// What the config says about one identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityRules {
    /// What it may do, besides its roles and its token's claims.
    pub grant: Option<Grant>,
    /// Its roles.
    pub roles: Vec<String>,
    /// Its limits, where they differ from [`Trust::limits`]'s defaults.
    pub limits: AppLimits,
}

/// A secret of simple authentication, stored as `sha256:SALT:DIGEST` (hex):
/// the SHA-256 of the salt followed by the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    salt: Vec<u8>,
    digest: [u8; 32],
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads `sha256:SALT:DIGEST`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.trim().split(':');
        let (Some("sha256"), Some(salt), Some(digest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("a secret is written sha256:SALT:DIGEST (hex)".into());
        };
        let salt = hex::decode(salt).map_err(|e| format!("the salt is not hex: {e}"))?;
        let digest = hex::decode(digest)
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or("the digest is not 64 hex digits")?;
        Ok(Self { salt, digest })
    }

    /// The stored form of `secret` with `salt`.
    pub fn hash(salt: &[u8], secret: &[u8]) -> String {
        format!(
            "sha256:{}:{}",
            hex::encode(salt),
            hex::encode(Self::digest(salt, secret))
        )
    }

    fn digest(salt: &[u8], secret: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(secret);
        h.finalize().into()
    }

    /// Whether `secret` is this one (compared in constant time).
    pub fn matches(&self, secret: &[u8]) -> bool {
        Self::digest(&self.salt, secret).ct_eq(&self.digest).into()
    }
}

/// The broker's authentication and authorisation rules.
#[derive(Clone, Debug)]
pub struct Trust {
    /// Connections without credentials are let in, with `anonymous`.
    pub allow_anonymous: bool,
    /// What a connection without credentials may do.
    pub anonymous: Grant,
    /// What an identity may do that neither its token, nor the config's
    /// identities, nor its roles speak of.
    pub authenticated: Grant,
    /// Bearer tokens, when any key is configured.
    pub jwt: Option<Jwt>,
    /// Simple authentication: user name -> secret.
    pub users: HashMap<String, Secret>,
    /// The verified client certificate's common name is an identity.
    pub certificate_identity: bool,
    /// Rules per identity name.
    pub identities: HashMap<String, IdentityRules>,
    /// Grants per role.
    pub roles: HashMap<String, Grant>,
    /// Longest bearer token read (longer ones are refused unread).
    pub max_token_size: usize,
    /// Clock skew allowed for `exp` and `nbf`, in seconds.
    pub leeway: u64,
    /// Verified tokens kept per shard.
    pub cache_size: usize,
    /// The limits of every identity the config's identities do not set
    /// otherwise.
    pub default_limits: AppLimits,
    /// Failed authentications a shard allows before it refuses SETUPs
    /// unchecked.
    pub failures: FailureLimits,
}

impl Default for Trust {
    /// Anyone may connect and do anything: a fresh install on loopback.
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            anonymous: Grant::all(),
            authenticated: Grant::all(),
            jwt: None,
            users: HashMap::new(),
            certificate_identity: false,
            identities: HashMap::new(),
            roles: HashMap::new(),
            max_token_size: 8 << 10,
            leeway: 30,
            cache_size: 1024,
            default_limits: AppLimits::default(),
            failures: FailureLimits::default(),
        }
    }
}

impl Trust {
    /// Who `credentials` prove; the error says what failed (never a
    /// secret). `now` is the time in Unix seconds.
    pub fn authenticate(
        &self,
        credentials: &Credentials<'_>,
        now: u64,
        cache: &mut TokenCache,
    ) -> Result<Arc<Identity>, String> {
        if let Some(token) = credentials.bearer {
            return match &self.jwt {
                Some(jwt) => self.bearer(jwt, token, now, cache),
                None if self.allow_anonymous => Ok(Arc::new(Identity::anonymous())),
                None => Err("bearer tokens are not accepted: no JWT keys are configured".into()),
            };
        }
        if let Some((user, secret)) = credentials.simple {
            if self.users.is_empty() && self.allow_anonymous {
                return Ok(Arc::new(Identity::anonymous()));
            }
            let user = std::str::from_utf8(user).map_err(|_| "the user name is not UTF-8")?;
            return match self.users.get(user) {
                Some(s) if s.matches(secret) => Ok(Arc::new(Identity::named(user, Method::Simple))),
                _ => Err(format!("unknown user {user:?} or wrong secret")),
            };
        }
        if let Some(name) = credentials.certificate
            && self.certificate_identity
        {
            return Ok(Arc::new(Identity::named(name, Method::Certificate)));
        }
        if self.allow_anonymous {
            return Ok(Arc::new(Identity::anonymous()));
        }
        Err("the broker requires authentication and the SETUP carries no credentials".into())
    }

    fn bearer(
        &self,
        jwt: &Jwt,
        token: &[u8],
        now: u64,
        cache: &mut TokenCache,
    ) -> Result<Arc<Identity>, String> {
        if token.len() > self.max_token_size {
            return Err(format!(
                "the bearer token is {} bytes, more than the limit of {}",
                token.len(),
                self.max_token_size
            ));
        }
        if let Some(hit) = cache.get(token, now) {
            return Ok(hit);
        }
        let v = jwt.verify(token)?;
        let identity = Arc::new(Identity {
            name: v.subject.into(),
            method: Method::Bearer,
            roles: v.roles,
            claimed: v.grant,
            expires: Some(v.expires.saturating_add(self.leeway)),
        });
        cache.put(token, identity.clone(), self.cache_size);
        Ok(identity)
    }

    /// What `identity` may use under these rules.
    pub fn limits(&self, identity: &Identity) -> AppLimits {
        match self.identities.get(&*identity.name) {
            Some(rules) => rules.limits.or(&self.default_limits),
            None => self.default_limits,
        }
    }

    /// What `identity` may do under these rules.
    pub fn grant(&self, identity: &Identity) -> Grant {
        if identity.method == Method::Anonymous {
            return self.anonymous.clone();
        }
        let rules = self.identities.get(&*identity.name);
        let mut grant = Grant::default();
        let mut named = false;
        for g in identity
            .claimed
            .iter()
            .chain(rules.and_then(|r| r.grant.as_ref()))
        {
            grant.extend(g);
            named = true;
        }
        let roles = identity
            .roles
            .iter()
            .chain(rules.map(|r| r.roles.as_slice()).unwrap_or_default());
        for role in roles {
            if let Some(g) = self.roles.get(role) {
                grant.extend(g);
                named = true;
            }
        }
        if named {
            grant
        } else {
            self.authenticated.clone()
        }
    }
}

/// Verified tokens of one shard, keyed by the whole token (a hash that
/// could collide would let one token stand for another), with std's
/// randomly keyed hasher (a peer cannot choose tokens that collide in the
/// table).
#[derive(Debug, Default)]
pub struct TokenCache {
    map: HashMap<Box<[u8]>, Arc<Identity>>,
}

impl TokenCache {
    /// The identity `token` proved, if it is cached and not expired.
    pub fn get(&mut self, token: &[u8], now: u64) -> Option<Arc<Identity>> {
        let hit = self.map.get(token)?;
        if hit.expires.is_some_and(|e| e <= now) {
            self.map.remove(token);
            return None;
        }
        Some(hit.clone())
    }

    /// Keeps `identity` for `token`, at most `max` entries in all: a full
    /// cache forgets an entry first.
    pub fn put(&mut self, token: &[u8], identity: Arc<Identity>, max: usize) {
        if max == 0 {
            return;
        }
        if self.map.len() >= max
            && let Some(old) = self.map.keys().next().cloned()
        {
            self.map.remove(&old);
        }
        self.map.insert(token.into(), identity);
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets every token (the keys changed).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests;
