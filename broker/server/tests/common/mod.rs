//! Helpers shared by the loopback test binaries: a broker on two shards
//! and apps built on rsbroker-client, each on its own glommio executor.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use rsbroker::{BrokerConfig, BrokerHandle};
use rsbroker_client::{
    AppConfig, Client, ClientConfig, ClientError, LocalBoxFuture, Payload, Responder, Sink,
    Subscription,
};
use rsbroker_core::ServicePolicy;
use rsbroker_transports::ListenAddr;

/// Tests start brokers and executors; running them one at a time keeps
/// locked memory and the two cores from being oversubscribed. Take it
/// with [`serial`]; the broker fixtures take it themselves.
static SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    /// Whether this thread holds [`SERIAL`] already (a fixture inside
    /// another, or a test that holds it before its broker starts).
    static HOLDS_SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// This test's turn: no other test of the binary runs a broker until it
/// is dropped. Taken again on a thread that has it, it is a no-op, so
/// fixtures can nest (the fault suite's `Fault` holds a [`BrokerProcess`]).
pub struct Serial {
    guard: Option<MutexGuard<'static, ()>>,
}

pub fn serial() -> Serial {
    if HOLDS_SERIAL.get() {
        return Serial { guard: None };
    }
    // A test that failed while holding it poisoned it; the next one runs anyway.
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    HOLDS_SERIAL.set(true);
    Serial { guard: Some(guard) }
}

impl Drop for Serial {
    fn drop(&mut self) {
        if self.guard.take().is_some() {
            HOLDS_SERIAL.set(false);
        }
    }
}

/// The tests' broker settings: two shards on a loopback port chosen by the
/// system, small io_memory.
pub fn test_config() -> BrokerConfig {
    let mut c = BrokerConfig::default();
    c.server.listen = vec![ListenAddr::tcp(([127, 0, 0, 1], 0).into())];
    c.server.shards = 2;
    c.server.io_memory = rsbroker::config::Size(64 << 10);
    c.shutdown.close_timeout = Duration::from_secs(1);
    c.admin.listen = ([127, 0, 0, 1], 0).into();
    c
}

/// A broker running in this process for one test: it holds the test's
/// [`serial`] turn, derefs to its [`BrokerHandle`], and on drop stops the
/// broker, joins its shards and asserts they ended without an error
/// (unless the test is failing already).
pub struct TestBroker {
    handle: Option<BrokerHandle>,
    // Dropped after the broker has stopped.
    _serial: Serial,
}

impl TestBroker {
    /// [`test_config`] with `policies`.
    pub fn start(policies: &[(&str, ServicePolicy)]) -> Self {
        let mut config = test_config();
        for (svc, p) in policies {
            config.set_policy(svc, p);
        }
        Self::with_config(config)
    }

    pub fn with_config(config: BrokerConfig) -> Self {
        let serial = serial();
        Self {
            handle: Some(rsbroker::start(config).expect("broker starts")),
            _serial: serial,
        }
    }

    /// The broker's TCP address.
    pub fn addr(&self) -> SocketAddr {
        self.tcp_addr().expect("the broker listens on TCP")
    }

    /// Stops the broker now and waits for it (what drop does, at a point
    /// the test chooses).
    pub fn shut_down(self) {
        self.stop();
        self.join();
    }

    /// Waits for the broker to end by itself (after a drain), asserting
    /// its shards ended without an error.
    pub fn join(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.join().expect("the broker's shards ended cleanly");
        }
    }
}

impl std::ops::Deref for TestBroker {
    type Target = BrokerHandle;

    fn deref(&self) -> &BrokerHandle {
        self.handle.as_ref().expect("the broker runs until dropped")
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.stop();
            let ended = handle.join();
            if !std::thread::panicking() {
                ended.expect("the broker's shards ended cleanly");
            }
        }
    }
}

/// Runs `f` on a fresh glommio executor and returns its result.
pub fn run<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
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
pub struct TestService {
    pub name: String,
    pub log: mpsc::Sender<String>,
    /// Answer request-response only after this long (a slow instance).
    pub delay: Duration,
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
pub struct App {
    pub local: SocketAddr,
    pub log: mpsc::Receiver<String>,
    stop: mpsc::Sender<bool>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

impl App {
    pub fn start(
        addr: SocketAddr,
        uuid: &str,
        service: &str,
        power_rating: u32,
        delay: Duration,
    ) -> Self {
        Self::start_at(
            ListenAddr::tcp(addr),
            None,
            uuid,
            service,
            power_rating,
            delay,
        )
    }

    /// An app connected over `url` (any transport; `tls` for tls:// and wss://).
    pub fn start_at(
        url: ListenAddr,
        tls: Option<Arc<rsbroker_transports::rustls::ClientConfig>>,
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
                    .connect_url(&url, tls)
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

    pub fn kill(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            t.join().expect("app thread");
        }
    }

