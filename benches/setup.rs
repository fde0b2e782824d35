//! Criterion bench of what a SETUP costs a shard, by how it proves its
//! identity: a connection opened, its SETUP (app metadata, one service,
//! the credentials) handled, the answer taken, and the connection closed,
//! all on one `Shard` (`Shard::open`, `handle_frame`, `close`). The
//! reciprocal is the SETUPs a second one core can take, transport aside.
//!
//! Tokens are verified each time (`cache_size` 0) except in `jwt-hs256-cached`,
//! where one token comes back and is found in the shard's cache.
//!
//! `jwt-es256-forged` is a token signed with another key, checked and
//! refused every time (no budget for failures); `jwt-es256-forged-unchecked`
//! is the same token once the shard's budget for failed authentications
//! is spent (`auth.failures`), refused without its signature checked: what
//! a flood of forged tokens costs the shard.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsbroker_core::trust::{FailureLimits, Jwt, JwtRules, Secret, Trust};
use rsbroker_core::{Shard, ShardConfig};
use rsocket_proto::conn::{Config, Connection, SetupPayload};
use rsocket_proto::metadata::build::CompositeBuilder;
use rsocket_proto::metadata::{MimeType, WellKnownMime};

// The broker's allocator, so that allocation costs are the broker's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &[u8] = b"a secret for the setup bench, 32+ bytes long";

/// The SETUP frame a client sends with `auth` (an authentication entry
/// or none) before its app and service metadata.
fn setup_frame(auth: Option<CompositeBuilder>) -> Bytes {
    let app = br#"{"name":"bench","uuid":"bench-1","powerRating":1}"#;
    let registry = br#"{"published":[{"service":"com.example.Echo"}]}"#;
    let md = auth
        .unwrap_or_default()
        .entry(MimeType::WellKnown(WellKnownMime::APPLICATION), app)
        .entry(
            MimeType::WellKnown(WellKnownMime::SERVICE_REGISTRY),
            registry,
        )
        .build()
        .expect("metadata fits");
    let mut client = Connection::client(
        Config::default(),
        SetupPayload {
            metadata: Some(md),
            data: Bytes::new(),
        },
        Instant::now(),
    );
    client.poll_transmit().expect("a SETUP").to_bytes()
}

fn token(algorithm: Algorithm, key: &EncodingKey) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"sub": "bench", "exp": exp});
    jsonwebtoken::encode(&Header::new(algorithm), &claims, key).expect("signs")
}

/// An RSA key pair from openssl (the bench's only use of it): (private
/// PEM, public PEM).
fn rsa_pair() -> (Vec<u8>, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!("rsbroker-setup-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let (private, public) = (dir.join("rsa.key"), dir.join("rsa.pub"));
    let run = |args: &[&std::ffi::OsStr]| {
        let ok = Command::new("openssl")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "openssl {args:?} (install openssl)");
    };
    run(&[
        "genpkey".as_ref(),
        "-algorithm".as_ref(),
        "RSA".as_ref(),
        "-pkeyopt".as_ref(),
        "rsa_keygen_bits:2048".as_ref(),
        "-out".as_ref(),
        private.as_os_str(),
    ]);
    run(&[
        "pkey".as_ref(),
        "-pubout".as_ref(),
        "-in".as_ref(),
        private.as_os_str(),
        "-out".as_ref(),
        public.as_os_str(),
    ]);
    let pair = (
        std::fs::read(&private).expect("the key"),
        std::fs::read(&public).expect("the public key"),
    );
    let _ = std::fs::remove_dir_all(&dir);
    pair
}

/// Rules that need credentials, verifying every token (no cache).
fn closed(jwt: Option<Jwt>) -> Trust {
    Trust {
        allow_anonymous: false,
        jwt,
        cache_size: 0,
        ..Trust::default()
    }
}

fn jwt_with(add: impl FnOnce(&mut Jwt)) -> Option<Jwt> {
    let mut jwt = Jwt::new(JwtRules::default());
    add(&mut jwt);
    Some(jwt)
}

