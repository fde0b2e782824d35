//! loadgen end to end: a broker (in this process), `loadgen responder` and
//! `loadgen requester` as the user runs them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rsbroker::BrokerConfig;
use rsbroker_transports::ListenAddr;

fn broker() -> rsbroker::BrokerHandle {
    let mut c = BrokerConfig::default();
    c.server.listen = vec![ListenAddr::tcp(([127, 0, 0, 1], 0).into())];
    c.server.shards = 1;
    c.server.io_memory = rsbroker::config::Size(64 << 10);
    c.admin.enabled = false;
    c.shutdown.close_timeout = Duration::from_secs(1);
    rsbroker::start(c).expect("broker starts")
}

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
}

/// Starts a responder and waits until it serves.
fn responder(addr: SocketAddr, extra: &[&str]) -> Child {
    responder_at(&format!("tcp://{addr}"), extra)
}

/// Starts a responder registering through `url` and waits until it serves.
fn responder_at(url: &str, extra: &[&str]) -> Child {
    let mut child = loadgen()
        .args(["responder", "--broker", url, "--duration", "60s"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen runs");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a line").expect("text");
    assert!(first.contains("loadgen responder: serving echo"), "{first}");
    child
}

/// A self-signed certificate for 127.0.0.1 and its key, written under
/// `name` in the test directory.
fn certificate(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("loadgen");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Asserts that a requester run succeeded and returns its stdout and the
/// JSON summary it wrote to `json`.
fn succeeded(out: &std::process::Output, json: &std::path::Path) -> (String, serde_json::Value) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (stdout, summary)
}

#[test]
fn open_loop_run_reports_rate_and_percentiles_and_fails_without_a_responder() {
    let broker = broker();
    let addr = broker.tcp_addr().unwrap();
    let mut resp = responder(addr, &[]);
    let json = tmp("rr.json");
    let hgrm = tmp("rr.hgrm");
    let out = loadgen()
        .args([
            "requester",
            "--broker",
            &format!("tcp://{addr}"),
            "--rps",
            "2000",
            "--duration",
            "3s",
        ])
        .args([
            "--json",
            json.to_str().unwrap(),
            "--hgrm",
            hgrm.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    let (stdout, summary) = succeeded(&out, &json);
    assert!(stdout.contains("target 2000/s, achieved"), "{stdout}");
    assert_eq!(summary["passed"], true);
    assert_eq!(summary["target_rps"], 2000.0);
    let achieved = summary["achieved_rps"].as_f64().unwrap();
    assert!((1900.0..=2100.0).contains(&achieved), "{summary}");
    assert_eq!(summary["errors"], 0);
    let lat = &summary["latency_us"];
    let p = |k: &str| lat[k].as_f64().unwrap();
    assert!(
        p("p50") > 0.0 && p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("p999")
    );
    assert!(p("p999") <= p("p9999") && p("p9999") <= p("max"));
    // Every request due in the window is measured, answered in it or just after.
    assert_eq!(lat["count"].as_u64().unwrap(), 6000);
    assert!(summary["lag_us"]["count"].as_u64().unwrap() >= 5900);
    let text = std::fs::read_to_string(&hgrm).unwrap();
    assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
    assert!(text.contains("#[Max     ="));

    // No responder: every request is refused; the run fails and says why.
    resp.kill().unwrap();
    resp.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = loadgen()
        .args([
            "requester",
            "--broker",
            &format!("tcp://{addr}"),
            "--rps",
            "500",
            "--duration",
            "1s",
            "--quiet",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL: achieved 0 requests/s, below 95% of the target 500/s"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL: 500 requests failed (first: REJECTED"),
        "{stdout}"
    );
    assert!(
        stdout.contains("no live instance of service echo"),
        "{stdout}"
    );
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn closed_loop_and_streams_under_a_window() {
    let broker = broker();
    let addr = broker.tcp_addr().unwrap();
    let mut resp = responder(addr, &["--items", "50"]);
    let json = tmp("stream.json");
    let out = loadgen()
        .args([
            "requester",
            "--broker",
            &format!("tcp://{addr}"),
            "--interaction",
            "stream",
        ])
        .args([
            "--max",
            "--concurrency",
            "2",
            "--connections",
            "2",
            "--request-n",
            "4",
        ])
        .args([
            "--duration",
            "1s",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let (_, summary) = succeeded(&out, &json);
    assert_eq!(summary["mode"], "closed");
    assert_eq!(summary["request_n"], 4);
    let streams = summary["ok"].as_u64().unwrap();
    let items = summary["items"].as_u64().unwrap();
    assert!(streams > 0);
    // Each stream is 50 items (some streams straddle the window's edges).
    assert!(
        items >= streams * 40 && items <= (streams + 8) * 50,
        "{summary}"
    );
    assert!(summary["item_latency_us"]["count"].as_u64().unwrap() > 0);
    let _ = resp.kill();
    let _ = resp.wait();
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn requester_over_tls_reaches_a_responder_over_websocket() {
    let (cert_path, key_path) = certificate("tls");
    let mut c = BrokerConfig::default();
    c.server.listen = ["tls://127.0.0.1:0", "ws://127.0.0.1:0/rsocket"]
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
    c.server.shards = 1;
    c.server.io_memory = rsbroker::config::Size(64 << 10);
    c.admin.enabled = false;
    c.shutdown.close_timeout = Duration::from_secs(1);
    c.tls.certificate = Some(cert_path.clone());
    c.tls.key = Some(key_path);
    let broker = rsbroker::start(c).expect("broker starts");
    let url = |s: rsbroker_transports::Scheme| broker.addr_of(s).unwrap().to_string();
    let mut resp = responder_at(&url(rsbroker_transports::Scheme::Ws), &[]);
    let tls = url(rsbroker_transports::Scheme::Tls);
    let json = tmp("tls.json");
    let run = |extra: &[&str]| {
        loadgen()
            .args([
                "requester",
                "--broker",
                &tls,
                "--max",
                "--duration",
                "1s",
                "--quiet",
            ])
            .args(["--json", json.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    // Without a CA the requester says what it needs.
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca"),
        "{out:?}"
    );
    let out = run(&["--ca", cert_path.to_str().unwrap()]);
    let (stdout, summary) = succeeded(&out, &json);
    assert!(stdout.contains(&format!("via {tls}")), "{stdout}");
    assert!(
        summary["ok"].as_u64().unwrap() > 0 && summary["errors"] == 0,
        "{summary}"
    );
    let _ = resp.kill();
    let _ = resp.wait();
    broker.stop();
    broker.join().unwrap();
}

/// A nats-server on a free loopback port, or None (test skipped) when the
/// Debian package `nats-server` is not installed and RSBROKER_REQUIRE_ALL is
/// not set.
fn nats_server() -> Option<(Child, String)> {
    let found = Command::new("sh")
        .args(["-c", "command -v nats-server"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("RSBROKER_REQUIRE_ALL").is_none(),
            "nats-server is missing (apt-get install nats-server)"
        );
        eprintln!("skipped: nats-server not installed");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nats-server listens");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((child, format!("nats://127.0.0.1:{port}")))
}

#[test]
fn the_same_scenario_runs_through_nats_server() {
    let Some((mut server, url)) = nats_server() else {
        return;
    };
    let mut resp = loadgen()
        .args(["responder", "--nats", &url, "--duration", "60s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen runs");
    let mut lines = BufReader::new(resp.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a line").expect("text");
    assert!(
        first.contains("loadgen responder: serving subject"),
        "{first}"
    );
    let json = tmp("nats.json");
    let out = loadgen()
        .args(["requester", "--nats", &url, "--rps", "1000"])
        .args(["--duration", "2s", "--connections", "2", "--quiet"])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let (_, summary) = succeeded(&out, &json);
    let achieved = summary["achieved_rps"].as_f64().unwrap();
    assert!((950.0..=1050.0).contains(&achieved), "{summary}");
    assert_eq!(summary["latency_us"]["count"].as_u64().unwrap(), 2000);
    assert_eq!(summary["errors"], 0);

    // Without a subscriber NATS has no responder: the requests fail.
    resp.kill().unwrap();
    resp.wait().unwrap();
    let out = loadgen()
        .args(["requester", "--nats", &url, "--rps", "200"])
        .args(["--duration", "1s", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("requests failed"), "{stdout}");
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn serve_answers_in_the_requesters_own_process() {
    let broker = broker();
    let addr = broker.tcp_addr().unwrap();
    let json = tmp("serve.json");
    // No responder process: the requester registers the route itself, with
    // the responder options given to --serve, and spins while it waits.
    let out = loadgen()
        .args(["requester", "--broker", &format!("tcp://{addr}")])
        .args(["--route", "com.example.Count", "--interaction", "stream"])
        .args(["--max", "--concurrency", "2", "--request-n", "8"])
        .args(["--duration", "1s", "--warmup", "200ms", "--spin", "--quiet"])
        .args(["--serve=--items 30 --instances 2"])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let (stdout, summary) = succeeded(&out, &json);
    assert!(stdout.contains("served in this process:"), "{stdout}");
    let served = &summary["served"];
    let streams = served["streams"].as_u64().unwrap();
    let received = summary["items_total"].as_u64().unwrap();
    assert!(streams > 0, "{summary}");
    // Every item sent was sent by the responder in this process, 30 per
    // stream (the last streams may be cancelled when the run ends).
    let sent = served["items"].as_u64().unwrap();
    assert!(sent <= streams * 30 && sent >= received, "{summary}");
    // The route was registered by the in-process instances, not refused.
    assert_eq!(summary["errors"], 0, "{summary}");

    // Options --serve does not know are a clear error before anything runs.
    let out = loadgen()
        .args([
            "requester",
            "--broker",
            &format!("tcp://{addr}"),
            "--rps",
            "10",
        ])
        .args(["--serve=--items many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loadgen: --serve: error: invalid value 'many'"),
        "{stderr}"
    );
    broker.stop();
    broker.join().unwrap();
}

#[test]
fn serve_over_nats_answers_requests_and_counts_them() {
    let Some((mut server, url)) = nats_server() else {
        return;
    };
    let json = tmp("nats-serve.json");
    let out = loadgen()
        .args(["requester", "--nats", &url, "--rps", "1000", "--spin"])
        .args([
            "--duration",
            "1s",
            "--connections",
            "2",
            "--serve",
            "--quiet",
        ])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let (_, summary) = succeeded(&out, &json);
    assert_eq!(summary["latency_us"]["count"].as_u64().unwrap(), 1000);
    assert_eq!(
        summary["served"]["request_response"].as_u64().unwrap(),
        summary["sent"].as_u64().unwrap(),
        "{summary}"
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Runs `cmd` and fails the test if it has not finished within `within`.
fn output_within(mut cmd: Command, within: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen runs");
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {within:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn quic_streams_through_the_broker_and_on_the_direct_path() {
    let (cert_path, key_path) = certificate("quic");
    let mut c = BrokerConfig::default();
    c.server.listen = vec!["quic://127.0.0.1:0".parse().unwrap()];
    c.server.shards = 1;
    c.server.io_memory = rsbroker::config::Size(64 << 10);
    c.admin.enabled = false;
    c.shutdown.close_timeout = Duration::from_secs(1);
    c.tls.certificate = Some(cert_path.clone());
    c.tls.key = Some(key_path.clone());
    let broker = rsbroker::start(c).expect("broker starts");
    let quic = broker
        .addr_of(rsbroker_transports::Scheme::Quic)
        .unwrap()
        .to_string();
    let json = tmp("quic.json");
    // An unbounded stream pushes as fast as QUIC's windows and pacing
    // allow, several times over: it must end on time every time.
    for round in 0..3 {
        let mut cmd = loadgen();
        cmd.args(["requester", "--broker", &quic, "--insecure"])
            .args(["--serve=--items 1000000", "--interaction", "stream"])
            .args(["--request-n", "2147483647", "--connections", "4", "--max"])
            .args(["--spin", "--duration", "1s", "--quiet"])
            .args(["--json", json.to_str().unwrap()]);
        let out = output_within(cmd, Duration::from_secs(30));
        let (_, summary) = succeeded(&out, &json);
        assert!(
            summary["items_total"].as_u64().unwrap() > 1000,
            "round {round}: {summary}"
        );
    }
    broker.stop();
    broker.join().unwrap();

    // The direct path: a plain RSocket server on quic://.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("quic://127.0.0.1:{port}");
    let mut server = loadgen()
        .args(["responder", "--listen", &url, "--duration", "60s"])
        .args(["--certificate", cert_path.to_str().unwrap()])
        .args(["--key", key_path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen runs");
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a line").expect("text");
    assert!(first.contains("serving RSocket on quic://"), "{first}");
    let mut cmd = loadgen();
    cmd.args(["requester", "--broker", &url, "--insecure", "--max"])
        .args([
            "--duration",
            "1s",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ]);
    let out = output_within(cmd, Duration::from_secs(30));
    let (_, summary) = succeeded(&out, &json);
    assert!(
        summary["ok"].as_u64().unwrap() > 0 && summary["errors"] == 0,
        "{summary}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// The body of `GET path` from the admin server at `addr`.
fn admin_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn per_app_limits_hold_under_load_and_spare_other_apps() {
    use rsbroker::config::{IdentityConfig, LimitsConfig};
    let dir = tmp("limits");
    std::fs::create_dir_all(&dir).unwrap();
    let credentials = dir.join("credentials.toml");
    let mut users = String::new();
    for name in ["svc", "bulk", "steady"] {
        let secret = rsbroker::trust::hash_secret(b"pw").unwrap();
        users += &format!("[users.{name}]\nsecret = \"{secret}\"\n");
    }
    std::fs::write(&credentials, users).unwrap();
    let mut c = BrokerConfig::default();
    c.server.listen = vec![ListenAddr::tcp(([127, 0, 0, 1], 0).into())];
    c.server.shards = 2;
    c.server.io_memory = rsbroker::config::Size(64 << 10);
    c.admin.listen = ([127, 0, 0, 1], 0).into();
    c.shutdown.close_timeout = Duration::from_secs(1);
    c.auth.allow_anonymous = false;
    c.auth.credentials = Some(credentials);
    c.auth.identities.insert(
        "bulk".into(),
        IdentityConfig {
            limits: LimitsConfig {
                max_connections: Some(2),
                requests_per_second: Some(200),
                burst: Some(20),
                ..LimitsConfig::default()
            },
            ..IdentityConfig::default()
        },
    );
    let broker = rsbroker::start(c).expect("broker starts");
    let addr = broker.tcp_addr().unwrap();
    let admin = broker.admin_addr().unwrap();
    let url = format!("tcp://{addr}");
    let mut resp = responder(addr, &["--user", "svc:pw"]);

    // bulk asks for five times its rate over two connections (one per
    // shard), while steady runs beside it without a limit.
    let run = |user: &str, rps: &str, connections: &str, json: &std::path::Path| {
        let mut cmd = loadgen();
        cmd.args(["requester", "--broker", &url, "--user", user, "--rps", rps])
            .args(["--connections", connections, "--duration", "2s", "--quiet"])
            .args(["--json", json.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let (bulk_json, steady_json) = (dir.join("bulk.json"), dir.join("steady.json"));
    let bulk = run("bulk:pw", "1000", "2", &bulk_json);
    let steady = run("steady:pw", "300", "1", &steady_json);
    let bulk = bulk.wait_with_output().unwrap();
    let steady = steady.wait_with_output().unwrap();

    let (_, steady) = succeeded(&steady, &steady_json);
    // Every request steady sent was answered: `ok` counts only answers
    // inside the 2 s window, so the last one may land just after it; the
    // latency count holds every answer to a request sent in the window.
    assert_eq!(steady["errors"], 0, "{steady}");
    assert_eq!(steady["sent"], 600, "{steady}");
    assert_eq!(steady["latency_us"]["count"], 600, "{steady}");
    assert!(steady["ok"].as_u64().unwrap() >= 595, "{steady}");

    let stdout = String::from_utf8_lossy(&bulk.stdout);
    assert_eq!(bulk.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("identity bulk is over its limit of 200 requests a second"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bulk_json).unwrap()).unwrap();
    let ok = summary["ok"].as_u64().unwrap();
    let errors = summary["errors"].as_u64().unwrap();
    // 2 s at 200/s, the burst of 20, and what a late answer adds.
    assert!((300..=480).contains(&ok), "{summary}");
    // Every request is answered or refused (a few just after the window).
    assert!((1990..=2000).contains(&(ok + errors)), "{summary}");

    // A third connection of bulk is one too many; steady may open more.
    let out = loadgen()
        .args(["requester", "--broker", &url, "--user", "bulk:pw"])
        .args(["--connections", "3", "--rps", "10", "--duration", "1s"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("identity bulk already has 2 connections open, its limit"),
        "{text}"
    );
    let out = loadgen()
        .args(["requester", "--broker", &url, "--user", "steady:pw"])
        .args(["--connections", "3", "--rps", "30", "--duration", "1s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let metrics = admin_get(admin, "/metrics");
    let value = |line: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {line} in\n{metrics}"))
    };
    let refused = 2000 - ok;
    let limited = value(r#"rsbroker_app_limited_total{app="bulk",limit="rate"}"#);
    assert!((errors..=refused).contains(&limited), "{limited}");
    assert_eq!(
        value(r#"rsbroker_app_limited_total{app="bulk",limit="connections"}"#),
        1
    );
    assert_eq!(value(r#"rsbroker_app_connections{app="svc"}"#), 1);
    let per_shard: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("rsbroker_requests_limited_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(per_shard, limited);
    let _ = resp.kill();
    let _ = resp.wait();
    broker.stop();
    broker.join().unwrap();
}
