//! `[auth]`: who may connect, and what identities may publish and call,
//! as the config file says it; [`AuthConfig::build`] reads the key and
//! credentials files into the [`Trust`] every shard holds. SIGHUP builds
//! it again; a bad file keeps the rules in force.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rsbroker_core::trust::{
    AppLimits, FailureLimits, Grant, IdentityRules, Jwt, JwtRules, Secret, Trust,
};
use serde::{Deserialize, Serialize};

use crate::config::Size;

/// `[auth]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Let in connections whose SETUP carries no credentials (with the
    /// `anonymous` grant). On by default, so a fresh install on loopback
    /// is easy to try; `--check-config` warns when a listener on another
    /// address allows it.
    pub allow_anonymous: bool,
    /// The verified client certificate's common name (mutual TLS, see
    /// `tls.client_ca`) is the identity of a SETUP without other credentials.
    pub certificate_identity: bool,
    /// Longest bearer token read; longer ones are refused unread.
    pub max_token_size: Size,
    /// Verified tokens remembered per shard (0: none).
    pub token_cache: usize,
    /// Simple authentication: a TOML file of `[users.NAME] secret =
    /// "sha256:SALT:DIGEST"` (`rsbroker --hash-secret` writes one).
    pub credentials: Option<PathBuf>,
    /// What a connection without credentials may do.
    pub anonymous: GrantConfig,
    /// What an identity may do that no token claim, identity or role
    /// below speaks of.
    pub authenticated: GrantConfig,
    /// Bearer JWTs.
    pub jwt: JwtConfig,
    /// Grants per role (a token's `roles` and `authorities`, or an
    /// identity's `roles`).
    pub roles: BTreeMap<String, GrantConfig>,
    /// Rules per identity: a token's `sub`, a user name, a certificate's
    /// common name.
    pub identities: BTreeMap<String, IdentityConfig>,
    /// The limits of every identity (`[auth.identities.NAME.limits]` sets
    /// its own). Every anonymous connection is the one identity
    /// `anonymous`, so these bound them together.
    pub limits: LimitsConfig,
    /// Failed authentications allowed before SETUPs are refused without
    /// their credentials being checked.
    pub failures: FailuresConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            certificate_identity: false,
            max_token_size: Size(8 << 10),
            token_cache: 1024,
            credentials: None,
            anonymous: GrantConfig::everything(),
            authenticated: GrantConfig::everything(),
            jwt: JwtConfig::default(),
            roles: BTreeMap::new(),
            identities: BTreeMap::new(),
            limits: LimitsConfig::default(),
            failures: FailuresConfig::default(),
        }
    }
}

/// `[auth.failures]`: a shard counts the SETUPs whose credentials failed,
/// per peer address (an IPv6 one with its /64) and in all. Past these, a
/// SETUP with credentials to check (a secret, a token the shard has not
/// verified) is refused with REJECTED_SETUP without checking them, so
/// that forged tokens (a signature check costs up to 170 µs) cannot keep
/// a shard busy, nor secrets be guessed quickly. Tokens already verified
/// and SETUPs without credentials are let through as before.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailuresConfig {
    /// Failures one address may have in a row.
    pub per_address_burst: u32,
    /// Failures one address may have a minute after those.
    pub per_address_per_minute: u32,
    /// Failures a second on one shard, every address together.
    pub per_shard_per_second: u32,
}

impl Default for FailuresConfig {
    fn default() -> Self {
        let d = FailureLimits::default();
        Self {
            per_address_burst: d.per_address_burst,
            per_address_per_minute: d.per_address_per_minute,
            per_shard_per_second: d.per_shard_per_second,
        }
    }
}

impl FailuresConfig {
    fn limits(&self) -> FailureLimits {
        FailureLimits {
            per_address_burst: self.per_address_burst,
            per_address_per_minute: self.per_address_per_minute,
            per_shard_per_second: self.per_shard_per_second,
        }
    }

