//! One shard's broker: its connections, the stream maps that tie a
//! requester's stream to a responder's, routing and balancing, and the
//! messages it exchanges with other shards.
//!
//! A request arrives on connection `a` (this shard): the route is read from
//! its metadata, an instance is chosen, and an `Open` goes to the shard of
//! the chosen connection `b` (possibly this one). That shard starts a stream
//! on `b` with the request frame's bytes and remembers which requester stream
//! it serves; frames then flow both ways as `ToResponder` / `ToRequester`,
//! each passed on with only its stream id replaced. A stream's entries are
//! dropped when the connection's state machine says the stream has ended.
//!
//! # Layout
//!
//! - `mod.rs` (here): the [`Shard`], its connections, and the transport's
//!   side of it: open, frames in, timeouts, frames out, close.
//! - `events`: what a connection's state machine reports, from SETUP and
//!   METADATA_PUSH to requests and stream frames.
//! - `routing`: a request's route, the service lookup, the balancer's input
//!   ([`Shard::destination`]), and the `Open` sent to the instance.
//! - `streams`: the upstream and downstream stream maps, frames between
//!   them, and the cleanup when a connection goes.
//! - `failover`: retrying a request whose instance went away.
//! - `backpressure`: what each connection holds, credit top-ups, pausing
//!   the readers that feed a full connection, the memory budget and the
//!   limits that close a connection (the rules are in [`crate::flow`]).
//! - `trust`: authentication at SETUP, what each connection may publish
//!   and call, credentials that expire, and the rules replaced on reload.
//! - `mesh`: messages to and from the other shards.
//! - `stats`: counters per shard and per service.

mod backpressure;
mod events;
mod failover;
mod mesh;
mod routing;
mod stats;
mod streams;
mod trust;

pub use routing::{Destination, Targets};
pub use stats::{ServiceCounters, ShardStats};

use self::routing::{Outstanding, PendingRoute};
use self::streams::Upstream;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rsocket_proto::conn::{Config as ConnConfig, Connection};
use rsocket_proto::{DecodeError, ErrorCode, OutFrame};
use rustc_hash::FxHashMap;
use slab::Slab;

use crate::balance::{BalancerState, Policies, Rng};
use crate::flow::{Budget, ConnFlow, FlowLimits, MeshFlow, StreamCredit};
use crate::ids::{ConnId, ShardId, StreamRef};
use crate::message::Message;
use crate::routes::RouteTable;
use crate::service::ServiceKey;
use crate::trust::{
    AppLimits, AppUsage, AppUsages, FailedSetups, Grant, Identity, RefusalLog, TokenCache, Trust,
};

/// Settings of a shard.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// This shard's index.
    pub shard: ShardId,
    /// Number of shards.
    pub shards: u16,
    /// Settings of every accepted connection (server role; the broker passes
    /// fragments through, so `reassemble` should stay false).
    pub connection: ConnConfig,
    /// Balancer and failover per service.
    pub policies: Policies,
    /// Credit, pauses and memory limits (see [`crate::flow`]).
    pub flow: FlowLimits,
    /// Seed of the shard's random choices.
    pub seed: u64,
    /// Who may connect, publish and call. Replacing it (a reload) applies
    /// to every connection's next request.
    pub trust: Arc<Trust>,
    /// What each identity uses, shared by every shard so that per-app
    /// limits hold across them. A shard keeps the one it was made with.
    pub usage: Arc<AppUsages>,
}

impl ShardConfig {
    /// Defaults for shard `shard` of `shards`.
    pub fn new(shard: ShardId, shards: u16) -> Self {
        Self {
            shard,
            shards,
            connection: ConnConfig::default(),
            policies: Policies::default(),
            flow: FlowLimits::default(),
            seed: 0x5eed ^ u64::from(shard),
            trust: Arc::default(),
            usage: Arc::default(),
        }
    }
}

