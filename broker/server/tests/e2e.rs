//! Loopback end-to-end tests: a broker with two shards, apps built on
//! rsbroker-client, each app on its own glommio executor. Where it matters,
//! the requester is connected until it lands on the other shard than the
//! responder, so requests cross shards.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rsbroker::BrokerHandle;
use rsbroker_client::metadata::route;
use rsbroker_client::{AppConfig, Client, ClientConfig, ClientError, Payload};
use rsbroker_core::{Balancer, Failover, ServicePolicy};
use rsocket_proto::ErrorCode;

use common::*;

#[test]
fn all_four_models_across_shards() {
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let app = App::start(addr, "echo-1", "com.example.Echo", 1, Duration::ZERO);
    wait_for_instances(&broker, 1);
    let responder_shard = shard_of(&broker, app.local);
    let results = on_other_shard(&broker, responder_shard, |client| async move {
        let rr = client
            .request_response(Payload::new(route(&["com.example.Echo.hello"]), "hi"))
            .await;
        client
            .fire_and_forget(Payload::new(route(&["com.example.Echo.log"]), "note"))
            .unwrap();
        let mut sub = client
            .request_stream(Payload::new(route(&["com.example.Echo.count"]), "5"), 10)
            .unwrap();
        let mut items = Vec::new();
        while let Some(item) = sub.next().await {
            items.push(String::from_utf8(item.unwrap().data.to_vec()).unwrap());
        }
        let (sink, mut inbound) = client
            .request_channel(Payload::new(route(&["com.example.Echo.chat"]), "c0"), 10)
            .unwrap();
        let mut echoed = Vec::new();
        echoed.push(inbound.next().await.unwrap().unwrap().data);
        for i in 1..4 {
            sink.send(Payload::data(format!("c{i}"))).await.unwrap();
            echoed.push(inbound.next().await.unwrap().unwrap().data);
        }
        sink.complete().unwrap();
        assert!(
            inbound.next().await.is_none(),
            "the channel completes after the requester does"
        );
        glommio::timer::sleep(Duration::from_millis(50)).await;
        (rr.unwrap().data, items, echoed, client.open_streams())
    });
    assert_eq!(results.0, "echo-1:hi");
    assert_eq!(results.1, ["0", "1", "2", "3", "4"]);
    assert_eq!(
        results.2,
        ["c0", "c1", "c2", "c3"].map(|s| Bytes::from_static(s.as_bytes()))
    );
    assert_eq!(results.3, 0, "no stream left open at the requester");
    assert!(app.logs().contains(&"fnf echo-1 note".to_owned()));
}

#[test]
fn request_n_is_honoured_end_to_end() {
    let broker = TestBroker::start(&[]);
    let app = App::start(broker.addr(), "s-1", "svc", 1, Duration::ZERO);
    wait_for_instances(&broker, 1);
    let shard = shard_of(&broker, app.local);
    let windows = on_other_shard(&broker, shard, |client| async move {
        let mut sub = client
            .request_stream(Payload::new(route(&["svc"]), "100"), 1)
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..5 {
            let item = sub.next().await.unwrap().unwrap();
            // Nothing more arrives until asked for: wait, then look.
            glommio::timer::sleep(Duration::from_millis(100)).await;
            let extra = futures_lite::future::poll_once(sub.next()).await;
            seen.push((item.data, extra.is_some()));
            sub.request(1).unwrap();
        }
        seen
    });
    for (i, (data, extra)) in windows.iter().enumerate() {
        assert_eq!(data, &Bytes::from(i.to_string()));
        assert!(!extra, "window {i}: an item arrived that was not requested");
    }
    // Dropping the subscription cancelled the stream at the responder.
    assert!(
        app.logs()
            .iter()
            .any(|l| l.starts_with("stream cancelled after"))
    );
}

#[test]
fn responder_killed_mid_stream_ends_the_stream_with_an_error() {
    let broker = TestBroker::start(&[]);
    let mut app = App::start(broker.addr(), "doomed", "svc", 1, Duration::ZERO);
    wait_for_instances(&broker, 1);
    let shard = shard_of(&broker, app.local);
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        started_rx.recv().unwrap();
        app.kill();
    });
    let outcome = on_other_shard(&broker, shard, move |client| async move {
        let mut sub = client
            .request_stream(Payload::new(route(&["svc"]), "1000000"), 2)
            .unwrap();
        let first = sub.next().await.unwrap().unwrap();
        started_tx.send(()).unwrap();
        let end = sub.next().await;
        let end = match end {
            Some(Ok(_)) => sub.next().await,
            other => other,
        };
        (first.data, end)
    });
    killer.join().unwrap();
    assert_eq!(outcome.0, "0");
    let Some(Err(ClientError::Remote { code, message })) = outcome.1 else {
        panic!("{:?}", outcome.1)
    };
    assert_eq!(code, ErrorCode::CANCELED);
    assert!(
        message.contains("doomed") && message.contains("disconnected"),
        "{message}"
    );
    // The route is gone on every shard.
    wait_for_instances(&broker, 0);
}

