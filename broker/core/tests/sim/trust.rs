//! Trust in the simulation: credentials at SETUP, what identities may
//! publish and call, reloads and expiring tokens.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsbroker_core::trust::{AppLimits, Grant, IdentityRules, Jwt, JwtRules, Limit, Trust};
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
            limits: Default::default(),
        },
    );
    t.identities.insert(
        "stock".into(),
        IdentityRules {
            grant: Some(Grant::new(vec!["stock.*"], vec![])),
            roles: Vec::new(),
            limits: Default::default(),
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
            limits: Default::default(),
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
            limits: Default::default(),
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

/// `trust()` with `limits` for the identity `orders`.
fn trust_limiting_orders(limits: AppLimits) -> Trust {
    let mut t = trust();
    if let Some(rules) = t.identities.get_mut("orders") {
        rules.limits = limits;
    }
    t
}

fn usage_of(sim: &Sim, name: &str) -> Arc<rsbroker_core::trust::AppUsage> {
    sim.shards[0].config().usage.of(&name.into())
}

#[test]
fn an_identitys_connections_are_limited_across_shards() {
    let mut sim = Sim::new(2, 46, Policies::default());
    set_trust(
        &mut sim,
        trust_limiting_orders(AppLimits {
            max_connections: Some(2),
            ..AppLimits::default()
        }),
    );
    let first = connect_as(&mut sim, 0, "orders-1", &["orders.A"], &token_for("orders"));
    let second = connect_as(&mut sim, 1, "orders-2", &["orders.A"], &token_for("orders"));
    sim.run(10_000);
    let third = connect_as(&mut sim, 0, "orders-3", &["orders.A"], &token_for("orders"));
    let fourth = connect_as(&mut sim, 1, "orders-4", &["orders.A"], &token_for("orders"));
    // Another identity is not held back by orders' limit.
    let stock: Vec<usize> = (0..3)
        .map(|i| {
            connect_as(
                &mut sim,
                i % 2,
                &format!("stock-{i}"),
                &["stock.S"],
                &token_for("stock"),
            )
        })
        .collect();
    sim.run(10_000);
    for app in [third, fourth] {
        let message = refusal(&sim, app);
        assert!(
            message.contains("identity orders already has 2 connections open"),
            "{message}"
        );
    }
    nowhere(&sim, "orders-3");
    nowhere(&sim, "orders-4");
    for app in [first, second].into_iter().chain(stock) {
        assert!(sim.apps[app].closed.is_none(), "app {app} was refused");
    }
    let limited: u64 = sim.shards.iter().map(|s| s.stats().setups_limited).sum();
    let refused: u64 = sim.shards.iter().map(|s| s.stats().setups_refused).sum();
    assert_eq!((limited, refused), (2, 2));
    let orders = usage_of(&sim, "orders");
    assert_eq!(orders.connections(), 2);
    assert_eq!(orders.limited(Limit::Connections), 2);
    assert_eq!(usage_of(&sim, "stock").connections(), 3);

    // A connection that closes gives its place back.
    sim.disconnect(first);
    sim.run(10_000);
    assert_eq!(orders.connections(), 1);
    let again = connect_as(&mut sim, 1, "orders-5", &["orders.A"], &token_for("orders"));
    sim.run(10_000);
    assert!(sim.apps[again].closed.is_none());
    assert_eq!(orders.connections(), 2);
}

#[test]
fn an_identitys_open_streams_are_limited_and_given_back() {
    let mut sim = Sim::new(2, 47, Policies::default());
    set_trust(
        &mut sim,
        trust_limiting_orders(AppLimits {
            max_streams: Some(2),
            ..AppLimits::default()
        }),
    );
    let stock = connect_as(&mut sim, 1, "stock-1", &["stock.S"], &token_for("stock"));
    // Requests are not answered; streams are not completed.
    sim.apps[stock].answer = Answer::Never;
    sim.apps[stock].items = 1_000_000;
    let orders_a = connect_as(&mut sim, 0, "orders-1", &[], &token_for("orders"));
    let orders_b = connect_as(&mut sim, 1, "orders-2", &[], &token_for("orders"));
    let other = connect_as(&mut sim, 0, "other", &[], &token_for("someone"));
    sim.run(10_000);
    // Two streams open, on two connections of orders on two shards.
    let a = sim.request(orders_a, RequestKind::RequestResponse, &["stock.S"], "x");
    sim.run(10_000);
    let b = sim.request(
        orders_b,
        RequestKind::Stream { initial_n: 4 },
        &["stock.S"],
        "x",
    );
    sim.run(10_000);
    assert_eq!(usage_of(&sim, "orders").streams(), 2);
    for app in [orders_a, orders_b] {
        rejected_naming(
            &call(&mut sim, app, &["stock.S"], RequestKind::RequestResponse),
            "identity orders is over its limit of 2 streams open",
        );
    }
    // A fire-and-forget opens no stream; another identity is not limited.
    let fnf = call(&mut sim, orders_a, &["stock.S"], RequestKind::FireAndForget);
    assert_ne!(fnf.done, Some(Err(ErrorCode::REJECTED)), "{fnf:?}");
    let ids: Vec<u32> = (0..5)
        .map(|_| sim.request(other, RequestKind::RequestResponse, &["stock.S"], "x"))
        .collect();
    sim.run(10_000);
    for id in ids {
        assert_eq!(sim.apps[other].outcomes[&id].done, None, "still open");
    }
    assert!(sim.apps[orders_a].outcomes[&a].done.is_none());
    assert!(sim.apps[orders_b].outcomes[&b].done.is_none());
    let limited: u64 = sim.shards.iter().map(|s| s.stats().requests_limited).sum();
    assert_eq!(limited, 2);
    assert_eq!(usage_of(&sim, "orders").limited(Limit::Streams), 2);

    // The responder goes: the streams end, and their places come back.
    sim.disconnect(stock);
    sim.run(10_000);
    let stock = connect_as(&mut sim, 1, "stock-2", &["stock.S"], &token_for("stock"));
    sim.run(10_000);
    let ok = call(
        &mut sim,
        orders_a,
        &["stock.S"],
        RequestKind::RequestResponse,
    );
    assert_eq!(ok.done, Some(Ok(())), "{ok:?}");
    // The connection that made no request since is counted again within a
    // second.
    for s in &mut sim.shards {
        s.let_go_of_bursts();
    }
    assert_eq!(usage_of(&sim, "orders").streams(), 0);
    assert!(sim.apps[stock].closed.is_none());
}

#[test]
fn an_identitys_request_rate_is_limited_with_its_burst() {
    let mut sim = Sim::new(2, 48, Policies::default());
    set_trust(
        &mut sim,
        trust_limiting_orders(AppLimits {
            requests_per_second: Some(10),
            burst: Some(3),
            ..AppLimits::default()
        }),
    );
    let _stock = connect_as(&mut sim, 1, "stock-1", &["stock.S"], &token_for("stock"));
    let orders_a = connect_as(&mut sim, 0, "orders-1", &[], &token_for("orders"));
    let orders_b = connect_as(&mut sim, 1, "orders-2", &[], &token_for("orders"));
    let other = connect_as(&mut sim, 0, "other", &[], &token_for("someone"));
    sim.run(10_000);
    let burst = |sim: &mut Sim, app: usize, n: usize| -> Vec<u32> {
        let ids: Vec<u32> = (0..n)
            .map(|_| sim.request(app, RequestKind::RequestResponse, &["stock.S"], "x"))
            .collect();
        sim.run(10_000);
        ids
    };
    let answered = |sim: &Sim, app: usize, ids: &[u32]| -> usize {
        ids.iter()
            .filter(|id| sim.apps[app].outcomes[id].done == Some(Ok(())))
            .count()
    };
    // The bucket is shared by both connections of orders, on two shards.
    let a = burst(&mut sim, orders_a, 2);
    let b = burst(&mut sim, orders_b, 3);
    assert_eq!(
        answered(&sim, orders_a, &a) + answered(&sim, orders_b, &b),
        3
    );
    let refused = b
        .iter()
        .find(|id| sim.apps[orders_b].outcomes[id].done != Some(Ok(())))
        .unwrap();
    rejected_naming(
        &sim.apps[orders_b].outcomes[refused],
        "identity orders is over its limit of 10 requests a second",
    );
    // Others are not held back.
    let o = burst(&mut sim, other, 20);
    assert_eq!(answered(&sim, other, &o), 20);
    // A tenth of a second later, one more.
    sim.now += Duration::from_millis(100);
    let c = burst(&mut sim, orders_a, 2);
    assert_eq!(answered(&sim, orders_a, &c), 1);
    assert_eq!(usage_of(&sim, "orders").limited(Limit::Rate), 3);

    // A reload that lifts the limit applies to the open connections.
    set_trust(&mut sim, trust());
    let d = burst(&mut sim, orders_a, 10);
    assert_eq!(answered(&sim, orders_a, &d), 10);
    sim.assert_clean();
}

#[test]
fn streams_are_counted_exactly_through_refusals_waits_and_closes() {
    use rsocket_proto::frame::{Frame, RequestStream};
    let mut sim = Sim::new(2, 49, Policies::default());
    set_trust(
        &mut sim,
        trust_limiting_orders(AppLimits {
            max_streams: Some(5),
            requests_per_second: Some(10),
            burst: Some(2),
            ..AppLimits::default()
        }),
    );
    let stock = connect_as(&mut sim, 1, "stock-1", &["stock.S"], &token_for("stock"));
    sim.apps[stock].answer = Answer::Never;
    let orders = connect_as(&mut sim, 0, "orders-1", &[], &token_for("orders"));
    sim.run(10_000);
    let usage = usage_of(&sim, "orders");
    let sync = |sim: &mut Sim| {
        for s in &mut sim.shards {
            s.let_go_of_bursts();
        }
    };
    // Two open; the rate refuses a third, and a fire-and-forget: neither
    // is counted as open, then or at the next count.
    for _ in 0..2 {
        sim.request(orders, RequestKind::RequestResponse, &["stock.S"], "x");
    }
    sim.run(10_000);
    assert_eq!(usage.streams(), 2);
    rejected_naming(
        &call(&mut sim, orders, &["stock.S"], RequestKind::RequestResponse),
        "10 requests a second",
    );
    assert_eq!(usage.streams(), 2);
    call(&mut sim, orders, &["stock.S"], RequestKind::FireAndForget);
    assert_eq!(usage.streams(), 2);
    assert_eq!(usage.limited(Limit::Rate), 2);
    sync(&mut sim);
    assert_eq!(usage.streams(), 2);

    // A request still waiting for the rest of its route is open too.
    let conn = sim.apps[orders].broker;
    let md = rsocket_proto::metadata::build::route(&["stock.S"]).unwrap();
    let first = Frame::from(RequestStream {
        stream_id: 101,
        follows: true,
        initial_n: 1,
        metadata: Some(md.slice(..3)),
        data: Bytes::new(),
    });
    let now = sim.now;
    sim.shards[0].handle_frame(now, conn, first.to_bytes());
    assert_eq!(sim.shards[0].stream_maps(conn), Some((2, 0, 1)));
    sync(&mut sim);
    assert_eq!(usage.streams(), 3);

    // Its connection closes: every stream it had open is given back.
    sim.disconnect(orders);
    sim.run(10_000);
    assert_eq!(usage.streams(), 0);
    assert_eq!(usage.connections(), 0);
}

#[test]
fn a_shard_keeps_its_usage_registry_when_its_config_is_replaced() {
    let mut sim = Sim::new(2, 50, Policies::default());
    let shared = sim.shards[0].config().usage.clone();
    assert!(Arc::ptr_eq(&shared, &sim.shards[1].config().usage));
    for (i, s) in sim.shards.iter_mut().enumerate() {
        // A config made afresh, with a registry of its own.
        let fresh = ShardConfig {
            trust: Arc::new(trust()),
            ..ShardConfig::new(i as u16, 2)
        };
        assert!(!Arc::ptr_eq(&fresh.usage, &shared));
        s.set_config(fresh);
        assert!(Arc::ptr_eq(&s.config().usage, &shared));
    }
}

/// An app on shard 0 whose SETUP, from `ip`, carries `token`.
fn connect_from(sim: &mut Sim, ip: [u8; 4], uuid: &str, token: &str) -> usize {
    let app = connect_as(sim, 0, uuid, &[], token);
    from_address(sim, app, ip)
}

/// `app`'s connection (on shard 0, its SETUP not yet read) comes from
/// `ip`; its SETUP is handled. Returns `app`.
fn from_address(sim: &mut Sim, app: usize, ip: [u8; 4]) -> usize {
    let broker = sim.apps[app].broker;
    sim.shards[0].set_peer(
        broker,
        rsbroker_core::Peer {
            addr: Some((ip, 4000).into()),
            certificate: None,
        },
    );
    sim.run(10_000);
    app
}

fn forged(sub: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": unix_now() + 600}),
        &EncodingKey::from_secret(b"not the broker's secret, just as long").unwrap(),
    )
    .unwrap()
}

fn trust_failing_after(per_address_burst: u32, per_shard_per_second: u32) -> Trust {
    let mut t = trust();
    t.failures = rsbroker_core::trust::FailureLimits {
        per_address_burst,
        per_address_per_minute: 60,
        per_shard_per_second,
    };
    t
}

#[test]
fn an_address_that_fails_too_often_is_refused_unchecked_and_others_are_not() {
    let mut sim = Sim::new(1, 46, Policies::default());
    set_trust(&mut sim, trust_failing_after(3, 100));
    let bad = [10, 0, 0, 1];
    for i in 0..3 {
        let app = connect_from(&mut sim, bad, &format!("forger-{i}"), &forged("orders"));
        let why = refusal(&sim, app);
        assert!(why.starts_with("authentication failed: "), "{why}");
    }
    assert_eq!(sim.shards[0].stats().setups_throttled, 0);
    // Its next SETUP is refused before its token is looked at, even a
    // good one.
    let good = token_for("orders");
    let app = connect_from(&mut sim, bad, "forger-3", &good);
    let why = refusal(&sim, app);
    assert!(
        why.contains("too many failed authentications from 10.0.0.1 (more than 3 in a row"),
        "{why}"
    );
    nowhere(&sim, "forger-3");
    let stats = sim.shards[0].stats();
    assert_eq!((stats.setups_throttled, stats.setups_refused), (1, 4));
    // Another address is checked, and let in.
    let other = connect_from(&mut sim, [10, 0, 0, 2], "orders-1", &good);
    assert!(
        sim.apps[other].closed.is_none(),
        "{:?}",
        sim.apps[other].closed
    );
    // A token the shard verified before costs nothing to check: it is let
    // in from the refused address too.
    let cached = connect_from(&mut sim, bad, "orders-2", &good);
    assert!(
        sim.apps[cached].closed.is_none(),
        "{:?}",
        sim.apps[cached].closed
    );
    let fresh = token_for("stock");
    let app = connect_from(&mut sim, bad, "stock-1", &fresh);
    assert!(refusal(&sim, app).contains("not checked"));
    // A second later the address has one more try.
    sim.now += Duration::from_secs(1);
    let app = connect_from(&mut sim, bad, "stock-2", &fresh);
    assert!(sim.apps[app].closed.is_none(), "{:?}", sim.apps[app].closed);
    assert_eq!(sim.shards[0].stats().setups_throttled, 2);
}

#[test]
fn a_shard_checks_only_so_many_failing_setups_a_second_from_every_address() {
    let mut sim = Sim::new(1, 47, Policies::default());
    set_trust(&mut sim, trust_failing_after(10, 5));
    let good = token_for("orders");
    let first = connect_from(&mut sim, [10, 1, 0, 0], "orders-1", &good);
    assert!(sim.apps[first].closed.is_none());
    // Five addresses fail once each: the shard's budget for a second.
    for i in 0..5u8 {
        let app = connect_from(
            &mut sim,
            [10, 0, 0, i],
            &format!("forger-{i}"),
            &forged("x"),
        );
        assert!(refusal(&sim, app).starts_with("authentication failed: "));
    }
    let fresh = token_for("stock");
    let app = connect_from(&mut sim, [10, 2, 0, 0], "stock-1", &fresh);
    let why = refusal(&sim, app);
    assert!(
        why.contains("too many failed authentications on this shard (more than 5 a second)"),
        "{why}"
    );
    // A SETUP without credentials has nothing to check: it is refused for
    // what it is, not held back, and is not a failure counted.
    let bare = sim.connect(0, "bare", &[], 0);
    from_address(&mut sim, bare, [10, 3, 0, 0]);
    assert!(refusal(&sim, bare).contains("requires authentication"));
    // A verified token still gets in, and so does the fresh one once the
    // budget has refilled.
    let again = connect_from(&mut sim, [10, 1, 0, 0], "orders-2", &good);
    assert!(
        sim.apps[again].closed.is_none(),
        "{:?}",
        sim.apps[again].closed
    );
    sim.now += Duration::from_millis(200);
    let app = connect_from(&mut sim, [10, 2, 0, 0], "stock-2", &fresh);
    assert!(sim.apps[app].closed.is_none(), "{:?}", sim.apps[app].closed);
    assert_eq!(sim.shards[0].stats().setups_throttled, 1);
}

#[test]
fn a_flood_of_refused_setups_is_logged_so_many_a_second_and_counted() {
    let mut sim = Sim::new(1, 48, Policies::default());
    set_trust(&mut sim, trust_failing_after(3, 100));
    let n = rsbroker_core::trust::failures::LOGGED_PER_SECOND as usize + 5;
    for i in 0..n {
        let app = sim.connect(0, "", &[], 0);
        sim.run(10_000);
        let why = refusal(&sim, app);
        assert!(why.contains("requires authentication"), "{i}: {why}");
    }
    let stats = sim.shards[0].stats();
    assert_eq!(
        (
            stats.setups_refused,
            stats.refusals_unlogged,
            stats.setups_throttled
        ),
        (n as u64, 5, 0)
    );
    // Those refused unchecked have their own count.
    for i in 0..5 {
        let app = connect_from(&mut sim, [10, 0, 0, 1], &format!("f-{i}"), &forged("x"));
        assert!(sim.apps[app].closed.is_some());
    }
    let stats = sim.shards[0].stats();
    assert_eq!((stats.refusals_unlogged, stats.setups_throttled), (8, 2));
}

#[test]
fn malformed_authentication_metadata_is_a_failure_counted_against_its_address() {
    let mut sim = Sim::new(1, 49, Policies::default());
    set_trust(&mut sim, trust_failing_after(3, 100));
    // Simple authentication whose user name runs past the entry.
    let md = CompositeBuilder::new()
        .entry(
            MimeType::WellKnown(WellKnownMime::AUTHENTICATION),
            b"\x00\xff\x01",
        )
        .build()
        .unwrap();
    for i in 0..3 {
        let app = sim.connect_with(0, "", Some(md.clone()), Config::default());
        from_address(&mut sim, app, [10, 0, 0, 9]);
        let why = refusal(&sim, app);
        assert!(why.contains("malformed"), "{i}: {why}");
    }
    let app = connect_from(&mut sim, [10, 0, 0, 9], "orders-1", &token_for("orders"));
    let why = refusal(&sim, app);
    assert!(why.contains("from 10.0.0.9"), "{why}");
    assert_eq!(sim.shards[0].stats().setups_throttled, 1);
}
