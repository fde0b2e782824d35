//! Loopback end-to-end tests: a broker with two shards, apps built on
//! rsbroker-client, each app on its own glommio executor. Where it matters,
//! the requester is connected until it lands on the other shard than the
//! responder, so requests cross shards.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker::{BrokerConfig, BrokerHandle};
use rsbroker_client::metadata::route;
use rsbroker_client::{
    AppConfig, Client, ClientConfig, ClientError, LocalBoxFuture, Payload, Responder, Sink,
    Subscription,
};
use rsbroker_core::{Balancer, Failover, ServicePolicy};
use rsbroker_transports::ListenAddr;
use rsocket_proto::ErrorCode;

/// Tests start brokers and executors; running them one at a time keeps
/// locked memory and the two cores from being oversubscribed.
static SERIAL: Mutex<()> = Mutex::new(());

fn broker(policies: &[(&str, ServicePolicy)]) -> BrokerHandle {
    let mut config = BrokerConfig {
        listen: vec![ListenAddr::Tcp(([127, 0, 0, 1], 0).into())],
        shards: 2,
        io_memory: 64 << 10,
        shutdown_grace: Duration::from_secs(1),
        ..BrokerConfig::default()
    };
    for (svc, p) in policies {
        config
            .policies
            .services
            .insert((*svc).to_owned(), p.clone());
    }
    rsbroker::start(config).expect("broker starts")
}

/// Runs `f` on a fresh glommio executor and returns its result.
fn run<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    f: impl FnOnce() -> F + Send + 'static,
) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(f)
        .expect("executor")
        .join()
        .expect("the test's executor panicked")
}

/// A test responder: echoes request-response, logs fire-and-forget, streams
/// `data` items, echoes channels.
#[derive(Clone)]
struct TestService {
    name: String,
    log: mpsc::Sender<String>,
    /// Answer request-response only after this long (a slow instance).
    delay: Duration,
}

impl Responder for TestService {
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        let name = self.name.clone();
        let delay = self.delay;
        Box::pin(async move {
            if !delay.is_zero() {
                glommio::timer::sleep(delay).await;
            }
            Ok(Payload::data(format!(
                "{name}:{}",
                String::from_utf8_lossy(&request.data)
            )))
        })
    }

    fn fire_and_forget(&self, request: Payload) {
        let _ = self.log.send(format!(
            "fnf {} {}",
            self.name,
            String::from_utf8_lossy(&request.data)
        ));
    }

    fn request_stream(&self, request: Payload, sink: Sink) {
        let n: u32 = String::from_utf8_lossy(&request.data).parse().unwrap_or(3);
        let log = self.log.clone();
        glommio::spawn_local(async move {
            for i in 0..n {
                if sink.send(Payload::data(i.to_string())).await.is_err() {
                    let _ = log.send(format!("stream cancelled after {i}"));
                    return;
                }
            }
            let _ = sink.complete();
        })
        .detach();
    }

    fn request_channel(&self, request: Payload, mut inbound: Subscription, sink: Sink) {
        glommio::spawn_local(async move {
            let _ = inbound.request(1000);
            if sink.send(request).await.is_err() {
                return;
            }
            while let Some(Ok(item)) = inbound.next().await {
                if sink.send(item).await.is_err() {
                    return;
                }
            }
            let _ = sink.complete();
        })
        .detach();
    }
}

/// A responder app on its own executor; stops when the handle is dropped
/// or when asked to disconnect.
struct App {
    local: SocketAddr,
    log: mpsc::Receiver<String>,
    stop: mpsc::Sender<bool>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

impl App {
    fn start(
        addr: SocketAddr,
        uuid: &str,
        service: &str,
        power_rating: u32,
        delay: Duration,
    ) -> Self {
        let (log_tx, log) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel::<bool>();
        let (local_tx, local_rx) = mpsc::channel();
        let uuid = uuid.to_owned();
        let service = service.to_owned();
        let thread = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .spawn(move || async move {
                let config = ClientConfig {
                    app: Some(AppConfig {
                        name: format!("app-{uuid}"),
                        uuid: uuid.clone(),
                        power_rating,
                    }),
                    services: vec![(String::new(), service.clone(), String::new())],
                    ..ClientConfig::default()
                };
                let svc = TestService {
                    name: uuid.clone(),
                    log: log_tx,
                    delay,
                };
                let client = Client::builder(config)
                    .responder(&service, svc)
                    .connect(addr)
                    .await
                    .expect("connect");
                local_tx
                    .send(client.local_addr().expect("local address"))
                    .expect("report");
                loop {
                    match stop_rx.try_recv() {
                        Ok(abort) => {
                            if abort {
                                client.abort();
                            } else {
                                client.close();
                            }
                            break;
                        }
                        Err(mpsc::TryRecvError::Empty) => {
                            glommio::timer::sleep(Duration::from_millis(5)).await
                        }
                        Err(mpsc::TryRecvError::Disconnected) => break,
                    }
                }
                glommio::timer::sleep(Duration::from_millis(50)).await;
            })
            .expect("executor");
        let local = local_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the app connected");
        Self {
            local,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            t.join().expect("app thread");
        }
    }