#[test]
fn no_instance_is_rejected_with_the_service_named() {
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let err = run(move || async move {
        let client = Client::connect(addr).await.unwrap();
        client
            .request_response(Payload::new(route(&["com.example.Missing.call"]), "x"))
            .await
            .unwrap_err()
    });
    let ClientError::Remote { code, message } = err else {
        panic!("{err:?}")
    };
    assert_eq!(code, ErrorCode::REJECTED);
    assert!(message.contains("com.example.Missing"), "{message}");
}

#[test]
fn broadcast_reaches_every_instance() {
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let apps: Vec<App> = (0..3)
        .map(|i| App::start(addr, &format!("b{i}"), "news", 1, Duration::ZERO))
        .collect();
    wait_for_instances(&broker, 3);
    run(move || async move {
        let client = Client::connect(addr).await.unwrap();
        client
            .fire_and_forget(Payload::new(route(&["news", "broadcast=1"]), "extra"))
            .unwrap();
        glommio::timer::sleep(Duration::from_millis(100)).await;
    });
    for (i, app) in apps.iter().enumerate() {
        assert_eq!(app.logs(), [format!("fnf b{i} extra")], "instance b{i}");
    }
}

/// Sends `n` request-responses to `svc` (with extra tags) and counts answers per instance.
fn spread(
    broker: &BrokerHandle,
    n: usize,
    tags: Vec<String>,
) -> std::collections::BTreeMap<String, usize> {
    let addr = broker.tcp_addr().unwrap();
    run(move || async move {
        let client = Client::connect(addr).await.unwrap();
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..n {
            let answer = client
                .request_response(Payload::new(route(&tags), i.to_string()))
                .await
                .unwrap();
            let text = String::from_utf8(answer.data.to_vec()).unwrap();
            let instance = text.split(':').next().unwrap().to_owned();
            *counts.entry(instance).or_insert(0) += 1;
        }
        counts
    })
}

fn policy(balancer: Balancer) -> ServicePolicy {
    ServicePolicy {
        balancer,
        failover: Failover::FailFast,
    }
}

#[test]
fn balancers() {
    let broker = TestBroker::start(&[
        ("rr", policy(Balancer::RoundRobin)),
        ("rand", policy(Balancer::Random)),
        ("weighted", policy(Balancer::Weighted)),
        ("least", policy(Balancer::LeastOutstanding)),
        (
            "hash",
            policy(Balancer::ConsistentHash { tag: "user".into() }),
        ),
    ]);
    let addr = broker.addr();
    let mut apps = Vec::new();
    for svc in ["rr", "rand", "hash"] {
        apps.push(App::start(
            addr,
            &format!("{svc}-a"),
            svc,
            1,
            Duration::ZERO,
        ));
        apps.push(App::start(
            addr,
            &format!("{svc}-b"),
            svc,
            1,
            Duration::ZERO,
        ));
    }
    apps.push(App::start(
        addr,
        "weighted-light",
        "weighted",
        1,
        Duration::ZERO,
    ));
    apps.push(App::start(
        addr,
        "weighted-heavy",
        "weighted",
        9,
        Duration::ZERO,
    ));
    apps.push(App::start(addr, "least-fast", "least", 1, Duration::ZERO));
    apps.push(App::start(
        addr,
        "least-slow",
        "least",
        1,
        Duration::from_millis(200),
    ));
    wait_for_instances(&broker, apps.len());

    let rr = spread(&broker, 40, vec!["rr".into()]);
    assert_eq!(
        rr.values().copied().collect::<Vec<_>>(),
        [20, 20],
        "round robin alternates: {rr:?}"
    );

    let rand = spread(&broker, 200, vec!["rand".into()]);
    assert!(
        rand.len() == 2 && rand.values().all(|c| *c > 60),
        "random spreads: {rand:?}"
    );

    let weighted = spread(&broker, 400, vec!["weighted".into()]);
    let heavy = weighted.get("weighted-heavy").copied().unwrap_or(0);
    assert!(heavy > 300, "power rating 9 vs 1 takes ~90%: {weighted:?}");

    // Least outstanding: concurrent requests pile up on the slow instance,
    // so most go to the fast one.
    let least = run(move || async move {
        let client = Client::connect(addr).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..60 {
            let c = client.clone();
            tasks.push(glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(i * 5)).await;
                c.request_response(Payload::new(route(&["least"]), "x"))
                    .await
                    .unwrap()
                    .data
            }));
        }
        let mut fast = 0;
        for t in tasks {
            if t.await.starts_with(b"least-fast") {
                fast += 1;
            }
        }
        fast
    });
    assert!(
        least >= 45,
        "least outstanding favours the fast instance: {least}/60"
    );

    let by_user: Vec<std::collections::BTreeMap<String, usize>> = (0..16)
        .map(|u| spread(&broker, 4, vec!["hash".into(), format!("user=u{u}")]))
        .collect();
    for m in &by_user {
        assert_eq!(m.len(), 1, "one user, one instance: {m:?}");
    }
    // 16 users over two instances: both get some (a hash that ignored the
    // user would send them all to one).
    let users_on_a = by_user.iter().filter(|m| m.contains_key("hash-a")).count();
    assert!(
        (1..16).contains(&users_on_a),
        "{users_on_a} of 16 users on hash-a: {by_user:?}"
    );

    // e= targets one instance; sticky=1 keeps the first choice.
    let targeted = spread(&broker, 10, vec!["rr".into(), "e=rr-b".into()]);
    assert_eq!(targeted.get("rr-b"), Some(&10));
    let sticky = spread(&broker, 10, vec!["rr".into(), "sticky=1".into()]);
    assert_eq!(sticky.len(), 1, "sticky: {sticky:?}");
    drop(apps);
}

