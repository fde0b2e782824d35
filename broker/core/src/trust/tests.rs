use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;
use crate::service::ServiceKey;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn rules() -> JwtRules {
    JwtRules {
        issuers: vec!["rsbroker-test".into()],
        audiences: vec!["brokers".into()],
        leeway: Duration::from_secs(5),
    }
}

fn claims() -> Value {
    json!({"sub": "orders", "iss": "rsbroker-test", "aud": "brokers", "exp": now() + 600})
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

fn hs_jwt() -> Jwt {
    let mut jwt = Jwt::new(rules());
    jwt.add_secret(SECRET).unwrap();
    jwt
}

/// An EC P-256 key pair: (private PKCS#8 PEM, public PEM).
fn ec_pair() -> (String, String) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    (pair.serialize_pem(), pair.public_key_pem())
}

fn ed_pair() -> (String, String) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    (pair.serialize_pem(), pair.public_key_pem())
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn a_good_token_names_its_identity_roles_and_grant() {
    let mut c = claims();
    c["roles"] = json!(["reader"]);
    c["authorities"] = json!("writer");
    c["publish"] = json!(["com.example.Orders*"]);
    let v = hs_jwt().verify(hs256(&c, SECRET).as_bytes()).unwrap();
    assert_eq!(v.subject, "orders");
    assert_eq!(v.roles, ["reader", "writer"]);
    let grant = v.grant.unwrap();
    assert!(grant.may_publish(&ServiceKey::new("", "com.example.OrdersV2", "")));
    assert!(!grant.may_call(&ServiceKey::new("", "com.example.OrdersV2", "")));
    assert_eq!(v.expires, c["exp"].as_u64().unwrap());
}

#[test]
fn every_broken_token_is_refused_with_what_failed() {
    let jwt = hs_jwt();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        jwt.verify(hs256(&c, SECRET).as_bytes()).unwrap_err()
    };
    assert!(with(&|c| c["exp"] = json!(now() - 60)).contains("expired"));
    assert!(with(&|c| c["nbf"] = json!(now() + 60)).contains("not valid yet"));
    assert!(with(&|c| c["iss"] = json!("someone")).contains("issuer"));
    assert!(with(&|c| c["aud"] = json!("others")).contains("audience"));
    assert!(with(&|c| drop(c.as_object_mut().unwrap().remove("exp"))).contains("exp"));
    assert!(with(&|c| drop(c.as_object_mut().unwrap().remove("iss"))).contains("iss"));
    assert!(with(&|c| drop(c.as_object_mut().unwrap().remove("sub"))).contains("sub"));
    assert!(with(&|c| c["roles"] = json!(7)).contains("claims are malformed"));
    // Within the skew, exp and nbf still pass.
    assert!(
        jwt.verify(
            hs256(
                &{
                    let mut c = claims();
                    c["exp"] = json!(now() - 2);
                    c["nbf"] = json!(now() + 2);
                    c
                },
                SECRET
            )
            .as_bytes()
        )
        .is_ok()
    );
    let wrong_key = hs256(&claims(), b"another secret, just as long as the first");
    assert!(
        jwt.verify(wrong_key.as_bytes())
            .unwrap_err()
            .contains("signature")
    );
    for garbage in [
        "",
        "a.b",
        "a.b.c",
        "...",
        "eyJhbGciOiJIUzI1NiJ9.e30.x",
        "\u{ff}.\0.\0",
    ] {
        let e = jwt.verify(garbage.as_bytes()).unwrap_err();
        assert!(
            e.contains("malformed") || e.contains("signature"),
            "{garbage:?}: {e}"
        );
    }
}

