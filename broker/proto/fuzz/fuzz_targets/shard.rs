//! Two or three shards wired to each other in memory, several connections
//! on each, driven by a small program read from the input: which connection
//! acts and what it sends (SETUPs with app and service-registry JSON,
//! requests whose routing metadata may name a registered service, stream
//! frames on guessed stream ids, METADATA_PUSH CloudEvents, raw bytes),
//! time passing, transports that take frames or stop taking them, shard
//! messages delivered in order at whatever moment, connections closing.
//!
//! Nothing panics; every frame a shard sends parses; once every app that
//! registered is gone no other connection holds a routed stream; once every
//! connection is gone no shard holds streams, memory, frames in flight or
//! routes.
#![no_main]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rsbroker_core::{Balancer, ConnId, Failover, Message, Policies, ServicePolicy, Shard, ShardConfig};
use rsocket_proto::frame::{
    Cancel, ErrorFrame, Frame, MetadataPush, Payload, RequestChannel, RequestFnf, RequestN,
    RequestResponse, RequestStream, Setup, VERSION,
};
use rsocket_proto::metadata::build::CompositeBuilder;
use rsocket_proto::metadata::{MimeType, WellKnownMime};
use rsocket_proto::{DecodeError, ErrorCode, FrameView};

/// Connection slots per shard (a closed slot can be opened again).
const PER_SHARD: usize = 3;
/// Program steps at most (keeps each run short).
const MAX_OPS: usize = 400;

/// Services apps publish: (group, service, version).
const SERVICES: [(&str, &str, &str); 5] = [
    ("", "echo", ""),
    ("", "com.x.Svc", ""),
    ("g", "svc", "1"),
    ("", "com.x.Svc.hello", ""),
    ("", "", ""),
];
/// Routes requests name: most find a service above (with or without a
/// method), one is the broker's health check, one is nobody.
const ROUTES: [&str; 9] = [
    "echo",
    "echo.m",
    "com.x.Svc.hello",
    "com.x.Svc.other",
    "g!svc:1",
    "g!svc.m:1",
    "svc",
    "com.alibaba.rsocket.health.RSocketServiceHealth",
    "missing",
];
const UUIDS: [&str; 3] = ["u0", "u1", "u2"];
const EVENTS: [&str; 4] = [
    "com.alibaba.rsocket.events.ServicesExposedEvent",
    "com.alibaba.rsocket.events.ServicesHiddenEvent",
    "com.alibaba.rsocket.events.AppStatusEvent",
    "com.example.Other",
];
const CODES: [ErrorCode; 6] = [
    ErrorCode::APPLICATION_ERROR,
    ErrorCode::REJECTED,
    ErrorCode::CANCELED,
    ErrorCode::INVALID,
    ErrorCode::CONNECTION_ERROR,
    ErrorCode(0x0000_0300),
];