#[test]
fn failover_retries_a_request_whose_instance_disconnects() {
    let broker = TestBroker::start(&[(
        "svc",
        ServicePolicy {
            balancer: Balancer::RoundRobin,
            failover: Failover::Retry { attempts: 2 },
        },
    )]);
    let addr = broker.addr();
    let mut slow = App::start(addr, "slow", "svc", 1, Duration::from_secs(30));
    let _fast = App::start(addr, "fast", "svc", 1, Duration::ZERO);
    wait_for_instances(&broker, 2);
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        sent_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        slow.kill();
    });
    let answers = run(move || async move {
        let client = Client::connect(addr).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..4 {
            let c = client.clone();
            tasks.push(glommio::spawn_local(async move {
                c.request_response(Payload::new(route(&["svc"]), format!("r{i}")))
                    .await
            }));
        }
        sent_tx.send(()).unwrap();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await);
        }
        out
    });
    killer.join().unwrap();
    for a in &answers {
        let data = a.as_ref().expect("every request is answered").data.clone();
        assert!(data.starts_with(b"fast:"), "{data:?}");
    }
}

#[test]
fn health_check_is_answered_by_the_broker() {
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let answer = run(move || async move {
        let client = Client::connect(addr).await.unwrap();
        client
            .request_response(Payload::new(
                route(&["com.alibaba.rsocket.health.RSocketServiceHealth.check"]),
                "\"\"",
            ))
            .await
            .unwrap()
    });
    assert_eq!(answer.data, "1");
}

