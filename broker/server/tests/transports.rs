//! The broker on every transport: requesters and responders on tcp, tls,
//! ws and wss reach each other across shards, and bad input on each port
//! closes only its own connection, with a counter moved, while the other
//! connections keep working.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    App, TempDir, TestBroker, every_transport_config, run, tls_files, wait_for_instances,
};
use rsbroker::BrokerConfig;
use rsbroker_client::metadata::route;
use rsbroker_client::{Client, ClientConfig, Payload};
use rsbroker_transports::rustls::ClientConfig as TlsClient;
use rsbroker_transports::{ListenAddr, Scheme};

const SCHEMES: [Scheme; 5] = [
    Scheme::Tcp,
    Scheme::Tls,
    Scheme::Ws,
    Scheme::Wss,
    Scheme::Quic,
];

struct Setup {
    broker: TestBroker,
    tls: Arc<TlsClient>,
    _dir: TempDir,
}

fn config_on_every_transport(name: &str) -> (BrokerConfig, TempDir, Arc<TlsClient>) {
    let (c, dir, ca) = every_transport_config(name);
    let tls = rsbroker_transports::tls::client_config_with_ca(&ca).expect("CA loads");
    (c, dir, tls)
}

fn start(name: &str) -> Setup {
    let (c, dir, tls) = config_on_every_transport(name);
    Setup {
        broker: TestBroker::with_config(c),
        tls,
        _dir: dir,
    }
}

impl Setup {
    fn url(&self, scheme: Scheme) -> ListenAddr {
        let mut url = self.broker.addr_of(scheme).expect("listening").clone();
        // The certificate names localhost.
        url.host = "localhost".into();
        url
    }

    fn tls_for(&self, scheme: Scheme) -> Option<Arc<TlsClient>> {
        scheme.is_tls().then(|| self.tls.clone())
    }

    fn io(&self) -> rsbroker::IoStats {
        let mut sum = rsbroker::IoStats::default();
        for s in self.broker.snapshot() {
            sum.tls_handshakes_failed += s.io.tls_handshakes_failed;
            sum.upgrades_refused += s.io.upgrades_refused;
            sum.handshake_timeouts += s.io.handshake_timeouts;
            sum.unreadable_connections += s.io.unreadable_connections;
            sum.bytes_in += s.io.bytes_in;
        }
        sum
    }
}

/// A request-response and a stream in windows of 2 then 3, over `url`,
/// to `service`; returns what came back.
async fn call(
    url: ListenAddr,
    tls: Option<Arc<TlsClient>>,
    service: String,
) -> (String, Vec<String>) {
    let client = Client::builder(ClientConfig::default())
        .connect_url(&url, tls)
        .await
        .unwrap_or_else(|e| panic!("connect over {url}: {e}"));
    let answer = client
        .request_response(Payload::new(route(&[&service]), "hello"))
        .await
        .unwrap_or_else(|e| panic!("request-response over {url}: {e}"));
    let mut items = Vec::new();
    let mut stream = client
        .request_stream(Payload::new(route(&[&service]), "5"), 2)
        .expect("stream");
    for _ in 0..2 {
        let item = stream.next().await.expect("item").expect("ok");
        items.push(String::from_utf8_lossy(&item.data).into_owned());
    }
    // The window is spent: nothing more comes until more is asked for.
    let early = futures_lite::future::or(async { Some(stream.next().await) }, async {
        glommio::timer::sleep(Duration::from_millis(100)).await;
        None
    })
    .await;
    assert!(
        early.is_none(),
        "an item beyond the window over {url}: {early:?}"
    );
    stream.request(3).expect("request 3 more");
    while let Some(item) = stream.next().await {
        items.push(String::from_utf8_lossy(&item.expect("ok").data).into_owned());
    }
    client.close();
    (String::from_utf8_lossy(&answer.data).into_owned(), items)
}

#[test]
fn every_requester_transport_reaches_every_responder_transport() {
    let s = start("matrix");
    let apps: Vec<App> = SCHEMES
        .iter()
        .map(|r| {
            App::start_at(
                s.url(*r),
                s.tls_for(*r),
                &format!("on-{r}"),
                &format!("matrix.{r}"),
                1,
                Duration::ZERO,
            )
        })
        .collect();
    wait_for_instances(&s.broker, apps.len());
    for requester in SCHEMES {
        for responder in SCHEMES {
            let (url, tls) = (s.url(requester), s.tls_for(requester));
            let service = format!("matrix.{responder}");
            let (answer, items) = run(move || call(url, tls, service));
            assert_eq!(
                answer,
                format!("on-{responder}:hello"),
                "{requester} -> {responder}"
            );
            assert_eq!(
                items,
                ["0", "1", "2", "3", "4"],
                "{requester} -> {responder}"
            );
        }
    }
    drop(apps);
}

