//! The fault suite's fixture: the `rsbroker` binary on two shards with
//! small limits, well-behaved traffic running across its shards, and the
//! measurements every case asserts on (that traffic's errors and p99, the
//! broker's RSS and descriptors, no panic).
#![allow(unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_client::metadata::route;
use rsbroker_client::{
    AppConfig, Client, ClientConfig, ClientError, LocalBoxFuture, Payload, Responder, Sink,
};

use crate::common::{BrokerProcess, Serial, http_get, serial};

/// The latency the well-behaved traffic must stay under while a case
/// attacks the broker (a debug build on a noisy 2-core VM; a stall of the
/// kind the suite guards against lasts seconds).
pub const P99_BOUND: Duration = Duration::from_millis(300);

/// RSS the broker may keep above its baseline once an attack is over
/// (what the allocator holds on to).
pub const RSS_SLACK: usize = 12 << 20;

/// The limits every case runs with, small enough for attacks to reach
/// them quickly; a case may override any key.
const LIMITS: &[(&str, &str)] = &[
    ("max_frame_size", "\"1 MiB\""),
    ("max_pending_bytes", "\"256 KiB\""),
    ("stream_buffer", "\"64 KiB\""),
    ("max_connection_memory", "\"4 MiB\""),
    ("max_buffered_bytes", "\"256 MiB\""),
    ("backpressure_timeout", "\"20s\""),
    ("max_streams_per_connection", "1000"),
    ("setup_timeout", "\"2s\""),
    ("min_keepalive_lifetime", "\"500ms\""),
];

/// Resources the broker process uses.
#[derive(Clone, Copy, Debug)]
pub struct Resources {
    pub rss: usize,
    pub fds: usize,
}

pub fn resources(pid: u32) -> Resources {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb << 10);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    Resources { rss, fds }
}

/// One connection as `/api/connections` reports it.
#[derive(Clone, Debug)]
pub struct Conn {
    pub shard: u16,
    pub peer: Option<SocketAddr>,
    pub app: Option<String>,
    pub pending_bytes: usize,
    pub reading: bool,
}

/// A running broker with traffic beside it. It holds the test's turn
/// until the broker is killed and the traffic has stopped.
pub struct Fault {
    pub broker: BrokerProcess,
    pub traffic: Traffic,
    pub baseline: Resources,
    pub config: std::path::PathBuf,
    // Dropped last.
    _serial: Serial,
}

impl Fault {
    /// Starts a broker with the suite's limits, `overrides` applied
    /// (`("limits", "key", "value")`, values in TOML), and the
    /// well-behaved traffic; waits until the traffic runs on both shards.
    pub fn start(name: &str, overrides: &[(&str, &str, &str)]) -> Self {
        let serial = serial();
        let config = write_config(name, overrides);
        let broker = BrokerProcess::start(
            &[
                "--config",
                config.to_str().expect("utf-8 path"),
                "--log",
                "info",
            ],
            &[],
        );
        let traffic = Traffic::start(broker.addr);
        let mut f = Self {
            broker,
            traffic,
            baseline: Resources { rss: 0, fds: 0 },
            config,
            _serial: serial,
        };
        f.wait_for_traffic_on_both_shards();
        // Warm up: buffers, allocator arenas and the connections' first use.
        std::thread::sleep(Duration::from_millis(1500));
        f.traffic.take();
        f.baseline = resources(f.broker.pid);
        f
    }

