//! Deterministic simulation of several shards with fake app connections.
//!
//! Apps are rsocket-proto client connections wired to shard connections in
//! memory. Messages between shards travel through FIFO queues per pair of
//! shards; which queue, connection or app moves next is chosen by a seeded
//! generator, so every interleaving of route updates, requests, cancels and
//! disconnects a seed produces is replayed exactly. At the end every stream
//! map is empty and every shard's route table is the same.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rsbroker_core::balance::Rng;
use rsbroker_core::{
    Balancer, ConnId, Failover, Message, Policies, ServicePolicy, Shard, ShardConfig,
};
use rsocket_proto::conn::{Config, Connection, Event, Interaction, RequestKind, SetupPayload};
use rsocket_proto::metadata::build::{CompositeBuilder, route};
use rsocket_proto::metadata::{MimeType, WellKnownMime};
use rsocket_proto::{ConnectionError, ErrorCode};

/// SETUP metadata of app `uuid` publishing `services`, in the JSON
/// alibaba-rsocket-broker clients send (with the `ip` the parser reads).
fn setup_metadata(uuid: &str, services: &[&str]) -> Bytes {
    let services: Vec<(&str, &str)> = services.iter().map(|s| (*s, "")).collect();
    app_metadata(uuid, &services, 1)
}