#[derive(Debug)]
struct Conn {
    id: ConnId,
    proto: Connection,
    /// The instance this connection serves for, once it registered.
    instance: Option<Arc<str>>,
    /// Its app's name, for messages.
    app_name: Option<String>,
    /// Who it proved to be at SETUP.
    identity: Option<Arc<Identity>>,
    /// What it may publish and call: nothing until its SETUP is accepted.
    grant: Option<Arc<Grant>>,
    /// When its credentials expire: the connection ends then.
    expires: Option<Instant>,
    /// What its identity uses, across shards, once its SETUP is accepted.
    usage: Option<Arc<AppUsage>>,
    /// Its identity's limits.
    limits: AppLimits,
    /// Its requester streams as `usage` counts them.
    counted_streams: i64,
    /// Its requests are checked against its grant and limits: set until
    /// its SETUP is accepted, and after, unless it may call everything
    /// without limits.
    checks_requests: bool,
    /// Where it connects from, and the common name of the client
    /// certificate its transport verified.
    peer: Peer,
    /// Streams this connection requested: stream id -> where they go.
    upstream: FxHashMap<u32, Upstream>,
    pending: FxHashMap<u32, PendingRoute>,
    /// Streams the broker opened on this connection: stream id -> requester's stream.
    downstream: FxHashMap<u32, StreamRef>,
    by_origin: FxHashMap<StreamRef, u32>,
    /// Sticky choices: service -> instance.
    sticky: FxHashMap<ServiceKey, Arc<str>>,
    /// Credit metering of the streams whose items are written to this
    /// connection, by stream id on it (its requests' streams and channels
    /// from the peer; the channels the broker opened on it).
    meters: FxHashMap<u32, StreamCredit>,
    /// Pauses, memory held, backlog of metered items.
    flow: ConnFlow,
    woken: bool,
    /// Routing and stream cleanup done (the connection is closed).
    released: bool,
    /// Why the protocol ended, when it ended with an ERROR either way.
    close_reason: Option<String>,
}

/// One shard's broker logic.
#[derive(Debug)]
pub struct Shard {
    id: ShardId,
    shards: u16,
    config: ShardConfig,
    conns: Slab<Conn>,
    next_generation: u32,
    routes: RouteTable,
    /// Balancer state and randomness, in a cell so that a pick can read
    /// the route table while it moves them.
    picker: RefCell<(BalancerState, Rng)>,
    outstanding: Outstanding,
    revision: u64,
    local: VecDeque<Message>,
    outbox: Vec<Vec<Message>>,
    wakeups: Vec<ConnId>,
    /// The runtime stopped reading every connection (its queues to other
    /// shards are too long).
    reading_blocked: bool,
    /// Frames in flight to each other shard.
    mesh: MeshFlow,
    /// The broker-wide memory budget as this shard sees it.
    budget: Budget,
    /// Connections paused for the budget, to read again once it recovers.
    budget_paused: Vec<ConnId>,
    /// Connections over `max_connection_memory`, closed at the end of the pass.
    overfull: Vec<ConnId>,
    stats: ShardStats,
    service_stats: FxHashMap<ServiceKey, ServiceCounters>,
    /// Bearer tokens verified on this shard.
    tokens: TokenCache,
    /// Failed authentications lately, by peer address.
    failed: FailedSetups,
    /// Refused SETUPs logged this second.
    refusal_log: RefusalLog,
    now: Instant,
}

/// What the transport knows of a connection's peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Its address.
    pub addr: Option<SocketAddr>,
    /// The common name of the client certificate it presented, verified
    /// (mutual TLS).
    pub certificate: Option<Arc<str>>,
}

