//! Trust in the simulation: credentials at SETUP, what identities may
//! publish and call, reloads and expiring tokens.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsbroker_core::trust::{Grant, IdentityRules, Jwt, JwtRules, Trust};
use rsocket_proto::metadata::put_bearer;
use serde_json::{Value, json};

use super::*;
use rsbroker_core::ServiceKey;

const SECRET: &[u8] = b"a secret of the simulation, 32+ bytes long";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

fn token_for(sub: &str) -> String {
    token(json!({"sub": sub, "exp": unix_now() + 600}))
}

/// Only identities with a token; `orders` may publish `orders.*` and call
/// `stock.*`, `stock` may publish `stock.*` and call nothing; anyone else
/// may do everything.
fn trust() -> Trust {
    let mut jwt = Jwt::new(JwtRules::default());
    jwt.add_secret(SECRET).unwrap();
    let mut t = Trust {
        allow_anonymous: false,
        jwt: Some(jwt),
        leeway: 0,
        ..Trust::default()
    };
    t.identities.insert(
        "orders".into(),
        IdentityRules {
            grant: Some(Grant::new(["orders.*"], ["stock.*"])),
            roles: Vec::new(),
        },
    );
    t.identities.insert(
        "stock".into(),
        IdentityRules {
            grant: Some(Grant::new(vec!["stock.*"], vec![])),
            roles: Vec::new(),
        },
    );
    t
}

fn set_trust(sim: &mut Sim, trust: Trust) {
    let trust = Arc::new(trust);
    for i in 0..sim.shards.len() {
        let s = &mut sim.shards[i];
        let mut c = s.config().clone();
        c.trust = trust.clone();
        s.set_config(c);
        sim.collect_outboxes(i);
    }
}

