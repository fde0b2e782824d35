//! Bearer JWTs: signature, `exp`, `nbf`, issuer and audience, checked by
//! the `jsonwebtoken` crate against the keys in the config.
//!
//! Every key accepts only the algorithms of its own kind: an RSA public key
//! RS256/384/512 and PS256/384/512, an EC key ES256/ES384, an Ed25519 key
//! EdDSA, a shared secret HS256/384/512. So a token signed with HS256 over
//! the bytes of a public key is refused (algorithm confusion), and
//! `alg: none` is no algorithm at all.
//!
//! Claims the broker reads: `sub` (the identity, required), `exp`
//! (required), `nbf`, `iss` and `aud` (when the config names them), and
//! what the identity may do: `publish` and `call` (lists of service
//! patterns), and `roles` and `authorities` (alibaba-rsocket-broker's
//! claims), looked up in the config's roles.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

use super::grants::Grant;

/// What a token must say besides its signature.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtRules {
    /// Accepted issuers (`iss`); empty: any, and `iss` is not required.
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud`); empty: any, and `aud` is not required.
    pub audiences: Vec<String>,
    /// Clock skew allowed for `exp` and `nbf`.
    pub leeway: Duration,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// The keys tokens are checked with.
#[derive(Clone)]
pub struct Jwt {
    rules: JwtRules,
    keys: Vec<Key>,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("rules", &self.rules)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// A token that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// `sub`.
    pub subject: String,
    /// `exp`, in seconds since the Unix epoch.
    pub expires: u64,
    /// `roles` and `authorities`.
    pub roles: Vec<String>,
    /// `publish` and `call`, when the token has either.
    pub grant: Option<Grant>,
}

/// A list of strings, or one string.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Strings {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Strings {
    fn into_vec(self) -> Vec<String> {
        match self {
            Strings::None => Vec::new(),
            Strings::One(s) => vec![s],
            Strings::Many(v) => v,
        }
    }

    fn is_none(&self) -> bool {
        matches!(self, Strings::None)
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    roles: Strings,
    #[serde(default)]
    authorities: Strings,
    #[serde(default)]
    publish: Strings,
    #[serde(default)]
    call: Strings,
}

fn algorithms(family: AlgorithmFamily) -> Vec<Algorithm> {
    match family {
        // ES384 keys are P-384 keys, which the EC key parser also reads.
        AlgorithmFamily::Ec => vec![Algorithm::ES256, Algorithm::ES384],
        f => f.algorithms().to_vec(),
    }
}

impl Jwt {
    /// No keys yet.
    pub fn new(rules: JwtRules) -> Self {
        Self {
            rules,
            keys: Vec::new(),
        }
    }

    /// Keys configured.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    fn push(&mut self, kid: Option<String>, key: DecodingKey, algs: Vec<Algorithm>) {
        let mut v = Validation::new(Algorithm::HS256);
        v.algorithms = algs;
        v.leeway = self.rules.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        if self.rules.issuers.is_empty() {
            v.iss = None;
        } else {
            v.set_issuer(&self.rules.issuers);
            required.push("iss");
        }
        if self.rules.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.rules.audiences);
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        self.keys.push(Key {
            kid,
            key,
            validation: v,
        });
    }

    /// Adds a public key in PEM (RSA, EC P-256/P-384 or Ed25519).
    pub fn add_pem(&mut self, pem: &[u8]) -> Result<(), String> {
        let key = DecodingKey::from_rsa_pem(pem)
            .or_else(|_| DecodingKey::from_ec_pem(pem))
            .or_else(|_| DecodingKey::from_ed_pem(pem))
            .map_err(|_| "not an RSA, EC or Ed25519 public key in PEM".to_owned())?;
        let algs = algorithms(key.family());
        self.push(None, key, algs);
        Ok(())
    }

    /// Adds the keys of a JWKS document; returns how many.
    pub fn add_jwks(&mut self, json: &[u8]) -> Result<usize, String> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut added = 0;
        for (i, jwk) in set.keys.iter().enumerate() {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
            let algs = match jwk.common.key_algorithm.map(Algorithm::try_from) {
                Some(Ok(a)) if a.family() == key.family() => vec![a],
                Some(Ok(a)) => {
                    return Err(format!(
                        "key {i}: algorithm {a:?} does not fit its key type"
                    ));
                }
                // An encryption key: not for signatures.
                Some(Err(_)) => continue,
                None => algorithms(key.family()),
            };
            self.push(jwk.common.key_id.clone(), key, algs);
            added += 1;
        }
        Ok(added)
    }

    /// Adds a shared secret for HS256/384/512 (at least 32 bytes).
    pub fn add_secret(&mut self, secret: &[u8]) -> Result<(), String> {
        if secret.len() < 32 {
            return Err(format!(
                "the secret is {} bytes; HS256 needs at least 32",
                secret.len()
            ));
        }
        let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        self.push(None, key, algorithms(AlgorithmFamily::Hmac));
        Ok(())
    }

    /// Checks `token`. The error says what failed, never a key.
    pub fn verify(&self, token: &[u8]) -> Result<Verified, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) => format!(
                "the token's header is malformed or names an algorithm the broker does not \
                 accept ({e}); alg none is never accepted"
            ),
            _ => format!("the token is malformed: {e}"),
        })?;
        let by_kid = header
            .kid
            .as_deref()
            .filter(|kid| self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| by_kid.is_none() || k.kid.as_deref() == by_kid)
            .filter(|k| k.validation.algorithms.contains(&header.alg))
            .peekable();
        if candidates.peek().is_none() {
            return Err(format!(
                "the token is signed with {:?}, which no configured key accepts",
                header.alg
            ));
        }
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation) {
                Ok(data) => return self.verified(data.claims),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidAlgorithm
                            | ErrorKind::InvalidKeyFormat
                    ) => {}
                Err(e) => return Err(self.describe(e.kind())),
            }
        }
        Err("the token's signature does not verify with any configured key".into())
    }

    fn verified(&self, claims: Claims) -> Result<Verified, String> {
        let subject = claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or("the token has no sub claim (the identity)")?;
        let grant = (!claims.publish.is_none() || !claims.call.is_none())
            .then(|| Grant::new(claims.publish.into_vec(), claims.call.into_vec()));
        let mut roles = claims.roles.into_vec();
        roles.extend(claims.authorities.into_vec());
        Ok(Verified {
            subject,
            expires: claims.exp,
            roles,
            grant,
        })
    }

    fn describe(&self, kind: &ErrorKind) -> String {
        match kind {
            ErrorKind::ExpiredSignature => "the token has expired (exp)".into(),
            ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
            ErrorKind::InvalidIssuer => format!(
                "the token's issuer (iss) is not one of {:?}",
                self.rules.issuers
            ),
            ErrorKind::InvalidAudience => format!(
                "the token's audience (aud) is not one of {:?}",
                self.rules.audiences
            ),
            ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
            ErrorKind::InvalidClaimFormat(c) => format!("the token's {c} claim is malformed"),
            ErrorKind::Json(e) => format!("the token's claims are malformed: {e}"),
            other => format!("the token is malformed: {other:?}"),
        }
    }
}