/// SETUP metadata of app `uuid` publishing `(service, version)` pairs, with
/// its `powerRating`.
fn app_metadata(uuid: &str, services: &[(&str, &str)], power_rating: u32) -> Bytes {
    let app = format!(
        r#"{{"name":"app-{uuid}","uuid":"{uuid}","ip":"127.0.0.1","powerRating":{power_rating}}}"#
    );
    let published: Vec<String> = services
        .iter()
        .map(|(s, v)| format!(r#"{{"group":"","service":"{s}","version":"{v}"}}"#))
        .collect();
    let registry = format!(r#"{{"published":[{}]}}"#, published.join(","));
    CompositeBuilder::new()
        .entry(
            MimeType::WellKnown(WellKnownMime::APPLICATION),
            app.as_bytes(),
        )
        .entry(
            MimeType::WellKnown(WellKnownMime::SERVICE_REGISTRY),
            registry.as_bytes(),
        )
        .build()
        .unwrap()
}

/// A fake app: one client connection to a shard.
struct App {
    uuid: String,
    conn: Connection,
    broker: ConnId,
    /// Responder: items to send per request-stream.
    items: u32,
    /// Responder: bytes per stream item (0: a short text).
    item_size: usize,
    /// Responder: fire-and-forget requests received.
    fnf: u32,
    /// Responder: how it answers a request-response.
    answer: Answer,
    /// Responder: streams with items still to send: stream -> next item.
    serving: HashMap<u32, u32>,
    /// Requester: what happened on each stream.
    outcomes: HashMap<u32, Outcome>,
    alive: bool,
    /// The error its connection closed with.
    closed: Option<ConnectionError>,
    /// Whether the app reads what the broker sends it.
    reading: bool,
    events: Vec<Event>,
}

/// How a fake responder answers a request-response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// With `uuid:data`.
    Payload,
    /// With ERROR APPLICATION_ERROR.
    Error,
    /// Not at all (the request stays outstanding).
    Never,
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    items: Vec<Bytes>,
    done: Option<Result<(), ErrorCode>>,
    /// The ERROR's message, when it ended with one.
    error: Option<Bytes>,
    requested: u32,
}

struct Sim {
    now: Instant,
    rng: Rng,
    shards: Vec<Shard>,
    queues: BTreeMap<(u16, u16), VecDeque<Message>>,
    apps: Vec<App>,
    /// Address ranges of the frames apps handed to the broker.
    received: Vec<(usize, usize)>,
    /// Address ranges of payload data parts of 1 KiB or more the broker sent.
    forwarded: Vec<(usize, usize)>,
    /// Queues between shards that deliver nothing for now (a shard that is behind).
    held: Vec<(u16, u16)>,
}

#[path = "sim/trust.rs"]
mod trust;

fn range(b: &[u8]) -> (usize, usize) {
    (b.as_ptr() as usize, b.len())
}

impl Sim {
    fn new(shards: u16, seed: u64, policies: Policies) -> Self {
        let now = Instant::now();
        // One usage registry for every shard, as the runtime has.
        let usage = std::sync::Arc::new(rsbroker_core::trust::AppUsages::new(now));
        let shards = (0..shards)
            .map(|i| {
                let mut config = ShardConfig::new(i, shards);
                config.usage = usage.clone();
                config.policies = policies.clone();
                config.seed = seed ^ u64::from(i);
                Shard::new(config, now)
            })
            .collect();
        Self {
            now,
            rng: Rng::new(seed),
            shards,
            queues: BTreeMap::new(),
            apps: Vec::new(),
            received: Vec::new(),
            forwarded: Vec::new(),
            held: Vec::new(),
        }
    }

    fn connect(
        &mut self,
        shard: u16,
        uuid: &str,
        services: &[&str],
        fragment_size: usize,
    ) -> usize {
        let metadata = if services.is_empty() && uuid.is_empty() {
            None
        } else {
            Some(setup_metadata(uuid, services))
        };
        let config = Config {
            reassemble: true,
            fragment_size,
            ..Config::default()
        };
        self.connect_with(shard, uuid, metadata, config)
    }

    /// An app whose SETUP carries `metadata`, its connection set up by `config`.
    fn connect_with(
        &mut self,
        shard: u16,
        uuid: &str,
        metadata: Option<Bytes>,
        config: Config,
    ) -> usize {
        let conn = Connection::client(
            config,
            SetupPayload {
                metadata,
                data: Bytes::new(),
            },
            self.now,
        );
        let broker = self.shards[usize::from(shard)].open(self.now);
        self.apps.push(App {
            uuid: uuid.to_owned(),
            conn,
            broker,
            items: 3,
            item_size: 0,
            fnf: 0,
            answer: Answer::Payload,
            serving: HashMap::new(),
            outcomes: HashMap::new(),
            alive: true,
            closed: None,
            reading: true,
            events: Vec::new(),
        });
        self.apps.len() - 1
    }

    fn collect_outboxes(&mut self, shard: usize) {
        let from = shard as u16;
        for to in 0..self.shards.len() as u16 {
            let msgs = self.shards[shard].take_outbox(to);
            if !msgs.is_empty() {
                self.queues.entry((from, to)).or_default().extend(msgs);
            }
        }
    }

    /// Moves one unit of work, chosen by the generator. Returns false when idle.
    fn step(&mut self) -> bool {
        let mut options = Vec::new();
        for (i, a) in self.apps.iter().enumerate() {
            if !a.alive {
                continue;
            }
            // The transport does not read a connection the shard holds back.
            if self.shards[usize::from(a.broker.shard)].may_read(a.broker) {
                options.push((0u8, i));
            }
            if a.reading {
                options.push((1u8, i));
            }
        }
        for (i, (pair, q)) in self.queues.iter().enumerate() {
            if !q.is_empty() && !self.held.contains(pair) {
                options.push((2u8, i));
            }
        }
        // Shuffle the order in which kinds of work are tried.
        let start = if options.is_empty() {
            0
        } else {
            self.rng.below(options.len())
        };
        for k in 0..options.len() {
            let (kind, i) = options[(start + k) % options.len()];
            if match kind {
                0 => self.app_to_broker(i),
                1 => self.broker_to_app(i),
                _ => self.deliver_queue(i),
            } {
                return true;
            }
        }
        false
    }

    fn app_to_broker(&mut self, i: usize) -> bool {
        let app = &mut self.apps[i];
        let Some(frame) = app.conn.poll_transmit() else {
            return false;
        };
        let shard = usize::from(app.broker.shard);
        let broker = app.broker;
        let frame = frame.to_bytes();
        self.received.push(range(&frame));
        self.shards[shard].handle_frame(self.now, broker, frame);
        self.collect_outboxes(shard);
        true
    }

    fn broker_to_app(&mut self, i: usize) -> bool {
        let broker = self.apps[i].broker;
        let shard = usize::from(broker.shard);
        let Some(frame) = self.shards[shard].poll_transmit(broker) else {
            return false;
        };
        self.shards[shard].written(broker);
        // Taking frames may grant credit or release pauses elsewhere.
        self.collect_outboxes(shard);
        let (_, data) = frame.shared_parts();
        if data.len() >= 1024 {
            self.forwarded.push(range(data));
        }
        let app = &mut self.apps[i];
        app.conn.handle_frame(self.now, frame.to_bytes());
        while let Some(e) = app.conn.poll_event() {
            app.events.push(e);
        }
        self.react(i);
        true
    }

    fn deliver_queue(&mut self, index: usize) -> bool {
        let Some((&(from, to), _)) = self.queues.iter().nth(index) else {
            return false;
        };
        let q = self.queues.get_mut(&(from, to)).unwrap();
        // Deliver a random-sized batch, in order.
        let n = 1 + self.rng.below(q.len().min(4));
        let batch: Vec<Message> = q.drain(..n).collect();
        self.shards[usize::from(to)].handle_messages(self.now, from, batch);
        self.collect_outboxes(usize::from(to));
        true
    }

    /// App behaviour: responders answer, requesters record.
    fn react(&mut self, i: usize) {
        let events = std::mem::take(&mut self.apps[i].events);
        let app = &mut self.apps[i];
        for e in events {
            match e {
                Event::Request {
                    stream_id,
                    interaction,
                    frame,
                    ended,
                } => match interaction {
                    Interaction::RequestResponse => {
                        let data = Bytes::from(format!(
                            "{}:{}",
                            app.uuid,
                            String::from_utf8_lossy(frame.data_slice())
                        ));
                        match app.answer {
                            Answer::Payload => app
                                .conn
                                .send_payload(stream_id, None, data, true, true)
                                .unwrap(),
                            Answer::Error => app
                                .conn
                                .send_error(stream_id, ErrorCode::APPLICATION_ERROR, data)
                                .unwrap(),
                            Answer::Never => {}
                        }
                    }
                    Interaction::FireAndForget => {
                        assert!(ended);
                        app.fnf += 1;
                    }
                    Interaction::Stream => {
                        app.serving.insert(stream_id, 0);
                    }
                    Interaction::Channel => {
                        // Echo the request and each item back, then complete when the requester does.
                        let _ = app.conn.send_request_n(stream_id, 1000);
                        app.serving.insert(stream_id, 0);
                        let _ = app.conn.send_payload(
                            stream_id,
                            None,
                            frame.data(),
                            true,
                            frame.complete(),
                        );
                    }
                },
                Event::Payload {
                    stream_id,
                    frame,
                    ended,
                } => {
                    if let Some(o) = app.outcomes.get_mut(&stream_id) {
                        if frame.next() {
                            o.items.push(frame.data());
                        }
                        if ended && o.done.is_none() {
                            o.done = Some(Ok(()));
                        }
                    } else if app.serving.contains_key(&stream_id) {
                        // A channel item from the requester: echo it back.
                        let _ = app.conn.send_payload(
                            stream_id,
                            None,
                            frame.data(),
                            frame.next(),
                            frame.complete(),
                        );
                        if !app.conn.is_stream_open(stream_id) {
                            app.serving.remove(&stream_id);
                        }
                    }
                }
                Event::Error {
                    stream_id,
                    code,
                    data,
                } => {
                    if let Some(o) = app.outcomes.get_mut(&stream_id) {
                        o.done.get_or_insert(Err(code));
                        o.error.get_or_insert(data);
                    }
                    app.serving.remove(&stream_id);
                }
                Event::Cancel { stream_id, ended } if ended => {
                    app.serving.remove(&stream_id);
                }
                Event::Closed(e) => app.closed = Some(e),
                _ => {}
            }
        }
        // Responders send stream items as credit allows.
        let items = app.items;
        let item_size = app.item_size;
        let streams: Vec<u32> = app.serving.keys().copied().collect();
        for s in streams {
            let Some(info) = app.conn.stream_info(s) else {
                app.serving.remove(&s);
                continue;
            };
            if info.interaction != Interaction::Stream {
                continue;
            }
            while let Some(next) = app.serving.get(&s).copied() {
                if next >= items {
                    let _ = app.conn.send_payload(s, None, Bytes::new(), false, true);
                    app.serving.remove(&s);
                    break;
                }
                let item = if item_size == 0 {
                    Bytes::from(format!("item{next}"))
                } else {
                    Bytes::from(vec![next as u8; item_size])
                };
                if app.conn.send_payload(s, None, item, true, false).is_err() {
                    break;
                }
                app.serving.insert(s, next + 1);
            }
        }
    }

    fn run(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if !self.step() {
                return;
            }
        }
        panic!("no quiescence after {max_steps} steps");
    }

    fn request(&mut self, app: usize, kind: RequestKind, tags: &[&str], data: &str) -> u32 {
        let a = &mut self.apps[app];
        let id = a
            .conn
            .send_request(
                kind,
                Some(route(tags).unwrap()),
                Bytes::from(data.to_owned()),
            )
            .unwrap();
        let requested = match kind {
            RequestKind::Stream { initial_n } | RequestKind::Channel { initial_n, .. } => initial_n,
            _ => 1,
        };
        a.outcomes.insert(
            id,
            Outcome {
                requested,
                ..Outcome::default()
            },
        );
        id
    }

    fn disconnect(&mut self, app: usize) {
        let a = &mut self.apps[app];
        a.alive = false;
        let broker = a.broker;
        self.shards[usize::from(broker.shard)].close(self.now, broker, "the test closed it");
        self.collect_outboxes(usize::from(broker.shard));
    }

    fn assert_clean(&self) {
        for s in &self.shards {
            for c in s.connections() {
                assert_eq!(
                    s.stream_maps(c),
                    Some((0, 0, 0)),
                    "shard {} conn {c:?} has stream entries",
                    s.id()
                );
                assert_eq!(
                    s.protocol_streams(c),
                    0,
                    "shard {} conn {c:?} has open streams",
                    s.id()
                );
            }
        }
        for s in &self.shards {
            assert_eq!(
                s.mesh_in_flight(),
                0,
                "shard {}: frames never acknowledged",
                s.id()
            );
        }
        let first = self.shards[0].routes().snapshot();
        for s in &self.shards[1..] {
            assert_eq!(
                s.routes().snapshot(),
                first,
                "route tables differ between shards"
            );
        }
        for a in self.apps.iter().filter(|a| a.alive) {
            assert_eq!(a.conn.stream_count(), 0, "app {} has open streams", a.uuid);
        }
    }
}

#[test]
fn all_four_models_across_shards() {
    let mut sim = Sim::new(2, 1, Policies::default());
    let responder = sim.connect(1, "r1", &["echo"], 0);
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let rr = sim.request(requester, RequestKind::RequestResponse, &["echo"], "hi");
    sim.request(requester, RequestKind::FireAndForget, &["echo"], "note");
    let st = sim.request(
        requester,
        RequestKind::Stream { initial_n: 10 },
        &["echo"],
        "s",
    );
    let ch = sim.request(
        requester,
        RequestKind::Channel {
            initial_n: 10,
            complete: false,
        },
        &["echo"],
        "c0",
    );
    sim.run(10_000);
    sim.apps[requester]
        .conn
        .send_payload(ch, None, Bytes::from_static(b"c1"), true, true)
        .unwrap();
    sim.run(10_000);
    let out = &sim.apps[requester].outcomes;
    assert_eq!(out[&rr].items, [Bytes::from_static(b"r1:hi")]);
    assert_eq!(out[&st].items, ["item0", "item1", "item2"].map(Bytes::from));
    assert_eq!(
        out[&ch].items,
        [Bytes::from_static(b"c0"), Bytes::from_static(b"c1")]
    );
    for id in [rr, st, ch] {
        assert_eq!(out[&id].done, Some(Ok(())), "stream {id}");
    }
    assert!(sim.apps[responder].alive);
    sim.assert_clean();
}

#[test]
fn no_instance_is_rejected_and_named() {
    let mut sim = Sim::new(2, 2, Policies::default());
    let requester = sim.connect(0, "", &[], 0);
    sim.run(1000);
    let id = sim.request(
        requester,
        RequestKind::RequestResponse,
        &["missing.Service.m"],
        "x",
    );
    sim.run(1000);
    assert_eq!(
        sim.apps[requester].outcomes[&id].done,
        Some(Err(ErrorCode::REJECTED))
    );
    sim.assert_clean();
}

#[test]
fn request_n_windows_hold_end_to_end() {
    let mut sim = Sim::new(2, 3, Policies::default());
    let responder = sim.connect(1, "r1", &["svc"], 0);
    sim.apps[responder].items = 6;
    let requester = sim.connect(0, "", &[], 0);
    sim.run(1000);
    let id = sim.request(
        requester,
        RequestKind::Stream { initial_n: 1 },
        &["svc"],
        "",
    );
    for window in 1..=5usize {
        sim.run(10_000);
        assert_eq!(
            sim.apps[requester].outcomes[&id].items.len(),
            window,
            "exactly what was asked"
        );
        assert_eq!(sim.apps[requester].outcomes[&id].done, None);
        sim.apps[requester].conn.send_request_n(id, 1).unwrap();
    }
    sim.run(10_000);
    assert_eq!(sim.apps[requester].outcomes[&id].items.len(), 6);
    assert_eq!(sim.apps[requester].outcomes[&id].done, Some(Ok(())));
    sim.assert_clean();
}

#[test]
fn responder_disconnect_ends_its_streams_and_its_routes() {
    let mut sim = Sim::new(2, 4, Policies::default());
    let responder = sim.connect(1, "r1", &["svc"], 0);
    sim.apps[responder].items = 1000;
    let requester = sim.connect(0, "", &[], 0);
    sim.run(1000);
    let id = sim.request(
        requester,
        RequestKind::Stream { initial_n: 2 },
        &["svc"],
        "",
    );
    sim.run(10_000);
    assert_eq!(sim.apps[requester].outcomes[&id].items.len(), 2);
    sim.disconnect(responder);
    sim.run(10_000);
    assert_eq!(
        sim.apps[requester].outcomes[&id].done,
        Some(Err(ErrorCode::CANCELED))
    );
    for s in &sim.shards {
        assert!(
            s.routes().instance("r1").is_none(),
            "shard {} still routes to the gone instance",
            s.id()
        );
    }
    sim.assert_clean();
}

#[test]
fn requester_disconnect_cancels_at_the_responder() {
    let mut sim = Sim::new(2, 5, Policies::default());
    let responder = sim.connect(1, "r1", &["svc"], 0);
    sim.apps[responder].items = 1000;
    let requester = sim.connect(0, "", &[], 0);
    sim.run(1000);
    sim.request(
        requester,
        RequestKind::Stream { initial_n: 2 },
        &["svc"],
        "",
    );
    sim.request(
        requester,
        RequestKind::Channel {
            initial_n: 2,
            complete: false,
        },
        &["svc"],
        "c",
    );
    sim.run(10_000);
    assert_eq!(sim.apps[responder].conn.stream_count(), 2);
    sim.disconnect(requester);
    sim.run(10_000);
    assert_eq!(
        sim.apps[responder].conn.stream_count(),
        0,
        "the responder got CANCELs"
    );
    sim.assert_clean();
}

#[test]
fn failover_retries_on_another_instance() {
    let mut policies = Policies::default();
    policies.services.insert(
        "svc".into(),
        ServicePolicy {
            balancer: Balancer::RoundRobin,
            failover: Failover::Retry { attempts: 2 },
        },
    );
    let mut sim = Sim::new(2, 6, policies);
    let dead = sim.connect(1, "dead", &["svc"], 0);
    // This one never answers: the request waits on it.
    sim.apps[dead].items = 0;
    sim.connect(0, "alive", &["svc"], 0);
    let requester = sim.connect(0, "", &[], 0);
    sim.run(1000);
    // Round robin: find a request that went to "dead" (it stays unanswered
    // because the fake app answers only once it gets the frame).
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(sim.request(requester, RequestKind::RequestResponse, &["svc"], "x"));
    }
    // Deliver the requests but cut "dead" off before it can answer anything.
    sim.disconnect(dead);
    sim.run(10_000);
    for id in ids {
        let o = &sim.apps[requester].outcomes[&id];
        assert_eq!(
            o.items,
            [Bytes::from_static(b"alive:x")],
            "stream {id}: {o:?}"
        );
    }
    assert!(sim.shards[0].stats().requests_retried >= 1);
    sim.assert_clean();
}

