//! What the shards share with the rest of the process: the phase (running,
//! draining, stopping), the settings they apply (replaced on reload), and
//! one slot per shard where that shard alone writes its heartbeat and its
//! last snapshot. The admin server, the watchdog and tests read the slots;
//! nothing here is touched per frame.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rsbroker_core::{ConnId, ServiceCounters, ShardId, ShardStats};

use crate::config::BrokerConfig;

/// Where the broker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepting connections and requests.
    Running,
    /// Not accepting; new requests are refused; in-flight streams finish
    /// until the drain deadline.
    Draining,
    /// Closing every connection now.
    Stopping,
}

/// One connection as a shard last reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionSnapshot {
    /// The connection.
    pub id: ConnId,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// The transport it came in on.
    pub transport: Option<rsbroker_transports::Scheme>,
    /// The subject of the client certificate it presented (mutual TLS),
    /// verified against `tls.client_ca`.
    pub tls_subject: Option<String>,
    /// App name and instance uuid, once the app registered.
    pub app: Option<(String, String)>,
    /// Bytes the broker holds for it, not yet handed to the transport.
    pub pending_bytes: usize,
    /// Whether the broker reads it (false while it is held back).
    pub reading: bool,
}

/// One app instance in the route table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceView {
    /// Its uuid.
    pub uuid: String,
    /// The app's name.
    pub name: String,
    /// The address the app reported.
    pub ip: Option<String>,
    /// `serving`, `out_of_service` or `stopped`.
    pub status: String,
    /// Its weight for the weighted balancer.
    pub power_rating: u32,
    /// Services it serves.
    pub services: Vec<String>,
    /// Its connections, on every shard.
    pub connections: usize,
}

/// Transport counters of one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Bytes read from connections.
    pub bytes_in: u64,
    /// Bytes connections' transports wrote.
    pub bytes_out: u64,
    /// Frames handed to connections' transports.
    pub frames_out: u64,
    /// Connections refused because the broker was at `max_connections`.
    pub refused_connections: u64,
    /// TLS handshakes that failed (not TLS, a certificate refused, ...).
    pub tls_handshakes_failed: u64,
    /// WebSocket upgrades refused (not HTTP, a wrong path, ...).
    pub upgrades_refused: u64,
    /// Handshakes left unfinished past `limits.handshake_timeout`.
    pub handshake_timeouts: u64,
    /// Connections closed because their bytes were not RSocket frames (or
    /// not what their transport carries: a text WebSocket message, ...).
    pub unreadable_connections: u64,
}

/// What a shard last reported about itself (refreshed every 100 ms).
#[derive(Clone, Debug, Default)]
pub struct ShardSnapshot {
    /// The shard.
    pub shard: ShardId,
    /// Its connections.
    /// Its connections (on a shard with more than
    /// `CONNECTIONS_LISTED_EVERY_TICK` of them, this list is rebuilt once
    /// a second, the counters every tick).
    pub connections: Arc<Vec<ConnectionSnapshot>>,
    /// Its routing counters.
    pub stats: ShardStats,
    /// Its transport counters.
    pub io: IoStats,
    /// Its QUIC endpoints' counters, summed.
    pub quic: rsbroker_transports::quic::QuicStats,
    /// Requests and errors per service counted on this shard.
    pub services: Vec<(String, ServiceCounters)>,
    /// Instances in its copy of the route table.
    pub instances: usize,
    /// The route table as this shard sees it (the same on every shard once
    /// updates have spread).
    pub routes: Arc<Vec<InstanceView>>,
    /// Streams open on its connections.
    pub open_streams: usize,
    /// Message batches waiting for each peer shard's queue.
    pub queue_depths: Vec<usize>,
    /// The shard has stopped accepting connections and new requests.
    pub draining: bool,
    /// Bytes held for its connections (what counts against
    /// `limits.max_buffered_bytes`).
    pub held_bytes: usize,
    /// It is over its share of the memory budget, not reading the
    /// connections that hold the most.
    pub over_budget: bool,
    /// Its receive buffer pool.
    pub pool: rsocket_proto::codec::pool::PoolStats,
}

/// Connections a shard lists in every snapshot; with more, the list is
/// rebuilt once a second (building it costs time per connection).
pub(crate) const CONNECTIONS_LISTED_EVERY_TICK: usize = 1000;

/// A shard's slot: written by that shard only.
#[derive(Debug, Default)]
pub(crate) struct ShardSlot {
    /// Milliseconds since the broker started, at the shard's last timer pass.
    heartbeat_ms: AtomicU64,
    /// Bytes held for its connections, as it last told the others
    /// (written when that changes by a step, and every tick).
    held: AtomicUsize,
    snapshot: Mutex<ShardSnapshot>,
}

/// Shared by the shards, the admin server and whoever runs the broker.
#[derive(Debug)]
pub(crate) struct Control {
    phase: AtomicU8,
    settings: Mutex<Arc<BrokerConfig>>,
    /// The TLS configuration built from `settings.tls` (rebuilt on reload).
    tls: Mutex<Option<Arc<rustls::ServerConfig>>>,
    /// What `POST /api/reload` calls (the binary raises SIGHUP).
    reload_hook: Mutex<Option<ReloadHook>>,
    /// The rules built from `settings.auth` (rebuilt on reload).
    trust: Mutex<Arc<rsbroker_core::trust::Trust>>,
    /// What each identity uses, counted by every shard (per-app limits).
    pub(crate) usage: Arc<rsbroker_core::trust::AppUsages>,
    generation: AtomicU64,
    pub(crate) slots: Vec<ShardSlot>,
    /// Open connections on all shards (changed per connection, not per frame).
    pub(crate) connections: AtomicUsize,
    /// Shards that have not yet finished.
    running_shards: AtomicUsize,
    /// Set once every shard listens.
    pub(crate) ready: AtomicBool,
    /// A test hook: shard `stall_shard` blocks its thread for `stall_ms`.
    pub(crate) stall_shard: AtomicUsize,
    pub(crate) stall_ms: AtomicU64,
    pub(crate) started: Instant,
}

