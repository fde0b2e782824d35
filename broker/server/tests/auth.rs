//! Trust end to end: JWT (RS256, keys made with openssl) and simple
//! authentication at SETUP, grants per identity, a reload that takes a
//! permission away from an open connection, and the admin token.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsbroker::BrokerConfig;
use rsbroker::config::{GrantConfig, IdentityConfig};
use rsbroker_client::metadata::route;
use rsbroker_client::{AppConfig, Client, ClientConfig, Credentials, Payload};
use serde_json::{Value, json};

use common::*;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An RSA key pair made by openssl: (private key PEM path, public key PEM path).
fn rsa_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let private = dir.join("jwt.key");
    let public = dir.join("jwt.pub.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .status()
        .expect("openssl runs (CI installs it)")
        .success();
    assert!(ok, "openssl genpkey");
    let ok = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl pkey -pubout");
    (private, public)
}

struct Keys {
    private: Vec<u8>,
    public: Vec<u8>,
}

impl Keys {
    fn rs256(&self, claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            claims,
            &EncodingKey::from_rsa_pem(&self.private).unwrap(),
        )
        .unwrap()
    }

    fn token(&self, sub: &str) -> String {
        self.rs256(&json!({
            "sub": sub, "iss": "test-issuer", "aud": "rsbroker", "exp": unix_now() + 600
        }))
    }
}

fn grant(publish: &[&str], call: &[&str]) -> IdentityConfig {
    IdentityConfig {
        publish: publish.iter().map(|s| s.to_string()).collect(),
        call: call.iter().map(|s| s.to_string()).collect(),
        ..IdentityConfig::default()
    }
}