#[test]
fn stream_items_leave_the_broker_in_the_buffers_they_arrived_in() {
    let mut sim = Sim::new(2, 11, Policies::default());
    let responder = sim.connect(1, "r", &["big"], 0);
    sim.apps[responder].items = 5;
    sim.apps[responder].item_size = 65_536;
    // One requester on the responder's shard, one on the other.
    let near = sim.connect(1, "", &[], 0);
    let far = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let ids: Vec<(usize, u32)> = [near, far]
        .into_iter()
        .map(|a| {
            let id = sim.request(a, RequestKind::Stream { initial_n: 100 }, &["big"], "");
            (a, id)
        })
        .collect();
    sim.run(10_000);
    for (a, id) in ids {
        let o = &sim.apps[a].outcomes[&id];
        assert_eq!(o.done, Some(Ok(())));
        assert_eq!(o.items.len(), 5);
        for (n, item) in o.items.iter().enumerate() {
            assert!(item.len() == 65_536 && item.iter().all(|&b| b == n as u8));
        }
    }
    assert_eq!(sim.forwarded.len(), 10, "every item was forwarded");
    for &(at, len) in &sim.forwarded {
        assert!(
            sim.received
                .iter()
                .any(|&(start, n)| start <= at && at + len <= start + n),
            "a forwarded item's bytes are the bytes the broker received, not a copy"
        );
    }
    sim.assert_clean();
}

#[test]
fn broadcast_reaches_every_instance() {
    let mut sim = Sim::new(3, 7, Policies::default());
    let rs: Vec<usize> = (0..3u16)
        .map(|s| sim.connect(s, &format!("r{s}"), &["news"], 0))
        .collect();
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    sim.request(
        requester,
        RequestKind::FireAndForget,
        &["news", "broadcast=1"],
        "hello",
    );
    sim.run(10_000);
    for r in rs {
        assert_eq!(
            sim.apps[r].fnf, 1,
            "every instance got the fire-and-forget once"
        );
    }
    sim.assert_clean();
}

#[test]
fn endpoint_tag_targets_one_instance() {
    let mut sim = Sim::new(2, 8, Policies::default());
    sim.connect(0, "a", &["svc"], 0);
    sim.connect(1, "b", &["svc"], 0);
    let requester = sim.connect(0, "", &[], 0);
    sim.run(1000);
    let ids: Vec<u32> = (0..4)
        .map(|_| {
            sim.request(
                requester,
                RequestKind::RequestResponse,
                &["svc", "e=b"],
                "x",
            )
        })
        .collect();
    sim.run(10_000);
    for id in ids {
        assert_eq!(
            sim.apps[requester].outcomes[&id].items,
            [Bytes::from_static(b"b:x")]
        );
    }
    let id = sim.request(
        requester,
        RequestKind::RequestResponse,
        &["svc", "e=zzz"],
        "x",
    );
    sim.run(10_000);
    assert_eq!(
        sim.apps[requester].outcomes[&id].done,
        Some(Err(ErrorCode::REJECTED))
    );
    sim.assert_clean();
}

#[test]
fn fragmented_requests_and_routing_metadata_spanning_fragments() {
    let mut sim = Sim::new(2, 9, Policies::default());
    sim.connect(1, "r", &["a.very.long.service.name.that.spans"], 64);
    let requester = sim.connect(0, "", &[], 64);
    sim.run(1000);
    // Routing metadata of ~80 bytes with 64-byte fragments: it spans two frames.
    let key = "a.very.long.service.name.that.spans";
    let tags = [key, "x=0123456789012345678901234567890123456789"];
    let data = "d".repeat(500);
    let id = sim.request(requester, RequestKind::RequestResponse, &tags, &data);
    sim.run(10_000);
    let o = &sim.apps[requester].outcomes[&id];
    assert_eq!(o.items, [Bytes::from(format!("r:{data}"))]);
    sim.assert_clean();
}