impl Control {
    pub(crate) fn new(config: BrokerConfig, shards: usize) -> Self {
        Self {
            phase: AtomicU8::new(0),
            settings: Mutex::new(Arc::new(config)),
            tls: Mutex::new(None),
            trust: Mutex::default(),
            usage: Arc::default(),
            reload_hook: Mutex::new(None),
            generation: AtomicU64::new(0),
            slots: (0..shards).map(|_| ShardSlot::default()).collect(),
            connections: AtomicUsize::new(0),
            running_shards: AtomicUsize::new(shards),
            ready: AtomicBool::new(false),
            stall_shard: AtomicUsize::new(usize::MAX),
            stall_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Stopping,
        }
    }

    /// Moves forward only: running -> draining -> stopping.
    pub(crate) fn advance(&self, to: Phase) {
        let to = match to {
            Phase::Running => 0,
            Phase::Draining => 1,
            Phase::Stopping => 2,
        };
        self.phase.fetch_max(to, Ordering::AcqRel);
    }

    pub(crate) fn settings(&self) -> Arc<BrokerConfig> {
        self.settings
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The TLS configuration new connections get.
    pub(crate) fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        match self.tls.lock() {
            Ok(t) => t.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }

    /// Replaces the TLS configuration (before the settings that bump the
    /// generation, so shards see both).
    pub(crate) fn set_tls(&self, tls: Option<Arc<rustls::ServerConfig>>) {
        match self.tls.lock() {
            Ok(mut t) => *t = tls,
            Err(e) => *e.into_inner() = tls,
        }
    }

    /// Sets what a reload request from the admin server does.
    pub(crate) fn set_reload_hook(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        match self.reload_hook.lock() {
            Ok(mut h) => *h = Some(ReloadHook(hook)),
            Err(e) => *e.into_inner() = Some(ReloadHook(hook)),
        }
    }

    /// Asks for a reload; false when nothing can do one.
    pub(crate) fn request_reload(&self) -> bool {
        let hook = match self.reload_hook.lock() {
            Ok(h) => h.clone(),
            Err(e) => e.into_inner().clone(),
        };
        hook.map(|h| (h.0)()).is_some()
    }

    /// The authentication and authorisation rules in force.
    pub(crate) fn trust(&self) -> Arc<rsbroker_core::trust::Trust> {
        match self.trust.lock() {
            Ok(t) => t.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }

    /// Replaces the rules (before the settings that bump the generation,
    /// so shards see both).
    pub(crate) fn set_trust(&self, trust: rsbroker_core::trust::Trust) {
        let trust = Arc::new(trust);
        match self.trust.lock() {
            Ok(mut t) => *t = trust,
            Err(e) => *e.into_inner() = trust,
        }
    }

    pub(crate) fn replace_settings(&self, config: BrokerConfig) {
        match self.settings.lock() {
            Ok(mut s) => *s = Arc::new(config),
            Err(e) => *e.into_inner() = Arc::new(config),
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Blocks the calling shard's thread if a test asked for it.
    pub(crate) fn maybe_stall(&self, shard: ShardId) {
        if self.stall_shard.load(Ordering::Acquire) == usize::from(shard) {
            let ms = self.stall_ms.swap(0, Ordering::AcqRel);
            self.stall_shard.store(usize::MAX, Ordering::Release);
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    pub(crate) fn beat(&self, shard: ShardId) {
        if let Some(slot) = self.slots.get(usize::from(shard)) {
            let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            slot.heartbeat_ms.store(ms, Ordering::Release);
        }
    }

    /// How long ago each shard last went round its timer loop.
    pub(crate) fn heartbeat_ages(&self) -> Vec<Duration> {
        let now = self.started.elapsed();
        self.slots
            .iter()
            .map(|s| {
                now.saturating_sub(Duration::from_millis(
                    s.heartbeat_ms.load(Ordering::Acquire),
                ))
            })
            .collect()
    }

    pub(crate) fn publish_held(&self, shard: ShardId, held: usize) {
        if let Some(slot) = self.slots.get(usize::from(shard)) {
            slot.held.store(held, Ordering::Release);
        }
    }

    /// Bytes the shards other than `shard` hold.
    pub(crate) fn held_by_others(&self, shard: ShardId) -> usize {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != usize::from(shard))
            .map(|(_, s)| s.held.load(Ordering::Acquire))
            .sum()
    }

    pub(crate) fn publish(&self, shard: ShardId, snapshot: ShardSnapshot) {
        if let Some(slot) = self.slots.get(usize::from(shard)) {
            match slot.snapshot.lock() {
                Ok(mut s) => *s = snapshot,
                Err(e) => *e.into_inner() = snapshot,
            }
        }
    }

    pub(crate) fn snapshots(&self) -> Vec<ShardSnapshot> {
        self.slots
            .iter()
            .map(|s| {
                s.snapshot
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_else(|e| e.into_inner().clone())
            })
            .collect()
    }

    pub(crate) fn shard_finished(&self) {
        self.running_shards.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether every shard has finished.
    pub(crate) fn all_finished(&self) -> bool {
        self.running_shards.load(Ordering::Acquire) == 0
    }
}

/// What a reload request calls.
#[derive(Clone)]
struct ReloadHook(Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ReloadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadHook")
    }
}