#[test]
fn alg_none_and_algorithm_confusion_are_refused() {
    let jwt = hs_jwt();
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64(claims().to_string().as_bytes());
    let none = format!("{header}.{body}.");
    let e = jwt.verify(none.as_bytes()).unwrap_err();
    assert!(e.contains("alg none"), "{e}");

    // An HS256 token whose secret is the public key's PEM, checked against
    // that public key.
    let (_, public) = ec_pair();
    let mut jwt = Jwt::new(rules());
    jwt.add_pem(public.as_bytes()).unwrap();
    let forged = hs256(&claims(), public.as_bytes());
    let e = jwt.verify(forged.as_bytes()).unwrap_err();
    assert!(
        e.contains("HS256") && e.contains("no configured key"),
        "{e}"
    );
}

#[test]
fn public_keys_of_each_kind_verify_their_own_tokens_only() {
    let (ec_private, ec_public) = ec_pair();
    let (ed_private, ed_public) = ed_pair();
    let mut jwt = Jwt::new(rules());
    jwt.add_pem(ec_public.as_bytes()).unwrap();
    jwt.add_pem(ed_public.as_bytes()).unwrap();
    assert_eq!(jwt.keys(), 2);
    let es = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &EncodingKey::from_ec_pem(ec_private.as_bytes()).unwrap(),
    )
    .unwrap();
    let ed = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims(),
        &EncodingKey::from_ed_pem(ed_private.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(jwt.verify(es.as_bytes()).unwrap().subject, "orders");
    assert_eq!(jwt.verify(ed.as_bytes()).unwrap().subject, "orders");
    // Signed by another EC key.
    let (other, _) = ec_pair();
    let stranger = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &EncodingKey::from_ec_pem(other.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(
        jwt.verify(stranger.as_bytes())
            .unwrap_err()
            .contains("signature")
    );
    assert!(
        jwt.add_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .is_err()
    );
    assert!(jwt.add_secret(b"short").unwrap_err().contains("32"));
}

#[test]
fn jwks_keys_are_chosen_by_kid_and_keep_their_algorithm() {
    let (private, public) = ec_pair();
    let key = jsonwebtoken::DecodingKey::from_ec_pem(public.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_decoding_key(&key, Some(Algorithm::ES256)).unwrap();
    jwk.common.key_id = Some("k1".into());
    let set = json!({ "keys": [jwk] });
    let mut jwt = Jwt::new(rules());
    assert_eq!(jwt.add_jwks(set.to_string().as_bytes()).unwrap(), 1);
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let token = jsonwebtoken::encode(
        &header,
        &claims(),
        &EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(jwt.verify(token.as_bytes()).is_ok());
    // A kid no key has: every key that takes the algorithm is tried.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("unknown".into());
    let token = jsonwebtoken::encode(
        &header,
        &claims(),
        &EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(jwt.verify(token.as_bytes()).is_ok());
    assert!(format!("{jwt:?}").contains("keys: 1"));
    // An EC key that says it is for RS256.
    let mut wrong =
        jsonwebtoken::jwk::Jwk::from_decoding_key(&key, Some(Algorithm::ES256)).unwrap();
    wrong.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::RS256);
    let e = jwt
        .add_jwks(json!({ "keys": [wrong] }).to_string().as_bytes())
        .unwrap_err();
    assert!(e.contains("does not fit"), "{e}");
    assert!(jwt.add_jwks(b"{\"keys\": 3}").is_err());
    assert!(jwt.add_jwks(b"not json").is_err());
}

fn trust_with_jwt() -> Trust {
    Trust {
        allow_anonymous: false,
        jwt: Some(hs_jwt()),
        leeway: 5,
        ..Trust::default()
    }
}

#[test]
fn without_credentials_only_an_anonymous_broker_lets_in() {
    let mut cache = TokenCache::default();
    let open = Trust::default();
    let who = open
        .authenticate(&Credentials::default(), now(), &mut cache)
        .unwrap();
    assert_eq!(who.method, Method::Anonymous);
    let closed = trust_with_jwt();
    let e = closed
        .authenticate(&Credentials::default(), now(), &mut cache)
        .unwrap_err();
    assert!(e.contains("requires authentication"), "{e}");
    // A token where no key is configured: let in anonymously only where
    // anonymous connections are allowed.
    let token = Credentials {
        bearer: Some(b"x.y.z"),
        ..Credentials::default()
    };
    assert!(open.authenticate(&token, now(), &mut cache).is_ok());
    let no_keys = Trust {
        allow_anonymous: false,
        ..Trust::default()
    };
    assert!(
        no_keys
            .authenticate(&token, now(), &mut cache)
            .unwrap_err()
            .contains("no JWT keys")
    );
}

#[test]
fn bearer_tokens_are_bounded_verified_and_cached_whole() {
    let trust = trust_with_jwt();
    let mut cache = TokenCache::default();
    let token = hs256(&claims(), SECRET);
    let creds = Credentials {
        bearer: Some(token.as_bytes()),
        ..Credentials::default()
    };
    let who = trust.authenticate(&creds, now(), &mut cache).unwrap();
    assert_eq!(&*who.name, "orders");
    assert_eq!(who.method, Method::Bearer);
    assert_eq!(who.expires, Some(claims()["exp"].as_u64().unwrap() + 5));
    assert_eq!(cache.len(), 1);
    // A token that differs in one byte is not the cached one.
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    let creds_t = Credentials {
        bearer: Some(&tampered),
        ..Credentials::default()
    };
    assert!(trust.authenticate(&creds_t, now(), &mut cache).is_err());
    // A cached token past its expiry is checked again, and refused.
    let later = who.expires.unwrap();
    assert!(cache.get(token.as_bytes(), later).is_none());
    assert!(cache.is_empty());
    let long = vec![b'a'; trust.max_token_size + 1];
    let e = trust
        .authenticate(
            &Credentials {
                bearer: Some(&long),
                ..Credentials::default()
            },
            now(),
            &mut cache,
        )
        .unwrap_err();
    assert!(e.contains("more than the limit"), "{e}");
}

#[test]
fn the_token_cache_stays_within_its_size() {
    let mut cache = TokenCache::default();
    let who = Arc::new(Identity::anonymous());
    for i in 0..10u8 {
        cache.put(&[i], who.clone(), 4);
        assert!(cache.len() <= 4);
    }
    assert_eq!(cache.len(), 4);
    assert!(!cache.is_empty());
    assert!(cache.get(&[9], 0).is_some());
    cache.put(&[42], who.clone(), 0);
    assert!(cache.get(&[42], 0).is_none());
    cache.clear();
    assert!(cache.is_empty());
}

#[test]
fn simple_authentication_checks_the_salted_secret() {
    let stored = Secret::hash(b"salt", b"s3cret");
    let mut users = HashMap::new();
    users.insert("billing".to_owned(), Secret::parse(&stored).unwrap());
    let trust = Trust {
        allow_anonymous: false,
        users,
        ..Trust::default()
    };
    let mut cache = TokenCache::default();
    let login = |user: &'static [u8], secret: &'static [u8]| Credentials {
        simple: Some((user, secret)),
        ..Credentials::default()
    };
    let who = trust
        .authenticate(&login(b"billing", b"s3cret"), 0, &mut cache)
        .unwrap();
    assert_eq!((&*who.name, who.method), ("billing", Method::Simple));
    for (user, secret) in [
        (&b"billing"[..], &b"s3cret!"[..]),
        (b"billing", b""),
        (b"nobody", b"s3cret"),
    ] {
        let creds = Credentials {
            simple: Some((user, secret)),
            ..Credentials::default()
        };
        assert!(trust.authenticate(&creds, 0, &mut cache).is_err());
    }
    assert!(
        trust
            .authenticate(&login(b"\xff", b"x"), 0, &mut cache)
            .is_err()
    );
    for bad in ["sha256:zz:00", "md5:00:00", "sha256:00:abcd", "sha256:00"] {
        assert!(Secret::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(
        format!("{:?}", Secret::parse(&stored).unwrap()),
        "Secret(..)"
    );
}

#[test]
fn certificates_are_identities_only_when_configured() {
    let creds = Credentials {
        certificate: Some("orders"),
        ..Credentials::default()
    };
    let mut cache = TokenCache::default();
    let off = Trust {
        allow_anonymous: false,
        ..Trust::default()
    };
    assert!(off.authenticate(&creds, 0, &mut cache).is_err());
    let on = Trust {
        certificate_identity: true,
        ..off
    };
    let who = on.authenticate(&creds, 0, &mut cache).unwrap();
    assert_eq!((&*who.name, who.method), ("orders", Method::Certificate));
}

#[test]
fn grants_come_from_claims_config_and_roles_else_the_default() {
    let mut trust = Trust {
        anonymous: Grant::new(Vec::<String>::new(), vec!["public.*".into()]),
        authenticated: Grant::new(vec!["default.*"], vec!["default.*"]),
        ..Trust::default()
    };
    trust.identities.insert(
        "orders".into(),
        IdentityRules {
            grant: Some(Grant::new(["com.example.Orders"], ["com.example.Stock"])),
            roles: vec!["auditor".into()],
            limits: Default::default(),
        },
    );
    trust
        .roles
        .insert("auditor".into(), Grant::new(vec![], vec!["audit.*"]));
    trust
        .roles
        .insert("billing".into(), Grant::new(vec!["billing.*"], vec![]));
    let key = |n: &str| ServiceKey::new("", n, "");
    let g = trust.grant(&Identity::named("orders", Method::Bearer));
    assert!(g.may_publish(&key("com.example.Orders")));
    assert!(g.may_call(&key("com.example.Stock")));
    assert!(g.may_call(&key("audit.Log")));
    assert!(!g.may_call(&key("default.X")));
    let mut claimed = Identity::named("someone", Method::Bearer);
    claimed.roles = vec!["billing".into(), "unknown".into()];
    claimed.claimed = Some(Grant::new(vec![], vec!["x.Y"]));
    let g = trust.grant(&claimed);
    assert!(g.may_publish(&key("billing.Pay")));
    assert!(g.may_call(&key("x.Y")));
    assert!(!g.may_call(&key("default.X")));
    let g = trust.grant(&Identity::named("stranger", Method::Simple));
    assert_eq!(g, trust.authenticated);
    let mut unknown_role = Identity::named("stranger", Method::Bearer);
    unknown_role.roles = vec!["unknown".into()];
    assert_eq!(trust.grant(&unknown_role), trust.authenticated);
    assert_eq!(trust.grant(&Identity::anonymous()), trust.anonymous);
}

#[test]
fn methods_are_named_for_logs_and_metrics() {
    let names = [
        Method::Anonymous,
        Method::Bearer,
        Method::Simple,
        Method::Certificate,
    ]
    .map(Method::as_str);
    assert_eq!(names, ["anonymous", "jwt", "simple", "certificate"]);
}

#[test]
fn a_wrong_secret_is_refused_even_where_anonymous_connections_are_allowed() {
    let mut users = HashMap::new();
    users.insert(
        "billing".to_owned(),
        Secret::parse(&Secret::hash(b"s", b"pw")).unwrap(),
    );
    let trust = Trust {
        users,
        ..Trust::default()
    };
    let mut cache = TokenCache::default();
    let creds = Credentials {
        simple: Some((b"billing", b"guess")),
        ..Credentials::default()
    };
    assert!(trust.authenticate(&creds, 0, &mut cache).is_err());
}

#[test]
fn a_token_of_exactly_the_limit_is_read() {
    let trust = Trust {
        max_token_size: 5,
        ..trust_with_jwt()
    };
    let mut cache = TokenCache::default();
    let at_limit = Credentials {
        bearer: Some(b"a.b.c"),
        ..Credentials::default()
    };
    let e = trust
        .authenticate(&at_limit, now(), &mut cache)
        .unwrap_err();
    assert!(!e.contains("more than the limit"), "{e}");
}