/// Random traffic with disconnects and route changes racing it, over many
/// seeds: nothing is left behind and every stream ends exactly once.
#[test]
fn random_traffic_leaves_nothing_behind() {
    for seed in 1..=40u64 {
        let mut rng = Rng::new(seed);
        let mut sim = Sim::new(3, seed, Policies::default());
        let mut responders = Vec::new();
        for i in 0..4u16 {
            // Two connections of instance "m" on different shards.
            let uuid = if i < 2 {
                "m".to_owned()
            } else {
                format!("r{i}")
            };
            let r = sim.connect(i % 3, &uuid, &["svc"], if i % 2 == 0 { 64 } else { 0 });
            sim.apps[r].items = 2 + rng.below(4) as u32;
            responders.push(r);
        }
        let requesters: Vec<usize> = (0..3u16)
            .map(|s| sim.connect(s, "", &[], if s == 1 { 64 } else { 0 }))
            .collect();
        sim.run(100_000);
        let mut streams = Vec::new();
        for round in 0..30 {
            let alive_requesters: Vec<usize> = requesters
                .iter()
                .copied()
                .filter(|r| sim.apps[*r].alive)
                .collect();
            let q = alive_requesters[rng.below(alive_requesters.len())];
            let data = "p".repeat(rng.below(200));
            let kind = match rng.below(4) {
                0 => RequestKind::RequestResponse,
                1 => RequestKind::FireAndForget,
                2 => RequestKind::Stream {
                    initial_n: 1 + rng.below(3) as u32,
                },
                _ => RequestKind::Channel {
                    initial_n: 2,
                    complete: rng.below(2) == 0,
                },
            };
            let id = sim.request(q, kind, &["svc"], &data);
            if !matches!(kind, RequestKind::FireAndForget) {
                streams.push((q, id));
            }
            for _ in 0..rng.below(30) {
                sim.step();
            }
            match rng.below(10) {
                0 if round > 10 => {
                    // A responder goes away mid-traffic.
                    let alive: Vec<usize> = responders
                        .iter()
                        .copied()
                        .filter(|r| sim.apps[*r].alive)
                        .collect();
                    if alive.len() > 1 {
                        sim.disconnect(alive[rng.below(alive.len())]);
                    }
                }
                1 => {
                    // A requester cancels one of its streams.
                    if let Some(&(q, id)) = streams.get(rng.below(streams.len().max(1)))
                        && sim.apps[q].conn.is_stream_open(id)
                    {
                        sim.apps[q].conn.send_cancel(id).unwrap();
                        sim.apps[q]
                            .outcomes
                            .get_mut(&id)
                            .unwrap()
                            .done
                            .get_or_insert(Err(ErrorCode::CANCELED));
                    }
                }
                2 => {
                    // More credit for a stream.
                    if let Some(&(q, id)) = streams.get(rng.below(streams.len().max(1)))
                        && let Some(info) = sim.apps[q].conn.stream_info(id)
                        && info.inbound_open
                        && info.local_requester
                    {
                        let _ = sim.apps[q].conn.send_request_n(id, 5);
                    }
                }
                5 if round > 20 => {
                    // A requester goes away with streams open.
                    let q = requesters[rng.below(requesters.len())];
                    if sim.apps[q].alive
                        && requesters.iter().filter(|r| sim.apps[**r].alive).count() > 1
                    {
                        sim.disconnect(q);
                        streams.retain(|(r, _)| *r != q);
                    }
                }
                3 | 4 => {
                    // A responder changes what it serves, racing requests in flight.
                    let alive: Vec<usize> = responders
                        .iter()
                        .copied()
                        .filter(|r| sim.apps[*r].alive)
                        .collect();
                    let r = alive[rng.below(alive.len())];
                    let json = match rng.below(4) {
                        0 => {
                            r#"{"type":"com.alibaba.rsocket.events.AppStatusEvent","data":{"status":2}}"#
                        }
                        1 => {
                            r#"{"type":"com.alibaba.rsocket.events.AppStatusEvent","data":{"status":1}}"#
                        }
                        2 => {
                            r#"{"type":"com.alibaba.rsocket.events.ServicesHiddenEvent","data":{"services":[{"service":"svc"}]}}"#
                        }
                        _ => {
                            r#"{"type":"com.alibaba.rsocket.events.ServicesExposedEvent","data":{"services":[{"service":"svc"}]}}"#
                        }
                    };
                    sim.apps[r]
                        .conn
                        .send_metadata_push(Bytes::from_static(json.as_bytes()))
                        .unwrap();
                }
                _ => {}
            }
        }
        sim.run(1_000_000);
        // Finish what is still open: requesters complete their channels and cancel the rest.
        for &(q, id) in &streams {
            if sim.apps[q].conn.is_stream_open(id) {
                sim.apps[q].conn.send_cancel(id).unwrap();
                sim.apps[q]
                    .outcomes
                    .get_mut(&id)
                    .unwrap()
                    .done
                    .get_or_insert(Err(ErrorCode::CANCELED));
            }
        }
        sim.run(1_000_000);
        for &(q, id) in &streams {
            let o = &sim.apps[q].outcomes[&id];
            assert!(
                o.done.is_some(),
                "seed {seed}: stream {id} never ended: {o:?}"
            );
            assert!(
                o.items.len() as u32 <= o.requested.max(1) + 5 * 30,
                "seed {seed}: more items than credit"
            );
        }
        sim.assert_clean();
        sim.now += Duration::from_secs(1);
    }
}

/// The broker-side bytes waiting for app `i`.
fn held_for(sim: &Sim, i: usize) -> usize {
    let id = sim.apps[i].broker;
    sim.shards[usize::from(id.shard)].pending_bytes(id)
}

/// A requester asks for 2^31-1 items and stops reading. Its stream is held
/// to the stream buffer (the responder is granted credit only as the
/// requester's side drains), the responder is never paused, and its other
/// stream, to a requester that reads, runs to the end. Once the slow
/// requester reads, every item arrives, in order.
fn slow_consumer(same_shard: bool) {
    const ITEMS: u32 = 3000;
    const SIZE: usize = 1024;
    let mut sim = Sim::new(2, 21, Policies::default());
    let responder = sim.connect(1, "r", &["bulk"], 0);
    sim.apps[responder].items = ITEMS;
    sim.apps[responder].item_size = SIZE;
    let slow = sim.connect(if same_shard { 1 } else { 0 }, "", &[], 0);
    let fast = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let unbounded = RequestKind::Stream {
        initial_n: i32::MAX as u32,
    };
    sim.apps[slow].reading = false;
    let s = sim.request(slow, unbounded, &["bulk"], "");
    let f = sim.request(fast, unbounded, &["bulk"], "");
    sim.run(1_000_000);
    let limits = rsbroker_core::FlowLimits::default();
    assert_eq!(sim.apps[fast].outcomes[&f].items.len(), ITEMS as usize);
    assert_eq!(sim.apps[fast].outcomes[&f].done, Some(Ok(())));
    let held = held_for(&sim, slow);
    assert!(
        held > 0 && held <= limits.stream_buffer + SIZE + 64,
        "the broker holds {held} bytes for a requester that does not read"
    );
    let producer = sim.apps[responder].broker;
    assert!(sim.shards[1].may_read(producer), "the producer is read");
    assert!(
        sim.shards.iter().all(|s| s.stats().pauses == 0),
        "credit, not pauses, held the stream back"
    );
    let got = sim.apps[slow].outcomes[&s].items.len();
    assert!(
        got < ITEMS as usize,
        "{got} items arrived at a reader that stopped"
    );
    sim.apps[slow].reading = true;
    sim.run(1_000_000);
    let o = &sim.apps[slow].outcomes[&s];
    assert_eq!(o.done, Some(Ok(())));
    assert_eq!(o.items.len(), ITEMS as usize);
    for (n, item) in o.items.iter().enumerate() {
        assert!(
            item.len() == SIZE && item.iter().all(|&b| b == n as u8),
            "item {n}"
        );
    }
    sim.assert_clean();
}

#[test]
fn a_slow_consumer_on_another_shard_holds_back_only_its_own_stream() {
    slow_consumer(false);
}

#[test]
fn a_slow_consumer_on_the_producers_shard_holds_back_only_its_own_stream() {
    slow_consumer(true);
}

/// The responder never sees more credit than the requester gave: with a
/// window of 7 asked in pieces, the sum of REQUEST_N it receives is 7 + 5.
#[test]
fn the_responder_is_never_granted_more_than_the_requester_asked() {
    let mut sim = Sim::new(2, 22, Policies::default());
    let responder = sim.connect(1, "r", &["svc"], 0);
    sim.apps[responder].items = 100;
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let id = sim.request(
        requester,
        RequestKind::Stream { initial_n: 7 },
        &["svc"],
        "",
    );
    sim.run(100_000);
    assert_eq!(sim.apps[requester].outcomes[&id].items.len(), 7);
    sim.apps[requester].conn.send_request_n(id, 5).unwrap();
    sim.run(100_000);
    assert_eq!(sim.apps[requester].outcomes[&id].items.len(), 12);
    let serving: Vec<u32> = sim.apps[responder].serving.values().copied().collect();
    assert_eq!(serving, [12], "the responder sent exactly 12 items");
}