#[test]
fn metadata_push_changes_routing_on_every_shard() {
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let (cmd_tx, cmd_rx) = mpsc::channel::<Bytes>();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let app = std::thread::spawn(move || {
        run(move || async move {
            let config = ClientConfig {
                app: Some(AppConfig {
                    name: "pushy".into(),
                    uuid: "pushy".into(),
                    power_rating: 1,
                }),
                services: vec![(String::new(), "svc".into(), String::new())],
                ..ClientConfig::default()
            };
            let svc = TestService {
                name: "pushy".into(),
                log: mpsc::channel().0,
                delay: Duration::ZERO,
            };
            let client = Client::builder(config)
                .responder("svc", svc.clone())
                .responder("other", svc)
                .connect(addr)
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            // Poll the command channel: a blocking receive would stall this executor.
            loop {
                match cmd_rx.try_recv() {
                    Ok(push) => {
                        client.metadata_push(push).unwrap();
                        glommio::timer::sleep(Duration::from_millis(20)).await;
                        ready_tx.send(()).unwrap();
                    }
                    Err(mpsc::TryRecvError::Empty) => {
                        glommio::timer::sleep(Duration::from_millis(5)).await
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
        })
    });
    ready_rx.recv().unwrap();
    wait_for_instances(&broker, 1);
    let ask = |svc: &'static str| {
        run(move || async move {
            let client = Client::connect(addr).await.unwrap();
            client
                .request_response(Payload::new(route(&[svc]), "x"))
                .await
                .map(|p| p.data)
        })
    };
    assert!(ask("svc").is_ok());
    assert!(ask("other").is_err(), "not published yet");
    let push = |event: Bytes| {
        cmd_tx.send(event).unwrap();
        ready_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    };
    push(rsbroker_client::metadata::services_event(&["other"], false));
    assert_eq!(ask("other").unwrap(), "pushy:x");
    push(rsbroker_client::metadata::app_status_event(2));
    assert_eq!(
        ask("svc").unwrap_err().code(),
        Some(ErrorCode::REJECTED),
        "out of service"
    );
    push(rsbroker_client::metadata::app_status_event(1));
    assert!(ask("svc").is_ok());
    push(rsbroker_client::metadata::services_event(&["svc"], true));
    assert_eq!(
        ask("svc").unwrap_err().code(),
        Some(ErrorCode::REJECTED),
        "hidden"
    );
    drop(cmd_tx);
    app.join().unwrap();
}

#[test]
fn a_second_connection_of_an_instance_joins_it() {
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let first = App::start(addr, "same", "svc", 1, Duration::ZERO);
    let second = App::start(addr, "same", "svc", 1, Duration::ZERO);
    wait_for_instances(&broker, 1);
    let conns: usize = broker
        .snapshot()
        .iter()
        .map(|s| {
            s.connections
                .iter()
                .filter(|c| c.app.as_ref().is_some_and(|(_, u)| u == "same"))
                .count()
        })
        .sum();
    assert_eq!(conns, 2);
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    // The instance lives on through its other connection.
    wait_for_instances(&broker, 1);
    let answer = spread(&broker, 3, vec!["svc".into()]);
    assert_eq!(answer.get("same"), Some(&3));
    drop(second);
}

#[test]
fn stop_closes_connections_and_exits() {
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let closed = Arc::new(Mutex::new(None));
    let seen = closed.clone();
    let waiter = std::thread::spawn(move || {
        run(move || async move {
            let client = Client::connect(addr).await.unwrap();
            let started = Instant::now();
            client.closed().await;
            *seen.lock().unwrap() = Some(started.elapsed());
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    broker.shut_down();
    waiter.join().unwrap();
    assert!(
        closed.lock().unwrap().is_some(),
        "the client saw the connection close"
    );
}

/// Streams `count` items of `size` bytes; item i starts with i (u32, big endian).
struct Bulk {
    count: u32,
    size: usize,
}

impl rsbroker_client::Responder for Bulk {
    fn request_stream(&self, _request: Payload, sink: rsbroker_client::Sink) {
        let (count, size) = (self.count, self.size);
        glommio::spawn_local(async move {
            for i in 0..count {
                let mut item = vec![0xAB; size];
                item[..4].copy_from_slice(&i.to_be_bytes());
                if sink.send(Payload::data(item)).await.is_err() {
                    return;
                }
            }
            let _ = sink.complete();
        })
        .detach();
    }
}

#[test]
fn a_slow_consumer_on_the_producers_shard_holds_back_its_stream_and_loses_nothing() {
    slow_consumer(true);
}

#[test]
fn a_slow_consumer_on_another_shard_holds_back_its_stream_and_loses_nothing() {
    slow_consumer(false);
}

/// A requester asks for 64 MiB and does not read: the broker grants the
/// responder credit only as the requester's side drains, so it holds about
/// one stream buffer for it and never stops reading the responder; once
/// the requester reads, every item arrives.
fn slow_consumer(same_shard: bool) {
    use std::io::{Read, Write};

    use bytes::BytesMut;
    use rsocket_proto::codec::{ReadBuf, put_prefixed};
    use rsocket_proto::frame::{Frame, RequestStream, Setup, VERSION};
    use rsocket_proto::{FrameType, FrameView, OutFrame};

    const LIMIT: usize = 256 << 10;
    const BUFFER: usize = 128 << 10;
    const ITEMS: u32 = 4000;
    const SIZE: usize = 16 << 10;

    let mut config = test_config();
    config.limits.max_pending_bytes = rsbroker::config::Size(LIMIT);
    config.limits.stream_buffer = rsbroker::config::Size(BUFFER);
    let broker = TestBroker::with_config(config);
    let addr = broker.addr();
    let (stop_app, stop_rx) = mpsc::channel::<()>();
    let app = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(move || async move {
            let config = ClientConfig {
                app: Some(AppConfig {
                    name: "bulk".into(),
                    uuid: "bulk-1".into(),
                    power_rating: 1,
                }),
                services: vec![(String::new(), "bulk".into(), String::new())],
                ..ClientConfig::default()
            };
            let client = Client::builder(config)
                .responder(
                    "bulk",
                    Bulk {
                        count: ITEMS,
                        size: SIZE,
                    },
                )
                .connect(addr)
                .await
                .expect("connect");
            while stop_rx.try_recv() == Err(mpsc::TryRecvError::Empty) {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            client.close();
        })
        .expect("executor");
    wait_for_instances(&broker, 1);
    let responder_shard = broker
        .snapshot()
        .iter()
        .find(|s| s.connections.iter().any(|c| c.app.is_some()))
        .map(|s| s.shard)
        .expect("the responder's shard");

    // A requester that asks for everything and then does not read.
    let mut conn = None;
    for _ in 0..40 {
        let c = std::net::TcpStream::connect(addr).unwrap();
        if (shard_of(&broker, c.local_addr().unwrap()) == responder_shard) == same_shard {
            conn = Some(c);
            break;
        }
    }
    let mut conn = conn.expect("a connection on the wanted shard");
    let local = conn.local_addr().unwrap();
    let mut out = BytesMut::new();
    let setup = Frame::Setup(Setup {
        version: VERSION,
        keepalive_interval: 60_000,
        max_lifetime: 120_000,
        resume_token: None,
        lease: false,
        metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
        data_mime: Bytes::from_static(b"application/octet-stream"),
        metadata: None,
        data: Bytes::new(),
    });
    let request = Frame::RequestStream(RequestStream {
        stream_id: 1,
        follows: false,
        initial_n: i32::MAX as u32,
        metadata: Some(route(&["bulk"])),
        data: Bytes::new(),
    });
    for f in [&setup, &request] {
        put_prefixed(&mut out, &OutFrame::from_frame(f)).unwrap();
    }
    conn.write_all(&out).unwrap();

    // While it does not read, what the broker holds for it stays within
    // the stream buffer, and the responder is read all along.
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let snapshot = broker.snapshot();
        let conns = || snapshot.iter().flat_map(|s| s.connections.iter());
        let held = conns()
            .filter(|c| c.peer == Some(local))
            .map(|c| c.pending_bytes)
            .sum::<usize>();
        peak = peak.max(held);
        assert!(
            conns().filter(|c| c.app.is_some()).all(|c| c.reading),
            "the responder was held back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pauses: u64 = broker.snapshot().iter().map(|s| s.stats.pauses).sum();
    assert_eq!(pauses, 0, "credit, not pauses, held the stream back");
    // The stream buffer plus the item that passes it, against the 64 MiB
    // the stream carries.
    assert!(
        peak > 0 && peak <= BUFFER + SIZE + 64,
        "the broker held {peak} bytes for a consumer that did not read (stream buffer {BUFFER})"
    );

    // Now read it all: every item arrives, in order, intact.
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = ReadBuf::new(rsocket_proto::frame::MAX_U24);
    let mut frames = Vec::new();
    let mut next = 0u32;
    let mut chunk = vec![0u8; 256 << 10];
    'read: loop {
        for frame in frames.drain(..) {
            let view = FrameView::parse(frame).expect("valid frame");
            assert_eq!(view.frame_type(), FrameType::Payload, "{view:?}");
            let data = view.data_slice();
            if !data.is_empty() {
                assert_eq!(data.len(), SIZE);
                assert_eq!(data[..4], next.to_be_bytes(), "items in order");
                assert!(data[4..].iter().all(|b| *b == 0xAB), "item {next} intact");
                next += 1;
            }
            if view.flags().has(rsocket_proto::frame::Flags::COMPLETE) {
                break 'read;
            }
        }
        let n = conn.read(&mut chunk).unwrap_or_else(|e| {
            panic!(
                "stalled after {next} items: {e}; broker: {:?}",
                broker.snapshot()
            )
        });
        assert!(n > 0, "the broker closed the stream after {next} items");
        buf.feed(&chunk[..n], &mut frames).expect("valid frames");
    }
    assert_eq!(next, ITEMS);
    drop(conn);
    let _ = stop_app.send(());
    app.join().unwrap();
}