/// SETUP metadata: the app (when `uuid` is not empty), its services and a
/// bearer token.
fn metadata_with_token(uuid: &str, services: &[&str], token: &str) -> Bytes {
    let mut auth = Vec::new();
    put_bearer(&mut auth, token);
    let mut b =
        CompositeBuilder::new().entry(MimeType::WellKnown(WellKnownMime::AUTHENTICATION), &auth);
    if !uuid.is_empty() {
        let app = format!(r#"{{"name":"app-{uuid}","uuid":"{uuid}"}}"#);
        let published: Vec<String> = services
            .iter()
            .map(|s| format!(r#"{{"service":"{s}"}}"#))
            .collect();
        let registry = format!(r#"{{"published":[{}]}}"#, published.join(","));
        b = b
            .entry(
                MimeType::WellKnown(WellKnownMime::APPLICATION),
                app.as_bytes(),
            )
            .entry(
                MimeType::WellKnown(WellKnownMime::SERVICE_REGISTRY),
                registry.as_bytes(),
            );
    }
    b.build().unwrap()
}

fn connect_as(sim: &mut Sim, shard: u16, uuid: &str, services: &[&str], token: &str) -> usize {
    let md = metadata_with_token(uuid, services, token);
    let config = Config {
        reassemble: true,
        ..Config::default()
    };
    sim.connect_with(shard, uuid, Some(md), config)
}

fn refusal(sim: &Sim, app: usize) -> String {
    let closed = sim.apps[app]
        .closed
        .clone()
        .unwrap_or_else(|| panic!("app {app} was let in"));
    assert_eq!(closed.code, ErrorCode::REJECTED_SETUP, "{closed:?}");
    closed.message.to_string()
}

fn nowhere(sim: &Sim, uuid: &str) {
    for s in &sim.shards {
        assert!(
            s.routes().instance(uuid).is_none(),
            "shard {} routes to {uuid}, which it refused",
            s.id()
        );
    }
}

fn call(sim: &mut Sim, app: usize, tags: &[&str], kind: RequestKind) -> Outcome {
    let id = sim.request(app, kind, tags, "x");
    sim.run(10_000);
    sim.apps[app].outcomes[&id].clone()
}

fn rejected_naming(outcome: &Outcome, what: &str) {
    assert_eq!(outcome.done, Some(Err(ErrorCode::REJECTED)), "{outcome:?}");
    let message = String::from_utf8_lossy(outcome.error.as_deref().unwrap_or_default());
    assert!(message.contains(what), "{message}");
}

#[test]
fn setups_without_good_credentials_are_refused_and_register_nothing() {
    let mut sim = Sim::new(2, 40, Policies::default());
    set_trust(&mut sim, trust());
    let now = unix_now();
    let good = sim.connect_with(
        0,
        "good",
        Some(metadata_with_token("good", &["svc"], &token_for("someone"))),
        Config::default(),
    );
    let cases = [
        (
            "expired",
            token(json!({"sub": "x", "exp": now - 5})),
            "expired",
        ),
        (
            "early",
            token(json!({"sub": "x", "exp": now + 600, "nbf": now + 60})),
            "not valid yet",
        ),
        ("no-exp", token(json!({"sub": "x"})), "exp"),
        (
            "wrong-key",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &json!({"sub": "x", "exp": now + 600}),
                &EncodingKey::from_secret(b"not the broker's secret, just as long").unwrap(),
            )
            .unwrap(),
            "signature",
        ),
        ("garbage", "not.a.jwt".to_owned(), "malformed"),
        ("huge", "a".repeat(9000), "more than the limit"),
    ];
    let apps: Vec<(usize, &str)> = cases
        .iter()
        .enumerate()
        .map(|(i, (uuid, token, why))| {
            let shard = (i % 2) as u16;
            (connect_as(&mut sim, shard, uuid, &["svc"], token), *why)
        })
        .collect();
    let missing = sim.connect(1, "bare", &["svc"], 0);
    sim.run(10_000);
    for (app, why) in apps {
        let message = refusal(&sim, app);
        assert!(message.contains(why), "{why}: {message}");
        nowhere(&sim, &sim.apps[app].uuid.clone());
    }
    assert!(refusal(&sim, missing).contains("requires authentication"));
    nowhere(&sim, "bare");
    assert!(sim.apps[good].closed.is_none());
    for s in &sim.shards {
        assert!(s.routes().instance("good").is_some());
    }
    let refused: u64 = sim.shards.iter().map(|s| s.stats().setups_refused).sum();
    assert_eq!(refused, 7);
}

#[test]
fn identities_publish_and_call_only_what_they_are_granted() {
    let mut sim = Sim::new(2, 41, Policies::default());
    set_trust(&mut sim, trust());
    let stock = connect_as(
        &mut sim,
        1,
        "stock-1",
        &["stock.Level"],
        &token_for("stock"),
    );
    let orders = connect_as(
        &mut sim,
        0,
        "orders-1",
        &["orders.Place"],
        &token_for("orders"),
    );
    let squatter = connect_as(
        &mut sim,
        1,
        "orders-2",
        &["stock.Level"],
        &token_for("orders"),
    );
    sim.run(10_000);
    assert!(sim.apps[stock].closed.is_none());
    assert!(sim.apps[orders].closed.is_none());
    let message = refusal(&sim, squatter);
    assert!(
        message.contains("orders may not publish service stock.Level"),
        "{message}"
    );
    nowhere(&sim, "orders-2");

    // orders calls stock, not itself; stock calls nothing.
    let ok = call(
        &mut sim,
        orders,
        &["stock.Level"],
        RequestKind::RequestResponse,
    );
    assert_eq!(ok.items, [Bytes::from_static(b"stock-1:x")]);
    rejected_naming(
        &call(
            &mut sim,
            orders,
            &["orders.Place"],
            RequestKind::RequestResponse,
        ),
        "orders may not call service orders.Place",
    );
    rejected_naming(
        &call(
            &mut sim,
            stock,
            &["orders.Place", "e=orders-1"],
            RequestKind::RequestResponse,
        ),
        "stock may not call service orders.Place",
    );
    let stream = call(
        &mut sim,
        stock,
        &["orders.Place"],
        RequestKind::Stream { initial_n: 5 },
    );
    rejected_naming(&stream, "may not call");
    call(
        &mut sim,
        stock,
        &["orders.Place", "broadcast=1"],
        RequestKind::FireAndForget,
    );
    assert_eq!(sim.apps[orders].fnf, 0, "a broadcast it may not send");
    call(
        &mut sim,
        orders,
        &["stock.Level", "broadcast=1"],
        RequestKind::FireAndForget,
    );
    assert_eq!(sim.apps[stock].fnf, 1, "a broadcast it may send");

    // Exposing a service later obeys the same grant.
    sim.apps[orders]
        .conn
        .send_metadata_push(Bytes::from_static(
            br#"{"type":"com.alibaba.rsocket.events.ServicesExposedEvent","data":{"services":[{"service":"stock.Fake"},{"service":"orders.Cancel"}]}}"#,
        ))
        .unwrap();
    sim.run(10_000);
    for s in &sim.shards {
        let services = &s.routes().instance("orders-1").unwrap().services;
        assert!(services.contains(&ServiceKey::new("", "orders.Cancel", "")));
        assert!(!services.contains(&ServiceKey::new("", "stock.Fake", "")));
    }
    let refused: u64 = sim.shards.iter().map(|s| s.stats().publishes_refused).sum();
    assert_eq!(refused, 1, "stock.Fake");
    let denied: u64 = sim.shards.iter().map(|s| s.stats().requests_denied).sum();
    assert_eq!(denied, 4);
    sim.assert_clean();
}

#[test]
fn an_instance_cannot_be_joined_by_another_identity() {
    let mut sim = Sim::new(2, 42, Policies::default());
    let mut t = trust();
    t.authenticated = Grant::all();
    set_trust(&mut sim, t);
    let owner = connect_as(&mut sim, 0, "shared", &["stock.Level"], &token_for("stock"));
    sim.run(10_000);
    let thief = connect_as(&mut sim, 1, "shared", &[], &token_for("mallory"));
    let twin = connect_as(&mut sim, 1, "shared", &[], &token_for("stock"));
    sim.run(10_000);
    assert!(sim.apps[owner].closed.is_none());
    let message = refusal(&sim, thief);
    assert!(
        message.contains("instance shared belongs to identity stock, not mallory"),
        "{message}"
    );
    assert!(sim.apps[twin].closed.is_none(), "its own second connection");
    for s in &sim.shards {
        assert_eq!(s.routes().instance("shared").unwrap().conns.len(), 2);
    }
}

#[test]
fn a_reload_takes_permissions_away_from_open_connections_at_once() {
    let mut sim = Sim::new(2, 43, Policies::default());
    set_trust(&mut sim, trust());
    let stock = connect_as(
        &mut sim,
        1,
        "stock-1",
        &["stock.Level"],
        &token_for("stock"),
    );
    let orders = connect_as(
        &mut sim,
        0,
        "orders-1",
        &["orders.Place"],
        &token_for("orders"),
    );
    sim.run(10_000);
    let ok = call(
        &mut sim,
        orders,
        &["stock.Level"],
        RequestKind::RequestResponse,
    );
    assert_eq!(ok.done, Some(Ok(())));

    // orders may no longer call stock.*.
    let mut t = trust();
    t.identities.insert(
        "orders".into(),
        IdentityRules {
            grant: Some(Grant::new(["orders.*"], ["billing.*"])),
            roles: Vec::new(),
        },
    );
    set_trust(&mut sim, t);
    sim.run(10_000);
    rejected_naming(
        &call(
            &mut sim,
            orders,
            &["stock.Level"],
            RequestKind::RequestResponse,
        ),
        "orders may not call service stock.Level",
    );
    // stock may no longer publish stock.*, and may call orders.*.
    let mut t = trust();
    t.identities.insert(
        "stock".into(),
        IdentityRules {
            grant: Some(Grant::new(vec!["other.*"], vec!["orders.*"])),
            roles: Vec::new(),
        },
    );
    set_trust(&mut sim, t);
    sim.run(10_000);
    for s in &sim.shards {
        assert!(
            s.routes().instance("stock-1").unwrap().services.is_empty(),
            "shard {} still routes stock.Level",
            s.id()
        );
    }
    // What was granted works at once, over the same connections.
    let now_ok = call(
        &mut sim,
        stock,
        &["orders.Place"],
        RequestKind::RequestResponse,
    );
    assert_eq!(now_ok.items, [Bytes::from_static(b"orders-1:x")]);
    assert!(sim.apps[orders].closed.is_none() && sim.apps[stock].closed.is_none());
    sim.assert_clean();
}

#[test]
fn a_connection_ends_when_its_token_expires() {
    let mut sim = Sim::new(1, 44, Policies::default());
    set_trust(&mut sim, trust());
    let short = connect_as(
        &mut sim,
        0,
        "short",
        &["svc"],
        &token(json!({"sub": "short", "exp": unix_now() + 2})),
    );
    let long = connect_as(&mut sim, 0, "long", &["svc"], &token_for("long"));
    sim.run(10_000);
    assert!(sim.apps[short].closed.is_none());
    let due = sim.shards[0].poll_timeout().unwrap();
    assert!(
        due <= sim.now + Duration::from_secs(3),
        "the expiry is a deadline"
    );
    sim.now += Duration::from_secs(3);
    let now = sim.now;
    sim.shards[0].handle_timeout(now);
    sim.run(10_000);
    let closed = sim.apps[short]
        .closed
        .clone()
        .expect("closed at its expiry");
    assert_eq!(closed.code, ErrorCode::CONNECTION_ERROR);
    assert!(closed.message.contains("short expired"), "{closed:?}");
    assert!(sim.apps[long].closed.is_none());
    nowhere(&sim, "short");
    assert_eq!(sim.shards[0].stats().credentials_expired, 1);
}

#[test]
fn a_verified_certificate_is_the_identity_only_of_its_own_connection() {
    let mut sim = Sim::new(1, 45, Policies::default());
    let mut t = trust();
    t.certificate_identity = true;
    set_trust(&mut sim, t);
    let with_cert = sim.connect(0, "stock-9", &["stock.Level"], 0);
    let broker = sim.apps[with_cert].broker;
    sim.shards[0].set_peer(
        broker,
        rsbroker_core::Peer {
            addr: Some(([127, 0, 0, 1], 4000).into()),
            certificate: Some("stock".into()),
        },
    );
    let without = sim.connect(0, "stock-10", &["stock.Level"], 0);
    sim.run(10_000);
    assert!(
        sim.apps[with_cert].closed.is_none(),
        "the certificate proved stock"
    );
    assert!(refusal(&sim, without).contains("requires authentication"));
    let owner = sim.shards[0].routes().instance("stock-9").unwrap();
    assert_eq!(owner.app.identity.as_deref(), Some("stock"));
}