/// A requester that floods fire-and-forget at a responder that does not
/// read is paused (it is on the other shard: a message names it), while a
/// requester on its shard goes on; the flooder is read again once the
/// responder drains.
#[test]
fn a_fire_and_forget_flood_pauses_only_the_flooder() {
    let mut sim = Sim::new(2, 23, Policies::default());
    let sink = sim.connect(1, "sink", &["sink"], 0);
    sim.connect(1, "echo", &["echo"], 0);
    let flooder = sim.connect(0, "", &[], 0);
    let other = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    sim.apps[sink].reading = false;
    let big = "x".repeat(64 << 10);
    for _ in 0..100 {
        sim.request(flooder, RequestKind::FireAndForget, &["sink"], &big);
        sim.run(1_000_000);
    }
    let flood_conn = sim.apps[flooder].broker;
    assert!(!sim.shards[0].may_read(flood_conn), "the flooder is paused");
    assert!(sim.shards[1].stats().pauses >= 1);
    let held = held_for(&sim, sink);
    let limits = rsbroker_core::FlowLimits::default();
    assert!(
        held <= limits.max_pending_bytes + (1 << 20),
        "{held} bytes held for the sink"
    );
    // Everyone else is untouched.
    assert!(sim.shards[0].may_read(sim.apps[other].broker));
    let id = sim.request(other, RequestKind::RequestResponse, &["echo"], "hi");
    sim.run(1_000_000);
    assert_eq!(
        sim.apps[other].outcomes[&id].items,
        [Bytes::from_static(b"echo:hi")]
    );
    sim.apps[sink].reading = true;
    sim.run(1_000_000);
    assert!(
        sim.shards[0].may_read(flood_conn),
        "read again once the sink drained"
    );
    assert!(sim.apps[sink].fnf > 0);
}

/// A pause and its resume name the connection with its generation: a
/// resume for a connection that closed does not unpause the new
/// connection in its slot.
#[test]
fn a_stale_resume_does_not_unpause_the_next_connection_in_the_slot() {
    let now = Instant::now();
    let mut shard = Shard::new(ShardConfig::new(1, 2), now);
    let old = shard.open(now);
    shard.handle_messages(now, 0, [Message::Pause { conn: old }]);
    assert!(!shard.may_read(old));
    shard.close(now, old, "gone");
    let new = shard.open(now);
    assert_eq!(new.slot, old.slot, "the slot is reused");
    assert_ne!(new, old);
    assert!(shard.may_read(new));
    shard.handle_messages(now, 0, [Message::Pause { conn: new }]);
    shard.handle_messages(now, 0, [Message::Resume { conn: old }]);
    assert!(
        !shard.may_read(new),
        "the old connection's resume is not the new one's"
    );
    shard.handle_messages(now, 0, [Message::Resume { conn: new }]);
    assert!(shard.may_read(new));
}

/// A request with F set whose routing metadata never completes, followed
/// by empty fragments: each held fragment counts its overhead, so the
/// request is refused with REJECTED once it holds max_unrouted_bytes, and
/// nothing stays held.
#[test]
fn empty_fragments_before_a_route_are_counted_and_refused() {
    use rsocket_proto::frame::{Frame, Payload, RequestResponse};
    let mut sim = Sim::new(2, 24, Policies::default());
    sim.connect(1, "r", &["svc"], 0);
    let attacker = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let conn = sim.apps[attacker].broker;
    // A composite metadata entry header promising more than it carries.
    let first = Frame::from(RequestResponse {
        stream_id: 1,
        follows: true,
        metadata: Some(Bytes::from_static(&[0xFE, 0, 0, 200, 1])),
        data: Bytes::new(),
    });
    let now = sim.now;
    sim.shards[0].handle_frame(now, conn, first.to_bytes());
    let empty = Frame::from(Payload {
        stream_id: 1,
        follows: true,
        complete: false,
        next: false,
        metadata: Some(Bytes::new()),
        data: Bytes::new(),
    })
    .to_bytes();
    let limits = rsbroker_core::FlowLimits::default();
    let fits = limits.max_unrouted_bytes / (empty.len() + 128);
    for _ in 0..fits - 2 {
        sim.shards[0].handle_frame(now, conn, empty.clone());
    }
    assert_eq!(
        sim.shards[0].stream_maps(conn),
        Some((0, 0, 1)),
        "still gathering"
    );
    assert!(sim.shards[0].held_bytes() >= (fits - 2) * 128);
    for _ in 0..4 {
        sim.shards[0].handle_frame(now, conn, empty.clone());
    }
    assert_eq!(sim.shards[0].stream_maps(conn), Some((0, 0, 0)), "refused");
    let mut refused = None;
    while let Some(f) = sim.shards[0].poll_transmit(conn) {
        let f = rsocket_proto::FrameView::parse(f.to_bytes()).unwrap();
        if f.frame_type() == rsocket_proto::FrameType::Error {
            refused = f.error_code();
        }
    }
    sim.shards[0].written(conn);
    assert_eq!(refused, Some(ErrorCode::REJECTED));
    assert_eq!(sim.shards[0].held_bytes(), 0, "nothing is held for it");
}

/// One shard with a 1 MiB memory allowance, a sink that stopped reading,
/// a flooder that sent it 2 MB and a bystander: the shard is over its
/// budget. Returns (sink, flooder, bystander).
fn over_budget(sim: &mut Sim) -> (usize, usize, usize) {
    let sink = sim.connect(0, "sink", &["sink"], 0);
    let flooder = sim.connect(0, "", &[], 0);
    let bystander = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    sim.apps[sink].reading = false;
    let now = sim.now;
    sim.shards[0].set_allowance(now, 1 << 20);
    for _ in 0..20 {
        sim.request(
            flooder,
            RequestKind::FireAndForget,
            &["sink"],
            &"y".repeat(100 << 10),
        );
        sim.run(1_000_000);
    }
    assert!(sim.shards[0].is_over_budget());
    (sink, flooder, bystander)
}

/// Over its memory allowance a shard stops reading the connections that
/// hold the most (here the one slow consumer), not the others, and reads
/// them again once it is back under three quarters of it.
#[test]
fn over_the_memory_budget_the_largest_holder_is_not_read() {
    let mut sim = Sim::new(1, 25, Policies::default());
    let (sink, _, bystander) = over_budget(&mut sim);
    assert!(
        !sim.shards[0].may_read(sim.apps[sink].broker),
        "the largest holder"
    );
    assert!(sim.shards[0].may_read(sim.apps[bystander].broker));
    assert!(sim.shards[0].stats().overload_pauses >= 1);
    sim.apps[sink].reading = true;
    sim.run(1_000_000);
    assert!(!sim.shards[0].is_over_budget());
    assert!(sim.shards[0].may_read(sim.apps[sink].broker));
}

/// A shard over its memory budget for longer than the backpressure
/// timeout closes its largest holder, and only that one, and not before.
#[test]
fn over_the_budget_past_the_timeout_only_the_largest_holder_is_closed() {
    let mut sim = Sim::new(1, 29, Policies::default());
    let (sink, flooder, bystander) = over_budget(&mut sim);
    let timeout = rsbroker_core::FlowLimits::default().backpressure_timeout;
    let almost = sim.now + timeout - Duration::from_millis(1);
    sim.shards[0].handle_timeout(almost);
    let conn = |sim: &Sim, app: usize| sim.apps[app].broker;
    assert!(
        !sim.shards[0].is_closed(conn(&sim, sink)),
        "not before the timeout"
    );
    let at = sim.now + timeout;
    sim.shards[0].handle_timeout(at);
    assert!(
        sim.shards[0].is_closed(conn(&sim, sink)),
        "the largest holder"
    );
    for app in [flooder, bystander] {
        assert!(
            !sim.shards[0].is_closed(conn(&sim, app)),
            "only the largest"
        );
    }
    assert_eq!(sim.shards[0].stats().closed_over_limit, 1);
}