    fn problems(&self, out: &mut Vec<(String, String)>) {
        let fields = [
            ("per_address_burst", self.per_address_burst),
            ("per_address_per_minute", self.per_address_per_minute),
            ("per_shard_per_second", self.per_shard_per_second),
        ];
        for (name, value) in fields {
            if value == 0 {
                out.push((
                    format!("auth.failures.{name}"),
                    "is 0: every SETUP with credentials would be refused".to_owned(),
                ));
            }
        }
        if self.per_shard_per_second > 1_000_000_000 {
            out.push((
                "auth.failures.per_shard_per_second".to_owned(),
                format!("{} is more than 10^9", self.per_shard_per_second),
            ));
        }
    }
}

/// Services to publish and to call, as patterns: `*`, a prefix ending in
/// `*` (`com.example.*`), or a service name; with `!` or `:` in it, a
/// whole key (`group!service:version`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantConfig {
    /// Services it may register.
    pub publish: Vec<String>,
    /// Services it may call.
    pub call: Vec<String>,
}

impl GrantConfig {
    fn everything() -> Self {
        Self {
            publish: vec!["*".into()],
            call: vec!["*".into()],
        }
    }

    fn grant(&self) -> Grant {
        Grant::new(&self.publish, &self.call)
    }
}

/// `[auth.identities.NAME]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Services it may register.
    pub publish: Vec<String>,
    /// Services it may call.
    pub call: Vec<String>,
    /// Its roles, besides its token's.
    pub roles: Vec<String>,
    /// Its limits, where they differ from `[auth.limits]`.
    pub limits: LimitsConfig,
}

/// `[auth.limits]` and `[auth.identities.NAME.limits]`: what one identity
/// may use across the broker. A key left out is no limit (or, for an
/// identity, `[auth.limits]`'s). What is over a limit is refused (the SETUP
/// with REJECTED_SETUP, a request with ERROR REJECTED); nothing open is
/// closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections open at once.
    pub max_connections: Option<u32>,
    /// Requester streams (request-response, stream, channel) open at once.
    pub max_streams: Option<u32>,
    /// Requests a second, every interaction model counted (a token bucket).
    pub requests_per_second: Option<u32>,
    /// Requests let through at once above the rate; the rate when not set.
    pub burst: Option<u32>,
}

impl LimitsConfig {
    fn limits(&self) -> AppLimits {
        AppLimits {
            max_connections: self.max_connections,
            max_streams: self.max_streams,
            requests_per_second: self.requests_per_second,
            burst: self.burst,
        }
    }

    fn problems(&self, key: &str, out: &mut Vec<(String, String)>) {
        let fields = [
            ("max_connections", self.max_connections),
            ("max_streams", self.max_streams),
            ("requests_per_second", self.requests_per_second),
            ("burst", self.burst),
        ];
        for (name, value) in fields {
            if value == Some(0) {
                out.push((
                    format!("{key}.{name}"),
                    "is 0: leave the key out for no limit, or use auth grants to refuse".to_owned(),
                ));
            }
        }
        if self.burst.is_some() && self.requests_per_second.is_none() {
            out.push((
                format!("{key}.burst"),
                "is set without requests_per_second, so it limits nothing".to_owned(),
            ));
        }
        if self.requests_per_second.is_some_and(|r| r > 1_000_000_000) {
            out.push((
                format!("{key}.requests_per_second"),
                "is above 1000000000, the finest rate the bucket counts".to_owned(),
            ));
        }
    }
}

/// `[auth.jwt]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Public keys in PEM (RSA for RS*/PS*, EC P-256/P-384 for ES256/ES384,
    /// Ed25519 for EdDSA).
    pub keys: Vec<PathBuf>,
    /// JWKS documents (keys chosen by `kid`).
    pub jwks: Vec<PathBuf>,
    /// Files each holding a shared secret for HS256/384/512 (at least 32
    /// bytes; a trailing newline is not part of it).
    pub secrets: Vec<PathBuf>,
    /// Accepted issuers (`iss`); empty: `iss` is not checked.
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud`); empty: `aud` is not checked.
    pub audiences: Vec<String>,
    /// Clock skew allowed for `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            jwks: Vec::new(),
            secrets: Vec::new(),
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway: Duration::from_secs(30),
        }
    }
}

