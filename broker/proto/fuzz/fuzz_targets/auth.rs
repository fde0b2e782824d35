//! The authentication path of a SETUP: composite metadata read from the
//! input (app, services, authentication entries: bearer, simple, other
//! types, malformed), or a valid HS256 token with input bytes written over
//! part of it, checked against rules with an HS256 secret, an EC public
//! key, a credentials entry and certificate identities.
//!
//! Nothing panics; the only bearer token let in is the valid one, whole
//! (a token changed anywhere is refused); errors are bounded in length.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rsbroker_core::app::parse_setup;
use rsbroker_core::trust::{Credentials, Jwt, JwtRules, Secret, TokenCache, Trust};
use rsocket_proto::frame::{Setup, VERSION};

const SECRET: &[u8] = b"the fuzzer's HS256 secret, 32 bytes or more";
const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENXh5goTuwI9uP3WPE7rBXxQMc8x4
uf0NvtQoTJXYbNyXd6ASv1IrOGujSlLx2AtkTL0BvzG3u9yOPHqhdcODBw==
-----END PUBLIC KEY-----
";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

struct Fixture {
    trust: Trust,
    token: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut jwt = Jwt::new(JwtRules {
            issuers: vec!["fuzz".into()],
            audiences: vec!["rsbroker".into()],
            leeway: std::time::Duration::from_secs(5),
        });
        jwt.add_secret(SECRET).unwrap();
        jwt.add_pem(EC_PUBLIC.as_bytes()).unwrap();
        let mut users = HashMap::new();
        users.insert("u".to_owned(), Secret::parse(&Secret::hash(b"salt", b"pw")).unwrap());
        let trust = Trust {
            allow_anonymous: false,
            jwt: Some(jwt),
            users,
            certificate_identity: true,
            max_token_size: 4096,
            ..Trust::default()
        };
        let claims = serde_json::json!({
            "sub": "fuzzer", "iss": "fuzz", "aud": "rsbroker", "exp": now() + 3600,
            "roles": ["r"], "publish": ["a.*"], "call": "b.C"
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        Fixture { trust, token }
    })
}

fn setup(metadata: Bytes) -> Setup {
    Setup {
        version: VERSION,
        lease: false,
        keepalive_interval: 1000,
        max_lifetime: 10_000,
        resume_token: None,
        metadata_mime: "message/x.rsocket.composite-metadata.v0".into(),
        data_mime: "application/octet-stream".into(),
        metadata: Some(metadata),
        data: Bytes::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut cache = TokenCache::default();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        // SETUP metadata as sent.
        0 => {
            let info = match parse_setup(&setup(Bytes::copy_from_slice(rest))) {
                Ok(info) => info,
                Err(e) => {
                    assert!(e.len() < 4096);
                    return;
                }
            };
            if info.auth_problem.is_some() {
                return;
            }
            let creds = Credentials {
                bearer: info.bearer.as_deref(),
                simple: info.simple.as_ref().map(|(u, s)| (&u[..], &s[..])),
                certificate: None,
            };
            match f.trust.authenticate(&creds, now(), &mut cache) {
                Ok(who) => {
                    if let Some(token) = creds.bearer {
                        assert_eq!(token, f.token.as_bytes(), "a changed token was let in");
                    } else {
                        assert_eq!(&*who.name, "u");
                    }
                    let _ = f.trust.grant(&who);
                }
                Err(e) => assert!(e.len() < 8192, "{} bytes of error", e.len()),
            }
        }
        // The valid token with bytes written over part of it.
        1 => {
            let mut token = f.token.clone().into_bytes();
            let Some((&at, patch)) = rest.split_first() else {
                return;
            };
            let at = usize::from(at) * token.len() / 256;
            for (i, b) in patch.iter().enumerate() {
                match token.get_mut(at + i) {
                    Some(t) => *t = *b,
                    None => token.push(*b),
                }
            }
            let creds = Credentials { bearer: Some(&token), ..Credentials::default() };
            // Twice: the second may come from the cache.
            for _ in 0..2 {
                match f.trust.authenticate(&creds, now(), &mut cache) {
                    Ok(who) => {
                        assert_eq!(token, f.token.as_bytes(), "a changed token was let in");
                        let grant = f.trust.grant(&who);
                        assert!(grant.may_call(&rsbroker_core::ServiceKey::new("", "b.C", "")));
                    }
                    Err(e) => assert!(e.len() < 8192),
                }
            }
        }
        // A certificate name and a user name straight from the input.
        _ => {
            let half = rest.len() / 2;
            let (a, b) = rest.split_at(half);
            let name = String::from_utf8_lossy(a);
            let creds = Credentials { certificate: Some(&name), ..Credentials::default() };
            let who = f.trust.authenticate(&creds, now(), &mut cache);
            assert!(who.is_ok());
            let creds = Credentials { simple: Some((a, b)), ..Credentials::default() };
            if f.trust.authenticate(&creds, now(), &mut cache).is_ok() {
                assert_eq!((a, b), (&b"u"[..], &b"pw"[..]));
            }
        }
    }
});
