//! QUIC on every shard: a client whose address changes mid-connection (its
//! datagrams then reach another shard) keeps its streams, and hostile
//! datagrams (garbage, truncated and flooded Initials, handshakes left
//! open, a peer that goes silent) affect only themselves while a steady
//! requester keeps its latency.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::{App, TestBroker, every_transport_config, run, wait_for_instances};
use rsbroker::{BrokerConfig, Controller, ShardSnapshot};
use rsbroker_client::metadata::route;
use rsbroker_client::{Client, ClientConfig, Payload};
use rsbroker_transports::quic::QuicStats;
use rsbroker_transports::rustls::ClientConfig as TlsClient;
use rsbroker_transports::{ListenAddr, Scheme};

/// A UDP relay between one client and the broker. `switch` makes it send
/// from a new source port (the client's NAT rebinding, as the broker sees
/// it); `blackhole` drops everything from then on (a peer that stops
/// acknowledging).
struct Relay {
    addr: SocketAddr,
    switches: Arc<AtomicUsize>,
    blackhole: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let switches = Arc::new(AtomicUsize::new(0));
        let blackhole = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (sw, bh, st) = (switches.clone(), blackhole.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let fresh = || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                s
            };
            let mut back = fresh();
            let mut seen = 0;
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Acquire) {
                let now = sw.load(Ordering::Acquire);
                if now != seen {
                    seen = now;
                    back = fresh();
                }
                let mut idle = true;
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    idle = false;
                    client = Some(from);
                    if !bh.load(Ordering::Acquire) {
                        let _ = back.send_to(&buf[..n], upstream);
                    }
                }
                while let Ok((n, _)) = back.recv_from(&mut buf) {
                    idle = false;
                    if let (Some(c), false) = (client, bh.load(Ordering::Acquire)) {
                        let _ = front.send_to(&buf[..n], c);
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        Self {
            addr,
            switches,
            blackhole,
            stop,
            thread: Some(thread),
        }
    }

    fn switch(&self) {
        self.switches.fetch_add(1, Ordering::AcqRel);
    }

    fn url(&self) -> ListenAddr {
        let mut url = ListenAddr::new(Scheme::Quic, self.addr);
        url.host = "localhost".into();
        url
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn quic_stats(snaps: &[ShardSnapshot]) -> QuicStats {
    let mut sum = QuicStats::default();
    for s in snaps {
        sum.add(&s.quic);
    }
    sum
}

struct Setup {
    broker: TestBroker,
    tls: Arc<TlsClient>,
    _dir: common::TempDir,
}

fn start(name: &str, tune: impl FnOnce(&mut BrokerConfig)) -> Setup {
    let (mut c, dir, ca) = every_transport_config(name);
    tune(&mut c);
    let tls = rsbroker_transports::tls::client_config_with_ca(&ca).expect("CA loads");
    Setup {
        broker: TestBroker::with_config(c),
        tls,
        _dir: dir,
    }
}

impl Setup {
    fn url(&self, scheme: Scheme) -> ListenAddr {
        let mut url = self.broker.addr_of(scheme).expect("listening").clone();
        url.host = "localhost".into();
        url
    }

    fn quic(&self) -> QuicStats {
        quic_stats(&self.broker.snapshot())
    }

    fn wait_until(&self, what: &str, within: Duration, done: impl Fn(&QuicStats) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.quic();
            if done(&now) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}: {now:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_client_whose_address_changes_keeps_its_streams_across_shards() {
    let s = start("quic-rebind", |_| {});
    let _app = App::start_at(
        s.url(Scheme::Tcp),
        None,
        "rebind",
        "rebind.svc",
        1,
        Duration::ZERO,
    );
    wait_for_instances(&s.broker, 1);
    let relay = Arc::new(Relay::start(s.url(Scheme::Quic).addr));
    let controller = s.broker.controller();
    let (url, tls, r) = (relay.url(), s.tls.clone(), relay.clone());
    let (items, answers, switches) = run(move || async move {
        let client = Client::builder(ClientConfig::default())
            .connect_url(&url, Some(tls))
            .await
            .expect("connect through the relay");
        let call = |text: String| {
            let c = &client;
            async move {
                let a = c
                    .request_response(Payload::new(route(&["rebind.svc"]), text.clone()))
                    .await
                    .unwrap_or_else(|e| panic!("request-response {text}: {e}"));
                String::from_utf8_lossy(&a.data).into_owned()
            }
        };
        let mut answers = vec![call("before".into()).await];
        let mut stream = client
            .request_stream(Payload::new(route(&["rebind.svc"]), "40"), 2)
            .expect("stream");
        let mut items = Vec::new();
        for _ in 0..2 {
            items.push(stream.next().await.expect("item").expect("ok"));
        }
        // Move until the broker has passed datagrams between shards (the
        // kernel picks the shard by the 4-tuple: each move is a coin toss
        // between two shards).
        let mut switches = 0;
        while switches < 20 {
            r.switch();
            switches += 1;
            answers.push(call(format!("after-{switches}")).await);
            glommio::timer::sleep(Duration::from_millis(150)).await;
            if quic_stats(&controller.snapshot()).forwarded_out > 0 {
                break;
            }
        }
        // The stream opened before the moves goes on.
        stream.request(100).expect("request more");
        while let Some(item) = stream.next().await {
            items.push(item.expect("ok"));
        }
        answers.push(call("end".into()).await);
        client.close();
        (items.len(), answers, switches)
    });
    let q = s.quic();
    assert!(
        q.forwarded_out > 0 && q.forwarded_in > 0,
        "no datagram went to its owner after {switches} moves: {q:?}"
    );
    assert_eq!(
        items, 40,
        "every item of the stream opened before the moves"
    );
    assert_eq!(answers.first().map(String::as_str), Some("rebind:before"));
    assert_eq!(answers.last().map(String::as_str), Some("rebind:end"));
    assert_eq!(answers.len(), switches + 2);
}

#[test]
fn frames_within_a_packet_cross_the_broker_uncopied() {
    let s = start("quic-copies", |_| {});
    let _app = App::start_at(
        s.url(Scheme::Tcp),
        None,
        "copies",
        "copies.svc",
        1,
        Duration::ZERO,
    );
    wait_for_instances(&s.broker, 1);
    let (url, tls) = (s.url(Scheme::Quic), s.tls.clone());
    let controller = s.broker.controller();
    let big = 60 * 1024;
    let (small_assembled, answers, big_answer) = run(move || async move {
        let client = Client::builder(ClientConfig::default())
            .connect_url(&url, Some(tls))
            .await
            .expect("connect over QUIC");
        let mut answers = 0;
        for i in 0..200 {
            let a = client
                .request_response(Payload::new(route(&["copies.svc"]), format!("small-{i}")))
                .await
                .expect("small request");
            assert_eq!(&a.data[..], format!("copies:small-{i}").as_bytes());
            answers += 1;
        }
        // Shards publish their counters every tick: read them once a
        // snapshot has seen every request routed.
        let small_assembled = routed_then(&controller, "copies.svc", 200).assembled_bytes;
        let a = client
            .request_response(Payload::new(route(&["copies.svc"]), "x".repeat(big)))
            .await
            .expect("large request");
        client.close();
        (small_assembled, answers, a.data.len())
    });
    assert_eq!(answers, 200);
    // Every frame that fitted in its packet was cut from the packet's
    // buffer, SETUP included.
    assert_eq!(
        small_assembled, 0,
        "bytes copied for frames that each fitted in one packet"
    );
    assert_eq!(big_answer, "copies:".len() + big);
    // A frame longer than a packet is assembled once, and only it.
    let assembled = routed_then(&s.broker.controller(), "copies.svc", 201).assembled_bytes;
    assert!(
        (big as u64..big as u64 + 256).contains(&assembled),
        "{assembled} bytes assembled for one frame of {big}"
    );
}

/// The QUIC counters of the first snapshots that count `n` requests routed
/// to `service` (so taken after the broker read them).
fn routed_then(controller: &Controller, service: &str, n: u64) -> QuicStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snaps = controller.snapshot();
        let routed: u64 = snaps
            .iter()
            .flat_map(|s| &s.services)
            .filter(|(name, _)| name == service)
            .map(|(_, c)| c.total_requests())
            .sum();
        if routed >= n {
            return quic_stats(&snaps);
        }
        assert!(
            Instant::now() < deadline,
            "{routed} of {n} requests to {service} in the snapshots"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A xorshift generator: the same garbage every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// First datagrams (Initials) of `n` real QUIC clients, each from its own
/// port, caught by a socket that never answers.
fn capture_initials(n: usize, tls: Arc<TlsClient>) -> Vec<Vec<u8>> {
    let trap = UdpSocket::bind("127.0.0.1:0").unwrap();
    trap.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut url = ListenAddr::new(Scheme::Quic, trap.local_addr().unwrap());
    url.host = "localhost".into();
    let clients = std::thread::spawn(move || {
        run(move || async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let (url, tls) = (url.clone(), tls.clone());
                    glommio::spawn_local(async move {
                        let connect = async {
                            let _ = Client::builder(ClientConfig::default())
                                .connect_url(&url, Some(tls))
                                .await;
                        };
                        futures_lite::future::or(connect, async {
                            glommio::timer::sleep(Duration::from_secs(1)).await;
                        })
                        .await;
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
        })
    });
    let mut seen = std::collections::HashSet::new();
    let mut initials = Vec::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    while initials.len() < n && Instant::now() < deadline {
        if let Ok((len, from)) = trap.recv_from(&mut buf)
            && seen.insert(from)
        {
            initials.push(buf[..len].to_vec());
        }
    }
    clients.join().unwrap();
    initials
}

#[test]
fn hostile_datagrams_affect_only_themselves() {
    const RETRY_ABOVE: usize = 4;
    let s = start("quic-hostile", |c| {
        c.quic.retry_above = RETRY_ABOVE;
        c.quic.idle_timeout = Duration::from_secs(2);
    });
    let _app = App::start_at(
        s.url(Scheme::Tcp),
        None,
        "hostile",
        "hostile.svc",
        1,
        Duration::ZERO,
    );
    wait_for_instances(&s.broker, 1);
    let quic = s.url(Scheme::Quic).addr;

    // A steady requester over QUIC, timing every answer.
    let stop = Arc::new(AtomicBool::new(false));
    let (latencies_tx, latencies) = mpsc::channel::<Vec<Duration>>();
    let (url, tls, halt) = (s.url(Scheme::Quic), s.tls.clone(), stop.clone());
    let steady = std::thread::spawn(move || {
        run(move || async move {
            let client = Client::builder(ClientConfig::default())
                .connect_url(&url, Some(tls))
                .await
                .expect("the steady requester connects");
            let mut times = Vec::new();
            while !halt.load(Ordering::Acquire) {
                let t0 = Instant::now();
                let a = client
                    .request_response(Payload::new(route(&["hostile.svc"]), "steady"))
                    .await
                    .expect("the steady requester is never disturbed");
                assert_eq!(&a.data[..], b"hostile:steady");
                times.push(t0.elapsed());
                glommio::timer::sleep(Duration::from_millis(2)).await;
            }
            client.close();
            latencies_tx.send(times).unwrap();
        })
    });
    s.wait_until(
        "the steady requester is connected",
        Duration::from_secs(5),
        |q| q.connections >= 1,
    );
    let baseline = s.quic().connections;

    // Garbage: seeded random datagrams of every size, some with the long
    // header bit set.
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for i in 0..400 {
        let len = 1 + (rng.next() % 1400) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if i % 2 == 0 {
            d[0] |= 0xC0;
        }
        attacker.send_to(&d, quic).unwrap();
    }

    // Real Initials, truncated at every length that matters, then a flood
    // of whole ones from many ports, never followed by the rest of their
    // handshakes.
    let initials = capture_initials(120, s.tls.clone());
    assert!(
        initials.len() >= 100,
        "captured {} Initials",
        initials.len()
    );
    let first = &initials[0];
    for n in [1, 5, 6, 7, 20, 50, 100, 600, first.len() - 1] {
        attacker.send_to(&first[..n], quic).unwrap();
    }
    let ports: Vec<UdpSocket> = initials
        .iter()
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for (socket, initial) in ports.iter().zip(&initials) {
        socket.send_to(initial, quic).unwrap();
    }
    // Past retry_above handshakes in flight, new clients are asked to prove
    // their address first: the flood holds little state.
    s.wait_until(
        "the flood was answered with Retries",
        Duration::from_secs(5),
        |q| q.retries > 0,
    );
    let during = s.quic();
    assert!(
        during.handshaking <= 2 * RETRY_ABOVE as u64 + 2,
        "handshakes held during the flood: {during:?}"
    );
    // The handshakes left open end at limits.handshake_timeout (1 s).
    s.wait_until(
        "the unfinished handshakes were dropped",
        Duration::from_secs(10),
        |q| q.handshaking == 0 && q.connections <= baseline,
    );
    let timeouts: u64 = s
        .broker
        .snapshot()
        .iter()
        .map(|x| x.io.handshake_timeouts)
        .sum();
    assert!(timeouts > 0, "no handshake timed out");

    // A peer that goes silent after its first answer: its connection ends
    // at quic.idle_timeout (2 s), no one else's does.
    let relay = Arc::new(Relay::start(quic));
    let (url, tls, r) = (relay.url(), s.tls.clone(), relay.clone());
    let silent = std::thread::spawn(move || {
        run(move || async move {
            let client = Client::builder(ClientConfig::default())
                .connect_url(&url, Some(tls))
                .await
                .expect("connect through the relay");
            client
                .request_response(Payload::new(route(&["hostile.svc"]), "once"))
                .await
                .expect("answered before going silent");
            r.blackhole.store(true, Ordering::Release);
            glommio::timer::sleep(Duration::from_secs(4)).await;
            client.abort();
        })
    });
    s.wait_until("the silent peer connected", Duration::from_secs(5), |q| {
        q.connections > baseline
    });
    s.wait_until(
        "the silent peer's connection ended",
        Duration::from_secs(8),
        |q| q.connections <= baseline,
    );
    silent.join().unwrap();

    stop.store(true, Ordering::Release);
    steady.join().unwrap();
    let mut times = latencies.recv().unwrap();
    times.sort();
    assert!(
        times.len() > 100,
        "the steady requester answered {} times",
        times.len()
    );
    let median = times[times.len() / 2];
    let worst = *times.last().unwrap();
    eprintln!(
        "steady requester: {} answers, median {median:?}, worst {worst:?}",
        times.len()
    );
    assert!(median < Duration::from_millis(20), "median {median:?}");
    assert!(worst < Duration::from_secs(1), "worst {worst:?}");
    assert!(s.quic().datagrams_in > 500);
}