/// A consumer that keeps its feeder paused for longer than the
/// backpressure timeout is closed as a slow consumer, and its feeder is
/// read again.
#[test]
fn a_consumer_that_stays_full_is_closed_and_its_feeder_released() {
    let mut sim = Sim::new(2, 26, Policies::default());
    let sink = sim.connect(1, "sink", &["sink"], 0);
    let flooder = sim.connect(0, "", &[], 0);
    // A well-behaved app on the slow consumer's shard.
    let calm = sim.connect(1, "calm", &["calm"], 0);
    sim.run(10_000);
    sim.apps[sink].reading = false;
    for _ in 0..100 {
        sim.request(
            flooder,
            RequestKind::FireAndForget,
            &["sink"],
            &"z".repeat(64 << 10),
        );
        sim.run(1_000_000);
    }
    let flood_conn = sim.apps[flooder].broker;
    let sink_conn = sim.apps[sink].broker;
    assert!(!sim.shards[0].may_read(flood_conn));
    let timeout = rsbroker_core::FlowLimits::default().backpressure_timeout;
    let due = sim.shards[1].poll_timeout().unwrap();
    assert!(due <= sim.now + timeout);
    let almost = sim.now + timeout - Duration::from_millis(1);
    sim.shards[1].handle_timeout(almost);
    assert!(
        !sim.shards[1].is_closed(sink_conn),
        "closed before its backpressure timeout"
    );
    sim.now += timeout;
    let now = sim.now;
    sim.shards[1].handle_timeout(now);
    assert!(
        sim.shards[1].is_closed(sink_conn),
        "the slow consumer is closed"
    );
    assert!(
        !sim.shards[1].is_closed(sim.apps[calm].broker),
        "only the slow consumer"
    );
    assert_eq!(sim.shards[1].stats().closed_over_limit, 1);
    let mut last = None;
    while let Some(f) = sim.shards[1].poll_transmit(sink_conn) {
        last = Some(f);
    }
    let last = rsocket_proto::FrameView::parse(last.unwrap().to_bytes()).unwrap();
    assert_eq!(last.error_code(), Some(ErrorCode::CONNECTION_ERROR));
    assert!(String::from_utf8_lossy(last.data_slice()).contains("slow consumer"));
    sim.collect_outboxes(1);
    sim.run(1_000_000);
    assert!(
        sim.shards[0].may_read(flood_conn),
        "its feeder is read again"
    );
}

/// A shard that is behind (its queue from another shard is not handled)
/// stops the connection flooding it from being read once more than
/// max_pending_bytes of its frames are in flight, and only that one; it is
/// read again once the shard has caught up.
#[test]
fn a_shard_that_is_behind_pauses_only_the_connections_feeding_it() {
    let mut sim = Sim::new(2, 27, Policies::default());
    let sink = sim.connect(0, "sink", &["sink"], 0);
    sim.connect(1, "echo", &["echo"], 0);
    let flooder = sim.connect(1, "", &[], 0);
    let other = sim.connect(1, "", &[], 0);
    sim.run(10_000);
    sim.held.push((1, 0));
    for _ in 0..80 {
        sim.request(
            flooder,
            RequestKind::FireAndForget,
            &["sink"],
            &"f".repeat(64 << 10),
        );
        sim.run(1_000_000);
    }
    let limit = rsbroker_core::FlowLimits::default().max_pending_bytes;
    assert!(sim.shards[1].mesh_in_flight() > limit);
    assert!(
        sim.shards[1].mesh_in_flight() <= limit + (128 << 10),
        "{} bytes in flight",
        sim.shards[1].mesh_in_flight()
    );
    let flood_conn = sim.apps[flooder].broker;
    assert!(!sim.shards[1].may_read(flood_conn), "the flooder is paused");
    assert!(sim.shards[1].stats().mesh_pauses >= 1);
    assert_eq!(sim.shards[1].stats().pauses, 0, "no connection was full");
    // Its neighbour on the same shard is not.
    assert!(sim.shards[1].may_read(sim.apps[other].broker));
    let id = sim.request(other, RequestKind::RequestResponse, &["echo"], "hi");
    sim.run(1_000_000);
    assert_eq!(
        sim.apps[other].outcomes[&id].items,
        [Bytes::from_static(b"echo:hi")]
    );
    sim.held.clear();
    sim.run(1_000_000);
    assert!(sim.shards[1].may_read(flood_conn), "read again");
    assert_eq!(sim.apps[sink].fnf, 80);
    sim.assert_clean();
}

/// Answers pile up for a requester that sends requests and never reads
/// (answers were asked for: nobody is paused for them). Past
/// max_connection_memory the broker closes it with CONNECTION_ERROR,
/// dropping what it held; the responder goes on.
#[test]
fn a_connection_over_its_memory_cap_is_closed() {
    let mut sim = Sim::new(1, 28, Policies::default());
    let mut config = sim.shards[0].config().clone();
    config.flow.max_connection_memory = 1 << 20;
    sim.shards[0].set_config(config);
    let echo = sim.connect(0, "echo", &["echo"], 0);
    let greedy = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    sim.apps[greedy].reading = false;
    let conn = sim.apps[greedy].broker;
    for _ in 0..40 {
        sim.request(
            greedy,
            RequestKind::RequestResponse,
            &["echo"],
            &"g".repeat(64 << 10),
        );
        sim.run(1_000_000);
        if sim.shards[0].is_closed(conn) {
            break;
        }
    }
    assert!(sim.shards[0].is_closed(conn), "closed past its cap");
    assert_eq!(sim.shards[0].stats().closed_over_limit, 1);
    let mut frames = Vec::new();
    while let Some(f) = sim.shards[0].poll_transmit(conn) {
        frames.push(rsocket_proto::FrameView::parse(f.to_bytes()).unwrap());
    }
    assert_eq!(
        frames.len(),
        1,
        "what it held was dropped: only the ERROR is left"
    );
    assert_eq!(frames[0].error_code(), Some(ErrorCode::CONNECTION_ERROR));
    assert!(String::from_utf8_lossy(frames[0].data_slice()).contains("max_connection_memory"));
    assert!(sim.apps[echo].alive);
    assert!(sim.shards[0].held_bytes() < 64 << 10);
}

/// A stream requester may send REQUEST_N while its request's routing
/// metadata is still arriving in fragments: the request stays waiting for
/// its route (it is not taken for cancelled, which left its stream open
/// and never answered), and is routed once the route is complete.
#[test]
fn request_n_before_the_route_is_complete_keeps_the_request() {
    use rsocket_proto::frame::{Frame, Payload, RequestN, RequestStream};
    let mut sim = Sim::new(2, 29, Policies::default());
    sim.connect(1, "r", &["svc"], 0);
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    sim.apps[requester].reading = false;
    let conn = sim.apps[requester].broker;
    let md = route(&["svc"]).unwrap();
    let (head, tail) = md.split_at(3);
    let now = sim.now;
    let first = Frame::from(RequestStream {
        stream_id: 1,
        follows: true,
        initial_n: 2,
        metadata: Some(Bytes::copy_from_slice(head)),
        data: Bytes::new(),
    });
    sim.shards[0].handle_frame(now, conn, first.to_bytes());
    assert_eq!(sim.shards[0].stream_maps(conn), Some((0, 0, 1)));
    let more = Frame::from(RequestN { stream_id: 1, n: 3 });
    sim.shards[0].handle_frame(now, conn, more.to_bytes());
    assert_eq!(
        sim.shards[0].stream_maps(conn),
        Some((0, 0, 1)),
        "still waiting for its route"
    );
    let last = Frame::from(Payload {
        stream_id: 1,
        follows: false,
        complete: false,
        next: true,
        metadata: Some(Bytes::copy_from_slice(tail)),
        data: Bytes::from_static(b"x"),
    });
    sim.shards[0].handle_frame(now, conn, last.to_bytes());
    assert_eq!(sim.shards[0].stream_maps(conn), Some((1, 0, 0)), "routed");
    assert_eq!(sim.shards[0].stats().requests_routed, 1);
}

// ------------------------------------------------ balancers and routing
//
// Each test below names one input of routing and fails when the broker
// ignores it.

fn policies(balancer: Balancer) -> Policies {
    Policies {
        default: ServicePolicy {
            balancer,
            failover: Failover::FailFast,
        },
        ..Policies::default()
    }
}

/// Which instance answered request `id` of `app` (the fake responders
/// answer `uuid:data`); `None` while unanswered.
fn answered_by(sim: &Sim, app: usize, id: u32) -> Option<String> {
    let o = sim.apps[app].outcomes.get(&id)?;
    let item = o.items.first()?;
    let text = String::from_utf8_lossy(item);
    text.split(':').next().map(str::to_owned)
}

/// Sends `n` request-responses with `tags` from `app`, each after the one
/// before was answered; returns who answered each.
fn one_at_a_time(sim: &mut Sim, app: usize, tags: &[&str], n: usize) -> Vec<Option<String>> {
    (0..n)
        .map(|_| {
            let id = sim.request(app, RequestKind::RequestResponse, tags, "x");
            sim.run(10_000);
            answered_by(sim, app, id)
        })
        .collect()
}

