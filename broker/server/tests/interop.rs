//! Interop: RSocket clients that others wrote talk to each other through
//! rsbroker on two shards.
//!
//! - rsocket-py (PyPI `rsocket`): a responder registers `com.example.Echo`
//!   with alibaba-style SETUP metadata and announces one more service over
//!   METADATA_PUSH; a requester calls it in all four interaction models.
//!   The scripts live in `tests/interop/rsocket_py/`.
//! - rsocket-py with PyJWT: RS256 tokens at SETUP, alibaba-style and as
//!   authentication metadata, and a tampered one refused (`auth.py`).
//! - rsocket_rust: a requester doing request-response against an
//!   rsbroker-client responder on the other shard.
//!
//! Python comes from `RSBROKER_INTEROP_PYTHON` when set (CI points it at the
//! venv it built); otherwise this test builds a venv under cargo's target
//! directory from `tests/interop/requirements.txt` (needs `python3 -m venv`
//! and PyPI once).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop")
}

/// The Python interpreter with rsocket-py installed.
fn python() -> PathBuf {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(prepare_python)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn prepare_python() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("RSBROKER_INTEROP_PYTHON") {
        return Ok(p.into());
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-venv");
    let python = venv.join("bin/python");
    let requirements = interop_dir().join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    let stamp = venv.join("requirements.installed");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&*wanted) {
        return Ok(python);
    }
    let status = |what: &str, cmd: &mut Command| -> Result<(), String> {
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("{what} failed ({s})")),
            Err(e) => Err(format!("{what} could not start: {e}")),
        }
    };
    status(
        "python3 -m venv (install python3 and python3-venv, or set RSBROKER_INTEROP_PYTHON)",
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
    )?;
    status(
        "pip install -r tests/interop/requirements.txt",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements),
    )?;
    std::fs::write(&stamp, wanted).map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    Ok(python)
}