impl Shard {
    /// A shard with no connections.
    pub fn new(config: ShardConfig, now: Instant) -> Self {
        let shards = config.shards.max(1);
        Self {
            id: config.shard,
            shards,
            conns: Slab::new(),
            next_generation: 1,
            routes: RouteTable::new(shards),
            picker: RefCell::new((BalancerState::default(), Rng::new(config.seed))),
            outstanding: Outstanding::default(),
            revision: 0,
            local: VecDeque::new(),
            outbox: (0..shards).map(|_| Vec::new()).collect(),
            wakeups: Vec::new(),
            reading_blocked: false,
            mesh: MeshFlow::new(shards),
            budget: Budget::default(),
            budget_paused: Vec::new(),
            overfull: Vec::new(),
            stats: ShardStats::default(),
            service_stats: FxHashMap::default(),
            tokens: TokenCache::default(),
            failed: FailedSetups::default(),
            refusal_log: RefusalLog::default(),
            now,
            config,
        }
    }

    /// This shard's index.
    pub fn id(&self) -> ShardId {
        self.id
    }

    /// The route table replica.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// The settings in force.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// Replaces the settings (the shard's index, count, seed and usage
    /// registry stay):
    /// policies and limits apply at once, the connection settings to
    /// connections opened from now on, except the stream limit, which
    /// applies to every connection.
    pub fn set_config(&mut self, config: ShardConfig) {
        let max_streams = config.connection.max_inbound_streams;
        let trust_changed = !Arc::ptr_eq(&self.config.trust, &config.trust);
        self.config = ShardConfig {
            shard: self.config.shard,
            shards: self.config.shards,
            seed: self.config.seed,
            usage: self.config.usage.clone(),
            ..config
        };
        for (_, c) in self.conns.iter_mut() {
            c.proto.set_max_inbound_streams(max_streams);
        }
        if trust_changed {
            self.apply_trust();
        }
    }

    /// What the transport knows of connection `id`'s peer, before its SETUP.
    pub fn set_peer(&mut self, id: ConnId, peer: Peer) {
        if let Some(c) = self.conn_mut(id) {
            c.peer = peer;
        }
    }

    /// Streams open on all of this shard's connections.
    pub fn open_streams(&self) -> usize {
        self.conns.iter().map(|(_, c)| c.proto.stream_count()).sum()
    }