    fn wait_for_traffic_on_both_shards(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempt_ends = Instant::now() + Duration::from_secs(5);
        loop {
            if Instant::now() > attempt_ends {
                // The kernel put them all on one shard: connect them again.
                self.traffic = Traffic::start(self.broker.addr);
                attempt_ends = Instant::now() + Duration::from_secs(5);
            }
            let conns = self.connections();
            let requesters: Vec<u16> = self
                .traffic
                .locals()
                .iter()
                .filter_map(|l| conns.iter().find(|c| c.peer == Some(*l)).map(|c| c.shard))
                .collect();
            let responder = conns
                .iter()
                .filter(|c| c.app.as_deref() == Some("ctl"))
                .find(|c| c.peer == Some(self.traffic.responder))
                .map(|c| c.shard);
            if let Some(r) = responder
                && requesters.contains(&r)
                && requesters.iter().any(|s| *s != r)
                && self.traffic.take().ok > 10
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the traffic did not run on both shards: responder on {responder:?}, requesters on {requesters:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The broker's connections (snapshots refresh every 100 ms).
    pub fn connections(&self) -> Vec<Conn> {
        let admin = self.broker.admin.expect("admin server");
        let (status, body) = http_get(admin, "/api/connections");
        assert_eq!(status, 200, "/api/connections: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        json.as_array()
            .expect("a list")
            .iter()
            .map(|c| Conn {
                shard: c["shard"].as_u64().unwrap_or(0) as u16,
                peer: c["peer"].as_str().and_then(|p| p.parse().ok()),
                app: c["app"].as_str().map(str::to_owned),
                pending_bytes: c["pending_bytes"].as_u64().unwrap_or(0) as usize,
                reading: c["reading"].as_bool().unwrap_or(true),
            })
            .collect()
    }

    /// The connection whose peer is `local`, once the broker reports it.
    pub fn conn_of(&self, local: SocketAddr) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = self
                .connections()
                .into_iter()
                .find(|c| c.peer == Some(local))
            {
                return c;
            }
            assert!(Instant::now() < deadline, "{local} never showed up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A metric summed over its labels (counters by their name without
    /// `_total`).
    pub fn metric(&self, name: &str) -> f64 {
        let total = format!("{name}_total");
        let (_, body) = http_get(self.broker.admin.expect("admin"), "/metrics");
        body.lines()
            .filter(|l| {
                [name, total.as_str()]
                    .iter()
                    .any(|n| l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n} ")))
            })
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }

    pub fn resources(&self) -> Resources {
        resources(self.broker.pid)
    }

    /// The well-behaved traffic since the last check had no error and a
    /// p99 under [`P99_BOUND`].
    pub fn assert_traffic_unharmed(&self, during: &str) {
        let w = self.traffic.take_after(Duration::from_secs(1));
        assert!(w.ok > 20, "{during}: only {} requests answered", w.ok);
        assert!(
            w.errors.is_empty(),
            "{during}: the well-behaved traffic had {} errors: {:?}",
            w.errors.len(),
            &w.errors[..w.errors.len().min(5)]
        );
        let p99 = w.percentile(0.99);
        assert!(
            p99 <= P99_BOUND,
            "{during}: the well-behaved traffic's p99 was {p99:?} (bound {P99_BOUND:?}, max {:?})",
            w.percentile(1.0)
        );
    }

    /// The broker is alive and has not panicked.
    pub fn assert_alive(&mut self) {
        assert!(
            self.broker.child.try_wait().expect("wait").is_none(),
            "the broker exited"
        );
        self.broker.collect_lines();
        assert!(
            !self.broker.seen.iter().any(|l| l.contains("panicked")),
            "the broker panicked:\n{}",
            self.broker.seen.join("\n")
        );
    }

    /// Waits until the broker's RSS and descriptors are back at the
    /// baseline (RSS within [`RSS_SLACK`]), the traffic still unharmed.
    pub fn assert_back_to_baseline(&mut self) {
        self.assert_back_within(RSS_SLACK);
    }

    /// As [`Fault::assert_back_to_baseline`], with `slack` bytes of RSS
    /// over the baseline allowed.
    pub fn assert_back_within(&mut self, slack: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut now = self.resources();
        while Instant::now() < deadline {
            now = self.resources();
            if now.fds <= self.baseline.fds && now.rss <= self.baseline.rss + slack {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            now.fds <= self.baseline.fds,
            "descriptors: {} now, {} before",
            now.fds,
            self.baseline.fds
        );
        assert!(
            now.rss <= self.baseline.rss + slack,
            "RSS: {} KiB now, {} KiB before, {} KiB allowed over it",
            now.rss >> 10,
            self.baseline.rss >> 10,
            slack >> 10
        );
        self.assert_alive();
    }

    /// Waits until an app named `name` is connected.
    pub fn wait_for_app(&self, name: &str) {
        self.eventually(&format!("{name} registered"), Duration::from_secs(5), |f| {
            f.connections()
                .iter()
                .any(|c| c.app.as_deref() == Some(name))
        });
    }

    /// Waits until `f` holds, polling.
    pub fn eventually(&self, what: &str, within: Duration, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: not within {within:?}");
    }
}

fn write_config(name: &str, overrides: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let mut sections: std::collections::BTreeMap<&str, Vec<(String, String)>> =
        std::collections::BTreeMap::new();
    sections.insert("server", vec![("io_memory".into(), "\"64 KiB\"".into())]);
    sections.insert(
        "limits",
        LIMITS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    sections.insert(
        "shutdown",
        vec![
            ("drain_timeout".into(), "\"5s\"".into()),
            ("close_timeout".into(), "\"1s\"".into()),
        ],
    );
    for (section, key, value) in overrides {
        let entries = sections.entry(section).or_default();
        entries.retain(|(k, _)| k != key);
        entries.push(((*key).to_owned(), (*value).to_owned()));
    }
    let mut text = String::new();
    for (section, entries) in sections {
        text.push_str(&format!("[{section}]\n"));
        for (k, v) in entries {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config written");
    path
}

// ------------------------------------------------------------ the traffic

/// Requests answered and failed since the last [`Traffic::take`].
#[derive(Debug, Default)]
pub struct Window {
    pub ok: usize,
    pub latencies: Vec<Duration>,
    pub errors: Vec<String>,
}

impl Window {
    pub fn percentile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        l.get(((l.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    }
}

/// Well-behaved traffic: a responder app `ctl` serving `ctl.echo`, and
/// requesters on several connections (so on both shards) calling it in a
/// loop, each call bounded by a 3 s timeout.
pub struct Traffic {
    /// The responder's local address.
    pub responder: SocketAddr,
    window: Arc<Mutex<Window>>,
    /// When the current window began.
    since: Mutex<Instant>,
    locals: Vec<SocketAddr>,
    stop: mpsc::Sender<()>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

const REQUESTERS: usize = 8;

struct Echo;

impl Responder for Echo {
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        Box::pin(async move { Ok(Payload::data(request.data)) })
    }
}

impl Traffic {
    fn start(addr: SocketAddr) -> Self {
        let window = Arc::new(Mutex::new(Window::default()));
        let (stop, stop_rx) = mpsc::channel::<()>();
        let (locals_tx, locals_rx) = mpsc::channel();
        let w = window.clone();
        let thread = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .spawn(move || async move {
                let config = ClientConfig {
                    app: Some(AppConfig {
                        name: "ctl".into(),
                        uuid: "ctl-1".into(),
                        power_rating: 1,
                    }),
                    services: vec![(String::new(), "ctl".into(), String::new())],
                    ..ClientConfig::default()
                };
                let responder = Client::builder(config)
                    .responder("ctl", Echo)
                    .connect(addr)
                    .await
                    .expect("the traffic's responder connects");
                let mut requesters = Vec::new();
                let mut locals = vec![responder.local_addr().expect("local")];
                for _ in 0..REQUESTERS {
                    let c = Client::connect(addr).await.expect("a requester connects");
                    locals.push(c.local_addr().expect("local"));
                    requesters.push(std::rc::Rc::new(c));
                }
                locals_tx.send(locals).expect("report");
                let tasks: Vec<_> = requesters
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let (c, w) = (c.clone(), w.clone());
                        glommio::spawn_local(async move {
                            let mut n = 0u64;
                            loop {
                                n += 1;
                                let started = Instant::now();
                                let call = c.request_response(Payload::new(
                                    route(&["ctl.echo"]),
                                    format!("{i}:{n}"),
                                ));
                                let timeout = async {
                                    glommio::timer::sleep(Duration::from_secs(3)).await;
                                    Err(ClientError::Closed("timed out after 3 s".into()))
                                };
                                let result = futures_lite::future::or(call, timeout).await;
                                let took = started.elapsed();
                                {
                                    let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                                    match result {
                                        Ok(p) if p.data == format!("{i}:{n}").as_bytes() => {
                                            w.ok += 1;
                                            w.latencies.push(took);
                                        }
                                        Ok(p) => {
                                            w.errors.push(format!("wrong answer {:?}", p.data))
                                        }
                                        Err(e) => w.errors.push(format!("requester {i}: {e}")),
                                    }
                                }
                                glommio::timer::sleep(Duration::from_millis(4)).await;
                            }
                        })
                    })
                    .collect();
                while stop_rx.try_recv() == Err(mpsc::TryRecvError::Empty) {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                drop(tasks);
                for c in &requesters {
                    c.close();
                }
                responder.close();
                glommio::timer::sleep(Duration::from_millis(50)).await;
            })
            .expect("executor");
        let mut locals: Vec<SocketAddr> = locals_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the traffic connected");
        let responder = locals.remove(0);
        Self {
            responder,
            window,
            since: Mutex::new(Instant::now()),
            locals,
            stop,
            thread: Some(thread),
        }
    }

    /// The requesters' local addresses.
    pub fn locals(&self) -> &[SocketAddr] {
        &self.locals
    }

    /// What happened since the last call.
    pub fn take(&self) -> Window {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        std::mem::take(&mut *self.window.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// What happened since the last call, watched for at least `at_least`
    /// (waiting for the rest of it first).
    pub fn take_after(&self, at_least: Duration) -> Window {
        let since = *self.since.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rest) = at_least.checked_sub(since.elapsed()) {
            std::thread::sleep(rest);
        }
        self.take()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------ a producer

/// A responder app on its own executor streaming `count` items of `size`
/// bytes for `<service>` (item i starts with i as a big-endian u32), and
/// answering `<service>.ping` request-responses: a well-behaved producer.
pub struct Producer {
    stop: mpsc::Sender<()>,
    closed: Arc<Mutex<Option<String>>>,
    pub local: SocketAddr,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

/// How a [`Producer`] connects and what it sends.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    pub uuid: &'static str,
    pub service: &'static str,
    pub count: u32,
    pub size: usize,
    /// Fragments larger items (0: never).
    pub fragment_size: usize,
    pub keepalive: Duration,
    pub max_lifetime: Duration,
}

#[derive(Clone)]
struct Bulk {
    count: u32,
    size: usize,
}

impl Responder for Bulk {
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        Box::pin(async move { Ok(Payload::data(request.data)) })
    }

    fn request_stream(&self, _request: Payload, sink: Sink) {
        let (count, size) = (self.count, self.size);
        glommio::spawn_local(async move {
            for i in 0..count {
                let mut item = vec![0xAB; size.max(4)];
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

impl Producer {
    pub fn start(addr: SocketAddr, p: ProducerConfig) -> Self {
        let (stop, stop_rx) = mpsc::channel::<()>();
        let (local_tx, local_rx) = mpsc::channel();
        let closed = Arc::new(Mutex::new(None));
        let seen = closed.clone();
        let thread = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .spawn(move || async move {
                let config = ClientConfig {
                    app: Some(AppConfig {
                        name: p.uuid.into(),
                        uuid: p.uuid.into(),
                        power_rating: 1,
                    }),
                    services: vec![(String::new(), p.service.into(), String::new())],
                    keepalive_interval: p.keepalive,
                    max_lifetime: p.max_lifetime,
                    fragment_size: p.fragment_size,
                    ..ClientConfig::default()
                };
                let bulk = Bulk {
                    count: p.count,
                    size: p.size,
                };
                let client = Client::builder(config)
                    .responder(p.service, bulk)
                    .connect(addr)
                    .await
                    .expect("the producer connects");
                local_tx
                    .send(client.local_addr().expect("local"))
                    .expect("report");
                let c = std::rc::Rc::new(client);
                let watcher = {
                    let c = c.clone();
                    glommio::spawn_local(async move {
                        c.closed().await;
                        *seen.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(c.close_reason().unwrap_or_else(|| "closed".into()));
                    })
                };
                while stop_rx.try_recv() == Err(mpsc::TryRecvError::Empty) {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                drop(watcher);
                c.close();
                glommio::timer::sleep(Duration::from_millis(50)).await;
            })
            .expect("executor");
        let local = local_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the producer connected");
        Self {
            stop,
            closed,
            local,
            thread: Some(thread),
        }
    }

    /// Why its connection closed, if it did.
    pub fn closed(&self) -> Option<String> {
        self.closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