/// (name, rules, SETUP frame) of every case.
type Case = (&'static str, Trust, Bytes);

/// The cases whose SETUP is let in, then those refused.
fn cases() -> (Vec<Case>, Vec<Case>) {
    let mut out = Vec::new();
    out.push(("anonymous", Trust::default(), setup_frame(None)));

    let mut simple = closed(None);
    simple.users.insert(
        "bench".into(),
        Secret::parse(&Secret::hash(b"0123456789abcdef", b"s3cret")).expect("a secret"),
    );
    let frame = setup_frame(Some(CompositeBuilder::new().simple_auth("bench", "s3cret")));
    out.push(("simple", simple, frame));

    let hs = EncodingKey::from_secret(SECRET).expect("a secret");
    let hs_token = token(Algorithm::HS256, &hs);
    let hs_jwt = || {
        jwt_with(|j| {
            j.add_secret(SECRET).expect("a secret");
        })
    };
    let frame = setup_frame(Some(CompositeBuilder::new().bearer(&hs_token)));
    out.push(("jwt-hs256", closed(hs_jwt()), frame.clone()));
    let cached = Trust {
        cache_size: 1024,
        ..closed(hs_jwt())
    };
    out.push(("jwt-hs256-cached", cached, frame));

    let (private, public) = rsa_pair();
    let rs = EncodingKey::from_rsa_pem(&private).expect("an RSA key");
    let rs_jwt = jwt_with(|j| {
        j.add_pem(&public).expect("an RSA public key");
    });
    let frame = setup_frame(Some(
        CompositeBuilder::new().bearer(&token(Algorithm::RS256, &rs)),
    ));
    out.push(("jwt-rs256", closed(rs_jwt), frame));

    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("an EC key");
    let es = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("an EC key");
    let es_jwt = jwt_with(|j| {
        j.add_pem(ec.public_key_pem().as_bytes())
            .expect("an EC public key");
    });
    let frame = setup_frame(Some(
        CompositeBuilder::new().bearer(&token(Algorithm::ES256, &es)),
    ));
    out.push(("jwt-es256", closed(es_jwt.clone()), frame));
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("an EC key");
    let other = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).expect("an EC key");
    let forged = setup_frame(Some(
        CompositeBuilder::new().bearer(&token(Algorithm::ES256, &other)),
    ));
    let unlimited = Trust {
        failures: FailureLimits {
            per_address_burst: u32::MAX,
            per_address_per_minute: u32::MAX,
            per_shard_per_second: 1_000_000_000,
        },
        ..closed(es_jwt.clone())
    };
    let refused = vec![
        ("jwt-es256-forged", unlimited, forged.clone()),
        ("jwt-es256-forged-unchecked", closed(es_jwt), forged),
    ];

    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("an Ed25519 key");
    let eddsa = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).expect("an Ed25519 key");
    let ed_jwt = jwt_with(|j| {
        j.add_pem(ed.public_key_pem().as_bytes())
            .expect("an Ed25519 public key");
    });
    let frame = setup_frame(Some(
        CompositeBuilder::new().bearer(&token(Algorithm::EdDSA, &eddsa)),
    ));
    out.push(("jwt-eddsa", closed(ed_jwt), frame));
    (out, refused)
}

fn setup(c: &mut Criterion) {
    let mut group = c.benchmark_group("setup");
    let (let_in, refused) = cases();
    let refused = refused.into_iter().map(|case| (case, false));
    for ((name, trust, frame), let_in) in let_in.into_iter().map(|case| (case, true)).chain(refused)
    {
        let now = Instant::now();
        let mut shard = Shard::new(
            ShardConfig {
                trust: Arc::new(trust),
                ..ShardConfig::new(0, 1)
            },
            now,
        );
        // The case is what it says: its SETUP is let in, or refused.
        let id = shard.open(now);
        shard.handle_frame(now, id, frame.clone());
        assert_eq!(
            shard.connection_app(id).is_some() && !shard.is_closed(id),
            let_in,
            "{name}: the SETUP was not what the case says"
        );
        shard.close(now, id, "bench");
        group.bench_function(name, |b| {
            b.iter(|| {
                let id = shard.open(now);
                shard.handle_frame(now, id, frame.clone());
                while shard.poll_transmit(id).is_some() {}
                shard.close(now, id, "bench");
                shard.take_wakeups();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, setup);
criterion_main!(benches);