/// A requester over every transport still gets its answers.
fn others_still_work(s: &Setup) {
    for scheme in SCHEMES {
        let (url, tls) = (s.url(scheme), s.tls_for(scheme));
        let (answer, _) = run(move || call(url, tls, "bad.echo".into()));
        assert_eq!(answer, "echo:hello", "over {scheme} after the bad input");
    }
}

/// Sends `bytes` to `addr` on a raw socket and reads until the broker
/// closes it; returns what the broker sent.
fn poke(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(bytes).expect("write");
    read_to_close(&mut c)
}

fn read_to_close(c: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let started = Instant::now();
    loop {
        match c.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!(
                "the broker did not close the connection: {e} after {:?}",
                started.elapsed()
            ),
        }
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A WebSocket client frame (masked) with `opcode` and `payload`.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65_536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The WebSocket close code in what the broker sent after its 101.
fn close_code(got: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(got);
    let body = &got[text.find("\r\n\r\n")? + 4..];
    // Server frames are unmasked: find the Close frame (0x88).
    let mut rest = body;
    while rest.len() >= 2 {
        let (op, len) = (rest[0] & 0x0f, usize::from(rest[1] & 0x7f));
        let (head, len) = match len {
            126 => (4, usize::from(u16::from_be_bytes([rest[2], rest[3]]))),
            127 => (
                10,
                u64::from_be_bytes(rest[2..10].try_into().ok()?) as usize,
            ),
            n => (2, n),
        };
        if op == 8 {
            return Some(u16::from_be_bytes([rest[head], rest[head + 1]]));
        }
        rest = rest.get(head + len..)?;
    }
    None
}

#[test]
fn bad_input_on_every_port_closes_only_its_own_connection() {
    let s = start("bad-input");
    let _app = App::start_at(
        s.url(Scheme::Tcp),
        None,
        "echo",
        "bad.echo",
        1,
        Duration::ZERO,
    );
    wait_for_instances(&s.broker, 1);
    // A requester that stays connected through all of it.
    let steady = s.url(Scheme::Ws);
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<usize>();
    let steady_thread = std::thread::spawn(move || {
        run(move || async move {
            let client = Client::builder(ClientConfig::default())
                .connect_url(&steady, None)
                .await
                .expect("connect");
            let mut answered = 0;
            while stop_rx.try_recv().is_err() {
                let a = client
                    .request_response(Payload::new(route(&["bad.echo"]), "steady"))
                    .await
                    .expect("the steady requester is never disturbed");
                assert_eq!(a.data, Bytes::from_static(b"echo:steady"));
                answered += 1;
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            done_tx.send(answered).unwrap();
        })
    });

    let tcp = s.url(Scheme::Tcp).addr;
    let tls = s.url(Scheme::Tls).addr;
    let ws = s.url(Scheme::Ws).addr;
    let wss = s.url(Scheme::Wss).addr;

    // Plaintext RSocket to the TLS port: the TLS handshake fails.
    let before = s.io();
    poke(
        tls,
        &[
            0, 0, 20, 0, 0, 0, 0, 4, 0, 0, 1, 0, 0, 0, 0x4e, 0x20, 0, 1, 0x5f, 0x90, 0, 0, 0,
        ],
    );
    wait_until("a TLS handshake failure was counted", || {
        s.io().tls_handshakes_failed > before.tls_handshakes_failed
    });

    // A TLS ClientHello to the plain port, and to the ws:// port.
    let hello = [
        0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c, 0x03, 0x03,
    ];
    let before = s.io();
    poke(tcp, &hello);
    wait_until("the TLS bytes on the plain port were counted", || {
        s.io().unreadable_connections > before.unreadable_connections
    });
    let before = s.io();
    let got = poke(ws, &hello);
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 400"),
        "{got:?}"
    );
    wait_until("the refused upgrade was counted", || {
        s.io().upgrades_refused > before.upgrades_refused
    });

    // Garbage instead of an upgrade, and an upgrade to the wrong path.
    let got = poke(ws, b"\x00\x01\x02garbage\r\n\r\n");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 400"),
        "{got:?}"
    );
    let got = poke(ws, upgrade_request("/elsewhere").as_bytes());
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 404"),
        "{got:?}"
    );
    // An HTTP request to the plain port.
    let before = s.io();
    poke(tcp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    wait_until("the HTTP request on the plain port was counted", || {
        s.io().unreadable_connections > before.unreadable_connections
    });

    // A text message after a good upgrade: closed with 1003.
    let mut text = upgrade_request("/rsocket").into_bytes();
    text.extend(ws_frame(0x1, b"not rsocket"));
    let got = poke(ws, &text);
    assert_eq!(
        close_code(&got),
        Some(1003),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // A message above max_frame_size (64 KiB here): closed with 1009.
    let mut big = upgrade_request("/rsocket").into_bytes();
    big.extend(ws_frame(0x2, &vec![0u8; 70_000]));
    let got = poke(ws, &big);
    assert_eq!(
        close_code(&got),
        Some(1009),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // A ping is answered with a pong carrying its payload.
    let mut c = TcpStream::connect(ws).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(upgrade_request("/rsocket").as_bytes()).unwrap();
    c.write_all(&ws_frame(0x9, b"are you there")).unwrap();
    c.write_all(&ws_frame(0x8, &1000u16.to_be_bytes())).unwrap();
    let got = read_to_close(&mut c);
    let body = &got[String::from_utf8_lossy(&got).find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(&body[..15], b"\x8a\x0dare you there", "{body:?}");
    assert_eq!(close_code(&got), Some(1000));

    // Handshakes left unfinished on the TLS, ws and wss ports: closed
    // after handshake_timeout (1 s here).
    let before = s.io();
    let mut open: Vec<TcpStream> = [tls, ws, wss]
        .iter()
        .map(|a| TcpStream::connect(a).unwrap())
        .collect();
    // Half an upgrade on the ws port.
    open[1]
        .write_all(b"GET /rsocket HTTP/1.1\r\nHost:")
        .unwrap();
    for c in &mut open {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        read_to_close(c);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
    wait_until("three handshake timeouts were counted", || {
        s.io().handshake_timeouts >= before.handshake_timeouts + 3
    });

    others_still_work(&s);
    stop_tx.send(()).unwrap();
    let answered = done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        answered > 10,
        "the steady requester answered {answered} times"
    );
    steady_thread.join().unwrap();
}

#[test]
fn a_reload_rotates_the_certificate_for_new_connections_only() {
    let (c, dir, old_ca) = config_on_every_transport("rotate");
    let broker = TestBroker::with_config(c.clone());
    let _app = App::start_at(
        broker.addr_of(Scheme::Tcp).unwrap().clone(),
        None,
        "echo",
        "bad.echo",
        1,
        Duration::ZERO,
    );
    wait_for_instances(&broker, 1);
    let mut url = broker.addr_of(Scheme::Tls).unwrap().clone();
    url.host = "localhost".into();

    // A connection made before the rotation, kept open across it.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (answer_tx, answer_rx) = std::sync::mpsc::channel::<String>();
    let (u, ca) = (url.clone(), old_ca.clone());
    let early = std::thread::spawn(move || {
        run(move || async move {
            let client = Client::builder(ClientConfig::default())
                .connect_url(&u, Some(ca))
                .await
                .expect("connect before the rotation");
            for _ in 0..2 {
                while go_rx.try_recv().is_err() {
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
                let a = client
                    .request_response(Payload::new(route(&["bad.echo"]), "early"))
                    .await
                    .expect("the connection from before the rotation still works");
                answer_tx
                    .send(String::from_utf8_lossy(&a.data).into_owned())
                    .unwrap();
            }
        })
    });
    go_tx.send(()).unwrap();
    assert_eq!(
        answer_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "echo:early"
    );

    // New files at the same paths, from another CA; then the reload.
    let (new_ca_path, _, _) = tls_files(&dir.0);
    let new_ca = rsbroker_transports::tls::client_config_with_ca(&new_ca_path).unwrap();
    assert!(broker.controller().reload(c).is_empty());

    let connects = |ca: Arc<TlsClient>| {
        let u = url.clone();
        run(move || async move {
            Client::builder(ClientConfig::default())
                .connect_url(&u, Some(ca))
                .await
                .map(|c| c.close())
        })
    };
    // The shards take the new configuration at their next tick (100 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    while connects(new_ca.clone()).is_err() {
        assert!(
            Instant::now() < deadline,
            "a new connection gets the new certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = connects(old_ca);
    assert!(
        refused.is_err(),
        "the old CA no longer verifies new connections"
    );
    go_tx.send(()).unwrap();
    assert_eq!(
        answer_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "echo:early"
    );
    early.join().unwrap();
}

#[test]
fn mutual_tls_admits_only_clients_with_a_certificate_of_the_client_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let (mut c, dir, server_ca) = every_transport_config("mtls");
    // A client CA, and a client certificate it signed.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "clients CA");
    let client_ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "billing-service");
    let cert = params.signed_by(&key, &client_ca).unwrap();
    let paths = |n: &str| dir.0.join(n);
    std::fs::write(paths("clients-ca.pem"), client_ca.pem()).unwrap();
    std::fs::write(paths("client.pem"), cert.pem()).unwrap();
    std::fs::write(paths("client.key"), key.serialize_pem()).unwrap();
    c.tls.client_ca = Some(paths("clients-ca.pem"));
    let broker = TestBroker::with_config(c);
    let _app = App::start_at(
        broker.addr_of(Scheme::Tcp).unwrap().clone(),
        None,
        "echo",
        "bad.echo",
        1,
        Duration::ZERO,
    );
    wait_for_instances(&broker, 1);
    let url = broker.addr_of(Scheme::Tls).unwrap().clone();

    let call = |tls: Arc<TlsClient>| {
        let url = url.clone();
        run(move || async move {
            let client = Client::builder(ClientConfig::default())
                .connect_url(&url, Some(tls))
                .await
                .map_err(|e| e.to_string())?;
            let answer = client
                .request_response(Payload::new(route(&["bad.echo"]), "who"))
                .await
                .map_err(|e| e.to_string());
            client.close();
            answer.map(|a| String::from_utf8_lossy(&a.data).into_owned())
        })
    };
    let anonymous = rsbroker_transports::tls::client_config_with_ca(&server_ca).unwrap();
    let before = broker
        .snapshot()
        .iter()
        .map(|s| s.io.tls_handshakes_failed)
        .sum::<u64>();
    assert!(
        call(anonymous).is_err(),
        "a client without a certificate is refused"
    );
    wait_until("the refused handshake was counted", || {
        broker
            .snapshot()
            .iter()
            .map(|s| s.io.tls_handshakes_failed)
            .sum::<u64>()
            > before
    });

    let identified = rsbroker_transports::tls::client_config(
        &server_ca,
        Some((&paths("client.pem"), &paths("client.key"))),
    )
    .unwrap();
    // Held open while the snapshot is read: its subject is what the
    // authorisation work will see.
    let (url2, id2) = (url.clone(), identified.clone());
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<String>();
    let holder = std::thread::spawn(move || {
        run(move || async move {
            let client = Client::builder(ClientConfig::default())
                .connect_url(&url2, Some(id2))
                .await
                .expect("a client with a certificate of the client CA connects");
            let a = client
                .request_response(Payload::new(route(&["bad.echo"]), "who"))
                .await
                .expect("and is answered");
            done_tx
                .send(String::from_utf8_lossy(&a.data).into_owned())
                .unwrap();
            while seen_rx.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        })
    });
    assert_eq!(
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "echo:who"
    );
    wait_until("the subject shows in the snapshot", || {
        broker
            .snapshot()
            .iter()
            .flat_map(|s| s.connections.to_vec())
            .any(|c| {
                c.transport == Some(Scheme::Tls)
                    && c.tls_subject.as_deref() == Some("CN=billing-service")
            })
    });
    seen_tx.send(()).unwrap();
    holder.join().unwrap();
}

/// Random bytes after a good upgrade, on the plain and the TLS-less ports:
/// whatever they are, the broker closes (or waits on) only those
/// connections, every shard stays up, and the others are served.
#[test]
fn random_bytes_on_every_plain_port_hurt_no_one_else() {
    let s = start("random");
    let _app = App::start_at(
        s.url(Scheme::Tcp),
        None,
        "echo",
        "bad.echo",
        1,
        Duration::ZERO,
    );
    wait_for_instances(&s.broker, 1);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (tcp, ws) = (s.url(Scheme::Tcp).addr, s.url(Scheme::Ws).addr);
    let mut open = Vec::new();
    for i in 0..60 {
        let len = (next() % 3000) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let addr = if i % 2 == 0 {
            // WebSocket-looking frames: a FIN bit and the mask bit set, so
            // more of them get past the header checks.
            for b in bytes.iter_mut().step_by(97) {
                *b |= 0x80;
            }
            let mut upgrade = upgrade_request("/rsocket").into_bytes();
            upgrade.extend(bytes);
            bytes = upgrade;
            ws
        } else {
            tcp
        };
        let mut c = TcpStream::connect(addr).expect("connect");
        let _ = c.write_all(&bytes);
        open.push(c);
    }
    others_still_work(&s);
    drop(open);
    // Every one of them is gone once their sockets close.
    wait_until("the random connections are gone", || {
        s.broker
            .snapshot()
            .iter()
            .map(|sh| sh.connections.len())
            .sum::<usize>()
            == 1
    });
    others_still_work(&s);
}
