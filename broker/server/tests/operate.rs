//! Operating rsbroker: config checks, metrics, health, drain, reload,
//! sd_notify, the watchdog, logs, and the status page. Some tests run the
//! broker in-process, others run the `rsbroker` binary and send it signals.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rsbroker_client::metadata::route;
use rsbroker_client::{Client, ClientError, Payload};
use rsocket_proto::ErrorCode;

use common::*;

/// The value of a metric line `name{labels} value` whose labels include
/// every `(key, value)` in `labels`.
fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric_name != name {
                return None;
            }
            let wanted = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if wanted { value.parse().ok() } else { None }
        })
}

fn sum_metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Polls `f` until it returns true (snapshots refresh every 100 ms).
fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {within:?}");
}

/// A requester on its own executor that runs commands for the test thread
/// on one connection, so the test can check that connection survives.
struct Requester {
    commands: mpsc::Sender<(Command, mpsc::Sender<Result<String, String>>)>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

enum Command {
    Call(&'static str, String),
    /// Opens `n` streams of a source that never ends, waits for each one's
    /// first item or error, and reports how many were refused.
    OpenStreams(&'static str, usize),
    Local,
}

impl Requester {
    fn start(addr: SocketAddr) -> Self {
        let (commands, rx) = mpsc::channel::<(Command, mpsc::Sender<Result<String, String>>)>();
        let thread = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .spawn(move || async move {
                let client = Client::connect(addr).await.expect("connect");
                loop {
                    let (cmd, reply) = match rx.try_recv() {
                        Ok(c) => c,
                        Err(mpsc::TryRecvError::Empty) => {
                            glommio::timer::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        Err(mpsc::TryRecvError::Disconnected) => break,
                    };
                    let result = match cmd {
                        Command::Call(r, data) => client
                            .request_response(Payload::new(route(&[r]), data))
                            .await
                            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
                            .map_err(|e| e.to_string()),
                        Command::OpenStreams(r, n) => {
                            let mut refused = 0;
                            let mut open = Vec::new();
                            for _ in 0..n {
                                match client.request_stream(Payload::new(route(&[r]), "1000000"), 1)
                                {
                                    Ok(mut s) => match s.next().await {
                                        Some(Ok(_)) => open.push(s),
                                        _ => refused += 1,
                                    },
                                    Err(_) => refused += 1,
                                }
                            }
                            // Dropping them cancels them.
                            drop(open);
                            glommio::timer::sleep(Duration::from_millis(50)).await;
                            Ok(refused.to_string())
                        }
                        Command::Local => Ok(client
                            .local_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_default()),
                    };
                    let _ = reply.send(result);
                }
                client.close();
                glommio::timer::sleep(Duration::from_millis(50)).await;
            })
            .expect("executor");
        Self {
            commands,
            thread: Some(thread),
        }
    }

    fn run(&self, cmd: Command) -> Result<String, String> {
        let (tx, rx) = mpsc::channel();
        self.commands.send((cmd, tx)).expect("requester alive");
        rx.recv_timeout(Duration::from_secs(20))
            .expect("requester answered")
    }

    fn call(&self, route: &'static str, data: &str) -> Result<String, String> {
        self.run(Command::Call(route, data.to_owned()))
    }
}

impl Drop for Requester {
    fn drop(&mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.commands, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------ config

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("operate");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn rsbroker(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_rsbroker"))
        .args(args)
        .output()
        .expect("rsbroker runs")
}

#[test]
fn check_config_exit_codes_and_error_locations() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../systemd/rsbroker.toml");
    let out = rsbroker(&["--check-config", "--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");

    let bad = write_temp(
        "bad.toml",
        "[server]\nshards = \"two\"\n\n[limits]\nmax_frame_size = \"32 MiB\"\nmax_streams = 5\n\n[logs]\nlevel = \"info\"\n",
    );
    let out = rsbroker(&["--check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no OK on failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    for want in [
        format!("{file}:2:10: server.shards: invalid type: string \"two\""),
        format!("{file}:5:18: limits.max_frame_size: 32 MiB is outside"),
        format!("{file}:6:1: limits.max_streams: unknown field `max_streams`"),
        format!("{file}:8:2: logs: unknown section"),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }
    assert!(stderr.contains("4 error(s)"), "{stderr}");

    // A file that does not exist, and a bad flag value.
    let out = rsbroker(&["--check-config", "--config", "/nonexistent/rsbroker.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read it"));
    let out = rsbroker(&["--check-config", "--max-frame-size", "1 GiB"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("limits.max_frame_size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dump_config_shows_file_and_flags_and_reads_back() {
    let file = write_temp(
        "dump.toml",
        "[limits]\nmax_connections = 77\n\n[services.\"a.B\"]\nbalancer = \"random\"\n",
    );
    let out = rsbroker(&[
        "--dump-config",
        "--config",
        file.to_str().unwrap(),
        "--shards",
        "3",
        "--policy",
        "c.D=hash:user,retry=2",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed = rsbroker::config::parse(&text).expect("the dump parses");
    assert_eq!(parsed.limits.max_connections, 77);
    assert_eq!(parsed.server.shards, 3);
    assert_eq!(
        parsed.services["a.B"].balancer,
        rsbroker_core::Balancer::Random
    );
    assert_eq!(parsed.services["c.D"].retries, 2);
    // Dumping the dump gives the same text.
    let again = write_temp("dump2.toml", &text);
    let out = rsbroker(&["--dump-config", "--config", again.to_str().unwrap()]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), text);
}

#[test]
fn a_memlock_limit_too_low_for_io_uring_is_explained() {
    // As root, drop CAP_IPC_LOCK (which lifts the limit); then lower the limit.
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg("--memlock=262144:262144");
    if root {
        cmd.args([
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--inh-caps=-ipc_lock",
        ]);
    }
    let out = cmd
        .arg(env!("CARGO_BIN_EXE_rsbroker"))
        .arg("--check-config")
        .output()
        .expect("prlimit (util-linux) runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("locked-memory limit is 256 KiB")
            && stderr.contains("LimitMEMLOCK=infinity"),
        "{stderr}"
    );
}

// ------------------------------------------------------------- admin HTTP

#[test]
fn metrics_count_what_was_sent() {
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let admin = broker.admin_addr().expect("admin server");
    let app = App::start(addr, "metrics-1", "com.example.Echo", 3, Duration::ZERO);
    wait_for_instances(&broker, 1);
    run(move || async move {
        let c = Client::connect(addr).await.unwrap();
        for i in 0..7 {
            c.request_response(Payload::new(
                route(&["com.example.Echo.hello"]),
                format!("{i}"),
            ))
            .await
            .unwrap();
        }
        for i in 0..5 {
            c.fire_and_forget(Payload::new(
                route(&["com.example.Echo.log"]),
                format!("{i}"),
            ))
            .unwrap();
        }
        for _ in 0..3 {
            let mut s = c
                .request_stream(Payload::new(route(&["com.example.Echo.count"]), "4"), 10)
                .unwrap();
            while let Some(item) = s.next().await {
                item.unwrap();
            }
        }
        let (sink, mut inbound) = c
            .request_channel(Payload::new(route(&["com.example.Echo.chat"]), "a"), 10)
            .unwrap();
        sink.send(Payload::data("b")).await.unwrap();
        sink.complete().unwrap();
        while let Some(item) = inbound.next().await {
            item.unwrap();
        }
        for _ in 0..2 {
            let e = c
                .request_response(Payload::new(route(&["com.example.Missing.x"]), "x"))
                .await
                .unwrap_err();
            assert!(matches!(e, ClientError::Remote { code, .. } if code == ErrorCode::REJECTED));
        }
    });
    // Fire-and-forget has no answer: wait until all five arrived.
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got < 5 && Instant::now() < deadline {
        if let Ok(l) = app.log.recv_timeout(Duration::from_millis(100))
            && l.starts_with("fnf")
        {
            got += 1;
        }
    }
    assert_eq!(got, 5);

    let svc = [("service", "com.example.Echo")];
    let expect = [
        ("request_response", 7.0),
        ("fire_and_forget", 5.0),
        ("request_stream", 3.0),
        ("request_channel", 1.0),
    ];
    let mut body = String::new();
    eventually("request counters", Duration::from_secs(3), || {
        let (status, b) = http_get(admin, "/metrics");
        assert_eq!(status, 200);
        body = b;
        expect.iter().all(|(i, n)| {
            metric(
                &body,
                "rsbroker_requests_total",
                &[svc[0], ("interaction", i)],
            ) == Some(*n)
        }) && sum_metric(&body, "rsbroker_requests_rejected_total") == 2.0
    });
    for (i, _) in expect {
        assert_eq!(
            metric(
                &body,
                "rsbroker_request_errors_total",
                &[svc[0], ("interaction", i)]
            ),
            Some(0.0),
            "{body}"
        );
    }
    assert_eq!(metric(&body, "rsbroker_service_instances", &svc), Some(1.0));
    assert_eq!(sum_metric(&body, "rsbroker_apps"), 1.0);
    assert_eq!(sum_metric(&body, "rsbroker_instances"), 1.0);
    // At least every request, item and answer crossed as a frame.
    let frames_in = sum_metric(&body, "rsbroker_frames_received_total");
    assert!(frames_in >= (7 + 5 + 3 + 2 + 2) as f64, "{body}");
    assert!(sum_metric(&body, "rsbroker_frames_sent_total") >= (7 + 5 + 3 * 4) as f64);
    assert!(sum_metric(&body, "rsbroker_received_bytes_total") > 0.0);
    assert!(sum_metric(&body, "rsbroker_sent_bytes_total") > 0.0);
    assert!(body.contains("rsbroker_shard_heartbeat_age_milliseconds{shard=\"1\"}"));

    let (status, apps) = http_get(admin, "/api/apps");
    assert_eq!(status, 200);
    let apps: serde_json::Value = serde_json::from_str(&apps).unwrap();
    assert_eq!(apps[0]["name"], "app-metrics-1");
    assert_eq!(apps[0]["instances"][0]["uuid"], "metrics-1");
    assert_eq!(apps[0]["instances"][0]["power_rating"], 3);
    assert_eq!(apps[0]["instances"][0]["services"][0], "com.example.Echo");
    let (_, services) = http_get(admin, "/api/services");
    let services: serde_json::Value = serde_json::from_str(&services).unwrap();
    assert_eq!(services[0]["service"], "com.example.Echo");
    assert_eq!(services[0]["requests"]["request_response"], 7);
    assert_eq!(services[0]["instances"][0], "metrics-1");
    let (status, text) = http_get(admin, "/healthz");
    assert_eq!((status, text.trim()), (200, "ok"));
    let (status, text) = http_get(admin, "/readyz");
    assert_eq!((status, text.trim()), (200, "ready"));
    drop(app);
}

// -------------------------------------------------------------- draining

#[test]
fn drain_lets_in_flight_streams_finish_and_refuses_new_requests() {
    let mut config = test_config();
    config.shutdown.drain_timeout = Duration::from_secs(20);
    let broker = TestBroker::with_config(config);
    let addr = broker.addr();
    let admin = broker.admin_addr().unwrap();
    // A slow instance: request-response answers after 1.5 s.
    let slow = App::start(addr, "slow-1", "slow", 1, Duration::from_millis(1500));
    let fast = App::start(addr, "fast-1", "fast", 1, Duration::ZERO);
    wait_for_instances(&broker, 2);

    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (draining_tx, draining_rx) = mpsc::channel::<()>();
    let requester = std::thread::spawn(move || {
        run(move || async move {
            let c = Client::connect(addr).await.unwrap();
            // In flight when the drain starts: a slow request-response, and a
            // 20-item stream read one item at a time, 50 ms apart.
            let slow_call = {
                let c = c.clone();
                glommio::spawn_local(async move {
                    c.request_response(Payload::new(route(&["slow.hello"]), "late"))
                        .await
                })
            };
            let mut stream = c
                .request_stream(Payload::new(route(&["fast.count"]), "20"), 1)
                .unwrap();
            let first = stream.next().await.unwrap().unwrap();
            stream.request(1).unwrap();
            started_tx.send(()).unwrap();
            let mut items = vec![first.data];
            let mut refused = None;
            while let Some(item) = stream.next().await {
                items.push(item.unwrap().data);
                if refused.is_none() && draining_rx.try_recv().is_ok() {
                    // A new request while draining.
                    refused = Some(
                        c.request_response(Payload::new(route(&["fast.hello"]), "new"))
                            .await,
                    );
                }
                glommio::timer::sleep(Duration::from_millis(50)).await;
                // After the last item the broker may already have closed the connection.
                let _ = stream.request(1);
            }
            let slow_answer = slow_call.await;
            c.closed().await;
            (items.len(), slow_answer, refused)
        })
    });
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    broker.drain();
    eventually("readyz turns 503", Duration::from_secs(2), || {
        http_get(admin, "/readyz") == (503, "draining\n".into())
    });
    // Each shard applies the drain at its next timer pass (within 100 ms).
    eventually("every shard drains", Duration::from_secs(2), || {
        broker.snapshot().iter().all(|s| s.draining)
    });
    draining_tx.send(()).unwrap();
    // New connections are not accepted any more.
    eventually("the listener closes", Duration::from_secs(2), || {
        std::net::TcpStream::connect(addr).is_err()
    });
    let (items, slow_answer, refused) = requester.join().unwrap();
    assert_eq!(items, 20, "the stream in flight finished");
    assert_eq!(slow_answer.unwrap().data, "slow-1:late");
    match refused {
        Some(Err(ClientError::Remote { code, message })) => {
            assert_eq!(code, ErrorCode::REJECTED, "{message}");
        }
        other => panic!("a request during drain was not refused: {other:?}"),
    }
    // The refusal is counted.
    eventually(
        "the request refused while draining is counted",
        Duration::from_secs(2),
        || {
            broker
                .snapshot()
                .iter()
                .map(|s| s.stats.requests_rejected)
                .sum::<u64>()
                >= 1
        },
    );
    let started = Instant::now();
    broker.join();
    assert!(started.elapsed() < Duration::from_secs(5));
    drop((slow, fast));
}

#[test]
fn sigterm_drains_then_exits_zero() {
    let mut broker = BrokerProcess::start(&["--drain-timeout", "20s"], &[]);
    let addr = broker.addr;
    let admin = broker.admin.expect("admin address logged");
    let slow = App::start(addr, "slow-2", "slow", 1, Duration::from_millis(1500));
    eventually("the instance registered", Duration::from_secs(5), || {
        http_get(admin, "/api/apps").1.contains("slow-2")
    });
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    let (answer_tx, answer_rx) = mpsc::channel();
    let requester = std::thread::spawn(move || {
        run(move || async move {
            let c = Client::connect(addr).await.unwrap();
            let call = {
                let c = c.clone();
                glommio::spawn_local(async move {
                    c.request_response(Payload::new(route(&["slow.hello"]), "bye"))
                        .await
                })
            };
            glommio::timer::sleep(Duration::from_millis(100)).await;
            sent_tx.send(()).unwrap();
            answer_tx.send(call.await).unwrap();
            // Connected until the broker closes it: the broker's close is
            // what this test watches, not the requester's exit.
            c.closed().await;
            c.close_reason()
        })
    });
    sent_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    broker.signal("TERM");
    broker.wait_for("draining", Duration::from_secs(5));
    assert_eq!(http_get(admin, "/readyz").0, 503);
    let answer = answer_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        answer.unwrap().data,
        "slow-2:bye",
        "the request in flight was answered"
    );
    let reason = requester.join().unwrap().unwrap_or_default();
    assert!(
        reason.contains("CONNECTION_CLOSE"),
        "the requester was told: {reason}"
    );
    let (status, lines) = broker.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l.contains("CONNECTION_CLOSE")),
        "{}",
        lines.join("\n")
    );
    drop(slow);
}

// ---------------------------------------------------------------- reload

#[test]
fn sighup_applies_a_good_config_and_keeps_the_old_one_when_bad() {
    let file = write_temp(
        "reload.toml",
        "[limits]\nmax_streams_per_connection = 100\n",
    );
    let mut broker = BrokerProcess::start(&["--config", file.to_str().unwrap()], &[]);
    let addr = broker.addr;
    let admin = broker.admin.unwrap();
    let app = App::start(addr, "reload-1", "com.example.Echo", 1, Duration::ZERO);
    eventually("the instance registered", Duration::from_secs(5), || {
        http_get(admin, "/api/apps").1.contains("reload-1")
    });
    let requester = Requester::start(addr);
    assert_eq!(
        requester.call("com.example.Echo.hello", "1"),
        Ok("reload-1:1".into())
    );
    let local = requester.run(Command::Local).unwrap();

    // A bad file: logged, the config in force kept, the connection untouched.
    std::fs::write(&file, "[limits]\nmax_streams_per_connection = \"many\"\n").unwrap();
    broker.signal("HUP");
    broker.wait_for("reload failed", Duration::from_secs(5));
    assert!(
        broker
            .seen
            .iter()
            .any(|l| l.contains("limits.max_streams_per_connection")),
        "the error names the key: {}",
        broker.seen.join("\n")
    );
    assert!(
        http_get(admin, "/api/config")
            .1
            .contains("max_streams_per_connection = 100")
    );
    assert_eq!(
        requester.call("com.example.Echo.hello", "2"),
        Ok("reload-1:2".into())
    );

    // A good file: a tighter stream limit (on the open connection too), another
    // balancer, and debug logs.
    std::fs::write(
        &file,
        "[limits]\nmax_streams_per_connection = 3\n\n[log]\nlevel = \"debug\"\n\n[services.\"com.example.Echo\"]\nbalancer = \"random\"\n",
    )
    .unwrap();
    broker.signal("HUP");
    broker.wait_for("configuration reloaded", Duration::from_secs(5));
    let config = http_get(admin, "/api/config").1;
    assert!(
        config.contains("max_streams_per_connection = 3"),
        "{config}"
    );
    assert!(config.contains("balancer = \"random\""), "{config}");
    eventually(
        "the shards applied the new limit",
        Duration::from_secs(3),
        || {
            // Four streams on the same connection: the fourth is refused.
            let refused = requester.run(Command::OpenStreams("com.example.Echo.count", 4));
            refused == Ok("1".into())
        },
    );
    assert_eq!(
        requester.call("com.example.Echo.hello", "3"),
        Ok("reload-1:3".into())
    );
    assert_eq!(
        requester.run(Command::Local).unwrap(),
        local,
        "still the same connection"
    );
    // Debug logging is on now: a refused request is logged.
    let _ = requester.call("com.example.Missing.x", "4");
    broker.wait_for("request refused", Duration::from_secs(5));
    drop(requester);
    drop(app);
    broker.signal("TERM");
    let (status, _) = broker.wait_exit(Duration::from_secs(10));
    assert!(status.success());
}

// ------------------------------------------------------------ systemd

#[test]
fn sd_notify_ready_watchdog_reloading_stopping_in_order() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("notify");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (tx, messages) = mpsc::channel::<String>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listening = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        })
    };
    let mut broker = BrokerProcess::start(
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    std::thread::sleep(Duration::from_millis(600));
    broker.signal("HUP");
    broker.wait_for("configuration reloaded", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    broker.signal("TERM");
    let (status, lines) = broker.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{}", lines.join("\n"));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Release);
    listening.join().unwrap();
    let got: Vec<String> = messages.try_iter().collect();
    let first = |what: &str| {
        got.iter()
            .position(|m| m.lines().any(|l| l == what))
            .unwrap_or_else(|| panic!("no {what} in {got:?}"))
    };
    let last = |what: &str| {
        got.iter()
            .rposition(|m| m.lines().any(|l| l == what))
            .unwrap_or_else(|| panic!("no {what} in {got:?}"))
    };
    assert_eq!(first("READY=1"), 0, "READY=1 comes first: {got:?}");
    assert!(
        got[0].contains("STATUS=2 shards, listening on tcp://127.0.0.1:"),
        "{got:?}"
    );
    let watchdogs = got.iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    assert!(watchdogs >= 2, "WATCHDOG=1 every 200 ms: {got:?}");
    let reloading = first("RELOADING=1");
    assert!(got[reloading].contains("MONOTONIC_USEC="), "{got:?}");
    assert!(first("WATCHDOG=1") < reloading);
    assert!(
        last("READY=1") > reloading,
        "READY=1 again after the reload: {got:?}"
    );
    let stopping = first("STOPPING=1");
    assert!(stopping > last("READY=1"), "{got:?}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn watchdog_pings_stop_while_a_shard_is_stuck() {
    let broker = TestBroker::start(&[]);
    let admin = broker.admin_addr().unwrap();
    let controller = broker.controller();
    let (tx, pings) = mpsc::channel::<Instant>();
    let watchdog = rsbroker::watchdog::spawn(
        controller.clone(),
        Duration::from_millis(20),
        Duration::from_millis(400),
        move || {
            let _ = tx.send(Instant::now());
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(pings.try_iter().count() >= 5, "pings while healthy");
    controller.stall_shard(1, Duration::from_millis(3500));
    // Past the watchdog's threshold (400 ms) the pings stop; past /healthz's
    // (2 s) it names the shard.
    std::thread::sleep(Duration::from_millis(700));
    let _ = pings.try_iter().count();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        pings.try_iter().count(),
        0,
        "no pings while shard 1 is stuck"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let (status, body) = http_get(admin, "/healthz");
    assert_eq!(status, 503);
    assert!(body.contains("shard 1 has not run"), "{body}");
    // The shard runs again: pings resume.
    eventually("pings resume", Duration::from_secs(3), || {
        pings.try_iter().count() > 0
    });
    assert_eq!(http_get(admin, "/healthz").0, 200);
    broker.shut_down();
    watchdog.join().unwrap();
}

// ------------------------------------------------------------------ logs

#[test]
fn json_logs_name_each_connection_once_at_setup_and_close() {
    let mut broker = BrokerProcess::start(&["--log-format", "json"], &[]);
    let addr = broker.addr;
    let app = App::start(addr, "json-1", "svc", 1, Duration::ZERO);
    broker.wait_for("connection set up", Duration::from_secs(5));
    let answer = run(move || async move {
        let c = Client::connect(addr).await.unwrap();
        let a = c
            .request_response(Payload::new(route(&["svc.x"]), "y"))
            .await;
        c.close();
        c.closed().await;
        a
    });
    assert_eq!(answer.unwrap().data, "json-1:y");
    drop(app);
    broker.wait_for("connection closed", Duration::from_secs(5));
    broker.signal("TERM");
    let (status, lines) = broker.wait_exit(Duration::from_secs(10));
    assert!(status.success());
    let not_json: Vec<&String> = lines
        .iter()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        .collect();
    assert!(
        not_json.is_empty(),
        "lines that are not JSON: {not_json:#?}"
    );
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let fields = |e: &serde_json::Value| e["fields"].clone();
    let setups: Vec<_> = events
        .iter()
        .map(fields)
        .filter(|f| f["message"] == "connection set up")
        .collect();
    assert_eq!(setups.len(), 1, "{setups:?}");
    assert_eq!(setups[0]["app"], "app-json-1");
    assert_eq!(setups[0]["instance"], "json-1");
    let conn = setups[0]["conn"].clone();
    let closes: Vec<_> = events
        .iter()
        .map(fields)
        .filter(|f| f["message"] == "connection closed" && f["conn"] == conn)
        .collect();
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0]["app"], "app-json-1");
    assert!(closes[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    // The requester connection: set up and closed once each, too.
    let requester_setups = events
        .iter()
        .map(fields)
        .filter(|f| {
            f["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connection set up (a requester"))
        })
        .count();
    assert_eq!(requester_setups, 1);
}

// ---------------------------------------------------------- status page

/// Finds a program on PATH.
fn which(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {n}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    })
}

/// Whether the environment says every tool must be there (CI does).
fn require_all() -> bool {
    std::env::var_os("RSBROKER_REQUIRE_ALL").is_some()
}

#[test]
fn status_page_in_headless_chromium_shows_the_registered_app() {
    let (Some(chromium), Some(tesseract)) = (
        which(&["chromium", "chromium-browser", "google-chrome"]),
        which(&["tesseract"]),
    ) else {
        assert!(
            !require_all(),
            "chromium and tesseract are required (apt-get install chromium tesseract-ocr)"
        );
        eprintln!(
            "skipped: chromium or tesseract not installed (apt-get install chromium tesseract-ocr)"
        );
        return;
    };
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let admin = broker.admin_addr().unwrap();
    let app = App::start(addr, "orders-7", "com.shop.Orders", 1, Duration::ZERO);
    wait_for_instances(&broker, 1);
    eventually(
        "the app is in the route table view",
        Duration::from_secs(3),
        || http_get(admin, "/api/apps").1.contains("orders-7"),
    );
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chromium");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("status.png");
    let url = format!("http://{admin}/");
    let chrome = |extra: &[&str]| {
        let profile = dir.join(format!("profile-{}", extra.len()));
        std::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium runs")
    };
    let dom = chrome(&["--dump-dom", "--virtual-time-budget=3000"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("app-orders-7") && dom.contains("com.shop.Orders"),
        "{dom}"
    );
    let out = chrome(&[&format!("--screenshot={}", shot.display())]);
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Read the screenshot back as text: the app and its service are on it.
    let ocr = std::process::Command::new(&tesseract)
        .arg(&shot)
        .arg("stdout")
        .output()
        .expect("tesseract runs");
    let text = String::from_utf8_lossy(&ocr.stdout);
    assert!(
        text.contains("app-orders-7") && text.contains("com.shop.Orders"),
        "the screenshot does not show the app; OCR read:\n{text}"
    );
    drop(app);
}