    pub fn logs(&self) -> Vec<String> {
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
pub fn wait_for_instances(broker: &BrokerHandle, apps: usize) {
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

pub fn shard_of(broker: &BrokerHandle, local: SocketAddr) -> u16 {
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
pub fn on_other_shard<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
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

/// GET `path` from an HTTP server; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("admin server reachable");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("a response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, body.to_owned())
}

/// Waits up to `within` for a child process to exit.
pub fn wait_child(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The socket address right after `marker` in a log line (text or JSON).
fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':' || c == '[' || c == ']'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The `rsbroker` binary running as a child process, its stderr collected
/// line by line. It holds the test's [`serial`] turn; killed on drop.
pub struct BrokerProcess {
    pub child: std::process::Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// The broker's pid (not the wrapper's, when there is one).
    pub pid: u32,
    // Dropped after the process has been killed.
    _serial: Serial,
}

impl BrokerProcess {
    /// Starts `rsbroker` with `args` (plus a loopback listener on a free
    /// port, 2 shards and an admin server on a free port unless `args` say
    /// otherwise) and waits until it listens.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_wrapped(&[], args, envs)
    }

    /// [`BrokerProcess::start`] under a wrapper command (`strace ...`).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str], envs: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let serial = serial();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = std::process::Command::new(program);
                c.args(rest).arg(env!("CARGO_BIN_EXE_rsbroker"));
                c
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_rsbroker")),
        };
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "tcp://127.0.0.1:0"]);
        }
        if !args.contains(&"--shards") {
            cmd.args(["--shards", "2"]);
        }
        if !args.contains(&"--admin") && !args.contains(&"--no-admin") {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .envs(envs.iter().copied())
            .env_remove("JOURNAL_STREAM")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("rsbroker starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let pid = child.id();
        let mut p = Self {
            child,
            lines,
            seen: Vec::new(),
            addr: ([0, 0, 0, 0], 0).into(),
            admin: None,
            pid,
            _serial: serial,
        };
        let line = p.wait_for("rsbroker listening on tcp://", Duration::from_secs(30));
        p.addr = address_after(&line, "tcp://").unwrap_or_else(|| panic!("no address in {line:?}"));
        if !args.contains(&"--no-admin") {
            let line = p.wait_for("admin server on http://", Duration::from_secs(10));
            p.admin = address_after(&line, "admin server on http://");
        }
        if !wrapper.is_empty() {
            let out = std::process::Command::new("pgrep")
                .args(["-P", &pid.to_string()])
                .output()
                .expect("pgrep runs");
            p.pid = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .expect("the wrapped broker's pid");
        }
        p
    }

    /// Waits for a stderr line containing `text`; returns it.
    pub fn wait_for(&mut self, text: &str, within: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(text)) {
            return l.clone();
        }
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(text);
                    self.seen.push(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "rsbroker did not log {text:?} within {within:?}; it logged:\n{}",
            self.seen.join("\n")
        );
    }

    /// Takes every line logged so far into `seen`, without waiting.
    pub fn collect_lines(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Sends a signal (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; returns its status and every line it logged.
    pub fn wait_exit(&mut self, within: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let status = wait_child(&mut self.child, within).unwrap_or_else(|| {
            panic!(
                "rsbroker still running after {within:?}; it logged:\n{}",
                self.seen.join("\n")
            )
        });
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(line);
        }
        assert!(
            !self.seen.iter().any(|l| l.contains("panicked at")),
            "rsbroker panicked:\n{}",
            self.seen.join("\n")
        );
        (status, self.seen.clone())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1,
/// written as PEM files under `dir`: (ca, certificate, key).
pub fn tls_files(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    std::fs::create_dir_all(dir).expect("certificate directory");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rsbroker test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).expect("write CA");
    std::fs::write(&paths.1, cert.pem()).expect("write certificate");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write key");
    paths
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test broker listening on tcp, tls, ws, wss and quic (loopback, free
/// ports), with a certificate for localhost: the config, the directory
/// holding the files, and the CA that signed the certificate.
pub fn every_transport_config(name: &str) -> (BrokerConfig, TempDir, PathBuf) {
    use rsbroker_transports::Scheme;
    let dir = std::env::temp_dir().join(format!("rsbroker-{name}-{}", std::process::id()));
    let (ca, cert, key) = tls_files(&dir);
    let mut c = test_config();
    c.server.listen = [
        Scheme::Tcp,
        Scheme::Tls,
        Scheme::Ws,
        Scheme::Wss,
        Scheme::Quic,
    ]
    .iter()
    .map(|s| ListenAddr::new(*s, ([127, 0, 0, 1], 0).into()))
    .collect();
    c.tls.certificate = Some(cert);
    c.tls.key = Some(key);
    c.limits.handshake_timeout = Duration::from_secs(1);
    c.limits.max_frame_size = rsbroker::config::Size(64 << 10);
    (c, TempDir(dir), ca)
}

/// `scheme`'s address of `broker` as a URL (the test certificate names
/// 127.0.0.1 too).
pub fn url_of(broker: &BrokerHandle, scheme: rsbroker_transports::Scheme) -> String {
    let a = broker.addr_of(scheme).expect("listening");
    format!("{}://127.0.0.1:{}{}", scheme, a.addr.port(), a.path)
}