    /// Replaces the service policies (balancers, failover).
    pub fn set_policies(&mut self, policies: Policies) {
        self.config.policies = policies;
    }

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(id.slot as usize).filter(|c| c.id == id)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id.slot as usize).filter(|c| c.id == id)
    }

    /// Connection `slot` has something new to do (frames to write, reading
    /// allowed again, closed): its transport is woken, and what it holds is
    /// counted again.
    #[inline]
    fn wake(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if !c.woken {
            c.woken = true;
            self.wakeups.push(c.id);
        }
        Self::count_held(
            c,
            &self.config.flow,
            &mut self.budget,
            self.now,
            &mut self.overfull,
        );
    }

    /// A transport connection was accepted on this shard.
    pub fn open(&mut self, now: Instant) -> ConnId {
        self.now = now;
        let entry = self.conns.vacant_entry();
        let id = ConnId {
            shard: self.id,
            slot: entry.key() as u32,
            generation: self.next_generation,
        };
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        entry.insert(Conn {
            id,
            proto: Connection::server(self.config.connection.clone(), now),
            instance: None,
            app_name: None,
            identity: None,
            grant: None,
            expires: None,
            usage: None,
            limits: AppLimits::default(),
            counted_streams: 0,
            checks_requests: true,
            peer: Peer::default(),
            upstream: FxHashMap::default(),
            pending: FxHashMap::default(),
            downstream: FxHashMap::default(),
            by_origin: FxHashMap::default(),
            sticky: FxHashMap::default(),
            meters: FxHashMap::default(),
            flow: ConnFlow::default(),
            woken: false,
            released: false,
            close_reason: None,
        });
        self.stats.connections_opened += 1;
        id
    }

    /// A frame arrived on connection `id`.
    pub fn handle_frame(&mut self, now: Instant, id: ConnId, frame: Bytes) {
        self.now = now;
        let slot = id.slot as usize;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let refused = conn.proto.requests_refused();
        conn.proto.handle_frame(now, frame);
        self.stats.requests_rejected += conn.proto.requests_refused() - refused;
        self.stats.frames_in += 1;
        self.drain_events(slot);
        self.wake(slot);
        self.finish_pass();
    }

    /// The byte stream of connection `id` is not RSocket (e.g. a frame
    /// over the size limit): the connection is closed with CONNECTION_ERROR.
    pub fn handle_decode_error(&mut self, now: Instant, id: ConnId, error: DecodeError) {
        self.now = now;
        let slot = id.slot as usize;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.proto.close(
            ErrorCode::CONNECTION_ERROR,
            format!("unreadable frame: {error}"),
        );
        self.drain_events(slot);
        self.wake(slot);
        self.finish_pass();
    }

    /// The transport of `id` is gone (or finished closing): everything about
    /// the connection is dropped. `transport` says what the transport saw
    /// (the peer closed it, a read failed, ...); the log line names the
    /// protocol's reason instead when the connection ended with an ERROR.
    pub fn close(&mut self, now: Instant, id: ConnId, transport: &str) {
        self.now = now;
        let slot = id.slot as usize;
        let Some(c) = self.conn(id) else {
            return;
        };
        let reason = c.close_reason.as_deref().unwrap_or(transport);
        match (&c.app_name, &c.instance) {
            (Some(app), Some(instance)) => {
                tracing::info!(conn = %id, %app, %instance, %reason, "connection closed");
            }
            _ => tracing::info!(conn = %id, %reason, "connection closed"),
        }
        self.release(slot, "its connection closed");
        if let Some(c) = self.conns.get_mut(slot) {
            self.budget.account(&mut c.flow, 0);
        }
        self.conns.remove(slot);
        self.stats.connections_closed += 1;
        self.finish_pass();
    }

    /// Time has passed: keepalive timeouts and the like.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        let due: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.proto.poll_timeout().is_some_and(|t| t <= now))
            .map(|(slot, _)| slot)
            .collect();
        for slot in due {
            if let Some(c) = self.conns.get_mut(slot) {
                c.proto.handle_timeout(now);
            }
            self.drain_events(slot);
            self.wake(slot);
        }
        self.end_expired_credentials(now);
        self.check_backpressure_timeouts();
        self.finish_pass();
    }

    /// When `handle_timeout` should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timeout = self.config.flow.backpressure_timeout;
        self.conns
            .iter()
            .flat_map(|(_, c)| {
                [
                    c.proto.poll_timeout(),
                    c.flow.over_since.map(|t| t + timeout),
                    c.expires.filter(|_| !c.proto.is_closed()),
                ]
            })
            .flatten()
            .chain(self.budget.over_since.map(|t| t + timeout))
            .min()
    }

    /// The next frame to write on `id`.
    #[inline]
    pub fn poll_transmit(&mut self, id: ConnId) -> Option<OutFrame> {
        let c = self.conn_mut(id)?;
        let frame = c.proto.poll_transmit()?;
        if !c.flow.backlog.is_empty() {
            self.taken(id.slot as usize);
        }
        Some(frame)
    }

    /// Bytes waiting to be written on `id`.
    pub fn pending_bytes(&self, id: ConnId) -> usize {
        self.conn(id).map_or(0, |c| c.proto.pending_bytes())
    }

    /// Whether `id` is closed: once its frames are written, close the transport
    /// and call [`Shard::close`].
    pub fn is_closed(&self, id: ConnId) -> bool {
        self.conn(id).is_none_or(|c| c.proto.is_closed())
    }

    /// Connections with something new to do (frames to write, reading
    /// allowed again, closed); each is listed once until it is taken.
    pub fn take_wakeups(&mut self) -> Vec<ConnId> {
        let woken = std::mem::take(&mut self.wakeups);
        for id in &woken {
            if let Some(c) = self.conns.get_mut(id.slot as usize) {
                c.woken = false;
            }
        }
        woken
    }

    /// Open connections on this shard.
    pub fn connections(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.conns.iter().map(|(_, c)| c.id)
    }

    /// Streams tracked on connection `id`: (requested, opened on it, waiting for routing).
    pub fn stream_maps(&self, id: ConnId) -> Option<(usize, usize, usize)> {
        self.conn(id)
            .map(|c| (c.upstream.len(), c.downstream.len(), c.pending.len()))
    }

    /// Gives back the room bursts of streams left in the connections'
    /// stream tables, and brings the per-app stream counts up to date.
    /// Checking on every stream's end would cost every request; the
    /// runtime calls this once a second instead.
    pub fn let_go_of_bursts(&mut self) {
        for (_, c) in &mut self.conns {
            c.let_go_of_burst();
            c.count_streams();
        }
        self.config.usage.sweep(self.now);
        self.failed.sweep(self.config.usage.nanos(self.now));
    }

    /// Entries connection `id`'s stream tables and queues have room for
    /// (what they hold, and what a burst left them), by name.
    pub fn table_room(&self, id: ConnId) -> Option<Vec<(&'static str, usize)>> {
        self.conn(id).map(Conn::table_room)
    }

    /// The app name and instance uuid a connection registered, if it did.
    pub fn connection_app(&self, id: ConnId) -> Option<(String, Arc<str>)> {
        let c = self.conn(id)?;
        Some((c.app_name.clone()?, c.instance.clone()?))
    }

    /// Streams open in `id`'s protocol state machine.
    pub fn protocol_streams(&self, id: ConnId) -> usize {
        self.conn(id).map_or(0, |c| c.proto.stream_count())
    }

    /// Sends METADATA_PUSH to connection `id` (events for the app).
    pub fn push_metadata(&mut self, id: ConnId, metadata: Bytes) -> bool {
        let slot = id.slot as usize;
        let Some(c) = self.conn_mut(id) else {
            return false;
        };
        let ok = c.proto.send_metadata_push(metadata).is_ok();
        self.wake(slot);
        ok
    }

    /// Stops new requests on every connection (they get REJECTED); open
    /// streams go on.
    pub fn drain(&mut self) {
        for (_, c) in self.conns.iter_mut() {
            c.proto.drain();
        }
    }

    /// Closes every connection: the streams still open end (ERROR
    /// CANCELED to requesters, whose requests may have been processed;
    /// CANCEL to responders; REJECTED for requests not yet routed), then
    /// each connection gets ERROR[CONNECTION_CLOSE] and is still read for
    /// `linger`, answering every request that arrives meanwhile with ERROR
    /// REJECTED, before it closes. Every shard does this for its own
    /// connections, so nothing crosses shards.
    pub fn shut_down(&mut self, now: Instant, message: &str, linger: Duration) {
        self.now = now;
        let slots: Vec<usize> = self.conns.iter().map(|(s, _)| s).collect();
        for slot in slots {
            let Some(c) = self.conns.get_mut(slot) else {
                continue;
            };
            let ended = Bytes::from(format!("{message}; the request may have been processed"));
            for (stream, _) in c.upstream.drain() {
                let _ = c
                    .proto
                    .send_error(stream, ErrorCode::CANCELED, ended.clone());
            }
            for (stream, _) in c.pending.drain() {
                let not_routed = Bytes::from(format!("{message}; the request was not processed"));
                let _ = c.proto.send_error(stream, ErrorCode::REJECTED, not_routed);
            }
            for (stream, _) in c.downstream.drain() {
                let _ = c.proto.send_cancel(stream);
            }
            c.by_origin.clear();
            c.meters.clear();
            c.flow.reserved = 0;
            c.flow.unrouted = 0;
            c.proto.shut_down(now, message, linger);
            // The peer may close as soon as it reads the ERROR: that close
            // is the broker's doing, and the log says so.
            c.close_reason.get_or_insert_with(|| {
                format!("sent ERROR {}: {message}", ErrorCode::CONNECTION_CLOSE)
            });
            self.drain_events(slot);
            self.wake(slot);
        }
        self.outstanding.clear();
        self.finish_pass();
    }
}