impl JwtConfig {
    fn configured(&self) -> bool {
        !(self.keys.is_empty() && self.jwks.is_empty() && self.secrets.is_empty())
    }
}

/// The credentials file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    users: BTreeMap<String, UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    secret: String,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

impl AuthConfig {
    /// Whether any way to prove an identity is configured.
    pub fn authenticates(&self) -> bool {
        self.jwt.configured() || self.credentials.is_some() || self.certificate_identity
    }

    /// Reads the files and builds the rules. Every error names its file.
    pub fn build(&self) -> Result<Trust, String> {
        let jwt = if self.jwt.configured() {
            let mut jwt = Jwt::new(JwtRules {
                issuers: self.jwt.issuers.clone(),
                audiences: self.jwt.audiences.clone(),
                leeway: self.jwt.leeway,
            });
            for path in &self.jwt.keys {
                jwt.add_pem(&read(path)?)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            for path in &self.jwt.jwks {
                jwt.add_jwks(&read(path)?)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            for path in &self.jwt.secrets {
                let mut secret = read(path)?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                jwt.add_secret(&secret)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if jwt.keys() == 0 {
                return Err("auth.jwt: the configured files hold no signing key".into());
            }
            Some(jwt)
        } else {
            None
        };
        let mut users = HashMap::new();
        if let Some(path) = &self.credentials {
            let text = String::from_utf8(read(path)?)
                .map_err(|_| format!("{}: not UTF-8", path.display()))?;
            let file: CredentialsFile =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            for (name, user) in file.users {
                let secret = Secret::parse(&user.secret)
                    .map_err(|e| format!("{}: users.{name}.secret: {e}", path.display()))?;
                users.insert(name, secret);
            }
        }
        Ok(Trust {
            allow_anonymous: self.allow_anonymous,
            anonymous: self.anonymous.grant(),
            authenticated: self.authenticated.grant(),
            jwt,
            users,
            certificate_identity: self.certificate_identity,
            identities: self
                .identities
                .iter()
                .map(|(name, i)| {
                    let grant = (!i.publish.is_empty() || !i.call.is_empty())
                        .then(|| Grant::new(&i.publish, &i.call));
                    let rules = IdentityRules {
                        grant,
                        roles: i.roles.clone(),
                        limits: i.limits.limits(),
                    };
                    (name.clone(), rules)
                })
                .collect(),
            roles: self
                .roles
                .iter()
                .map(|(name, g)| (name.clone(), g.grant()))
                .collect(),
            max_token_size: self.max_token_size.0,
            leeway: self.jwt.leeway.as_secs(),
            cache_size: self.token_cache,
            default_limits: self.limits.limits(),
            failures: self.failures.limits(),
        })
    }

    /// What is wrong with these settings, by key.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.allow_anonymous && !self.authenticates() {
            out.push((
                "auth.allow_anonymous".to_owned(),
                "is false, but no way to authenticate is configured (auth.jwt, \
                 auth.credentials or auth.certificate_identity): every SETUP would be refused"
                    .to_owned(),
            ));
        }
        if self.max_token_size.0 < 64 {
            out.push((
                "auth.max_token_size".to_owned(),
                format!("{} is below the 64 B minimum", self.max_token_size),
            ));
        }
        self.limits.problems("auth.limits", &mut out);
        self.failures.problems(&mut out);
        for (name, identity) in &self.identities {
            let key = format!("auth.identities.{name}.limits");
            identity.limits.problems(&key, &mut out);
        }
        if let Err(e) = self.build() {
            out.push(("auth".to_owned(), e));
        }
        out
    }
}

/// A salted secret for the credentials file, from a secret: 16 random
/// bytes of salt from the system.
pub fn hash_secret(secret: &[u8]) -> std::io::Result<String> {
    use std::io::Read;
    let mut salt = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut salt)?;
    Ok(Secret::hash(&salt, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_let_anyone_in_and_build() {
        let c = AuthConfig::default();
        assert!(c.problems().is_empty());
        let t = c.build().unwrap();
        assert!(t.allow_anonymous && t.jwt.is_none());
        assert_eq!(t.anonymous, Grant::all());
    }

    #[test]
    fn files_are_read_and_their_errors_name_them() {
        let dir = std::env::temp_dir().join(format!("rsbroker-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("hs.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        let creds = dir.join("credentials.toml");
        let stored = hash_secret(b"pw").unwrap();
        std::fs::write(&creds, format!("[users.billing]\nsecret = \"{stored}\"\n")).unwrap();
        let mut c = AuthConfig {
            allow_anonymous: false,
            credentials: Some(creds.clone()),
            ..AuthConfig::default()
        };
        c.jwt.secrets.push(secret.clone());
        let t = c.build().unwrap();
        assert_eq!(t.jwt.as_ref().map(Jwt::keys), Some(1));
        assert!(t.users["billing"].matches(b"pw"));
        assert!(c.problems().is_empty());

        std::fs::write(&secret, "short\n").unwrap();
        let e = c.build().unwrap_err();
        assert!(e.contains("hs.secret") && e.contains("32"), "{e}");
        c.jwt.secrets.clear();
        c.jwt.keys.push(dir.join("missing.pem"));
        assert!(c.build().unwrap_err().contains("missing.pem"));
        c.jwt.keys.clear();
        std::fs::write(&creds, "[users.billing]\nsecret = \"plain\"\n").unwrap();
        let e = c.build().unwrap_err();
        assert!(e.contains("users.billing.secret"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn closed_without_a_way_in_is_a_problem() {
        let c = AuthConfig {
            allow_anonymous: false,
            ..AuthConfig::default()
        };
        let problems = c.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].1.contains("every SETUP would be refused"));
    }

    #[test]
    fn limits_reach_the_rules_and_their_mistakes_are_named() {
        let text = r#"
            [limits]
            max_connections = 8
            requests_per_second = 100
            [identities.batch.limits]
            requests_per_second = 5000
            burst = 10000
            max_streams = 64
        "#;
        let c: AuthConfig = toml::from_str(text).unwrap();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let t = c.build().unwrap();
        assert_eq!(
            t.default_limits,
            AppLimits {
                max_connections: Some(8),
                requests_per_second: Some(100),
                ..AppLimits::default()
            }
        );
        let batch = t.identities["batch"].limits.or(&t.default_limits);
        assert_eq!(
            batch,
            AppLimits {
                max_connections: Some(8),
                max_streams: Some(64),
                requests_per_second: Some(5000),
                burst: Some(10000),
            }
        );

        let bad = r#"
            [limits]
            max_streams = 0
            burst = 3
            [identities.x.limits]
            requests_per_second = 2000000000
        "#;
        let c: AuthConfig = toml::from_str(bad).unwrap();
        let keys: Vec<String> = c.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "auth.limits.max_streams",
                "auth.limits.burst",
                "auth.identities.x.limits.requests_per_second"
            ]
        );
        assert!(
            toml::from_str::<AuthConfig>(
                "[limits]
rate = 3
"
            )
            .is_err()
        );
    }

    #[test]
    fn failure_budgets_reach_the_rules_and_their_mistakes_are_named() {
        let c = AuthConfig::default();
        assert_eq!(c.build().unwrap().failures, FailureLimits::default());
        let text = r#"
            [failures]
            per_address_burst = 3
            per_shard_per_second = 1000
        "#;
        let c: AuthConfig = toml::from_str(text).unwrap();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!(
            c.build().unwrap().failures,
            FailureLimits {
                per_address_burst: 3,
                per_address_per_minute: FailureLimits::default().per_address_per_minute,
                per_shard_per_second: 1000,
            }
        );
        let bad = r#"
            [failures]
            per_address_per_minute = 0
            per_shard_per_second = 2000000000
        "#;
        let c: AuthConfig = toml::from_str(bad).unwrap();
        let keys: Vec<String> = c.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "auth.failures.per_address_per_minute",
                "auth.failures.per_shard_per_second"
            ]
        );
        assert!(toml::from_str::<AuthConfig>("[failures]\nburst = 3\n").is_err());
    }
}