    fn logs(&self) -> Vec<String> {
        std::iter::from_fn(|| self.log.recv_timeout(Duration::from_millis(200)).ok()).collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.stop.send(false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until every shard has reported `apps` registered instances.
fn wait_for_instances(broker: &BrokerHandle, apps: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let snap = broker.snapshot();
        if snap.len() == broker.shards() && snap.iter().all(|s| s.instances == apps) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "instances did not register on every shard: {:?}",
        broker.snapshot()
    );
}

fn shard_of(broker: &BrokerHandle, local: SocketAddr) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = broker.shard_of(local) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "connection {local} never showed up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects plain requesters until one lands on a shard other than `avoid`,
/// then runs `f` with it.
fn on_other_shard<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    broker: &BrokerHandle,
    avoid: u16,
    f: impl FnOnce(Client) -> F + Send + 'static,
) -> T {
    let addr = broker.tcp_addr().expect("tcp");
    let (local_tx, local_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<usize>();
    let handle = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(move || async move {
            let mut clients = Vec::new();
            loop {
                let c = Client::connect(addr).await.expect("connect");
                local_tx
                    .send(c.local_addr().expect("local"))
                    .expect("report");
                clients.push(c);
                let pick = loop {
                    match go_rx.try_recv() {
                        Ok(i) => break Some(i),
                        Err(mpsc::TryRecvError::Empty) => {
                            glommio::timer::sleep(Duration::from_millis(5)).await
                        }
                        Err(mpsc::TryRecvError::Disconnected) => break None,
                    }
                };
                match pick {
                    Some(usize::MAX) => continue,
                    Some(i) => {
                        let chosen = clients.swap_remove(i);
                        for c in &clients {
                            c.abort();
                        }
                        return f(chosen).await;
                    }
                    None => panic!("no requester landed on another shard"),
                }
            }
        })
        .expect("executor");
    for attempt in 0..40 {
        let local = local_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("requester connected");
        if shard_of(broker, local) != avoid {
            go_tx.send(attempt).expect("go");
            return handle.join().expect("requester panicked");
        }
        go_tx.send(usize::MAX).expect("next");
    }
    panic!("40 requesters all landed on shard {avoid}");
}

#[test]
fn all_four_models_across_shards() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let addr = broker.tcp_addr().unwrap();
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
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn request_n_is_honoured_end_to_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let app = App::start(broker.tcp_addr().unwrap(), "s-1", "svc", 1, Duration::ZERO);
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
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn responder_killed_mid_stream_ends_the_stream_with_an_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let mut app = App::start(
        broker.tcp_addr().unwrap(),
        "doomed",
        "svc",
        1,
        Duration::ZERO,
    );
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
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn no_instance_is_rejected_with_the_service_named() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let addr = broker.tcp_addr().unwrap();
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
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn broadcast_reaches_every_instance() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let addr = broker.tcp_addr().unwrap();
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
    broker.stop();
    broker.join().unwrap();
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
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[
        ("rr", policy(Balancer::RoundRobin)),
        ("rand", policy(Balancer::Random)),
        ("weighted", policy(Balancer::Weighted)),
        ("least", policy(Balancer::LeastOutstanding)),
        (
            "hash",
            policy(Balancer::ConsistentHash { tag: "user".into() }),
        ),
    ]);
    let addr = broker.tcp_addr().unwrap();
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

    let by_user: Vec<std::collections::BTreeMap<String, usize>> = (0..4)
        .map(|u| spread(&broker, 10, vec!["hash".into(), format!("user=u{u}")]))
        .collect();
    for m in &by_user {
        assert_eq!(m.len(), 1, "one user, one instance: {m:?}");
    }
    let users_on_a = by_user.iter().filter(|m| m.contains_key("hash-a")).count();
    assert!(users_on_a > 0 || by_user.len() == 4, "{by_user:?}");

    // e= targets one instance; sticky=1 keeps the first choice.
    let targeted = spread(&broker, 10, vec!["rr".into(), "e=rr-b".into()]);
    assert_eq!(targeted.get("rr-b"), Some(&10));
    let sticky = spread(&broker, 10, vec!["rr".into(), "sticky=1".into()]);
    assert_eq!(sticky.len(), 1, "sticky: {sticky:?}");
    drop(apps);
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn failover_retries_a_request_whose_instance_disconnects() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[(
        "svc",
        ServicePolicy {
            balancer: Balancer::RoundRobin,
            failover: Failover::Retry { attempts: 2 },
        },
    )]);
    let addr = broker.tcp_addr().unwrap();
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
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn health_check_is_answered_by_the_broker() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let addr = broker.tcp_addr().unwrap();
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
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn metadata_push_changes_routing_on_every_shard() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let addr = broker.tcp_addr().unwrap();
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
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn a_second_connection_of_an_instance_joins_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let addr = broker.tcp_addr().unwrap();
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
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn stop_closes_connections_and_exits() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = broker(&[]);
    let addr = broker.tcp_addr().unwrap();
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
    broker.stop();
    broker.join().unwrap();
    waiter.join().unwrap();
    assert!(
        closed.lock().unwrap().is_some(),
        "the client saw the connection close"
    );
}
