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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rsocket_proto::conn::{Config as ConnConfig, Connection, Event, Interaction};
use rsocket_proto::frame::FrameType;
use rsocket_proto::metadata::{BinaryRouting, RequestMetadata, Route};
use rsocket_proto::{DecodeError, ErrorCode, FrameView, OutFrame};
use rustc_hash::FxHashMap;
use slab::Slab;

use crate::app::{AppEvent, parse_app_event, parse_setup};
use crate::balance::{BalancerState, Candidate, Failover, Policies, Rng};
use crate::flow::{Budget, ConnFlow, FRAGMENT_OVERHEAD, FlowLimits, Mark, MeshFlow, StreamCredit};
use crate::ids::{ConnId, ShardId, StreamRef};
use crate::message::{Message, Signal};
use crate::routes::{RouteChange, RouteTable, RouteUpdate};
use crate::service::{HEALTH_SERVICE, ServiceKey, with_key};
use smallvec::SmallVec;

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
        }
    }
}

/// Counters of one shard, summed over shards for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Connections accepted.
    pub connections_opened: u64,
    /// Connections closed.
    pub connections_closed: u64,
    /// Requests routed to an instance.
    pub requests_routed: u64,
    /// Requests refused (no route, no live instance, stream limit, draining, ...).
    pub requests_rejected: u64,
    /// Requests retried on another instance.
    pub requests_retried: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Times a connection was paused because a connection it feeds was full.
    pub pauses: u64,
    /// Times a connection was paused because the shard its frames go to
    /// had too many of this shard's frames still to handle.
    pub mesh_pauses: u64,
    /// Times a connection was not read because the shard was over its
    /// memory budget and it held the most.
    pub overload_pauses: u64,
    /// Connections closed for a limit: a slow consumer past
    /// `backpressure_timeout`, `max_connection_memory`, or the largest
    /// holder of a spent memory budget.
    pub closed_over_limit: u64,
}

/// Requests and errors of one service on one shard, by interaction model
/// (indexed as [`interaction_index`] says).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Requests routed to an instance.
    pub requests: [u64; 4],
    /// Requests that ended with an ERROR from the instance, or because the
    /// instance went away.
    pub errors: [u64; 4],
}

/// Names of the interaction models, in [`interaction_index`] order.
pub const INTERACTIONS: [&str; 4] = [
    "request_response",
    "fire_and_forget",
    "request_stream",
    "request_channel",
];

/// The index of an interaction model in [`ServiceCounters`] and [`INTERACTIONS`].
pub fn interaction_index(interaction: Interaction) -> usize {
    match interaction {
        Interaction::RequestResponse => 0,
        Interaction::FireAndForget => 1,
        Interaction::Stream => 2,
        Interaction::Channel => 3,
    }
}

#[derive(Clone, Copy)]
enum Count {
    Request,
    Error,
}

/// Where a request goes, as [`Shard::destination`] decides.
#[derive(Debug)]
pub enum Destination {
    /// The broker answers it itself (the health check).
    Broker,
    /// Instances of a service.
    Instances {
        /// The service.
        service: ServiceKey,
        /// The chosen instances with the connection to use for each: one,
        /// or every routable instance for a broadcast.
        targets: Targets,
        /// The requester asked to stay on the instance it gets.
        sticky: bool,
        /// What to do when the instance goes away before answering.
        failover: Failover,
    },
}

/// Instances a request goes to, each with the connection to use: one
/// except for a broadcast, so held inline.
pub type Targets = SmallVec<[(Arc<str>, ConnId); 1]>;

/// Where a requester's stream goes.
#[derive(Debug)]
struct Upstream {
    /// Responder connections (more than one for a broadcast).
    targets: SmallVec<[ConnId; 1]>,
    service: ServiceKey,
    interaction: Interaction,
    /// Instances tried so far (for failover).
    tried: SmallVec<[Arc<str>; 1]>,
    /// The request, kept while a retry may still need it.
    retry: Option<(FrameView, u32)>,
}

/// A request whose routing metadata spans fragments that have not all
/// arrived. Its frames are copies (they may wait long; a copy does not keep
/// a whole receive buffer alive), counted with their overhead in `held`.
#[derive(Debug)]
struct PendingRoute {
    frames: Vec<FrameView>,
    metadata: BytesMut,
    held: usize,
}

#[derive(Debug)]
struct Conn {
    id: ConnId,
    proto: Connection,
    /// The instance this connection serves for, once it registered.
    instance: Option<Arc<str>>,
    /// Its app's name, for messages.
    app_name: Option<String>,
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
    /// Requests this shard has outstanding per responder connection.
    outstanding: FxHashMap<ConnId, u32>,
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
    now: Instant,
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
            outstanding: FxHashMap::default(),
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