fn tally(answers: &[Option<String>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.clone().unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    m
}

#[test]
fn consistent_hash_keeps_each_key_on_one_instance_and_spreads_the_keys() {
    let mut sim = Sim::new(
        2,
        21,
        policies(Balancer::ConsistentHash { tag: "user".into() }),
    );
    for (i, uuid) in ["a", "b", "c", "d"].into_iter().enumerate() {
        sim.connect(i as u16 % 2, uuid, &["svc"], 0);
    }
    // Requesters on both shards: the choice does not depend on the shard.
    let near = sim.connect(0, "", &[], 0);
    let far = sim.connect(1, "", &[], 0);
    sim.run(10_000);
    let mut owner = BTreeMap::new();
    for k in 0..32 {
        let tag = format!("user=u{k}");
        let mut seen = Vec::new();
        for app in [near, far, near, far] {
            seen.extend(one_at_a_time(&mut sim, app, &["svc", &tag], 1));
        }
        let first = seen[0].clone().expect("answered");
        assert!(
            seen.iter().all(|s| s.as_deref() == Some(first.as_str())),
            "key u{k} went to {seen:?}"
        );
        owner.insert(k, first);
    }
    let spread = tally(&owner.values().cloned().map(Some).collect::<Vec<_>>());
    assert_eq!(
        spread.len(),
        4,
        "32 keys over 4 instances reach every one: {spread:?}"
    );
    assert!(
        spread.values().all(|&n| n <= 16),
        "no instance takes half the keys: {spread:?}"
    );
    sim.assert_clean();
}

#[test]
fn consistent_hash_without_its_tag_takes_the_instances_in_turn() {
    let mut sim = Sim::new(
        2,
        22,
        policies(Balancer::ConsistentHash { tag: "user".into() }),
    );
    for (i, uuid) in ["a", "b", "c", "d"].into_iter().enumerate() {
        sim.connect(i as u16 % 2, uuid, &["svc"], 0);
    }
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    // Other tags are no hash key.
    let answers = one_at_a_time(&mut sim, requester, &["svc", "region=x"], 8);
    for turn in answers.chunks(4) {
        let distinct = tally(turn);
        assert_eq!(
            distinct.len(),
            4,
            "four requests, four instances: {answers:?}"
        );
    }
    sim.assert_clean();
}

#[test]
fn a_request_for_a_version_reaches_only_that_version() {
    let mut sim = Sim::new(2, 23, Policies::default());
    for (shard, uuid, version) in [(0, "v1", "1.0"), (1, "v2", "2.0"), (1, "v0", "")] {
        let metadata = app_metadata(uuid, &[("svc", version)], 1);
        let config = Config {
            reassemble: true,
            ..Config::default()
        };
        sim.connect_with(shard, uuid, Some(metadata), config);
    }
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    for (key, instance) in [("svc:2.0", "v2"), ("svc:1.0", "v1"), ("svc", "v0")] {
        let answers = one_at_a_time(&mut sim, requester, &[key], 6);
        assert_eq!(
            tally(&answers),
            BTreeMap::from([(instance.to_owned(), 6)]),
            "{key}"
        );
    }
    let id = sim.request(requester, RequestKind::RequestResponse, &["svc:3.0"], "x");
    sim.run(10_000);
    assert_eq!(
        sim.apps[requester].outcomes[&id].done,
        Some(Err(ErrorCode::REJECTED)),
        "no instance has version 3.0"
    );
    sim.assert_clean();
}

#[test]
fn weighted_follows_the_power_rating_apps_announce() {
    let mut sim = Sim::new(2, 24, policies(Balancer::Weighted));
    for (shard, uuid, rating) in [(0, "light", 1), (1, "heavy", 9)] {
        let metadata = app_metadata(uuid, &[("svc", "")], rating);
        sim.connect_with(shard, uuid, Some(metadata), Config::default());
    }
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let ids: Vec<u32> = (0..1000)
        .map(|_| sim.request(requester, RequestKind::RequestResponse, &["svc"], "x"))
        .collect();
    sim.run(1_000_000);
    let answers: Vec<Option<String>> = ids
        .iter()
        .map(|&id| answered_by(&sim, requester, id))
        .collect();
    let heavy = tally(&answers).get("heavy").copied().unwrap_or(0);
    assert!(
        (850..950).contains(&heavy),
        "powerRating 9 against 1 takes about 90%: {heavy} of 1000"
    );
    sim.assert_clean();
}

#[test]
fn least_outstanding_avoids_the_instance_holding_requests() {
    let mut sim = Sim::new(2, 25, policies(Balancer::LeastOutstanding));
    // Both on the other shard: neither is preferred as local.
    let stuck = sim.connect(1, "stuck", &["svc"], 0);
    sim.apps[stuck].answer = Answer::Never;
    sim.connect(1, "quick", &["svc"], 0);
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let answers = one_at_a_time(&mut sim, requester, &["svc"], 40);
    let counts = tally(&answers);
    // Once "stuck" holds one request, "quick" (whose answered requests no
    // longer count) is always the less busy.
    assert!(
        counts.get("(none)").copied().unwrap_or(0) <= 1,
        "requests left on the instance that holds them: {counts:?}"
    );
    assert!(
        sim.apps[stuck].conn.stream_count() <= 1,
        "the stuck instance got more than one request"
    );
    sim.disconnect(stuck);
    sim.run(10_000);
    sim.assert_clean();
}

#[test]
fn cancel_reaches_the_responder_on_another_shard() {
    let mut sim = Sim::new(2, 26, Policies::default());
    let responder = sim.connect(1, "r", &["svc"], 0);
    sim.apps[responder].items = 1000;
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let stream = sim.request(
        requester,
        RequestKind::Stream { initial_n: 2 },
        &["svc"],
        "s",
    );
    let channel = sim.request(
        requester,
        RequestKind::Channel {
            initial_n: 2,
            complete: false,
        },
        &["svc"],
        "c",
    );
    sim.run(10_000);
    assert_eq!(sim.apps[responder].conn.stream_count(), 2);
    sim.apps[requester].conn.send_cancel(stream).unwrap();
    sim.run(10_000);
    assert_eq!(
        sim.apps[responder].conn.stream_count(),
        1,
        "the stream's CANCEL reached the responder; the channel stays"
    );
    sim.apps[requester].conn.send_cancel(channel).unwrap();
    sim.apps[requester]
        .conn
        .send_payload(channel, None, Bytes::new(), false, true)
        .unwrap_or_default();
    sim.run(10_000);
    assert_eq!(sim.apps[responder].conn.stream_count(), 0);
    assert_eq!(sim.apps[requester].outcomes[&stream].items.len(), 2);
    sim.assert_clean();
}

#[test]
fn request_errors_are_counted_per_service_and_interaction() {
    let mut sim = Sim::new(2, 27, Policies::default());
    let failing = sim.connect(1, "failing", &["bad"], 0);
    sim.apps[failing].answer = Answer::Error;
    sim.connect(1, "fine", &["good"], 0);
    let gone = sim.connect(1, "gone", &["leaving"], 0);
    sim.apps[gone].items = 1000;
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    for _ in 0..3 {
        let id = sim.request(requester, RequestKind::RequestResponse, &["bad"], "x");
        sim.run(10_000);
        assert_eq!(
            sim.apps[requester].outcomes[&id].done,
            Some(Err(ErrorCode::APPLICATION_ERROR))
        );
    }
    one_at_a_time(&mut sim, requester, &["good"], 2);
    sim.request(
        requester,
        RequestKind::Stream { initial_n: 1 },
        &["leaving"],
        "",
    );
    sim.run(10_000);
    sim.disconnect(gone);
    sim.run(10_000);
    let counters: BTreeMap<String, _> = sim.shards[0]
        .service_counters()
        .map(|(k, c)| (k.as_str().to_owned(), *c))
        .collect();
    let rr = Interaction::RequestResponse;
    assert_eq!(
        (counters["bad"].requests(rr), counters["bad"].errors(rr)),
        (3, 3),
        "every ERROR from the instance counts"
    );
    assert_eq!(
        (counters["good"].requests(rr), counters["good"].errors(rr)),
        (2, 0),
        "answers are no errors"
    );
    let st = Interaction::Stream;
    assert_eq!(
        (
            counters["leaving"].requests(st),
            counters["leaving"].errors(st)
        ),
        (1, 1),
        "a stream whose instance went away counts as an error"
    );
    assert_eq!(
        counters["leaving"].errors(rr),
        0,
        "under its own model only"
    );
    assert_eq!(
        (
            counters["bad"].total_requests(),
            counters["bad"].total_errors()
        ),
        (3, 3)
    );
    assert_eq!(
        (
            counters["leaving"].total_requests(),
            counters["leaving"].total_errors()
        ),
        (1, 1)
    );
    sim.assert_clean();
}

#[test]
fn a_setup_asking_for_lease_is_refused_and_registers_nothing() {
    let mut sim = Sim::new(2, 28, Policies::default());
    let mut config = Config::default();
    config.client.lease = true;
    let metadata = setup_metadata("leaser", &["svc"]);
    let app = sim.connect_with(1, "leaser", Some(metadata), config);
    sim.run(10_000);
    let closed = sim.apps[app].closed.clone().expect("the broker closed it");
    assert_eq!(closed.code, ErrorCode::UNSUPPORTED_SETUP, "{closed:?}");
    assert!(closed.message.contains("LEASE"), "{closed:?}");
    for s in &sim.shards {
        assert!(
            s.routes().instance("leaser").is_none(),
            "shard {} routes to an app it refused",
            s.id()
        );
    }
    let broker = sim.apps[app].broker;
    assert!(
        sim.shards[1].is_closed(broker),
        "the broker's side of the connection is closed"
    );
    assert_eq!(sim.shards[1].connection_app(broker), None);
}

/// Apps change what they serve over METADATA_PUSH (alibaba's CloudEvents):
/// every shard's routes follow.
#[test]
fn app_events_over_metadata_push_change_the_routes_on_every_shard() {
    let mut sim = Sim::new(2, 30, Policies::default());
    let app = sim.connect(1, "a", &["first"], 0);
    sim.connect(1, "b", &["first"], 0);
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let push = |sim: &mut Sim, json: &str| {
        sim.apps[app]
            .conn
            .send_metadata_push(Bytes::from(json.to_owned()))
            .unwrap();
        sim.run(10_000);
    };
    push(
        &mut sim,
        r#"{"type":"com.alibaba.rsocket.events.ServicesExposedEvent","data":{"services":[{"service":"second"}]}}"#,
    );
    let answers = one_at_a_time(&mut sim, requester, &["second"], 2);
    assert_eq!(tally(&answers), BTreeMap::from([("a".to_owned(), 2)]));
    push(
        &mut sim,
        r#"{"type":"com.alibaba.rsocket.events.ServicesHiddenEvent","data":{"services":[{"service":"second"}]}}"#,
    );
    let id = sim.request(requester, RequestKind::RequestResponse, &["second"], "x");
    sim.run(10_000);
    assert_eq!(
        sim.apps[requester].outcomes[&id].done,
        Some(Err(ErrorCode::REJECTED)),
        "hidden again"
    );
    // Out of service: its services go to the other instance only.
    push(
        &mut sim,
        r#"{"type":"com.alibaba.rsocket.events.AppStatusEvent","data":{"status":2}}"#,
    );
    let answers = one_at_a_time(&mut sim, requester, &["first"], 4);
    assert_eq!(tally(&answers), BTreeMap::from([("b".to_owned(), 4)]));
    for s in &sim.shards {
        assert_eq!(
            s.routes().instance("a").map(|i| i.status),
            Some(rsbroker_core::app::AppStatus::OutOfService),
            "shard {}",
            s.id()
        );
    }
    sim.assert_clean();
}

#[test]
fn the_broker_answers_its_own_health_check() {
    let mut sim = Sim::new(2, 31, Policies::default());
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let check = format!("{}.check", rsbroker_core::service::HEALTH_SERVICE);
    let id = sim.request(requester, RequestKind::RequestResponse, &[&check], "");
    sim.run(10_000);
    let o = &sim.apps[requester].outcomes[&id];
    assert_eq!(o.items, [Bytes::from_static(b"1")]);
    assert_eq!(o.done, Some(Ok(())));
    sim.assert_clean();
}

/// An instance connected to several shards is reached through its
/// connection on the requester's shard: no hop across cores.
#[test]
fn an_instance_is_reached_through_its_connection_on_the_requesters_shard() {
    let mut sim = Sim::new(2, 32, Policies::default());
    let on0 = sim.connect(0, "multi", &["svc"], 0);
    let on1 = sim.connect(1, "multi", &["svc"], 0);
    let near0 = sim.connect(0, "", &[], 0);
    let near1 = sim.connect(1, "", &[], 0);
    sim.run(10_000);
    let served = |sim: &Sim, app: usize| sim.apps[app].conn.stats().frames_received;
    for (requester, local, other) in [(near0, on0, on1), (near1, on1, on0)] {
        let before = (served(&sim, local), served(&sim, other));
        for _ in 0..3 {
            sim.request(requester, RequestKind::RequestResponse, &["svc"], "x");
        }
        sim.run(10_000);
        assert_eq!(
            served(&sim, other),
            before.1,
            "a request crossed to the other shard"
        );
        assert_eq!(served(&sim, local), before.0 + 3);
    }
    sim.assert_clean();
}

#[test]
fn sticky_keeps_each_requester_on_its_first_instance() {
    let mut sim = Sim::new(2, 33, Policies::default());
    for (i, uuid) in ["a", "b", "c"].into_iter().enumerate() {
        sim.connect(i as u16 % 2, uuid, &["svc"], 0);
    }
    let first = sim.connect(0, "", &[], 0);
    let second = sim.connect(1, "", &[], 0);
    sim.run(10_000);
    for requester in [first, second] {
        let answers = one_at_a_time(&mut sim, requester, &["svc", "sticky=1"], 6);
        assert_eq!(tally(&answers).len(), 1, "sticky: {answers:?}");
    }
    // Without the tag the same requester takes turns again.
    let answers = one_at_a_time(&mut sim, first, &["svc"], 6);
    assert_eq!(tally(&answers).len(), 3, "{answers:?}");
    sim.assert_clean();
}

/// A new config changes limits and policies, never which shard this is.
#[test]
fn a_new_config_keeps_the_shards_identity() {
    let mut sim = Sim::new(2, 34, Policies::default());
    sim.connect(1, "r", &["svc"], 0);
    let requester = sim.connect(1, "", &[], 0);
    sim.run(10_000);
    let mut config = ShardConfig::new(0, 7);
    config.seed = 99;
    sim.shards[1].set_config(config);
    assert_eq!(sim.shards[1].id(), 1);
    assert_eq!(sim.shards[1].config().shard, 1);
    assert_eq!(sim.shards[1].config().shards, 2);
    assert_ne!(sim.shards[1].config().seed, 99);
    // It still routes, and across shards.
    let answers = one_at_a_time(&mut sim, requester, &["svc"], 2);
    assert_eq!(tally(&answers), BTreeMap::from([("r".to_owned(), 2)]));
    sim.assert_clean();
}

/// A connection that once had a thousand streams open does not keep the
/// room the broker's tables and queues took for them: once the streams
/// end, what is left for each side is a few dozen entries' worth.
#[test]
fn a_burst_of_streams_leaves_no_room_behind() {
    let mut sim = Sim::new(2, 3, Policies::default());
    let responder = sim.connect(1, "r1", &["echo"], 0);
    let requester = sim.connect(0, "", &[], 0);
    sim.run(10_000);
    let room = |sim: &Sim, app: usize| {
        let b = sim.apps[app].broker;
        sim.shards[usize::from(b.shard)].table_room(b).unwrap()
    };
    let least = |room: &[(&str, usize)], names: &[&str]| {
        room.iter()
            .filter(|(n, _)| names.contains(n))
            .map(|&(_, r)| r)
            .min()
            .unwrap()
    };
    // The responder does not read until all of them are open, then the
    // requester does not read until every item is queued for it.
    sim.apps[responder].reading = false;
    let ids: Vec<u32> = (0..1000)
        .map(|_| {
            sim.request(
                requester,
                RequestKind::Stream { initial_n: 3 },
                &["echo"],
                "s",
            )
        })
        .collect();
    sim.run(100_000);
    let (r, o) = (room(&sim, requester), room(&sim, responder));
    assert!(
        least(&r, &["requested", "meters", "streams"]) >= 1000,
        "the requester's tables held a thousand streams: {r:?}"
    );
    assert!(
        least(&o, &["opened", "by origin", "streams", "transmit queue"]) >= 1000,
        "the responder's tables held a thousand streams: {o:?}"
    );
    sim.apps[requester].reading = false;
    sim.apps[responder].reading = true;
    sim.run(1_000_000);
    let r = room(&sim, requester);
    assert!(
        least(&r, &["transmit queue", "backlog"]) >= 1000,
        "the requester's queues held its items: {r:?}"
    );
    sim.apps[requester].reading = true;
    sim.run(1_000_000);
    for id in &ids {
        assert_eq!(
            sim.apps[requester].outcomes[id].done,
            Some(Ok(())),
            "stream {id}"
        );
    }
    sim.assert_clean();
    for s in &mut sim.shards {
        s.let_go_of_bursts();
    }
    for app in [requester, responder] {
        let after = room(&sim, app);
        assert!(
            after.iter().all(|&(_, r)| r <= 128),
            "room left after the burst: {after:?}"
        );
    }
}