/// The fuzz input, read front to back; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    /// A length byte, then that many bytes (fewer at the end of the input).
    fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte()).min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[usize::from(self.byte()) % from.len()]
    }

    /// A stream id: mostly small ones of either parity, so that frames hit
    /// streams the peer opened and streams the broker opened on it.
    fn stream_id(&mut self) -> u32 {
        let b = self.byte();
        match b {
            0..=239 => u32::from(b % 24),
            240..=247 => 0x7FFF_FFFF - u32::from(b & 1),
            _ => self.u32(),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn services_json(input: &mut Input<'_>) -> String {
    let n = input.byte() % 4;
    let list: Vec<String> = (0..n)
        .map(|_| {
            let (g, s, v) = input.pick(&SERVICES);
            format!(r#"{{"group":"{g}","service":"{s}","version":"{v}"}}"#)
        })
        .collect();
    list.join(",")
}

fn setup_frame(metadata_mime: &'static [u8], metadata: Option<Bytes>, lease: bool, keepalive: u8) -> Bytes {
    Frame::from(Setup {
        version: VERSION,
        keepalive_interval: 100 + u32::from(keepalive) * 100,
        max_lifetime: 1000 + u32::from(keepalive) * 1000,
        resume_token: None,
        lease,
        metadata_mime: Bytes::from_static(metadata_mime),
        data_mime: Bytes::from_static(b"application/json"),
        metadata,
        data: Bytes::new(),
    })
    .to_bytes()
}

const COMPOSITE: &[u8] = b"message/x.rsocket.composite-metadata.v0";

/// A SETUP built from the input: app JSON and a service registry in
/// composite metadata, either well formed from the pools or as fuzz bytes.
fn setup(input: &mut Input<'_>, structured: bool) -> Bytes {
    let flags = input.byte();
    let keepalive = input.byte();
    let lease = flags & 0x80 != 0;
    let mime = if flags & 0x40 != 0 { b"application/json".as_slice() } else { COMPOSITE };
    let (app, registry) = if structured {
        let uuid = input.pick(&UUIDS);
        let power = input.byte();
        let app = match flags & 3 {
            0 => None,
            1 => Some(format!(r#"{{"name":"app-{uuid}","uuid":"{uuid}","ip":"127.0.0.1","powerRating":{power}}}"#)),
            2 => Some(format!(r#"{{"uuid":"{uuid}"}}"#)),
            _ => Some(r#"{"name":"no-uuid"}"#.to_owned()),
        };
        let registry = (flags & 4 != 0).then(|| format!(r#"{{"published":[{}]}}"#, services_json(input)));
        (app.map(String::into_bytes), registry.map(String::into_bytes))
    } else {
        (Some(input.bytes().to_vec()), (flags & 4 != 0).then(|| input.bytes().to_vec()))
    };
    let mut md = CompositeBuilder::new();
    if let Some(app) = &app {
        md = md.entry(MimeType::WellKnown(WellKnownMime::APPLICATION), app);
    }
    if let Some(registry) = &registry {
        md = md.entry(MimeType::WellKnown(WellKnownMime::SERVICE_REGISTRY), registry);
    }
    if flags & 8 != 0 {
        md = md.bearer("token");
    }
    let metadata = if flags & 0x10 != 0 { None } else { md.build().ok() };
    setup_frame(mime, metadata, lease, keepalive)
}

/// Routing metadata for a request: a route from the pool with refining
/// tags, a route string from the input, binary routing, or fuzz bytes.
fn request_metadata(input: &mut Input<'_>, how: u8) -> Option<Bytes> {
    match how % 5 {
        0 | 1 => {
            let route = input.pick(&ROUTES);
            let extra = input.byte();
            let mut tags = vec![route.to_owned()];
            if extra & 1 != 0 {
                tags.push(format!("e={}", input.pick(&UUIDS)));
            }
            if extra & 2 != 0 {
                tags.push("sticky=1".into());
            }
            if extra & 4 != 0 {
                tags.push("broadcast=1".into());
            }
            if extra & 8 != 0 {
                tags.push("h=k".into());
            }
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            let md = CompositeBuilder::new().routing(&tags);
            let md = if extra & 16 != 0 { md.bearer("t") } else { md };
            md.build().ok()
        }
        2 => {
            // A route string from the input, in a well-formed routing entry.
            let raw = input.bytes();
            let mut content = vec![raw.len() as u8];
            content.extend_from_slice(raw);
            CompositeBuilder::new()
                .entry(MimeType::WellKnown(WellKnownMime::ROUTING), &content)
                .build()
                .ok()
        }
        3 => {
            // Binary routing with a service id that may be a published one.
            let (g, s, v) = input.pick(&SERVICES);
            let key = rsbroker_core::ServiceKey::new(g, s, v);
            let mut content = Vec::new();
            content.extend_from_slice(&key.binary_id().to_be_bytes());
            content.extend_from_slice(&input.u32().to_be_bytes());
            if input.byte() & 1 != 0 {
                content.extend_from_slice(&u32::from(input.byte()).to_be_bytes());
                content.extend_from_slice(key.as_str().as_bytes());
            }
            CompositeBuilder::new()
                .entry(MimeType::WellKnown(WellKnownMime::BINARY_ROUTING), &content)
                .build()
                .ok()
        }
        _ => Some(Bytes::copy_from_slice(input.bytes())),
    }
}

fn request(input: &mut Input<'_>, structured_route: bool) -> Bytes {
    let flags = input.byte();
    let stream_id = input.stream_id() | 1;
    let how = if structured_route { input.byte() % 4 } else { 4 };
    let metadata = request_metadata(input, how);
    let follows = flags & 0x10 != 0;
    let initial_n = match flags >> 5 {
        0 => 0,
        1 => i32::MAX as u32,
        n => u32::from(n),
    };
    let data = Bytes::from(vec![b'd'; usize::from(input.byte() % 32)]);
    let frame: Frame = match flags % 4 {
        0 => RequestResponse { stream_id, follows, metadata, data }.into(),
        1 => RequestFnf { stream_id, follows, metadata, data }.into(),
        2 => RequestStream { stream_id, follows, initial_n, metadata, data }.into(),
        _ => RequestChannel { stream_id, follows, complete: flags & 4 != 0, initial_n, metadata, data }.into(),
    };
    frame.to_bytes()
}

/// A CloudEvent over METADATA_PUSH: as JSON or in composite metadata.
fn metadata_push(input: &mut Input<'_>, structured: bool) -> Bytes {
    let flags = input.byte();
    let json = if structured {
        let kind = input.pick(&EVENTS);
        let data = match flags % 4 {
            0 => format!(r#"{{"services":[{}]}}"#, services_json(input)),
            1 => format!(r#"{{"published":[{}]}}"#, services_json(input)),
            2 => format!(r#"{{"status":{}}}"#, i32::from(input.byte() % 5) - 1),
            _ => "null".to_owned(),
        };
        format!(r#"{{"specversion":"1.0","type":"{kind}","source":"app","id":"1","data":{data}}}"#).into_bytes()
    } else {
        input.bytes().to_vec()
    };
    let metadata = if flags & 4 != 0 {
        CompositeBuilder::new()
            .entry(MimeType::WellKnown(WellKnownMime::APPLICATION_CLOUDEVENTS_JSON), &json)
            .build()
            .unwrap_or_default()
    } else {
        Bytes::from(json)
    };
    Frame::from(MetadataPush { metadata }).to_bytes()
}

fn stream_frame(input: &mut Input<'_>, kind: u8) -> Bytes {
    let stream_id = input.stream_id();
    let frame: Frame = match kind {
        0 => {
            let flags = input.byte();
            let metadata = (flags & 8 != 0).then(|| Bytes::copy_from_slice(input.bytes()));
            Payload {
                stream_id,
                follows: flags & 1 != 0,
                complete: flags & 2 != 0,
                next: flags & 4 != 0,
                metadata,
                data: Bytes::from(vec![b'p'; usize::from(flags >> 4) * 8]),
            }
            .into()
        }
        1 => {
            let b = input.byte();
            let n = if b == 255 { input.u32() } else { u32::from(b) };
            RequestN { stream_id, n }.into()
        }
        2 => Cancel { stream_id }.into(),
        _ => ErrorFrame { stream_id, code: input.pick(&CODES), data: Bytes::from_static(b"e") }.into(),
    };
    frame.to_bytes()
}

struct Slot {
    shard: usize,
    id: Option<ConnId>,
    /// The transport writes what the shard hands it (or is a slow consumer).
    taking: bool,
}

struct World {
    now: Instant,
    shards: Vec<Shard>,
    /// Messages in flight, per (from, to), in order.
    queues: Vec<VecDeque<Message>>,
    slots: Vec<Slot>,
}

impl World {
    fn new(shards: usize, flags: u8) -> Self {
        let now = Instant::now();
        let mut policies = Policies::default();
        let balancer = match flags % 5 {
            0 => Balancer::RoundRobin,
            1 => Balancer::Random,
            2 => Balancer::Weighted,
            3 => Balancer::LeastOutstanding,
            _ => Balancer::ConsistentHash { tag: "h".into() },
        };
        let failover = if flags & 8 != 0 { Failover::Retry { attempts: 2 } } else { Failover::FailFast };
        policies.default = ServicePolicy { balancer: balancer.clone(), failover };
        policies.services.insert("echo".into(), ServicePolicy { balancer, failover: Failover::Retry { attempts: 3 } });
        let shards: Vec<Shard> = (0..shards)
            .map(|i| {
                let mut config = ShardConfig::new(i as u16, shards as u16);
                config.policies = policies.clone();
                if flags & 16 != 0 {
                    // Small limits, so that a few frames reach the pauses,
                    // credit top-ups and memory caps.
                    config.flow.stream_window = 4;
                    config.flow.stream_buffer = 256;
                    config.flow.max_pending_bytes = 512;
                    config.flow.max_connection_memory = 4096;
                    config.flow.max_unrouted_bytes = 256;
                    config.flow.backpressure_timeout = Duration::from_millis(500);
                }
                if flags & 32 != 0 {
                    config.connection.max_inbound_streams = 4;
                }
                Shard::new(config, now)
            })
            .collect();
        let n = shards.len();
        let mut world = World {
            now,
            shards,
            queues: (0..n * n).map(|_| VecDeque::new()).collect(),
            slots: Vec::new(),
        };
        for i in 0..n * PER_SHARD {
            let shard = i % n;
            let id = world.shards[shard].open(now);
            world.slots.push(Slot { shard, id: Some(id), taking: true });
        }
        world
    }

    fn collect(&mut self) {
        let n = self.shards.len();
        for from in 0..n {
            for to in 0..n {
                let msgs = self.shards[from].take_outbox(to as u16);
                self.queues[from * n + to].extend(msgs);
            }
        }
    }

    /// Delivers up to `max` messages of queue `q`, in order.
    fn deliver(&mut self, q: usize, max: usize) -> bool {
        let n = self.shards.len();
        let Some(queue) = self.queues.get_mut(q) else { return false };
        let k = max.min(queue.len());
        if k == 0 {
            return false;
        }
        let batch: Vec<Message> = queue.drain(..k).collect();
        self.shards[q % n].handle_messages(self.now, (q / n) as u16, batch);
        self.collect();
        true
    }

    /// Takes up to `max` frames the shard has for slot `s`; each parses.
    fn transmit(&mut self, s: usize, max: usize) {
        let Slot { shard, id: Some(id), .. } = self.slots[s] else { return };
        let mut taken = 0;
        while taken < max {
            let Some(frame) = self.shards[shard].poll_transmit(id) else { break };
            let bytes = frame.to_bytes();
            assert_eq!(bytes.len(), frame.len());
            if let Err(e) = FrameView::parse(bytes.clone()) {
                panic!("shard {shard} sent an unparsable frame on {id:?}: {e} {bytes:02x?}");
            }
            taken += 1;
        }
        if taken > 0 {
            self.shards[shard].written(id);
        }
        self.collect();
    }

    fn fast_transports(&mut self) {
        for s in 0..self.slots.len() {
            if self.slots[s].taking {
                self.transmit(s, usize::MAX);
            }
        }
    }

    /// Every transport takes everything and every message is delivered,
    /// until nothing moves.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            for s in 0..self.slots.len() {
                self.transmit(s, usize::MAX);
            }
            let mut moved = false;
            for q in 0..self.queues.len() {
                moved |= self.deliver(q, usize::MAX);
            }
            // A transport that finished writing a closed connection closes it.
            for s in 0..self.slots.len() {
                if let Slot { shard, id: Some(id), .. } = self.slots[s]
                    && self.shards[shard].is_closed(id)
                    && self.shards[shard].pending_bytes(id) == 0
                {
                    self.close(s);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the shards do not settle");
    }

    fn close(&mut self, s: usize) {
        let Slot { shard, id: Some(id), .. } = self.slots[s] else { return };
        self.shards[shard].close(self.now, id, "the transport closed");
        self.slots[s].id = None;
        self.collect();
    }

    fn frame(&mut self, s: usize, frame: Bytes) {
        let Slot { shard, id: Some(id), .. } = self.slots[s] else { return };
        // The transport does not read a connection the shard holds back.
        if !self.shards[shard].may_read(id) {
            return;
        }
        self.shards[shard].handle_frame(self.now, id, frame);
        self.collect();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let config = input.byte();
    let mut world = World::new(2 + usize::from(config & 0x80 != 0), config);
    let slots = world.slots.len();

    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.byte();
        let s = usize::from(input.byte()) % slots;
        match op % 20 {
            0 | 1 => {
                let f = setup(&mut input, op % 20 == 0);
                world.frame(s, f);
            }
            2..=4 => {
                let f = request(&mut input, true);
                world.frame(s, f);
            }
            5 => {
                let f = request(&mut input, false);
                world.frame(s, f);
            }
            6..=9 => {
                let f = stream_frame(&mut input, op % 20 - 6);
                world.frame(s, f);
            }
            10 => {
                let f = metadata_push(&mut input, true);
                world.frame(s, f);
            }
            11 => {
                let f = metadata_push(&mut input, false);
                world.frame(s, f);
            }
            12 => {
                let f = Bytes::copy_from_slice(input.bytes());
                world.frame(s, f);
            }
            13 => {
                let b = input.byte();
                world.now += if b & 0x80 != 0 {
                    Duration::from_secs(u64::from(b & 0x7F))
                } else {
                    Duration::from_millis(u64::from(b) * 10)
                };
                let now = world.now;
                for shard in &mut world.shards {
                    shard.handle_timeout(now);
                }
                world.collect();
            }
            14 => {
                // The transport stops or starts taking frames, or takes a few.
                let b = input.byte();
                match b % 3 {
                    0 => world.slots[s].taking = !world.slots[s].taking,
                    _ => world.transmit(s, usize::from(b >> 2)),
                }
            }
            15 => {
                let n = world.shards.len();
                let q = usize::from(input.byte()) % (n * n);
                let max = usize::from(input.byte() % 8) + 1;
                world.deliver(q, max);
            }
            16 => {
                let b = input.byte();
                match (b % 4, world.slots[s].id) {
                    (0, Some(_)) => world.close(s),
                    (1, Some(id)) => {
                        let shard = world.slots[s].shard;
                        world.shards[shard].handle_decode_error(world.now, id, DecodeError::FrameTooLarge { len: 1 << 24, max: 1 << 24 });
                        world.collect();
                    }
                    (_, None) => {
                        let shard = world.slots[s].shard;
                        world.slots[s].id = Some(world.shards[shard].open(world.now));
                    }
                    _ => {}
                }
            }
            17 => {
                // The broker pushes an event to the app.
                let Slot { shard, id: Some(id), .. } = world.slots[s] else { continue };
                let md = Bytes::copy_from_slice(input.bytes());
                world.shards[shard].push_metadata(id, md);
                world.collect();
            }
            18 => {
                let shard = world.slots[s].shard;
                let b = input.byte();
                let now = world.now;
                match b % 8 {
                    0 => world.shards[shard].drain(),
                    1 => {
                        // The broker stops every shard at once (a shard's
                        // shut-down tells no other shard about its streams).
                        for shard in &mut world.shards {
                            shard.shut_down(now, "shutting down", Duration::from_millis(100));
                        }
                    }
                    2 => world.shards[shard].set_reading_blocked(now, b & 8 != 0),
                    3 => world.shards[shard].set_allowance(now, usize::from(b) * 64),
                    _ => {
                        if let Slot { id: Some(id), .. } = world.slots[s] {
                            world.shards[shard].set_transport_bytes(id, usize::from(b) * 16);
                        }
                    }
                }
                world.collect();
            }
            _ => {
                for shard in &mut world.shards {
                    let _ = shard.take_wakeups();
                }
            }
        }
        world.fast_transports();
    }

    // Every app that registered goes; once that has settled, nobody is
    // left to serve a request, so no connection holds a routed stream.
    for shard in &mut world.shards {
        shard.set_reading_blocked(world.now, false);
        shard.set_allowance(world.now, usize::MAX);
    }
    world.settle();
    for s in 0..slots {
        if let Slot { shard, id: Some(id), .. } = world.slots[s] {
            if world.shards[shard].connection_app(id).is_some() {
                world.close(s);
            }
        }
    }
    world.settle();
    for slot in &world.slots {
        let Slot { shard, id: Some(id), .. } = *slot else { continue };
        let (upstream, downstream, pending) = world.shards[shard].stream_maps(id).expect("open");
        assert_eq!((upstream, downstream), (0, 0), "shard {shard} {id:?} holds routed streams with no app left");
        assert_eq!(
            world.shards[shard].protocol_streams(id),
            pending,
            "shard {shard} {id:?}: streams open besides requests waiting for their route"
        );
    }
    for s in 0..slots {
        world.close(s);
    }
    world.settle();
    for shard in &world.shards {
        let id = shard.id();
        assert_eq!(shard.connections().count(), 0);
        assert_eq!(shard.open_streams(), 0, "shard {id}");
        assert_eq!(shard.held_bytes(), 0, "shard {id} holds memory for no connection");
        assert_eq!(shard.mesh_in_flight(), 0, "shard {id}: frames never acknowledged");
        assert!(!shard.has_outbox());
        assert_eq!(shard.routes().snapshot(), Vec::<String>::new(), "shard {id} routes to gone instances");
    }
});