    /// Counters.
    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Requests and errors per service, counted on this shard (the
    /// requester's) since it started.
    pub fn service_counters(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceCounters)> {
        self.service_stats.iter()
    }

    fn count(&mut self, service: &ServiceKey, interaction: Interaction, what: Count) {
        let i = interaction_index(interaction);
        let counters = match self.service_stats.get_mut(service) {
            Some(c) => c,
            None => self.service_stats.entry(service.clone()).or_default(),
        };
        match what {
            Count::Request => counters.requests[i] += 1,
            Count::Error => counters.errors[i] += 1,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// Replaces the settings (the shard's index, count and seed stay):
    /// policies and limits apply at once, the connection settings to
    /// connections opened from now on, except the stream limit, which
    /// applies to every connection.
    pub fn set_config(&mut self, config: ShardConfig) {
        let max_streams = config.connection.max_inbound_streams;
        self.config = ShardConfig {
            shard: self.config.shard,
            shards: self.config.shards,
            seed: self.config.seed,
            ..config
        };
        for (_, c) in self.conns.iter_mut() {
            c.proto.set_max_inbound_streams(max_streams);
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

    /// Counts what connection `slot` holds now in the shard's total, and
    /// notes when it passes its limits.
    fn account(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        Self::count_held(
            c,
            &self.config.flow,
            &mut self.budget,
            self.now,
            &mut self.overfull,
        );
    }

    #[inline]
    fn count_held(
        c: &mut Conn,
        limits: &FlowLimits,
        budget: &mut Budget,
        now: Instant,
        overfull: &mut Vec<ConnId>,
    ) {
        let pending = c.proto.pending_bytes();
        let held = c.flow.held(pending);
        if held == c.flow.accounted {
            // Nothing changed since it was last counted (the common case:
            // nothing held before, nothing held now).
            return;
        }
        budget.account(&mut c.flow, held);
        if pending > limits.max_pending_bytes {
            c.flow.over_since.get_or_insert(now);
        } else {
            c.flow.over_since = None;
        }
        if held > limits.max_connection_memory && !c.proto.is_closed() {
            overfull.push(c.id);
        }
    }

    /// Ends a pass: messages to this shard are handled, connections over
    /// their memory cap are closed, and the memory budget is checked.
    #[inline]
    fn finish_pass(&mut self) {
        self.run_local();
        if !self.overfull.is_empty() || self.budget.is_over() || self.budget.over_since.is_some() {
            self.enforce_memory_limits();
        }
    }

    #[cold]
    #[inline(never)]
    fn enforce_memory_limits(&mut self) {
        for id in std::mem::take(&mut self.overfull) {
            let Some(c) = self.conn(id) else { continue };
            let held = c.flow.held(c.proto.pending_bytes());
            if held > self.config.flow.max_connection_memory {
                let max = self.config.flow.max_connection_memory;
                self.close_over_limit(
                    id.slot as usize,
                    format!(
                        "the broker holds {held} bytes for this connection, more than its limit of {max} (max_connection_memory)"
                    ),
                );
            }
        }
        self.check_budget();
        self.run_local();
    }

    // ------------------------------------------------------------ transport side

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

    /// Items of metered streams the transport of `slot` has taken: their
    /// streams may be granted more.
    #[inline(never)]
    fn taken(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let (_, sent) = c.proto.transmit_positions();
        while let Some(mark) = self
            .conns
            .get_mut(slot)
            .and_then(|c| c.flow.backlog.pop_sent(sent))
        {
            self.on_taken(slot, mark);
        }
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

    /// Whether the transport should read from `id` now: not while a
    /// connection it feeds is full, while the shard is over its memory
    /// budget and it holds the most, or while the runtime holds every
    /// connection back.
    pub fn may_read(&self, id: ConnId) -> bool {
        self.conn(id)
            .is_some_and(|c| Self::reads(c, self.reading_blocked))
    }

    fn reads(c: &Conn, blocked: bool) -> bool {
        c.flow.paused_by == 0 && !c.flow.budget_paused && !blocked
    }

    /// The runtime stops (or resumes) reading every connection of the
    /// shard, as when its queues to another shard are too long.
    pub fn set_reading_blocked(&mut self, now: Instant, blocked: bool) {
        self.now = now;
        if self.reading_blocked == blocked {
            return;
        }
        self.reading_blocked = blocked;
        let slots: Vec<usize> = self.conns.iter().map(|(s, _)| s).collect();
        for slot in slots {
            self.sync_reading(slot);
        }
    }

    /// Tells connection `slot`'s state machine whether it is read (time
    /// not read is not the peer's silence), and wakes it when it is again.
    fn sync_reading(&mut self, slot: usize) {
        let blocked = self.reading_blocked;
        let now = self.now;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let reads = Self::reads(c, blocked);
        if reads != c.proto.is_reading() {
            c.proto.set_reading(now, reads);
            self.wake(slot);
        }
    }

    /// The transport of `id` holds `bytes` beyond its base buffers (a
    /// frame larger than usual on its way in, frames not yet written).
    pub fn set_transport_bytes(&mut self, id: ConnId, bytes: usize) {
        let slot = id.slot as usize;
        let Some(c) = self.conn_mut(id) else { return };
        if c.flow.transport == bytes {
            return;
        }
        c.flow.transport = bytes;
        self.account(slot);
        self.finish_pass();
    }

    /// Bytes held for this shard's connections (see [`crate::flow`]).
    pub fn held_bytes(&self) -> usize {
        self.budget.held
    }

    /// Bytes this shard may hold: the broker-wide budget minus what the
    /// other shards hold.
    pub fn set_allowance(&mut self, now: Instant, bytes: usize) {
        self.now = now;
        self.budget.allowance = bytes;
        self.finish_pass();
    }

    /// Whether the shard is over its memory allowance (and has stopped
    /// reading its largest holders).
    pub fn is_over_budget(&self) -> bool {
        self.budget.over_since.is_some()
    }

    /// Enters or leaves overload: over its allowance, the shard stops
    /// reading the connections that hold the most; at three quarters of it
    /// they are read again.
    fn check_budget(&mut self) {
        if self.budget.is_over() {
            if self.budget.over_since.is_none() {
                self.budget.over_since = Some(self.now);
                self.pause_largest_holders();
            }
        } else if self.budget.over_since.is_some() && self.budget.has_recovered() {
            self.budget.over_since = None;
            let paused = std::mem::take(&mut self.budget_paused);
            tracing::info!(
                shard = self.id,
                held = self.budget.held,
                allowance = self.budget.allowance,
                resumed = paused.len(),
                "back under the memory budget: reading every connection again"
            );
            for id in paused {
                if let Some(c) = self.conn_mut(id) {
                    c.flow.budget_paused = false;
                    self.sync_reading(id.slot as usize);
                }
            }
        }
    }

    fn pause_largest_holders(&mut self) {
        let holders = self
            .conns
            .iter()
            .filter(|(_, c)| !c.flow.budget_paused)
            .map(|(slot, c)| (slot, c.flow.accounted))
            .collect();
        let slots = self.budget.to_pause(holders);
        let largest = slots
            .first()
            .and_then(|s| self.conns.get(*s))
            .map(|c| (c.id, c.flow.accounted));
        tracing::warn!(
            shard = self.id,
            held = self.budget.held,
            allowance = self.budget.allowance,
            paused = slots.len(),
            largest = ?largest,
            "over the memory budget (max_buffered_bytes): the connections that hold the most are not read until it recovers"
        );
        for slot in slots {
            if let Some(c) = self.conns.get_mut(slot) {
                c.flow.budget_paused = true;
                self.budget_paused.push(c.id);
                self.stats.overload_pauses += 1;
                self.sync_reading(slot);
            }
        }
    }

    /// Closes the connections that stayed over `max_pending_bytes` for
    /// `backpressure_timeout` (slow consumers), and, when the shard has
    /// been over its memory budget that long, its largest holder.
    fn check_backpressure_timeouts(&mut self) {
        let limits = self.config.flow;
        let timeout = limits.backpressure_timeout;
        let now = self.now;
        let slow: Vec<(usize, usize)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.proto.is_closed() && c.flow.over_since.is_some_and(|t| now >= t + timeout)
            })
            .map(|(slot, c)| (slot, c.proto.pending_bytes()))
            .collect();
        for (slot, pending) in slow {
            self.close_over_limit(
                slot,
                format!(
                    "slow consumer: {pending} bytes not read for {} ms (more than max_pending_bytes = {} for backpressure_timeout)",
                    timeout.as_millis(),
                    limits.max_pending_bytes
                ),
            );
        }
        if self.budget.over_since.is_some_and(|t| now >= t + timeout) {
            let largest = self
                .conns
                .iter()
                .filter(|(_, c)| !c.proto.is_closed())
                .max_by_key(|(_, c)| c.flow.accounted)
                .map(|(slot, c)| (slot, c.flow.accounted));
            if let Some((slot, held)) = largest {
                self.close_over_limit(
                    slot,
                    format!(
                        "the broker is over its memory budget (max_buffered_bytes) and this connection holds the most ({held} bytes)"
                    ),
                );
            }
            // Another one after another timeout, if it is still over.
            self.budget.over_since = Some(now);
        }
    }

    /// Closes connection `slot` for a limit, with ERROR[CONNECTION_ERROR]
    /// saying which: what waited unsent for it is dropped (a peer that
    /// does not read would never take it).
    fn close_over_limit(&mut self, slot: usize, message: String) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.proto.is_closed() {
            return;
        }
        tracing::warn!(conn = %c.id, %message, "connection closed for a limit");
        self.stats.closed_over_limit += 1;
        c.proto.abort(ErrorCode::CONNECTION_ERROR, message);
        c.flow.backlog = crate::flow::Backlog::default();
        self.drain_events(slot);
        self.wake(slot);
    }

    /// The transport wrote some of `id`'s frames: once below half the limit,
    /// the connections it stopped may go on, and its starved streams may
    /// be granted credit.
    #[inline]
    pub fn written(&mut self, id: ConnId) {
        let slot = id.slot as usize;
        let half = self.config.flow.max_pending_bytes / 2;
        let Some(c) = self.conn_mut(id) else { return };
        let pending = c.proto.pending_bytes();
        let release = !c.flow.feeders.is_empty() && pending <= half;
        if release || c.flow.starved {
            self.drained(slot, release, pending);
        }
        self.account(slot);
        self.finish_pass();
    }

    /// Connection `slot` drained (to `pending` bytes): the pauses it made
    /// end (`release`), and its streams waiting for room get credit.
    #[inline(never)]
    fn drained(&mut self, slot: usize, release: bool, pending: usize) {
        let limits = self.config.flow;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if release {
            let feeders = std::mem::take(&mut c.flow.feeders);
            self.release_feeders(feeders);
        }
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.flow.starved && c.flow.room(&limits, pending) > 0 {
            c.flow.starved = false;
            let starved: SmallVec<[u32; 4]> = c
                .meters
                .iter()
                .filter(|(_, m)| m.is_starved())
                .map(|(s, _)| *s)
                .collect();
            for stream in starved {
                self.top_up(slot, stream);
            }
        }
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

    /// Messages for shard `to`, in order.
    pub fn take_outbox(&mut self, to: ShardId) -> Vec<Message> {
        self.outbox
            .get_mut(usize::from(to))
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Whether any message waits for another shard.
    pub fn has_outbox(&self) -> bool {
        self.outbox.iter().any(|o| !o.is_empty())
    }

    /// Messages from shard `from`.
    pub fn handle_messages(
        &mut self,
        now: Instant,
        from: ShardId,
        messages: impl IntoIterator<Item = Message>,
    ) {
        self.now = now;
        let mut handled = 0;
        for m in messages {
            handled += m.frame_bytes();
            self.on_message(m);
        }
        if handled > 0 && from != self.id {
            let ack = Message::Acked {
                from: self.id,
                bytes: handled,
            };
            self.send(from, ack);
        }
        self.finish_pass();
    }

    /// Frame bytes sent to other shards and not yet handled there.
    pub fn mesh_in_flight(&self) -> usize {
        self.mesh.in_flight()
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
            self.drain_events(slot);
            self.wake(slot);
        }
        self.outstanding.clear();
        self.finish_pass();
    }

    // --------------------------------------------------------------- routing

    fn send(&mut self, to: ShardId, message: Message) {
        if to == self.id {
            self.local.push_back(message);
        } else if let Some(out) = self.outbox.get_mut(usize::from(to)) {
            out.push(message);
        }
    }

    /// [`Shard::send`] for a message with a frame read from connection
    /// `from`: when it goes to another shard that has too many of this
    /// shard's frames still to handle, `from` is not read until it has.
    #[inline]
    fn send_frame(&mut self, from: ConnId, to: ShardId, message: Message) {
        if to == self.id {
            return self.local.push_back(message);
        }
        let bytes = message.frame_bytes();
        self.send(to, message);
        let limit = self.config.flow.max_pending_bytes;
        if bytes > 0 && self.mesh.sent(to, bytes, from, limit) {
            self.stats.mesh_pauses += 1;
            self.pause(from);
        }
    }

    fn run_local(&mut self) {
        while let Some(m) = self.local.pop_front() {
            self.on_message(m);
        }
    }

    fn broadcast(&mut self, change: RouteChange) {
        self.revision += 1;
        let update = RouteUpdate {
            origin: self.id,
            revision: self.revision,
            change,
        };
        self.routes.apply(&update);
        for shard in 0..self.shards {
            if shard != self.id
                && let Some(out) = self.outbox.get_mut(usize::from(shard))
            {
                out.push(Message::Route(update.clone()));
            }
        }
    }

    fn drain_events(&mut self, slot: usize) {
        loop {
            let Some(event) = self.conns.get_mut(slot).and_then(|c| c.proto.poll_event()) else {
                break;
            };
            self.on_event(slot, event);
        }
    }

    fn on_event(&mut self, slot: usize, event: Event) {
        match event {
            Event::Setup(setup) => self.on_setup(slot, &setup),
            Event::Request {
                stream_id,
                interaction,
                frame,
                ended,
            } => self.on_request(slot, stream_id, interaction, frame, ended),
            Event::Fragment {
                stream_id, frame, ..
            }
            | Event::Payload {
                stream_id, frame, ..
            } => self.on_stream_signal(slot, stream_id, Signal::Frame(frame)),
            Event::RequestN { stream_id, n } => {
                self.on_stream_signal(slot, stream_id, Signal::RequestN(n))
            }
            Event::Cancel { stream_id, .. } => {
                self.on_stream_signal(slot, stream_id, Signal::Cancel)
            }
            Event::Error {
                stream_id,
                code,
                data,
            } => self.on_stream_signal(slot, stream_id, Signal::Error { code, data }),
            Event::StreamError { stream_id, error } => {
                // The peer broke the protocol on this stream, and was told;
                // the other side of the stream is ended too.
                let data = Bytes::from(format!(
                    "the other side broke the protocol: {}",
                    error.message
                ));
                self.on_stream_signal(
                    slot,
                    stream_id,
                    Signal::Error {
                        code: ErrorCode::CANCELED,
                        data,
                    },
                );
            }
            Event::MetadataPush(metadata) => self.on_metadata_push(slot, &metadata),
            Event::Closed(e) => {
                self.note_close_reason(slot, &e);
                self.release(slot, "its connection closed");
            }
            Event::Closing(e) => self.note_close_reason(slot, &e),
            Event::ResumeRequested(_) => {
                if let Some(c) = self.conns.get_mut(slot) {
                    c.proto
                        .reject_resume("resume is not supported by this broker");
                }
            }
            Event::Resumed | Event::Lease(_) => {}
        }
    }

    fn note_close_reason(&mut self, slot: usize, e: &rsocket_proto::ConnectionError) {
        if let Some(c) = self.conns.get_mut(slot)
            && c.close_reason.is_none()
        {
            let by = match e.initiator {
                rsocket_proto::Initiator::Local => "sent",
                rsocket_proto::Initiator::Remote => "received",
            };
            c.close_reason = Some(format!("{by} ERROR {}: {}", e.code, e.message));
        }
    }

    fn on_setup(&mut self, slot: usize, setup: &rsocket_proto::frame::Setup) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if setup.lease {
            c.proto.reject_setup(
                ErrorCode::UNSUPPORTED_SETUP,
                "LEASE is not supported by this broker",
            );
            return;
        }
        let info = match parse_setup(setup) {
            Ok(info) => info,
            Err(e) => {
                c.proto.reject_setup(ErrorCode::INVALID_SETUP, e);
                return;
            }
        };
        let Some(app) = info.app else {
            tracing::info!(conn = %c.id, "connection set up (a requester: no app metadata)");
            return;
        };
        c.app_name = Some(app.name.clone());
        c.instance = Some(app.uuid.clone());
        let conn = c.id;
        tracing::info!(conn = %conn, app = %app.name, instance = %app.uuid, services = info.services.len(), "connection set up");
        self.broadcast(RouteChange::Join {
            conn,
            app: Arc::new(app),
            services: info.services,
        });
    }

    fn on_metadata_push(&mut self, slot: usize, metadata: &[u8]) {
        let Some(c) = self.conns.get(slot) else {
            return;
        };
        let Some(instance) = c.instance.clone() else {
            return;
        };
        let conn = c.id;
        let event = match parse_app_event(metadata) {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(conn = %conn, error = %e, "ignored METADATA_PUSH");
                return;
            }
        };
        let change = match event {
            AppEvent::ServicesExposed(services) => RouteChange::Expose { instance, services },
            AppEvent::ServicesHidden(services) => RouteChange::Hide { instance, services },
            AppEvent::Status(status) => RouteChange::Status { instance, status },
        };
        self.broadcast(change);
    }

    /// Refuses a request on `a`'s stream with `code`.
    fn refuse(&mut self, slot: usize, stream: u32, code: ErrorCode, message: String) {
        self.stats.requests_rejected += 1;
        if let Some(c) = self.conns.get_mut(slot) {
            if c.proto.is_stream_open(stream) {
                let _ = c.proto.send_error(stream, code, Bytes::from(message));
            }
            c.upstream.remove(&stream);
            if let Some(p) = c.pending.remove(&stream) {
                c.flow.unrouted = c.flow.unrouted.saturating_sub(p.held);
            }
        }
        self.wake(slot);
    }

    /// Why connection `slot` may not hold one more fragment of `cost`
    /// bytes for a request that already holds `held`, if it may not.
    fn unroutable(&self, slot: usize, held: usize, cost: usize) -> Option<String> {
        let limits = &self.config.flow;
        if held + cost > limits.max_unrouted_bytes {
            return Some(format!(
                "the request's fragments before its routing metadata ends exceed {} bytes \
                 (each fragment counts {FRAGMENT_OVERHEAD} bytes more than its length)",
                limits.max_unrouted_bytes
            ));
        }
        let c = self.conns.get(slot)?;
        let total = c.flow.held(c.proto.pending_bytes()) + cost;
        (total > limits.max_connection_memory).then(|| {
            format!(
                "the connection holds {total} bytes, more than its limit of {} \
                 (max_connection_memory)",
                limits.max_connection_memory
            )
        })
    }

    fn on_request(
        &mut self,
        slot: usize,
        stream: u32,
        interaction: Interaction,
        frame: FrameView,
        ended: bool,
    ) {
        let metadata = frame.metadata_slice().unwrap_or_default();
        // Only a fragmented request may have its route still to come; a
        // whole one is scanned once, when it is routed.
        let gather = frame.follows()
            && !ended
            && !matches!(RequestMetadata::scan(metadata),
                Ok(f) if f.routing.is_some() || f.binary_routing.is_some());
        if gather {
            // The routing metadata may go on in the next fragments: gather
            // metadata until data (or the end of the message) shows it is complete.
            let cost = frame.len() + FRAGMENT_OVERHEAD;
            if let Some(msg) = self.unroutable(slot, 0, cost) {
                return self.refuse(slot, stream, ErrorCode::REJECTED, msg);
            }
            if let Some(c) = self.conns.get_mut(slot) {
                let pending = PendingRoute {
                    frames: vec![frame.detached()],
                    metadata: BytesMut::from(metadata),
                    held: cost,
                };
                c.pending.insert(stream, pending);
                c.flow.unrouted += cost;
            }
            return self.wake(slot);
        }
        self.route(
            slot,
            stream,
            interaction,
            smallvec::smallvec![frame],
            None,
            ended,
        );
    }

    fn on_pending_fragment(&mut self, slot: usize, stream: u32, frame: FrameView) {
        let cost = frame.len() + FRAGMENT_OVERHEAD;
        let held = match self.conns.get(slot).and_then(|c| c.pending.get(&stream)) {
            Some(p) => p.held,
            None => return,
        };
        if let Some(msg) = self.unroutable(slot, held, cost) {
            return self.refuse(slot, stream, ErrorCode::REJECTED, msg);
        }
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let Some(p) = c.pending.get_mut(&stream) else {
            return;
        };
        if let Some(m) = frame.metadata_slice() {
            p.metadata.extend_from_slice(m);
        }
        let complete = !frame.follows() || !frame.data_slice().is_empty() || !frame.has_metadata();
        p.frames.push(frame.detached());
        p.held += cost;
        c.flow.unrouted += cost;
        if !complete {
            return self.wake(slot);
        }
        let Some(p) = c.pending.remove(&stream) else {
            return;
        };
        c.flow.unrouted = c.flow.unrouted.saturating_sub(p.held);
        let interaction = match p.frames.first().map(FrameView::frame_type) {
            Some(FrameType::RequestResponse) => Interaction::RequestResponse,
            Some(FrameType::RequestFnf) => Interaction::FireAndForget,
            Some(FrameType::RequestStream) => Interaction::Stream,
            _ => Interaction::Channel,
        };
        let ended = !c.proto.is_stream_open(stream);
        self.route(
            slot,
            stream,
            interaction,
            SmallVec::from_vec(p.frames),
            Some(&p.metadata),
            ended,
        );
    }

    /// Where a request with `metadata` from `requester` goes now: reads its
    /// route, finds the service and picks the instance (every instance for a
    /// broadcast). Sends nothing. The error says what is missing, naming the
    /// service.
    pub fn destination(
        &self,
        requester: ConnId,
        interaction: Interaction,
        metadata: &[u8],
    ) -> Result<Destination, String> {
        let found = RequestMetadata::scan(metadata)
            .map_err(|e| format!("request metadata is malformed: {e}"))?;
        let (service, uuids, route) = if let Some(tags) = found.routing {
            let route = Route::from_tags(tags)
                .map_err(|e| format!("routing metadata is malformed: {e}"))?;
            if route.service == HEALTH_SERVICE.as_bytes() {
                return Ok(Destination::Broker);
            }
            let group = route.group.unwrap_or_default();
            let version = route.version.unwrap_or_default();
            // The whole key first (a service named with dots and no method),
            // then the key without its method.
            let found = [route.key, route.service]
                .into_iter()
                .find_map(|name| with_key(group, name, version, |k| self.routes.service(k)));
            match found {
                Some((key, uuids)) => (key, uuids, Some(route)),
                None => return Err(format!("no live instance of service {route}")),
            }
        } else if let Some(bin) = found.binary_routing {
            let bin = BinaryRouting::parse(bin)
                .map_err(|e| format!("binary routing metadata is malformed: {e}"))?;
            match self
                .routes
                .service_by_binary_id(bin.service_id)
                .and_then(|key| self.routes.service(key.as_str().as_bytes()))
            {
                Some((key, uuids)) => (key, uuids, None),
                None => {
                    return Err(format!(
                        "no live instance of service {} (binary id {:#010x})",
                        String::from_utf8_lossy(bin.routing_text),
                        bin.service_id
                    ));
                }
            }
        } else {
            return Err("the request has no routing metadata".into());
        };

        let policy = self
            .config
            .policies
            .for_service(service, Self::service_name(service));
        let endpoint = route.and_then(|r| r.endpoint);
        let sticky = route.is_some_and(|r| r.sticky);
        let broadcast =
            route.is_some_and(|r| r.broadcast) && interaction == Interaction::FireAndForget;
        let hash_key = match &policy.balancer {
            crate::balance::Balancer::ConsistentHash { tag } => route.and_then(|r| r.tag(tag)),
            _ => None,
        };
        let mut targets = Targets::new();
        if broadcast {
            targets = self.all_targets(uuids);
        } else if let Some(t) = self.pick(
            service,
            uuids,
            &policy.balancer,
            requester,
            endpoint,
            sticky,
            hash_key,
            &[],
        ) {
            targets.push(t);
        }
        if targets.is_empty() {
            return Err(match endpoint {
                Some(e) => format!(
                    "instance {} does not serve {service}",
                    String::from_utf8_lossy(e)
                ),
                None => format!("no live instance of service {service}"),
            });
        }
        Ok(Destination::Instances {
            service: service.clone(),
            targets,
            sticky,
            failover: policy.failover,
        })
    }

    /// The route's service name alone, for the health check and policies.
    fn service_name(key: &ServiceKey) -> &str {
        let s = key.as_str();
        let s = s.split_once('!').map_or(s, |(_, rest)| rest);
        s.split_once(':').map_or(s, |(name, _)| name)
    }

    fn route(
        &mut self,
        slot: usize,
        stream: u32,
        interaction: Interaction,
        mut frames: SmallVec<[FrameView; 1]>,
        gathered: Option<&[u8]>,
        ended: bool,
    ) {
        if frames.is_empty() {
            return;
        }
        // The request's first frame, and in `frames` the fragments after it.
        let first = frames.remove(0);
        // The routing metadata: the first frame's, or what the fragments
        // of a request gathered.
        let metadata = gathered.unwrap_or_else(|| first.metadata_slice().unwrap_or_default());
        let requester = match self.conns.get(slot) {
            Some(c) => c.id,
            None => return,
        };
        let (service, targets, sticky, failover) =
            match self.destination(requester, interaction, metadata) {
                Ok(Destination::Instances {
                    service,
                    targets,
                    sticky,
                    failover,
                }) => (service, targets, sticky, failover),
                Ok(Destination::Broker) => {
                    // The health check: the broker is up, so it answers "1".
                    if let Some(c) = self.conns.get_mut(slot)
                        && interaction == Interaction::RequestResponse
                    {
                        let _ = c.proto.send_payload(
                            stream,
                            None,
                            Bytes::from_static(b"1"),
                            true,
                            true,
                        );
                    }
                    return;
                }
                Err(message) => {
                    tracing::debug!(conn = %requester, stream, %message, "request refused");
                    return self.refuse(slot, stream, ErrorCode::REJECTED, message);
                }
            };
        self.stats.requests_routed += 1;
        self.count(&service, interaction, Count::Request);
        let origin = StreamRef {
            conn: requester,
            stream,
        };
        // Kept for a retry on another instance: a whole request-response.
        let keep = !ended
            && matches!(failover, Failover::Retry { .. })
            && interaction == Interaction::RequestResponse
            && frames.is_empty()
            && !first.follows();
        // A stream's items are metered here, where they are written to the
        // requester: the responder is granted what this side can absorb.
        let credit = if !ended && matches!(interaction, Interaction::Stream | Interaction::Channel)
        {
            let limits = self.config.flow;
            self.conns.get_mut(slot).map(|c| {
                let room = c.flow.room(&limits, c.proto.pending_bytes());
                let mut meter = StreamCredit::new(c.flow.serial(), first.request_n());
                let grant = meter.first_grant(&limits, room);
                c.flow.reserved += grant.reserved;
                c.meters.insert(stream, meter);
                grant.n
            })
        } else {
            None
        };
        // The last target takes the request itself, unless a retry keeps it:
        // its buffer moves on instead of being shared once more.
        let mut first = Some(first);
        let last = targets.len().saturating_sub(1);
        for (i, (_, to)) in targets.iter().enumerate() {
            let frame = if i == last && !keep {
                first.take()
            } else {
                first.clone()
            };
            let Some(frame) = frame else {
                break;
            };
            let open = Message::Open {
                origin,
                to: *to,
                frame,
                credit,
            };
            self.send_frame(requester, to.shard, open);
            for f in &frames {
                let fragment = Message::ToResponder {
                    origin,
                    to: *to,
                    signal: Signal::Frame(f.clone()),
                };
                self.send_frame(requester, to.shard, fragment);
            }
            if !ended {
                *self.outstanding.entry(*to).or_default() += 1;
            }
        }
        if ended {
            return;
        }
        let retry = match failover {
            Failover::Retry { attempts } if keep => first.map(|f| (f, attempts)),
            _ => None,
        };
        if let Some(c) = self.conns.get_mut(slot) {
            if sticky && let Some((instance, _)) = targets.first() {
                c.sticky.insert(service.clone(), instance.clone());
            }
            let mut tried = SmallVec::new();
            let mut conns = SmallVec::new();
            for (instance, conn) in targets {
                tried.push(instance);
                conns.push(conn);
            }
            c.upstream.insert(
                stream,
                Upstream {
                    targets: conns,
                    service,
                    interaction,
                    tried,
                    retry,
                },
            );
        }
    }

    /// One connection of every routable instance in `uuids` (for broadcast).
    fn all_targets(&self, uuids: &[Arc<str>]) -> Targets {
        // Sized once: growing from the inline one would reallocate at 2, 4, 8, ...
        let mut targets = Targets::with_capacity(uuids.len());
        for u in uuids {
            if let Some(inst) = self.routes.instance(u)
                && inst.status.routable()
                && let Some(c) = self.connection_of(inst)
            {
                targets.push((u.clone(), c));
            }
        }
        targets
    }

    /// The connection of an instance to use from this shard: one on this shard if it has one.
    fn connection_of(&self, inst: &crate::routes::Instance) -> Option<ConnId> {
        inst.conns
            .iter()
            .find(|c| c.shard == self.id)
            .or_else(|| inst.conns.first())
            .copied()
    }

    /// The instance of `service` (among `uuids`, its instances) the
    /// balancer picks for `requester`, with the connection to use.
    #[allow(clippy::too_many_arguments)]
    fn pick(
        &self,
        service: &ServiceKey,
        uuids: &[Arc<str>],
        balancer: &crate::balance::Balancer,
        requester: ConnId,
        endpoint: Option<&[u8]>,
        sticky: bool,
        hash_key: Option<&[u8]>,
        exclude: &[Arc<str>],
    ) -> Option<(Arc<str>, ConnId)> {
        // Candidates borrow from the route table and live on the stack: no
        // allocation or reference count per request for up to 8 instances.
        let mut candidates: SmallVec<[Candidate<'_>; 8]> = SmallVec::new();
        let mut chosen: SmallVec<[(&Arc<str>, ConnId); 8]> = SmallVec::new();
        for uuid in uuids {
            if exclude.contains(uuid) {
                continue;
            }
            if endpoint.is_some_and(|e| e != uuid.as_bytes()) {
                continue;
            }
            let Some(inst) = self.routes.instance(uuid) else {
                continue;
            };
            if !inst.status.routable() {
                continue;
            }
            let Some(conn) = self.connection_of(inst) else {
                continue;
            };
            let outstanding = inst
                .conns
                .iter()
                .map(|c| self.outstanding.get(c).copied().unwrap_or(0))
                .sum();
            candidates.push(Candidate {
                uuid,
                weight: inst.app.power_rating.max(1),
                outstanding,
                local: conn.shard == self.id,
            });
            chosen.push((uuid, conn));
        }
        if candidates.is_empty() {
            return None;
        }
        if sticky
            && let Some(stuck) = self
                .conns
                .get(requester.slot as usize)
                .filter(|c| c.id == requester)
                .and_then(|c| c.sticky.get(service))
            && let Some(&(uuid, conn)) = chosen.iter().find(|(u, _)| *u == stuck)
        {
            return Some((uuid.clone(), conn));
        }
        let i = {
            let (state, rng) = &mut *self.picker.borrow_mut();
            state.pick(service, balancer, &candidates, hash_key, rng)
        };
        let &(uuid, conn) = chosen.get(i)?;
        Some((uuid.clone(), conn))
    }

    /// A frame or signal from connection `slot` on an existing stream.
    fn on_stream_signal(&mut self, slot: usize, stream: u32, signal: Signal) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let me = c.id;
        if c.pending.contains_key(&stream) {
            match signal {
                Signal::Frame(f) => return self.on_pending_fragment(slot, stream, f),
                _ => {
                    // Cancelled (or errored) before it could be routed.
                    if let Some(p) = c.pending.remove(&stream) {
                        c.flow.unrouted = c.flow.unrouted.saturating_sub(p.held);
                    }
                    return self.wake(slot);
                }
            }
        }
        if let Some(up) = c.upstream.get(&stream) {
            if let Signal::RequestN(n) = signal
                && let Some(m) = c.meters.get_mut(&stream)
            {
                // The requester's demand: passed on as its side drains.
                m.ask(n);
                self.top_up(slot, stream);
                return;
            }
            let targets = up.targets.clone();
            let origin = StreamRef { conn: me, stream };
            for to in targets {
                let message = Message::ToResponder {
                    origin,
                    to,
                    signal: signal.clone(),
                };
                self.send_frame(me, to.shard, message);
            }
            self.check_upstream(slot, stream);
            return;
        }
        if let Some(origin) = c.downstream.get(&stream).copied() {
            if let Signal::RequestN(n) = signal
                && let Some(m) = c.meters.get_mut(&stream)
            {
                // A channel's responder asks for the requester's items.
                m.ask(n);
                self.top_up(slot, stream);
                return;
            }
            let message = Message::ToRequester { to: origin, signal };
            self.send_frame(me, origin.conn.shard, message);
            self.check_downstream(slot, stream);
        }
    }

    /// Grants the producer of metered stream `stream` on connection `slot`
    /// what the meter allows now.
    fn top_up(&mut self, slot: usize, stream: u32) {
        let limits = self.config.flow;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let room = c.flow.room(&limits, c.proto.pending_bytes());
        let Some(m) = c.meters.get_mut(&stream) else {
            return;
        };
        let grant = m.grant(&limits, room);
        c.flow.starved |= m.is_starved();
        if let Some(grant) = grant {
            self.send_credit(slot, stream, grant);
        }
    }

    /// Passes `grant` on to the producer of stream `stream` of connection `slot`.
    fn send_credit(&mut self, slot: usize, stream: u32, grant: crate::flow::Grant) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        c.flow.reserved += grant.reserved;
        let signal = Signal::RequestN(grant.n);
        let me = c.id;
        if let Some(to) = c.upstream.get(&stream).and_then(|u| u.targets.first()) {
            let to = *to;
            let origin = StreamRef { conn: me, stream };
            self.send(to.shard, Message::ToResponder { origin, to, signal });
        } else if let Some(origin) = c.downstream.get(&stream).copied() {
            self.send(
                origin.conn.shard,
                Message::ToRequester { to: origin, signal },
            );
        }
    }

    /// The transport of connection `slot` took the items of `mark`.
    fn on_taken(&mut self, slot: usize, mark: Mark) {
        let limits = &self.config.flow;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let room = c.flow.room(limits, c.proto.pending_bytes());
        let Some(m) = c
            .meters
            .get_mut(&mark.stream)
            .filter(|m| m.serial() == mark.serial)
        else {
            return;
        };
        m.transmitted(mark.items, mark.bytes);
        let grant = m.grant(limits, room);
        c.flow.starved |= m.is_starved();
        if let Some(grant) = grant {
            self.send_credit(slot, mark.stream, grant);
        }
    }

    /// Drops a requester stream's entry once its state machine says it ended.
    fn check_upstream(&mut self, slot: usize, stream: u32) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.proto.is_stream_open(stream) {
            return;
        }
        if let Some(m) = c.meters.remove(&stream) {
            c.flow.reserved -= m.reserved().min(c.flow.reserved);
        }
        if let Some(up) = c.upstream.remove(&stream) {
            for t in up.targets {
                if let Some(n) = self.outstanding.get_mut(&t) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.outstanding.remove(&t);
                    }
                }
            }
        }
    }

    /// Drops a responder stream's entries once its state machine says it ended.
    fn check_downstream(&mut self, slot: usize, stream: u32) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.proto.is_stream_open(stream) {
            return;
        }
        if let Some(m) = c.meters.remove(&stream) {
            c.flow.reserved -= m.reserved().min(c.flow.reserved);
        }
        if let Some(origin) = c.downstream.remove(&stream) {
            c.by_origin.remove(&origin);
        }
    }

    /// Applies a signal to a stream of local connection `slot`, coming from
    /// connection `from`, and meters it where the stream is metered.
    /// `unrequested`: the signal goes to a responder (a request, its
    /// fragments, a channel's items), so `from` is paused if the
    /// connection is full. Towards a requester only the fragments that
    /// continue an item pause their producer; the rest was asked for.
    fn deliver(
        &mut self,
        slot: usize,
        stream: u32,
        signal: Signal,
        from: ConnId,
        unrequested: bool,
    ) -> bool {
        let max_pending = self.config.flow.max_pending_bytes;
        let Some(c) = self.conns.get_mut(slot) else {
            return false;
        };
        let full = c.proto.pending_bytes() > max_pending;
        let continues = full && c.proto.is_sending_fragments(stream);
        let frame = match &signal {
            Signal::Frame(f) => Some((f.len(), f.next(), f.follows())),
            _ => None,
        };
        // The signal is taken by value: a frame's buffer moves on to the
        // outgoing queue instead of being shared (a reference count less).
        let ok = match signal {
            Signal::Frame(f) => c.proto.forward(stream, f).is_ok(),
            Signal::RequestN(n) => c.proto.send_request_n(stream, n).is_ok(),
            Signal::Cancel => c.proto.send_cancel(stream).is_ok(),
            Signal::Error { code, data } => {
                if code.is_connection_level() {
                    c.proto
                        .send_error(stream, ErrorCode::APPLICATION_ERROR, data)
                        .is_ok()
                } else {
                    c.proto.send_error(stream, code, data).is_ok()
                }
            }
        };
        if ok
            && let Some((len, next, follows)) = frame
            && !c.meters.is_empty()
            && let Some(m) = c.meters.get_mut(&stream)
        {
            let arrival = m.arrived(len, next, follows);
            c.flow.reserved -= arrival.released.min(c.flow.reserved);
            let (queued, _) = c.proto.transmit_positions();
            c.flow
                .backlog
                .push(queued, stream, m.serial(), arrival.item, len);
        }
        if (unrequested || continues) && c.proto.pending_bytes() > max_pending {
            self.note_feeder(slot, from);
        }
        self.wake(slot);
        ok
    }

    /// If connection `slot` is over `max_pending_bytes`, stops reading
    /// `feeder` (on whichever shard) until `slot` is down to half.
    fn note_feeder(&mut self, slot: usize, feeder: ConnId) {
        let max_pending = self.config.flow.max_pending_bytes;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if feeder == c.id || c.proto.pending_bytes() <= max_pending || !c.flow.add_feeder(feeder) {
            return;
        }
        self.stats.pauses += 1;
        tracing::debug!(conn = %c.id, %feeder, pending = c.proto.pending_bytes(), "full: its feeder is paused");
        if feeder.shard == self.id {
            self.pause(feeder);
        } else {
            self.send(feeder.shard, Message::Pause { conn: feeder });
        }
    }

    /// Undoes the pauses a connection that drained (or closed) had made.
    fn release_feeders(&mut self, feeders: Vec<ConnId>) {
        for f in feeders {
            if f.shard == self.id {
                self.resume(f);
            } else {
                self.send(f.shard, Message::Resume { conn: f });
            }
        }
    }

    fn pause(&mut self, id: ConnId) {
        if let Some(c) = self.conn_mut(id) {
            c.flow.paused_by += 1;
            self.sync_reading(id.slot as usize);
        }
    }

    fn resume(&mut self, id: ConnId) {
        if let Some(c) = self.conn_mut(id) {
            c.flow.paused_by = c.flow.paused_by.saturating_sub(1);
            self.sync_reading(id.slot as usize);
        }
    }

    fn on_message(&mut self, message: Message) {
        match message {
            Message::Route(update) => {
                if !self.routes.apply(&update) {
                    tracing::warn!(
                        origin = update.origin,
                        revision = update.revision,
                        "route update out of order, ignored"
                    );
                }
            }
            Message::Open {
                origin,
                to,
                frame,
                credit,
            } => self.on_open(origin, to, frame, credit),
            Message::ToResponder { origin, to, signal } => {
                let slot = to.slot as usize;
                let Some(stream) = self
                    .conn(to)
                    .and_then(|c| c.by_origin.get(&origin).copied())
                else {
                    return;
                };
                if !self.deliver(slot, stream, signal, origin.conn, true) {
                    // The requester sent something the responder's stream cannot take.
                    if let Some(c) = self.conns.get_mut(slot) {
                        let _ = c.proto.send_cancel(stream);
                    }
                    let reason = "the request could not be passed on to its responder".to_owned();
                    self.send(
                        origin.conn.shard,
                        Message::Gone {
                            to: origin,
                            code: ErrorCode::CANCELED,
                            reason,
                        },
                    );
                }
                self.check_downstream(slot, stream);
            }
            Message::ToRequester { to, signal } => {
                let slot = to.conn.slot as usize;
                let Some(up) = self.conn(to.conn).and_then(|c| c.upstream.get(&to.stream)) else {
                    return;
                };
                let Some(responder) = up.targets.first().copied() else {
                    return;
                };
                if let Signal::Error { .. } = signal {
                    let (service, interaction) = (up.service.clone(), up.interaction);
                    self.count(&service, interaction, Count::Error);
                }
                self.deliver(slot, to.stream, signal, responder, false);
                self.check_upstream(slot, to.stream);
            }
            Message::Gone { to, code, reason } => self.on_gone(to, code, reason),
            Message::Pause { conn } => self.pause(conn),
            Message::Resume { conn } => self.resume(conn),
            Message::Acked { from, bytes } => {
                let limit = self.config.flow.max_pending_bytes;
                for conn in self.mesh.acked(from, bytes, limit) {
                    self.resume(conn);
                }
            }
        }
    }

    fn on_open(&mut self, origin: StreamRef, to: ConnId, frame: FrameView, credit: Option<u32>) {
        let slot = to.slot as usize;
        // A channel whose requester goes on sending: its items are metered
        // here, where they are written to the responder.
        let channel_items = frame.frame_type() == FrameType::RequestChannel && !frame.complete();
        let result = match self.conn_mut(to) {
            Some(c) if !c.released => c
                .proto
                .forward_request_granting(frame, credit)
                .map_err(|e| e.to_string()),
            _ => Err("the instance's connection has closed".into()),
        };
        match result {
            Ok(stream) => {
                if let Some(c) = self.conns.get_mut(slot)
                    && c.proto.is_stream_open(stream)
                {
                    c.downstream.insert(stream, origin);
                    c.by_origin.insert(origin, stream);
                    if channel_items {
                        let serial = c.flow.serial();
                        c.meters.insert(stream, StreamCredit::new(serial, 0));
                    }
                }
                if self
                    .conns
                    .get(slot)
                    .is_some_and(|c| c.proto.pending_bytes() > self.config.flow.max_pending_bytes)
                {
                    self.note_feeder(slot, origin.conn);
                }
                self.wake(slot);
            }
            Err(reason) => {
                let reason = format!("the request could not reach the instance: {reason}");
                self.send(
                    origin.conn.shard,
                    Message::Gone {
                        to: origin,
                        code: ErrorCode::REJECTED,
                        reason,
                    },
                );
            }
        }
    }

    fn on_gone(&mut self, to: StreamRef, code: ErrorCode, reason: String) {
        let slot = to.conn.slot as usize;
        let Some(c) = self.conn_mut(to.conn) else {
            return;
        };
        let Some(up) = c.upstream.remove(&to.stream) else {
            return;
        };
        if let Some(m) = c.meters.remove(&to.stream) {
            c.flow.reserved -= m.reserved().min(c.flow.reserved);
        }
        for t in &up.targets {
            if let Some(n) = self.outstanding.get_mut(t) {
                *n = n.saturating_sub(1);
            }
        }
        let requester = to.conn;
        // Failover: send the request to another instance.
        if let Some((frame, attempts)) = up.retry.clone()
            && attempts > 0
            && up.targets.len() == 1
        {
            let policy = self
                .config
                .policies
                .for_service(&up.service, Self::service_name(&up.service));
            let picked = self
                .routes
                .service(up.service.as_str().as_bytes())
                .and_then(|(_, uuids)| {
                    self.pick(
                        &up.service,
                        uuids,
                        &policy.balancer,
                        requester,
                        None,
                        false,
                        None,
                        &up.tried,
                    )
                });
            if let Some((instance, target)) = picked {
                self.stats.requests_retried += 1;
                tracing::debug!(conn = %requester, stream = to.stream, %instance, "request retried on another instance");
                let mut tried = up.tried;
                tried.push(instance);
                *self.outstanding.entry(target).or_default() += 1;
                let open = Message::Open {
                    origin: to,
                    to: target,
                    frame: frame.clone(),
                    credit: None,
                };
                self.send_frame(requester, target.shard, open);
                if let Some(c) = self.conns.get_mut(slot) {
                    c.upstream.insert(
                        to.stream,
                        Upstream {
                            targets: smallvec::smallvec![target],
                            service: up.service,
                            interaction: up.interaction,
                            tried,
                            retry: Some((frame, attempts - 1)),
                        },
                    );
                }
                return;
            }
        }
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.proto.is_stream_open(to.stream) {
            let message = format!("{reason} (service {})", up.service);
            let _ = c.proto.send_error(to.stream, code, Bytes::from(message));
        }
        self.count(&up.service, up.interaction, Count::Error);
        self.wake(slot);
    }

    /// Ends everything that involves connection `slot`: its requests are
    /// cancelled at their responders, the streams it served end at their
    /// requesters, and its instance leaves the route table everywhere.
    fn release(&mut self, slot: usize, why: &str) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.released {
            return;
        }
        c.released = true;
        let me = c.id;
        let upstream: Vec<(u32, Upstream)> = c.upstream.drain().collect();
        let downstream: Vec<(u32, StreamRef)> = c.downstream.drain().collect();
        c.by_origin.clear();
        c.pending.clear();
        c.meters.clear();
        c.flow.unrouted = 0;
        c.flow.reserved = 0;
        let feeders = std::mem::take(&mut c.flow.feeders);
        let instance = c.instance.clone();
        let name = c.app_name.clone().unwrap_or_else(|| "requester".to_owned());
        // Whoever paused it keeps a feeder entry; the Resume that comes
        // later names this connection's generation and finds nothing.
        c.flow.paused_by = 0;
        for (stream, up) in upstream {
            let origin = StreamRef { conn: me, stream };
            for to in up.targets {
                if let Some(n) = self.outstanding.get_mut(&to) {
                    *n = n.saturating_sub(1);
                }
                self.send(
                    to.shard,
                    Message::ToResponder {
                        origin,
                        to,
                        signal: Signal::Cancel,
                    },
                );
            }
        }
        for (_, origin) in downstream {
            let reason = match &instance {
                Some(i) => format!("instance {i} of {name} disconnected ({why})"),
                None => format!("the responder disconnected ({why})"),
            };
            self.send(
                origin.conn.shard,
                Message::Gone {
                    to: origin,
                    code: ErrorCode::CANCELED,
                    reason,
                },
            );
        }
        self.release_feeders(feeders);
        if instance.is_some() {
            self.broadcast(RouteChange::Leave { conn: me });
        }
        self.wake(slot);
    }
}