/// A child process whose stdout lines arrive on a channel; killed on drop
/// so a failing test leaves nothing behind.
struct Script {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

/// The rsocket-js scripts' directory, with `npm ci` and the browser
/// bundle built (once per test run; needs Node 20+, npm and the registry).
fn node_ready() -> PathBuf {
    static READY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let dir = interop_dir().join("js");
            let run = |what: &str, args: &[&str]| -> Result<(), String> {
                match Command::new("npm").args(args).current_dir(&dir).status() {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(format!("{what} failed ({s})")),
                    Err(e) => Err(format!(
                        "{what} could not start (install Node 20 and npm): {e}"
                    )),
                }
            };
            let stamp = dir.join("node_modules/.rsbroker-installed");
            let lock = std::fs::read_to_string(dir.join("package-lock.json"))
                .map_err(|e| format!("cannot read package-lock.json: {e}"))?;
            if std::fs::read_to_string(&stamp).ok().as_deref() != Some(&*lock) {
                run(
                    "npm ci in tests/interop/js",
                    &["ci", "--no-audit", "--no-fund"],
                )?;
                std::fs::write(&stamp, &lock).map_err(|e| format!("{}: {e}", stamp.display()))?;
            }
            run(
                "npm run build:browser",
                &["run", "--silent", "build:browser"],
            )?;
            Ok(dir)
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Script {
    fn start(script: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(python());
        cmd.arg(interop_dir().join("rsocket_py").join(script))
            .args(args);
        Self::spawn(script, cmd)
    }

    fn node(script: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new("node");
        cmd.arg(node_ready().join(script)).args(args);
        Self::spawn(script, cmd)
    }

    fn spawn(script: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {script}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            name: script.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line equal to `want`; panics with everything printed so
    /// far if it does not come in time or the script exits.
    fn expect_line(&mut self, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line == want;
                    self.seen.push(line);
                    if done {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "{} did not print {want:?}; it printed {:?} (exit: {:?})",
            self.name,
            self.seen,
            self.child.try_wait()
        );
    }

    /// Waits for the script to exit by itself and returns whether it
    /// succeeded, with every line it printed.
    fn finish(mut self, within: Duration) -> (bool, Vec<String>) {
        drop(self.stdin.take());
        let status = wait_child(&mut self.child, within).unwrap_or_else(|| {
            panic!(
                "{} still running after {within:?}; it printed {:?}",
                self.name, self.seen
            )
        });
        // The reader thread ends at EOF; take what it collected.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        (status.success(), std::mem::take(&mut self.seen))
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.stdin.take().map(|mut s| s.flush());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn rsocket_py_responder_and_requester_all_models() {
    // Build the venv before starting anything that has timeouts, in this
    // test's turn (the broker below takes it again).
    let _serial = serial();
    let _ = python();
    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());

    let mut responder = Script::start("responder.py", &[&host, &port, "py-echo-1"]);
    responder.expect_line("READY", Duration::from_secs(60));
    wait_for_instances(&broker, 1);
    let registered: Vec<_> = broker
        .snapshot()
        .into_iter()
        .flat_map(|s| s.connections.to_vec())
        .filter_map(|c| c.app)
        .collect();
    assert_eq!(
        registered,
        [("py-echo".to_owned(), "py-echo-1".to_owned())],
        "the rsocket-py app registered with its name and uuid"
    );

    let requester = Script::start("requester.py", &[&host, &port]);
    let (ok, lines) = requester.finish(Duration::from_secs(60));
    assert!(ok, "requester.py failed: {lines:?}");
    for check in [
        "OK request-response",
        "OK fragmented request-response",
        "OK fire-and-forget sent",
        "OK request-stream",
        "OK request-stream window 1",
        "OK request-channel",
        "OK service exposed by METADATA_PUSH",
        "OK no instance rejected",
        "OK metadata push from a requester",
    ] {
        assert!(
            lines.iter().any(|l| l == check),
            "missing {check:?} in {lines:?}"
        );
    }
    // Fire-and-forget has no answer: the responder says it arrived.
    responder.expect_line("FNF note-1", Duration::from_secs(10));
    let (ok, lines) = responder.finish(Duration::from_secs(20));
    assert!(ok, "responder.py failed: {lines:?}");
}

/// rsocket-py with tokens PyJWT signs (RS256): an alibaba-style SETUP
/// (app metadata, services, bearer token) is let in and answers a
/// requester whose token is authentication metadata; the same token
/// tampered with is refused, and only it.
#[test]
fn rsocket_py_with_rs256_tokens_from_pyjwt() {
    let _serial = serial();
    let _ = python();
    let dir = std::env::temp_dir().join(format!("rsbroker-py-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let (private, public) = (dir.join("jwt.key"), dir.join("jwt.pub.pem"));
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            private.to_str().unwrap(),
        ],
        vec![
            "pkey",
            "-pubout",
            "-in",
            private.to_str().unwrap(),
            "-out",
            public.to_str().unwrap(),
        ],
    ] {
        let ok = Command::new("openssl")
            .args(&args)
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl {args:?}");
    }
    let mut config = test_config();
    config.auth.allow_anonymous = false;
    config.auth.jwt.keys = vec![public];
    config.auth.jwt.issuers = vec!["test-issuer".into()];
    config.auth.jwt.audiences = vec!["rsbroker".into()];
    let broker = TestBroker::with_config(config);
    let addr = broker.addr();
    let script = Script::start(
        "auth.py",
        &[
            &addr.ip().to_string(),
            &addr.port().to_string(),
            private.to_str().unwrap(),
        ],
    );
    assert_lines(
        "auth.py",
        script.finish(Duration::from_secs(60)),
        &[
            "OK alibaba-style SETUP with a bearer token",
            "OK RS256 token from PyJWT accepted",
            "OK tampered token refused",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let refused: u64 = broker
        .snapshot()
        .iter()
        .map(|s| s.stats.setups_refused)
        .sum();
    assert_eq!(refused, 1, "only the tampered token was refused");
}

const PY_CHECKS: [&str; 9] = [
    "OK request-response",
    "OK fragmented request-response",
    "OK fire-and-forget sent",
    "OK request-stream",
    "OK request-stream window 1",
    "OK request-channel",
    "OK service exposed by METADATA_PUSH",
    "OK no instance rejected",
    "OK metadata push from a requester",
];

fn assert_lines(who: &str, (ok, lines): (bool, Vec<String>), want: &[&str]) {
    assert!(ok, "{who} failed: {lines:?}");
    for check in want {
        assert!(
            lines.iter().any(|l| l == check),
            "{who}: missing {check:?} in {lines:?}"
        );
    }
}

/// rsocket-py over QUIC (aioquic), with and without ALPN: a QUIC requester
/// calls a TCP responder, and a TCP requester calls a QUIC responder, in
/// all four interaction models, through the broker on two shards.
#[test]
fn rsocket_py_over_quic_with_and_without_alpn() {
    use rsbroker_transports::Scheme;
    let _serial = serial();
    let _ = python();
    for alpn in [None, Some("rsocket")] {
        let (mut config, _dir, ca) = every_transport_config("interop-quic");
        config.quic.alpn = alpn.map(str::to_owned).into_iter().collect();
        let broker = TestBroker::with_config(config);
        let ca = ca.to_string_lossy().into_owned();
        let quic = url_of(&broker, Scheme::Quic);
        let tcp = url_of(&broker, Scheme::Tcp);
        let mut quic_args = vec![quic.as_str(), "--ca", &ca];
        if let Some(a) = alpn {
            quic_args.extend(["--alpn", a]);
        }
        let label = format!("ALPN {alpn:?}");

        let mut responder = Script::start("responder.py", &[&tcp, "py-tcp-1"]);
        responder.expect_line("READY", Duration::from_secs(60));
        wait_for_instances(&broker, 1);
        let requester = Script::start("requester.py", &quic_args);
        assert_lines(
            &format!("requester.py over quic ({label})"),
            requester.finish(Duration::from_secs(60)),
            &PY_CHECKS,
        );
        responder.expect_line("FNF note-1", Duration::from_secs(10));
        drop(responder);
        wait_for_instances(&broker, 0);

        let mut args = quic_args.clone();
        args.insert(1, "py-quic-1");
        let mut responder = Script::start("responder.py", &args);
        responder.expect_line("READY", Duration::from_secs(60));
        wait_for_instances(&broker, 1);
        let requester = Script::start("requester.py", &[&tcp]);
        assert_lines(
            &format!("requester.py to a responder over quic ({label})"),
            requester.finish(Duration::from_secs(60)),
            &PY_CHECKS,
        );
        responder.expect_line("FNF note-1", Duration::from_secs(10));
        // Closed, not killed: a killed QUIC peer sends nothing, and the
        // broker would hold its connection until quic.idle_timeout.
        let (ok, lines) = responder.finish(Duration::from_secs(20));
        assert!(ok, "responder.py over quic: {lines:?}");
        wait_for_instances(&broker, 0);
        let q: u64 = broker.snapshot().iter().map(|s| s.quic.datagrams_in).sum();
        assert!(q > 0, "no QUIC datagram reached the broker ({label})");
    }
}

/// rsocket-py over TLS and WebSocket, rsocket-js (0.0.27 and 1.0) and a
/// browser over WebSocket: each calls a responder connected over another
/// transport, through the broker on two shards.
#[test]
fn clients_others_wrote_over_tls_and_websocket() {
    use rsbroker_transports::Scheme;
    let _serial = serial();
    let _ = python();
    let _ = node_ready();
    let (config, _dir, ca) = every_transport_config("interop");
    let broker = TestBroker::with_config(config);
    let ca = ca.to_string_lossy().into_owned();
    let url = |s: Scheme| url_of(&broker, s);

    // Responder on ws://; requesters on tls:// and wss://.
    let mut responder = Script::start("responder.py", &[&url(Scheme::Ws), "py-ws-1"]);
    responder.expect_line("READY", Duration::from_secs(60));
    wait_for_instances(&broker, 1);
    for scheme in [Scheme::Tls, Scheme::Wss] {
        let requester = Script::start("requester.py", &[&url(scheme), "--ca", &ca]);
        assert_lines(
            &format!("requester.py over {scheme}"),
            requester.finish(Duration::from_secs(60)),
            &PY_CHECKS,
        );
        responder.expect_line("FNF note-1", Duration::from_secs(10));
    }
    drop(responder);
    wait_for_instances(&broker, 0);

    // Responder on tls://; rsocket-js and the browser on ws://.
    let mut responder = Script::start(
        "responder.py",
        &[&url(Scheme::Tls), "py-tls-1", "--ca", &ca],
    );
    responder.expect_line("READY", Duration::from_secs(60));
    wait_for_instances(&broker, 1);
    let models = [
        "OK request-response",
        "OK fire-and-forget",
        "OK request-stream",
        "OK request-channel",
    ];
    for (script, note) in [
        ("requester-0.0.27.js", "FNF note-js-0.0.27"),
        ("requester-1.0.js", "FNF note-js-1.0"),
    ] {
        let requester = Script::node(script, &[&url(Scheme::Ws)]);
        assert_lines(script, requester.finish(Duration::from_secs(60)), &models);
        responder.expect_line(note, Duration::from_secs(10));
    }
    let browser = Script::node("run-browser.js", &[&url(Scheme::Ws)]);
    assert_lines(
        "the browser page",
        browser.finish(Duration::from_secs(90)),
        &[
            "OK request-response echo:browser",
            "OK request-stream 5 items windows 2+3",
        ],
    );
    let (ok, lines) = responder.finish(Duration::from_secs(20));
    assert!(ok, "responder.py failed: {lines:?}");
}

#[test]
fn rsocket_rust_requester_request_response() {
    use rsocket_rust::Client as RustClient;
    use rsocket_rust::extension::{CompositeMetadata, MimeType, RoutingMetadata};
    use rsocket_rust::prelude::{Payload as RustPayload, RSocket, RSocketFactory};
    use rsocket_rust::utils::Writeable;
    use rsocket_rust_transport_tcp::TcpClientTransport;

    let broker = TestBroker::start(&[]);
    let addr = broker.addr();
    let app = App::start(addr, "rs-echo-1", "com.example.Echo", 1, Duration::ZERO);
    wait_for_instances(&broker, 1);
    let responder_shard = shard_of(&broker, app.local);

    let request = |route: &str, data: String| {
        let routing = RoutingMetadata::builder().push_str(route).build();
        let metadata = CompositeMetadata::builder()
            .push(MimeType::MESSAGE_X_RSOCKET_ROUTING_V0, routing.bytes())
            .build();
        RustPayload::builder()
            .set_metadata(metadata.bytes())
            .set_data(data.into_bytes())
            .build()
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        // Connect until the connection lands on the responder's other shard.
        let mut stream = None;
        for _ in 0..40 {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            if shard_of(&broker, s.local_addr().unwrap()) != responder_shard {
                stream = Some(s);
                break;
            }
        }
        let stream = stream.expect("a connection on the other shard");
        let client: RustClient = RSocketFactory::connect()
            .transport(TcpClientTransport::from(stream))
            .metadata_mime_type("message/x.rsocket.composite-metadata.v0")
            .start()
            .await
            .expect("rsocket_rust connects to rsbroker");

        // One at a time, then many in flight on the one connection.
        for i in 0..50 {
            let answer = client
                .request_response(request("com.example.Echo.hello", format!("seq-{i}")))
                .await
                .expect("answered")
                .expect("with a payload");
            assert_eq!(answer.data_utf8(), Some(&*format!("rs-echo-1:seq-{i}")));
        }
        let mut in_flight = tokio::task::JoinSet::new();
        for i in 0..64 {
            let client = client.clone();
            let req = request("com.example.Echo.hello", format!("par-{i}"));
            in_flight.spawn(async move { (i, client.request_response(req).await) });
        }
        let mut answered = 0;
        while let Some(joined) = in_flight.join_next().await {
            let (i, result) = joined.expect("task");
            let answer = result.expect("answered").expect("with a payload");
            assert_eq!(answer.data_utf8(), Some(&*format!("rs-echo-1:par-{i}")));
            answered += 1;
        }
        assert_eq!(answered, 64);

        let missing = client
            .request_response(request("com.example.Missing.call", "x".to_owned()))
            .await;
        let err = missing.expect_err("no instance of com.example.Missing");
        let text = err.to_string();
        assert!(
            text.contains("REJECTED") && text.contains("com.example.Missing"),
            "{text}"
        );
    });
    drop(app);
}