/// Tokens only; `echo-app` publishes com.example.Echo, `caller` calls it;
/// any other identity may do nothing.
fn jwt_config(dir: &Path) -> (BrokerConfig, Keys) {
    let (private, public) = rsa_pair(dir);
    let mut c = test_config();
    c.auth.allow_anonymous = false;
    c.auth.jwt.keys = vec![public.clone()];
    c.auth.jwt.issuers = vec!["test-issuer".into()];
    c.auth.jwt.audiences = vec!["rsbroker".into()];
    c.auth.authenticated = GrantConfig::default();
    c.auth
        .identities
        .insert("echo-app".into(), grant(&["com.example.Echo"], &[]));
    c.auth
        .identities
        .insert("caller".into(), grant(&[], &["com.example.*"]));
    let keys = Keys {
        private: std::fs::read(private).unwrap(),
        public: std::fs::read(public).unwrap(),
    };
    (c, keys)
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("rsbroker-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn config_with(credentials: Credentials, app: Option<&str>, services: &[&str]) -> ClientConfig {
    ClientConfig {
        app: app.map(|uuid| AppConfig {
            name: uuid.into(),
            uuid: uuid.into(),
            power_rating: 1,
        }),
        services: services
            .iter()
            .map(|s| (String::new(), s.to_string(), String::new()))
            .collect(),
        credentials,
        ..ClientConfig::default()
    }
}

fn echo_service() -> TestService {
    TestService {
        name: "echo".into(),
        log: std::sync::mpsc::channel().0,
        delay: Duration::ZERO,
    }
}

/// Connects with `config` and waits for the broker to refuse it; returns
/// why (or panics when it is let in).
async fn refused(addr: std::net::SocketAddr, config: ClientConfig) -> String {
    let client = Client::builder(config).connect(addr).await.unwrap();
    let closed = glommio::timer::timeout(Duration::from_secs(10), async {
        client.closed().await;
        Ok(())
    })
    .await;
    assert!(closed.is_ok(), "the broker let the connection in");
    client.close_reason().unwrap_or_default()
}

async fn call(client: &Client, route_to: &str) -> Result<String, String> {
    client
        .request_response(Payload::new(route(&[route_to]), "hi"))
        .await
        .map(|p| String::from_utf8_lossy(&p.data).into_owned())
        .map_err(|e| e.to_string())
}

/// `echo-app` serving `com.example.Echo` and `caller`, each with a token
/// of its own, and the caller's first answer from the echo (once the
/// registration has reached the caller's shard, within 2 s).
async fn echo_and_caller(
    addr: std::net::SocketAddr,
    k: &Keys,
) -> (Client, Client, Result<String, String>) {
    let echo = Client::builder(config_with(
        Credentials::Bearer(k.token("echo-app")),
        Some("echo-1"),
        &["com.example.Echo"],
    ))
    .responder("com.example.Echo", echo_service())
    .connect(addr)
    .await
    .unwrap();
    let caller = Client::builder(config_with(
        Credentials::Bearer(k.token("caller")),
        None,
        &[],
    ))
    .connect(addr)
    .await
    .unwrap();
    let mut first = call(&caller, "com.example.Echo.hello").await;
    for _ in 0..100 {
        if first.is_ok() {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
        first = call(&caller, "com.example.Echo.hello").await;
    }
    (echo, caller, first)
}

fn metric(admin: std::net::SocketAddr, name: &str) -> u64 {
    let (_, body) = http_get(admin, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn rs256_tokens_at_setup_let_in_only_who_they_name_and_bad_ones_are_refused() {
    let dir = temp_dir("auth-jwt");
    let (config, keys) = jwt_config(&dir.0);
    let broker = TestBroker::with_config(config);
    let addr = broker.addr();
    let keys = Arc::new(keys);
    let k = keys.clone();
    let outcome = run(move || async move {
        let (_echo, caller, first) = echo_and_caller(addr, &k).await;
        let now = unix_now();
        let claims = |f: &dyn Fn(&mut Value)| {
            let mut c =
                json!({"sub": "caller", "iss": "test-issuer", "aud": "rsbroker", "exp": now + 600});
            f(&mut c);
            c
        };
        let mut tampered = k.token("caller").into_bytes();
        let at = tampered.len() - 5;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let hs_confusion = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(&|_| {}),
            &EncodingKey::from_secret(&k.public).unwrap(),
        )
        .unwrap();
        let none = {
            use base64::Engine;
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none"}"#),
                b64(claims(&|_| {}).to_string().as_bytes())
            )
        };
        let cases: Vec<(Credentials, &str)> = vec![
            (
                Credentials::Bearer(k.rs256(&claims(&|c| c["exp"] = json!(now - 120)))),
                "expired",
            ),
            (
                Credentials::Bearer(k.rs256(&claims(&|c| c["nbf"] = json!(now + 120)))),
                "not valid yet",
            ),
            (
                Credentials::Bearer(k.rs256(&claims(&|c| c["iss"] = json!("elsewhere")))),
                "issuer",
            ),
            (
                Credentials::Bearer(k.rs256(&claims(&|c| c["aud"] = json!("others")))),
                "audience",
            ),
            (
                Credentials::Bearer(String::from_utf8(tampered).unwrap()),
                "signature",
            ),
            (Credentials::Bearer(hs_confusion), "HS256"),
            (Credentials::Bearer(none), "alg none"),
            (Credentials::Bearer("garbage".into()), "malformed"),
            (
                Credentials::Bearer("x".repeat(20_000)),
                "more than the limit",
            ),
            (Credentials::None, "requires authentication"),
        ];
        let mut reasons = Vec::new();
        for (credentials, why) in cases {
            let reason = refused(
                addr,
                config_with(credentials, Some("bad"), &["com.example.Echo"]),
            )
            .await;
            reasons.push((why, reason));
        }
        // An identity that may not publish what it registers, and one that
        // may not call what it asks for.
        let squatter = refused(
            addr,
            config_with(
                Credentials::Bearer(k.token("caller")),
                Some("squat"),
                &["com.example.Echo"],
            ),
        )
        .await;
        let other = Client::builder(config_with(
            Credentials::Bearer(k.token("nobody")),
            None,
            &[],
        ))
        .connect(addr)
        .await
        .unwrap();
        let denied = call(&other, "com.example.Echo.hello").await;
        // Other traffic kept flowing through all of that.
        let after = call(&caller, "com.example.Echo.hello").await;
        (first, reasons, squatter, denied, after)
    });
    let (first, reasons, squatter, denied, after) = outcome;
    assert_eq!(first.as_deref(), Ok("echo:hi"));
    for (why, reason) in &reasons {
        assert!(
            reason.contains("REJECTED_SETUP") && reason.contains(why),
            "{why}: {reason}"
        );
    }
    assert!(
        squatter.contains("identity caller may not publish service com.example.Echo"),
        "{squatter}"
    );
    let denied = denied.unwrap_err();
    assert!(
        denied.contains("REJECTED")
            && denied.contains("nobody may not call service com.example.Echo"),
        "{denied}"
    );
    assert_eq!(after.as_deref(), Ok("echo:hi"));
    let admin = broker.admin_addr().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(admin, "rsbroker_setups_refused"), 11);
    assert_eq!(metric(admin, "rsbroker_requests_denied"), 1);
    let (_, apps) = http_get(admin, "/api/apps");
    assert!(
        !apps.contains("\"bad\"") && !apps.contains("squat"),
        "{apps}"
    );
}

#[test]
fn a_reload_takes_a_permission_from_an_open_connection_and_keeps_it_open() {
    let dir = temp_dir("auth-reload");
    let (config, keys) = jwt_config(&dir.0);
    let broker = TestBroker::with_config(config.clone());
    let addr = broker.addr();
    let controller = broker.controller();
    let (step_tx, step_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let echo = keys.token("echo-app");
    let caller = keys.token("caller");
    let worker = std::thread::spawn(move || {
        run(move || async move {
            let _echo = Client::builder(config_with(
                Credentials::Bearer(echo),
                Some("echo-1"),
                &["com.example.Echo"],
            ))
            .responder("com.example.Echo", echo_service())
            .connect(addr)
            .await
            .unwrap();
            let caller = Client::builder(config_with(Credentials::Bearer(caller), None, &[]))
                .connect(addr)
                .await
                .unwrap();
            let mut before = call(&caller, "com.example.Echo.hello").await;
            for _ in 0..100 {
                if before.is_ok() {
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(20)).await;
                before = call(&caller, "com.example.Echo.hello").await;
            }
            done_tx.send(()).unwrap();
            // Wait for the reload without blocking the executor.
            while step_rx.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            let after = call(&caller, "com.example.Echo.hello").await;
            (before, after, caller.is_closed())
        })
    });
    done_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let mut narrowed = config;
    narrowed
        .auth
        .identities
        .insert("caller".into(), grant(&[], &["com.example.Other"]));
    assert!(controller.reload(narrowed).is_empty());
    // Every shard applies it within a tick of the timer.
    std::thread::sleep(Duration::from_millis(500));
    step_tx.send(()).unwrap();
    let (before, after, closed) = worker.join().unwrap();
    assert_eq!(before.as_deref(), Ok("echo:hi"));
    let after = after.unwrap_err();
    assert!(
        after.contains("caller may not call service com.example.Echo"),
        "{after}"
    );
    assert!(!closed, "the connection stays open");
}

#[test]
fn simple_authentication_against_the_credentials_file() {
    let dir = temp_dir("auth-simple");
    let file = dir.0.join("credentials.toml");
    let stored = rsbroker::trust::hash_secret(b"billing-secret").unwrap();
    std::fs::write(&file, format!("[users.billing]\nsecret = \"{stored}\"\n")).unwrap();
    let mut config = test_config();
    config.auth.allow_anonymous = false;
    config.auth.credentials = Some(file);
    let broker = TestBroker::with_config(config);
    let addr = broker.addr();
    let (good, wrong, unknown) = run(move || async move {
        let good = Client::builder(config_with(
            Credentials::Simple("billing".into(), "billing-secret".into()),
            None,
            &[],
        ))
        .connect(addr)
        .await
        .unwrap();
        // The broker answers its health check itself.
        let health = call(
            &good,
            "com.alibaba.rsocket.health.RSocketServiceHealth.check",
        )
        .await;
        let wrong = refused(
            addr,
            config_with(
                Credentials::Simple("billing".into(), "guess".into()),
                None,
                &[],
            ),
        )
        .await;
        let unknown = refused(
            addr,
            config_with(
                Credentials::Simple("root".into(), "billing-secret".into()),
                None,
                &[],
            ),
        )
        .await;
        (health.map(|_| ()), wrong, unknown)
    });
    assert_eq!(good, Ok(()));
    assert!(
        wrong.contains("REJECTED_SETUP") && wrong.contains("wrong secret"),
        "{wrong}"
    );
    assert!(unknown.contains("\"root\""), "{unknown}");
}

/// An HTTP request with `method`, and the admin token when given.
fn http(addr: std::net::SocketAddr, method: &str, path: &str, token: Option<&str>) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: test\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap()
}

#[test]
fn the_admin_api_refuses_changes_and_protected_reads_without_its_token() {
    // Without a token configured, changes are refused outright.
    let broker = TestBroker::with_config(test_config());
    let admin = broker.admin_addr().unwrap();
    assert_eq!(http(admin, "POST", "/api/reload", None), 403);
    assert_eq!(http(admin, "GET", "/metrics", None), 200);
    drop(broker);

    let dir = temp_dir("auth-admin");
    let token_file = dir.0.join("admin.token");
    std::fs::write(&token_file, "s3cret-admin-token\n").unwrap();
    let mut config = test_config();
    config.admin.token_file = Some(token_file.clone());
    config.admin.protect_reads = true;
    let broker = TestBroker::with_config(config);
    let reloads = Arc::new(AtomicUsize::new(0));
    let r = reloads.clone();
    broker.controller().on_reload_request(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let admin = broker.admin_addr().unwrap();
    let token = Some("s3cret-admin-token");
    assert_eq!(http(admin, "POST", "/api/reload", None), 401);
    assert_eq!(
        http(admin, "POST", "/api/reload", Some("s3cret-admin-tokeN")),
        401
    );
    assert_eq!(reloads.load(Ordering::SeqCst), 0);
    assert_eq!(http(admin, "POST", "/api/reload", token), 202);
    assert_eq!(reloads.load(Ordering::SeqCst), 1);
    for path in ["/metrics", "/api/apps", "/api/config", "/"] {
        assert_eq!(http(admin, "GET", path, None), 401, "{path}");
        assert_eq!(http(admin, "GET", path, token), 200, "{path}");
    }
    assert_eq!(http(admin, "GET", "/healthz", None), 200);
    assert_eq!(http(admin, "GET", "/readyz", None), 200);
    // The token rotates with its file.
    std::fs::write(&token_file, "rotated").unwrap();
    assert_eq!(http(admin, "GET", "/metrics", token), 401);
    assert_eq!(http(admin, "GET", "/metrics", Some("rotated")), 200);
}

#[test]
fn names_from_peers_cannot_forge_lines_in_the_metrics() {
    // A service name, and so a metric label, with a quote and a newline
    // (JSON lets a SETUP say so).
    let hostile = "evil\"} 1\nrsbroker_forged 1 #";
    let broker = TestBroker::with_config(test_config());
    let addr = broker.addr();
    let answered = run(move || async move {
        let _echo = Client::builder(config_with(Credentials::None, Some("evil-1"), &[hostile]))
            .responder(hostile, echo_service())
            .connect(addr)
            .await
            .unwrap();
        let caller = Client::builder(ClientConfig::default())
            .connect(addr)
            .await
            .unwrap();
        let route_to = format!("{hostile}.m");
        let mut answer = call(&caller, &route_to).await;
        for _ in 0..100 {
            if answer.is_ok() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
            answer = call(&caller, &route_to).await;
        }
        answer
    });
    assert_eq!(answered.as_deref(), Ok("echo:hi"));
    std::thread::sleep(Duration::from_millis(300));
    let (_, body) = http_get(broker.admin_addr().unwrap(), "/metrics");
    assert!(
        body.contains(r#"service="evil\"} 1\nrsbroker_forged 1 #""#),
        "{body}"
    );
    assert!(
        !body.lines().any(|l| l.starts_with("rsbroker_forged")),
        "{body}"
    );
}

/// A SETUP frame, length-prefixed as on TCP, whose composite metadata
/// names the app `uuid` and carries the bearer `token`.
fn raw_setup(uuid: &str, token: &str) -> Vec<u8> {
    use rsocket_proto::frame::{Frame, Setup, VERSION};
    use rsocket_proto::metadata::build::CompositeBuilder;
    use rsocket_proto::metadata::{MimeType, WellKnownMime};
    let app = format!(r#"{{"name":"{uuid}","uuid":"{uuid}"}}"#);
    let metadata = CompositeBuilder::new()
        .bearer(token)
        .entry(
            MimeType::WellKnown(WellKnownMime::APPLICATION),
            app.as_bytes(),
        )
        .build()
        .unwrap();
    let setup = Frame::Setup(Setup {
        version: VERSION,
        keepalive_interval: 60_000,
        max_lifetime: 600_000,
        resume_token: None,
        lease: false,
        metadata_mime: bytes::Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
        data_mime: bytes::Bytes::from_static(b"application/octet-stream"),
        metadata: Some(metadata),
        data: bytes::Bytes::new(),
    });
    let mut wire = bytes::BytesMut::new();
    rsocket_proto::codec::put_prefixed(&mut wire, &rsocket_proto::OutFrame::from_owned(setup))
        .unwrap();
    wire.to_vec()
}

/// Sends `setup` on a new connection from the loopback address `local`
/// and returns all the broker wrote back before it closed (its ERROR
/// frame, for a refused SETUP).
fn setup_from(
    rt: &tokio::runtime::Runtime,
    local: std::net::IpAddr,
    broker: std::net::SocketAddr,
    setup: &[u8],
) -> String {
    use std::io::{Read, Write};
    let stream = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind((local, 0).into()).unwrap();
        s.connect(broker).await.unwrap()
    });
    let mut s = stream.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(setup).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// A peer flooding the broker with forged tokens (each signature check
/// costs the shard tens of µs) has its first few checked and refused, and
/// the rest refused unchecked, even a good token from its address; an app
/// on another address is let in with a token the broker never saw, and
/// calls kept flowing throughout.
#[test]
fn forged_tokens_from_one_address_are_refused_unchecked_and_spare_the_others() {
    const THREADS: usize = 4;
    const EACH: usize = 60;
    let attacker: std::net::IpAddr = [127, 0, 0, 2].into();
    let dir = temp_dir("auth-flood");
    let (config, keys) = jwt_config(&dir.0);
    let broker = TestBroker::with_config(config);
    let addr = broker.addr();
    let admin = broker.admin_addr().unwrap();
    let keys = Arc::new(keys);
    let mut forged = keys.token("caller").into_bytes();
    let at = forged.len() - 5;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();

    let attacking = Arc::new(AtomicUsize::new(THREADS));
    let started = std::time::Instant::now();
    let attackers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (forged, attacking) = (forged.clone(), attacking.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let answers: Vec<String> = (0..EACH)
                    .map(|i| {
                        let setup = raw_setup(&format!("forger-{t}-{i}"), &forged);
                        setup_from(&rt, attacker, addr, &setup)
                    })
                    .collect();
                attacking.fetch_sub(1, Ordering::SeqCst);
                answers
            })
        })
        .collect();
    let (k, flag) = (keys.clone(), attacking.clone());
    let (calls, errors) = run(move || async move {
        // Tokens the broker has not seen, from 127.0.0.1.
        let (_echo, caller, _) = echo_and_caller(addr, &k).await;
        let (mut calls, mut errors) = (0, Vec::new());
        while calls < 20 || flag.load(Ordering::SeqCst) > 0 {
            match call(&caller, "com.example.Echo.hello").await {
                Ok(_) => calls += 1,
                Err(e) => errors.push(e),
            }
        }
        (calls, errors)
    });
    let answers: Vec<String> = attackers
        .into_iter()
        .flat_map(|a| a.join().unwrap())
        .collect();
    let elapsed = started.elapsed();
    assert!(
        errors.is_empty(),
        "calls during the flood failed: {errors:?}"
    );
    assert!(calls >= 20, "{calls}");

    let checked = answers
        .iter()
        .filter(|a| a.contains("authentication failed: the token's signature"))
        .count();
    let unchecked = answers
        .iter()
        .filter(|a| {
            a.contains(
                "too many failed authentications from 127.0.0.2 (more than 10 in a row, \
                 then 30 a minute); this SETUP's credentials were not checked",
            )
        })
        .count();
    assert_eq!(
        checked + unchecked,
        THREADS * EACH,
        "every forged SETUP is refused, one way or the other: {:?}",
        answers
            .iter()
            .find(|a| !a.contains("authentication"))
            .map(String::as_str)
    );
    // Each of the two shards checks 10, then one every 2 s.
    let allowed = 2 * (10 + 1 + elapsed.as_secs() as usize / 2);
    assert!(
        (1..=allowed).contains(&checked),
        "{checked} forged tokens checked in {elapsed:?}, {allowed} allowed"
    );
    // The address is refused, not the token: a good one from it is not
    // checked either, while one from elsewhere is.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let good = raw_setup("newcomer", &keys.token("newcomer"));
    let answer = setup_from(&rt, attacker, addr, &good);
    assert!(answer.contains("were not checked"), "{answer}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(admin, "rsbroker_setups_throttled"),
        unchecked as u64 + 1
    );
    assert_eq!(
        metric(admin, "rsbroker_setups_refused"),
        (THREADS * EACH) as u64 + 1
    );
}
