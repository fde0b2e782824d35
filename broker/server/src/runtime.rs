//! Running the shards: one glommio executor per shard, pinned to its core,
//! each with its listeners, its connections, a timer, and one task per
//! peer shard for each direction of the cross-shard mesh.
//!
//! Each shard's [`Shard`] lives in an `Rc<RefCell<_>>` on its executor and
//! is only touched there. After every pass that changed it (frames read,
//! messages received, time passed) the runtime dispatches its outputs: it
//! wakes the connections that have frames to write and hands each peer
//! shard one batch of messages.
//!
//! The timer loop of each shard also beats its heartbeat, publishes its
//! snapshot, applies reloaded settings, and walks the shard through drain
//! and stop when the [`Control`] phase says so.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement, Task};
use rsbroker_core::{ConnId, Message, Shard, ShardConfig, ShardId};
use rsbroker_transports::driver::{self, End, Endpoint, Written};
use rsbroker_transports::listen::{BindOptions, HandshakeFailure};
use rsbroker_transports::quic::{Forwarded, Placement as QuicPlacement, QuicEndpoint, QuicStats};
use rsbroker_transports::{
    Conn, FrameIo, Handshake, Incoming, ListenAddr, Listener, Scheme, TransportError,
};
use rsocket_proto::frame::{ErrorFrame, Frame};
use rsocket_proto::{DecodeError, ErrorCode, OutFrame};
use rustc_hash::FxHashMap;

use crate::admin::AdminServer;
use crate::config::{BrokerConfig, available_cpus};
use crate::control::{
    CONNECTIONS_LISTED_EVERY_TICK, ConnectionSnapshot, Control, InstanceView, IoStats, Phase,
    ShardSnapshot,
};
use crate::notify::Notify;

/// A running broker.
#[derive(Debug)]
pub struct BrokerHandle {
    addrs: Vec<ListenAddr>,
    threads: Vec<ExecutorJoinHandle<io::Result<()>>>,
    shards: usize,
    control: Arc<Control>,
    admin: Option<AdminServer>,
}

/// Drives a running broker from other threads (signal handlers, the
/// watchdog): cheap to clone.
#[derive(Clone, Debug)]
pub struct Controller {
    control: Arc<Control>,
}

impl Controller {
    /// Starts draining: listeners close, new requests get ERROR REJECTED,
    /// in-flight streams have `shutdown.drain_timeout` to finish; then it
    /// goes on as [`Controller::stop`] does.
    pub fn drain(&self) {
        self.control.advance(Phase::Draining);
    }

    /// Closes every connection and ends the shards: the streams still open
    /// end (ERROR CANCELED), each connection gets ERROR CONNECTION_CLOSE
    /// and is read for `shutdown.close_timeout` more, so that a request
    /// already on its way gets ERROR REJECTED (not processed) rather than
    /// no answer; then it closes.
    pub fn stop(&self) {
        self.control.advance(Phase::Stopping);
    }

    /// Whether the broker is draining or stopping.
    pub fn is_stopping(&self) -> bool {
        self.control.phase() != Phase::Running
    }

    /// Whether every shard has finished.
    pub fn is_finished(&self) -> bool {
        self.control.all_finished()
    }

    /// Blocks shard `shard`'s thread for `duration`, as a stuck core would
    /// (for tests of the watchdog and `/healthz`).
    #[doc(hidden)]
    pub fn stall_shard(&self, shard: usize, duration: Duration) {
        self.control.stall_ms.store(
            u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
        self.control.stall_shard.store(shard, Ordering::Release);
    }

    /// How long ago each shard last went round its timer loop (a few
    /// hundred milliseconds at most while it is healthy).
    pub fn heartbeat_ages(&self) -> Vec<Duration> {
        self.control.heartbeat_ages()
    }

    /// What every shard last reported.
    pub fn snapshot(&self) -> Vec<ShardSnapshot> {
        self.control.snapshots()
    }

    /// What `POST /api/reload` on the admin server does (the binary
    /// raises SIGHUP, which its signal loop answers with a reload).
    pub fn on_reload_request(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.control.set_reload_hook(Arc::new(hook));
    }

    /// The settings in force.
    pub fn settings(&self) -> BrokerConfig {
        (*self.control.settings()).clone()
    }

    /// Applies what can change while running: limits, shutdown timeouts,
    /// policies and the log level (the caller sets the log filter). Returns
    /// the settings that differ but need a restart; those keep their old
    /// values.
    pub fn reload(&self, new: BrokerConfig) -> Vec<String> {
        let old = self.control.settings();
        let mut needs_restart = Vec::new();
        if new.server != old.server {
            needs_restart.push("server".to_owned());
        }
        if new.admin != old.admin {
            needs_restart.push("admin".to_owned());
        }
        if new.log.format != old.log.format {
            needs_restart.push("log.format".to_owned());
        }
        if new.quic != old.quic {
            needs_restart.push("quic".to_owned());
        }
        // Rotation: new connections get the files as they are now; open
        // connections keep the certificate they were accepted with.
        match new.tls.build() {
            Ok(tls) => self.control.set_tls(tls),
            Err(e) => {
                tracing::warn!(error = %e, "the TLS files cannot be loaded; the ones in force are kept");
            }
        }
        // Keys, credentials and permissions: open connections keep their
        // identity and get its new grant for their next request.
        let auth = match new.auth.build() {
            Ok(trust) => {
                self.control.set_trust(trust);
                new.auth.clone()
            }
            Err(e) => {
                tracing::warn!(error = %e, "the [auth] rules cannot be loaded; the ones in force are kept");
                old.auth.clone()
            }
        };
        let applied = BrokerConfig {
            server: old.server.clone(),
            admin: old.admin.clone(),
            quic: old.quic.clone(),
            log: crate::config::LogConfig {
                format: old.log.format,
                ..new.log.clone()
            },
            auth,
            ..new
        };
        self.control.replace_settings(applied);
        needs_restart
    }
}

impl BrokerHandle {
    /// The addresses the broker listens on (ports resolved).
    pub fn addrs(&self) -> &[ListenAddr] {
        &self.addrs
    }

    /// The first TCP address, for clients and tests.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addr_of(Scheme::Tcp).map(|a| a.addr)
    }

    /// The first address listening with `scheme` (port resolved).
    pub fn addr_of(&self, scheme: Scheme) -> Option<&ListenAddr> {
        self.addrs.iter().find(|a| a.scheme == scheme)
    }

    /// Where the admin HTTP server listens, when it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::addr)
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// A handle for other threads.
    pub fn controller(&self) -> Controller {
        Controller {
            control: self.control.clone(),
        }
    }

    /// What every shard last reported.
    pub fn snapshot(&self) -> Vec<ShardSnapshot> {
        self.control.snapshots()
    }

    /// The shard that accepted the connection from `peer`, once it has reported it.
    pub fn shard_of(&self, peer: SocketAddr) -> Option<ShardId> {
        self.snapshot()
            .iter()
            .find(|s| s.connections.iter().any(|c| c.peer == Some(peer)))
            .map(|s| s.shard)
    }

    /// See [`Controller::drain`].
    pub fn drain(&self) {
        self.controller().drain();
    }

    /// See [`Controller::stop`].
    pub fn stop(&self) {
        self.controller().stop();
    }

    /// Waits until every shard has stopped, then stops the admin server.
    pub fn join(self) -> io::Result<()> {
        let mut first_error = None;
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(io::Error::other(format!("a shard failed: {e}")));
                }
            }
        }
        if let Some(admin) = self.admin {
            admin.stop();
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// What the transport knows of a connection's peer.
struct PeerInfo {
    addr: Option<SocketAddr>,
    transport: Scheme,
    /// The verified client certificate's subject (mutual TLS).
    tls_subject: Option<String>,
}

/// The subject of the leaf certificate a client presented.
fn certificate_subject(io: &Conn) -> Option<String> {
    let leaf = io.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.subject().to_string())
}

/// The common name of the client certificate's subject (its whole
/// subject when it has none): the identity mutual TLS proves.
fn certificate_name(io: &Conn) -> Option<String> {
    let leaf = io.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Some(cn.unwrap_or_else(|| cert.subject().to_string()))
}

struct ShardRt {
    id: ShardId,
    shard: RefCell<Shard>,
    control: Arc<Control>,
    wakers: RefCell<FxHashMap<ConnId, Waker>>,
    peers: RefCell<FxHashMap<ConnId, PeerInfo>>,
    /// Batches waiting for each peer shard's queue.
    out: Vec<RefCell<VecDeque<Vec<Message>>>>,
    out_notify: Vec<Notify>,
    /// What handshakes of connections accepted from now on use: the
    /// largest frame accepted, the TLS configuration, the timeout.
    handshake: RefCell<Handshake>,
    stopping: Cell<bool>,
    /// Reading is held back on every connection because a peer shard's
    /// queue is too long (that shard is busy: more messages would only
    /// pile up).
    read_blocked: Cell<bool>,
    /// What this shard last told the others it holds.
    published_held: Cell<usize>,
    io: Cell<IoStats>,
    /// The route table view last published, and the revisions it was built at.
    routes: RefCell<(Vec<u64>, Arc<Vec<InstanceView>>)>,
    /// The connection list of the last snapshot, and when it was built.
    conn_list: RefCell<(Instant, Arc<Vec<ConnectionSnapshot>>)>,
    /// This shard's QUIC endpoints, in the order of the QUIC listeners.
    quic: Vec<QuicEndpoint>,
}

/// QUIC datagrams that may wait for one peer shard.
const DATAGRAM_QUEUE: usize = 1024;
/// Batches that may wait for one peer before this shard stops reading its connections.
const MAX_WAITING_BATCHES: usize = 64;
/// The timer loop's longest sleep (heartbeat, snapshot, phase checks).
const TICK: Duration = Duration::from_millis(100);
/// The timer loop's shortest sleep while running: keepalive and lifetime
/// deadlines fire up to this late, and a shard with many connections (each
/// pass looks at every one) wakes at most this often for them.
const TIMER_SLACK: Duration = Duration::from_millis(50);
/// How often a shard gives back the room bursts of streams left in its
/// connections' tables.
const LET_GO_EVERY: Duration = Duration::from_secs(1);
/// How old the connection list of a snapshot may grow on a shard with
/// many connections.
const CONNECTIONS_LIST_AGE: Duration = Duration::from_secs(1);
/// Change in what a shard holds at which it tells the others at once
/// (otherwise every tick).
const HELD_STEP: usize = 1 << 20;

impl ShardRt {
    fn dispatch(&self) {
        self.share_budget(false);
        let (wakeups, outboxes) = {
            let mut s = self.shard.borrow_mut();
            let outboxes: Vec<(usize, Vec<Message>)> = (0..self.out.len())
                .filter_map(|t| {
                    let batch = s.take_outbox(t as ShardId);
                    (!batch.is_empty()).then_some((t, batch))
                })
                .collect();
            (s.take_wakeups(), outboxes)
        };
        {
            let wakers = self.wakers.borrow();
            for id in wakeups {
                if let Some(w) = wakers.get(&id) {
                    w.wake_by_ref();
                }
            }
        }
        for (t, batch) in outboxes {
            if let (Some(q), Some(n)) = (self.out.get(t), self.out_notify.get(t)) {
                q.borrow_mut().push_back(batch);
                n.notify();
            }
        }
        if !self.read_blocked.get() && self.mesh_blocked() {
            self.read_blocked.set(true);
            self.shard
                .borrow_mut()
                .set_reading_blocked(Instant::now(), true);
        }
    }

    /// Whether a peer's queue is so far behind that reading more would only pile up messages.
    fn mesh_blocked(&self) -> bool {
        self.out
            .iter()
            .any(|q| q.borrow().len() > MAX_WAITING_BATCHES)
    }

    /// Tells the other shards what this one holds once it changed by a
    /// step (or on every tick), and gives this one what the others leave
    /// of the broker-wide budget.
    fn share_budget(&self, tick: bool) {
        let held = self.shard.borrow().held_bytes();
        if !tick && held.abs_diff(self.published_held.get()) < HELD_STEP {
            return;
        }
        self.published_held.set(held);
        self.control.publish_held(self.id, held);
        let budget = self.control.settings().limits.max_buffered_bytes.0;
        let allowance = budget.saturating_sub(self.control.held_by_others(self.id));
        self.shard
            .borrow_mut()
            .set_allowance(Instant::now(), allowance);
    }

    fn count_io(&self, f: impl FnOnce(&mut IoStats)) {
        let mut io = self.io.get();
        f(&mut io);
        self.io.set(io);
    }

    /// What the shard holds now, for the admin server and the watchdog.
    /// `fresh`: list the connections even if the list is less than a
    /// second old (drain, stop).
    fn snapshot(&self, fresh: bool) -> ShardSnapshot {
        let shard = self.shard.borrow();
        let connections = {
            let mut cached = self.conn_list.borrow_mut();
            let now = Instant::now();
            if fresh
                || cached.1.len() <= CONNECTIONS_LISTED_EVERY_TICK
                || now.duration_since(cached.0) >= CONNECTIONS_LIST_AGE
            {
                let peers = self.peers.borrow();
                let list = shard
                    .connections()
                    .map(|id| ConnectionSnapshot {
                        id,
                        peer: peers.get(&id).and_then(|p| p.addr),
                        transport: peers.get(&id).map(|p| p.transport),
                        tls_subject: peers.get(&id).and_then(|p| p.tls_subject.clone()),
                        app: shard
                            .connection_app(id)
                            .map(|(name, uuid)| (name, uuid.to_string())),
                        pending_bytes: shard.pending_bytes(id),
                        reading: shard.may_read(id),
                    })
                    .collect();
                *cached = (now, Arc::new(list));
            }
            cached.1.clone()
        };
        // The route table view is rebuilt only when the table changed.
        let routes = {
            let mut cached = self.routes.borrow_mut();
            let revisions = shard.routes().revisions();
            if cached.0 != revisions {
                let view = shard
                    .routes()
                    .instances()
                    .map(|(uuid, inst)| InstanceView {
                        uuid: uuid.to_string(),
                        name: inst.app.name.clone(),
                        ip: inst.app.ip.clone(),
                        status: inst.status.as_str().to_owned(),
                        power_rating: inst.app.power_rating,
                        services: inst
                            .services
                            .iter()
                            .map(|s| s.as_str().to_owned())
                            .collect(),
                        connections: inst.conns.len(),
                    })
                    .collect();
                *cached = (revisions.to_vec(), Arc::new(view));
            }
            cached.1.clone()
        };
        ShardSnapshot {
            shard: self.id,
            connections,
            stats: shard.stats(),
            io: self.io.get(),
            quic: self.quic_stats(),
            services: shard
                .service_counters()
                .map(|(k, c)| (k.as_str().to_owned(), *c))
                .collect(),
            instances: routes.len(),
            routes,
            open_streams: shard.open_streams(),
            queue_depths: self.out.iter().map(|q| q.borrow().len()).collect(),
            draining: self.stopping.get(),
            held_bytes: shard.held_bytes(),
            over_budget: shard.is_over_budget(),
            pool: rsocket_proto::codec::pool::stats(),
        }
    }

    fn quic_stats(&self) -> QuicStats {
        let mut sum = QuicStats::default();
        for ep in &self.quic {
            sum.add(&ep.stats());
        }
        sum
    }

    /// Applies the settings in `config` that may change while running.
    fn apply(&self, config: &BrokerConfig) {
        // Certificate rotation for QUIC: new connections get the new files.
        if let Some(tls) = self.control.tls() {
            let settings = self.control.settings();
            let options = settings.quic.options(settings.limits.max_frame_size.0);
            match rsbroker_transports::quic::server_config(&tls, &options) {
                Ok(server) => {
                    for ep in &self.quic {
                        ep.set_server_config(Some(server.clone()));
                    }
                }
                Err(e) => {
                    tracing::warn!(shard = self.id, error = %e, "QUIC keeps its TLS configuration")
                }
            }
        }
        let mut shard = self.shard.borrow_mut();
        let current = shard.config().clone();
        shard.set_config(shard_config(
            current.shard,
            current.shards,
            config,
            self.control.trust(),
        ));
        *self.handshake.borrow_mut() = Handshake {
            max_frame: config.limits.max_frame_size.0,
            tls: self.control.tls(),
            timeout: config.limits.handshake_timeout,
        };
    }
}

/// The settings of one shard, from the broker's.
fn shard_config(
    id: ShardId,
    shards: u16,
    config: &BrokerConfig,
    trust: Arc<rsbroker_core::trust::Trust>,
) -> ShardConfig {
    let mut c = ShardConfig::new(id, shards);
    c.trust = trust;
    c.connection.max_inbound_streams = config.limits.max_streams_per_connection;
    c.connection.server.setup_timeout = config.limits.setup_timeout;
    c.connection.server.peer_lifetime = (
        config.limits.min_keepalive_lifetime,
        config.limits.max_keepalive_lifetime,
    );
    c.policies = config.policies();
    c.flow = config.limits.flow();
    c
}

/// Starts a broker: binds every listen address on every shard, and the
/// admin server, and returns once all of them listen.
pub fn start(config: BrokerConfig) -> io::Result<BrokerHandle> {
    if let Some((key, problem)) = config.problems().into_iter().next() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{key}: {problem}"),
        ));
    }
    let cores: Vec<usize> = if config.server.cores.is_empty() {
        available_cpus()
    } else {
        config.server.cores.clone()
    };
    if cores.is_empty() {
        return Err(io::Error::other("no CPU to run on"));
    }
    let shards = if config.server.shards == 0 {
        cores.len()
    } else {
        config.server.shards
    };
    let control = Arc::new(Control::new(config.clone(), shards));
    control.set_tls(config.tls.build().map_err(io::Error::other)?);
    control.set_trust(config.auth.build().map_err(io::Error::other)?);
    let mesh: MeshBuilder<Vec<Message>, Full> =
        MeshBuilder::full(shards, config.server.mesh_capacity.max(1));
    // QUIC datagrams that reach a shard other than their connection's owner
    // go to the owner over a mesh of their own (a full queue drops them:
    // QUIC recovers a lost datagram).
    let datagrams: Option<MeshBuilder<Forwarded, Full>> = (shards > 1
        && config.server.listen.iter().any(|a| a.scheme.is_udp()))
    .then(|| MeshBuilder::full(shards, DATAGRAM_QUEUE));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<ListenAddr>, String>>();

    let spawn =
        |id: usize, listen: Vec<ListenAddr>| -> io::Result<ExecutorJoinHandle<io::Result<()>>> {
            let cpu = cores[id % cores.len()];
            let mesh = mesh.clone();
            let datagrams = datagrams.clone();
            let control = control.clone();
            let ready = ready_tx.clone();
            // Receive buffers: each shard's pool holds at most its share
            // of max_buffered_bytes; at it, reads wait for buffers to come back.
            let pool_limit = config.limits.max_buffered_bytes.0 / shards.max(1);
            LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("rsbroker-shard-{id}"))
                .io_memory(config.server.io_memory.0)
                .spin_before_park(config.server.spin_before_park)
                .spawn(move || async move {
                    rsocket_proto::codec::pool::configure(pool_limit);
                    let ctx = ShardCtx {
                        id: id as ShardId,
                        shards: shards as u16,
                        listen,
                        mesh,
                        datagrams,
                        control: control.clone(),
                        ready,
                    };
                    let result = run_shard(ctx).await;
                    control.shard_finished();
                    result
                })
                .map_err(|e| executor_error(id, cpu, &e.to_string()))
        };

    // Shard 0 binds first, so that port 0 resolves to one port every shard shares.
    let mut threads = vec![spawn(0, config.server.listen.clone())?];
    let resolved = match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => {
            control.advance(Phase::Stopping);
            return Err(io::Error::other(e));
        }
        Err(_) => return Err(io::Error::other("shard 0 did not start")),
    };
    let fail = |control: &Control, e: io::Error| {
        control.advance(Phase::Stopping);
        e
    };
    for id in 1..shards {
        threads.push(spawn(id, resolved.clone()).map_err(|e| fail(&control, e))?);
    }
    for _ in 1..shards {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(fail(&control, io::Error::other(e))),
            Err(_) => return Err(fail(&control, io::Error::other("a shard did not start"))),
        }
    }
    // Checked again now that every shard listens: another broker that
    // started at the same moment would have passed the first check too.
    if let Some(e) = resolved.iter().find_map(|a| held_elsewhere(a).err()) {
        return Err(fail(&control, io::Error::new(io::ErrorKind::AddrInUse, e)));
    }
    let admin = if config.admin.enabled {
        Some(
            AdminServer::start(config.admin.listen, control.clone())
                .map_err(|e| fail(&control, e))?,
        )
    } else {
        None
    };
    control.ready.store(true, Ordering::Release);
    Ok(BrokerHandle {
        addrs: resolved,
        threads,
        shards,
        control,
        admin,
    })
}

/// An executor that could not start, with what to do about it.
fn executor_error(shard: usize, cpu: usize, e: &str) -> io::Error {
    io::Error::other(format!(
        "shard {shard} could not start on CPU {cpu}: {e} \
         (rsbroker needs io_uring and locked memory: see `rsbroker --check-config`)"
    ))
}

/// Why `addr` cannot be ours: another process listens there. Our shards
/// share each address (SO_REUSEPORT), which would let a second broker
/// share it too, splitting apps between two route tables.
fn held_elsewhere(addr: &ListenAddr) -> Result<(), String> {
    let holders = if addr.scheme.is_udp() {
        rsbroker_transports::tcp::other_udp_sockets(addr.addr)
    } else {
        rsbroker_transports::tcp::other_listeners(addr.addr)
    };
    match holders.first() {
        None => Ok(()),
        Some(holder) => Err(format!(
            "cannot listen on {addr}: {holder} already listens there; a second broker on the \
             same address would take part of its connections with a route table of its own"
        )),
    }
}

fn bind(
    listen: &[ListenAddr],
    first: bool,
    options: &mut BindOptions,
) -> Result<(Vec<Listener>, Vec<ListenAddr>), String> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for addr in listen {
        if first {
            held_elsewhere(addr)?;
        }
        let l = Listener::bind_with(addr, options)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        if l.quic().is_some() {
            options.placement.listener += 1;
        }
        addrs.push(l.local().clone());
        listeners.push(l);
    }
    Ok((listeners, addrs))
}

struct ShardCtx {
    id: ShardId,
    shards: u16,
    listen: Vec<ListenAddr>,
    mesh: MeshBuilder<Vec<Message>, Full>,
    datagrams: Option<MeshBuilder<Forwarded, Full>>,
    control: Arc<Control>,
    ready: mpsc::Sender<Result<Vec<ListenAddr>, String>>,
}

async fn run_shard(ctx: ShardCtx) -> io::Result<()> {
    let ShardCtx {
        id,
        shards,
        listen,
        mesh,
        datagrams,
        control,
        ready,
    } = ctx;
    let settings = control.settings();
    let mut bind_options = BindOptions {
        placement: QuicPlacement {
            shard: id,
            shards,
            listener: 0,
        },
        quic: settings.quic.options(settings.limits.max_frame_size.0),
        tls: control.tls(),
    };
    let (listeners, addrs) = match bind(&listen, id == 0, &mut bind_options) {
        Ok(bound) => bound,
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(io::Error::other(e));
        }
    };
    // Report the bound addresses before joining the mesh: the other shards
    // start only once shard 0 has resolved its ports, and joining waits for all.
    let _ = ready.send(Ok(addrs.clone()));
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|e| io::Error::other(format!("the shard mesh failed to form: {e}")))?;
    if id == 0 {
        for a in &addrs {
            tracing::info!(shards, "rsbroker listening on {a}");
        }
    }

    let mut generation = control.generation();
    let now = Instant::now();
    let rt = Rc::new(ShardRt {
        id,
        shard: RefCell::new(Shard::new(
            ShardConfig {
                usage: control.usage.clone(),
                ..shard_config(id, shards, &settings, control.trust())
            },
            now,
        )),
        control: control.clone(),
        wakers: RefCell::new(FxHashMap::default()),
        peers: RefCell::new(FxHashMap::default()),
        out: (0..shards).map(|_| RefCell::new(VecDeque::new())).collect(),
        out_notify: (0..shards).map(|_| Notify::default()).collect(),
        handshake: RefCell::new(Handshake {
            max_frame: settings.limits.max_frame_size.0,
            tls: control.tls(),
            timeout: settings.limits.handshake_timeout,
        }),
        stopping: Cell::new(false),
        read_blocked: Cell::new(false),
        published_held: Cell::new(0),
        io: Cell::new(IoStats::default()),
        routes: RefCell::new((Vec::new(), Arc::new(Vec::new()))),
        conn_list: RefCell::new((Instant::now(), Arc::new(Vec::new()))),
        quic: listeners.iter().filter_map(|l| l.quic().cloned()).collect(),
    });

    let senders = Rc::new(senders);
    let receivers = Rc::new(receivers);
    let mut tasks: Vec<Task<()>> = Vec::new();
    if let Some(datagrams) = datagrams {
        let (senders, receivers) = datagrams
            .join()
            .await
            .map_err(|e| io::Error::other(format!("the datagram mesh failed to form: {e}")))?;
        let senders = Rc::new(senders);
        for ep in &rt.quic {
            let senders = senders.clone();
            ep.set_forward(Box::new(move |peer, datagram| {
                senders.try_send_to(peer, datagram).is_ok()
            }));
        }
        let receivers = Rc::new(receivers);
        for peer in 0..usize::from(shards) {
            if peer == usize::from(id) {
                continue;
            }
            tasks.push(glommio::spawn_local(receive_datagrams(
                rt.clone(),
                receivers.clone(),
                peer,
            )));
        }
    }
    for peer in 0..usize::from(shards) {
        if peer == usize::from(id) {
            continue;
        }
        tasks.push(glommio::spawn_local(send_to_peer(
            rt.clone(),
            senders.clone(),
            peer,
        )));
        tasks.push(glommio::spawn_local(receive_from_peer(
            rt.clone(),
            receivers.clone(),
            peer,
        )));
    }
    let mut accepts: Vec<Task<()>> = listeners
        .into_iter()
        .map(|l| glommio::spawn_local(accept(rt.clone(), l)))
        .collect();

    // The timer: keepalives, lifetimes, heartbeat, snapshot, reloads, and
    // the way through drain to stop.
    let mut last_snapshot = Instant::now() - Duration::from_secs(1);
    let mut last_let_go = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    loop {
        control.maybe_stall(id);
        let now = Instant::now();
        control.beat(id);
        rt.shard.borrow_mut().handle_timeout(now);
        rt.dispatch();
        if control.generation() != generation {
            generation = control.generation();
            rt.apply(&control.settings());
        }
        if now.duration_since(last_let_go) >= LET_GO_EVERY {
            last_let_go = now;
            rt.shard.borrow_mut().let_go_of_bursts();
        }
        if now.duration_since(last_snapshot) >= TICK {
            last_snapshot = now;
            rt.share_budget(true);
            rt.dispatch();
            control.publish(id, rt.snapshot(false));
        }
        match control.phase() {
            Phase::Running => {}
            Phase::Draining => {
                if drain_deadline.is_none() {
                    // No new connections, no new requests; open streams go on.
                    accepts.clear();
                    rt.stopping.set(true);
                    rt.shard.borrow_mut().drain();
                    rt.dispatch();
                    drain_deadline = Some(now + control.settings().shutdown.drain_timeout);
                    control.publish(id, rt.snapshot(true));
                    if id == 0 {
                        tracing::info!(
                            "draining: new requests are refused, open streams may finish"
                        );
                    }
                }
                let open = rt.shard.borrow().open_streams();
                if open == 0 {
                    break;
                }
                if drain_deadline.is_some_and(|d| now >= d) {
                    tracing::warn!(shard = id, open_streams = open, "drain deadline passed");
                    break;
                }
            }
            Phase::Stopping => break,
        }
        let next = rt.shard.borrow().poll_timeout().map_or(TICK, |t| {
            t.saturating_duration_since(Instant::now()).min(TICK)
        });
        let next = if drain_deadline.is_some() {
            next.min(Duration::from_millis(10))
        } else {
            next.max(TIMER_SLACK)
        };
        glommio::timer::sleep(next.max(Duration::from_millis(1))).await;
    }

    // Stop: no new connections; every connection gets ERROR[CONNECTION_CLOSE]
    // and is read for close_timeout more, answering late requests with
    // REJECTED, then closes; wait for them to go.
    drop(accepts);
    rt.stopping.set(true);
    let linger = control.settings().shutdown.close_timeout;
    rt.shard
        .borrow_mut()
        .shut_down(Instant::now(), "the broker is shutting down", linger);
    rt.dispatch();
    // Time for the last frames to be written after the linger.
    let deadline = Instant::now() + linger + Duration::from_secs(1);
    while rt.shard.borrow().connections().next().is_some() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
        let now = Instant::now();
        control.beat(id);
        rt.shard.borrow_mut().handle_timeout(now);
        rt.dispatch();
    }
    control.publish(id, rt.snapshot(true));
    senders.close();
    drop(tasks);
    Ok(())
}

async fn accept(rt: Rc<ShardRt>, listener: Listener) {
    loop {
        match listener.accept().await {
            Ok(incoming) => {
                if rt.stopping.get() {
                    continue;
                }
                let max = rt.control.settings().limits.max_connections;
                let open = rt.control.connections.fetch_add(1, Ordering::AcqRel);
                let over = open >= max;
                if over {
                    rt.count_io(|io| io.refused_connections += 1);
                }
                // The handshake runs in the connection's own task, bounded
                // by handshake_timeout: a peer that never finishes it holds
                // only its own connection (counted in max_connections).
                glommio::spawn_local(connection(rt.clone(), incoming, over.then_some(max)))
                    .detach();
            }
            Err(e) => {
                tracing::warn!(shard = rt.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One accepted connection: its handshake, then its driver. `refuse`
/// (the connection limit) tells it why it is refused instead.
async fn connection(rt: Rc<ShardRt>, incoming: Incoming, refuse: Option<usize>) {
    let peer = incoming.peer();
    let scheme = incoming.scheme();
    let hs = rt.handshake.borrow().clone();
    let io = match incoming.establish(&hs).await {
        Ok(io) => io,
        Err(e) => {
            rt.control.connections.fetch_sub(1, Ordering::AcqRel);
            rt.count_io(|io| match e.kind {
                HandshakeFailure::TimedOut => io.handshake_timeouts += 1,
                HandshakeFailure::Tls => io.tls_handshakes_failed += 1,
                HandshakeFailure::Upgrade => io.upgrades_refused += 1,
            });
            tracing::debug!(?peer, transport = %scheme, error = %e, "connection refused in its handshake");
            return;
        }
    };
    if let Some(max) = refuse {
        rt.control.connections.fetch_sub(1, Ordering::AcqRel);
        refuse_connection(io, max).await;
        return;
    }
    let id = rt.shard.borrow_mut().open(Instant::now());
    let info = PeerInfo {
        addr: io.peer(),
        transport: io.scheme(),
        tls_subject: certificate_subject(&io),
    };
    if let Some(subject) = &info.tls_subject {
        tracing::debug!(conn = %id, %subject, "client certificate verified");
    }
    rt.shard.borrow_mut().set_peer(
        id,
        rsbroker_core::Peer {
            addr: info.addr,
            certificate: certificate_name(&io).map(Into::into),
        },
    );
    rt.peers.borrow_mut().insert(id, info);
    // A task of its own: the handshake's task ends here, and the driver's
    // holds only what a connection needs for as long as it is open.
    glommio::spawn_local(driver::drive(ShardEndpoint { rt: rt.clone(), id }, io)).detach();
}

/// Tells a connection over the limit why it is refused, and closes it.
async fn refuse_connection(mut io: Conn, max: usize) {
    tracing::warn!(peer = ?io.peer(), max_connections = max, "connection refused: the broker is at max_connections");
    let error = Frame::Error(ErrorFrame {
        stream_id: 0,
        code: ErrorCode::REJECTED_SETUP,
        data: Bytes::from(format!(
            "the broker is at its limit of {max} connections; try another broker or later"
        )),
    });
    if io.queue(&OutFrame::from_frame(&error)).is_ok() {
        let _ = poll_fn(|cx| io.poll_flush(cx)).await;
    }
    let _ = poll_fn(|cx| io.poll_close(cx)).await;
}

/// QUIC datagrams another shard received for this shard's connections.
async fn receive_datagrams(rt: Rc<ShardRt>, receivers: Rc<Receivers<Forwarded>>, peer: usize) {
    loop {
        match receivers.recv_from(peer).await {
            Ok(Some(datagram)) => {
                if let Some(ep) = rt.quic.get(datagram.listener) {
                    ep.deliver(datagram);
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

async fn send_to_peer(rt: Rc<ShardRt>, senders: Rc<Senders<Vec<Message>>>, peer: usize) {
    let Some(notify) = rt.out_notify.get(peer) else {
        return;
    };
    loop {
        let batch = rt.out.get(peer).and_then(|q| q.borrow_mut().pop_front());
        let Some(batch) = batch else {
            notify.notified().await;
            continue;
        };
        if senders.send_to(peer, batch).await.is_err() {
            // The peer has stopped; what it would have received no longer matters.
            return;
        }
        if rt.read_blocked.get() && !rt.mesh_blocked() {
            rt.read_blocked.set(false);
            rt.shard
                .borrow_mut()
                .set_reading_blocked(Instant::now(), false);
            rt.dispatch();
        }
    }
}

async fn receive_from_peer(rt: Rc<ShardRt>, receivers: Rc<Receivers<Vec<Message>>>, peer: usize) {
    let from = peer as ShardId;
    loop {
        // Messages are always taken: a full connection holds back the
        // connections that feed it (a message to their shard), never the
        // queue that carries everyone's traffic.
        match receivers.recv_from(peer).await {
            Ok(Some(batch)) => {
                rt.shard
                    .borrow_mut()
                    .handle_messages(Instant::now(), from, batch);
                rt.dispatch();
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// The shard's side of one connection, for the transport driver.
struct ShardEndpoint {
    rt: Rc<ShardRt>,
    id: ConnId,
}

impl Endpoint for ShardEndpoint {
    fn register(&mut self, waker: &Waker) {
        let mut wakers = self.rt.wakers.borrow_mut();
        match wakers.get_mut(&self.id) {
            Some(w) if w.will_wake(waker) => {}
            Some(w) => *w = waker.clone(),
            None => {
                wakers.insert(self.id, waker.clone());
            }
        }
    }

    fn may_read(&self) -> bool {
        let shard = self.rt.shard.borrow();
        shard.may_read(self.id) && !shard.is_closed(self.id)
    }

    fn received(&mut self, now: Instant, frames: &mut Vec<Bytes>, wire_bytes: u64) {
        self.rt.count_io(|io| io.bytes_in += wire_bytes);
        {
            let mut shard = self.rt.shard.borrow_mut();
            for f in frames.drain(..) {
                shard.handle_frame(now, self.id, f);
            }
        }
        self.rt.dispatch();
    }

    fn unreadable(&mut self, now: Instant, error: DecodeError) {
        self.rt.count_io(|io| io.unreadable_connections += 1);
        self.rt
            .shard
            .borrow_mut()
            .handle_decode_error(now, self.id, error);
        self.rt.dispatch();
    }

    fn poll_transmit(&mut self) -> Option<OutFrame> {
        self.rt.shard.borrow_mut().poll_transmit(self.id)
    }

    fn pending_bytes(&self) -> usize {
        self.rt.shard.borrow().pending_bytes(self.id)
    }

    fn unsendable(&mut self, error: TransportError) {
        tracing::warn!(conn = %self.id, %error, "frame dropped");
    }

    fn written(&mut self, written: Written) {
        self.rt.count_io(|io| {
            io.bytes_out += written.wire_bytes;
            io.frames_out += written.frames;
        });
        {
            let mut shard = self.rt.shard.borrow_mut();
            shard.written(self.id);
            shard.set_transport_bytes(self.id, written.buffered);
        }
        self.rt.dispatch();
    }

    fn is_closed(&self) -> bool {
        self.rt.shard.borrow().is_closed(self.id)
    }

    fn close_timeout(&self) -> Duration {
        self.rt.control.settings().shutdown.close_timeout
    }

    fn finish(&mut self, end: End) {
        if let End::ReadFailed(TransportError::Io(e)) = &end
            && e.kind() == io::ErrorKind::InvalidData
        {
            // The transport refused what it read (a text WebSocket message, a bad TLS record).
            self.rt.count_io(|io| io.unreadable_connections += 1);
        }
        let reason = match end {
            End::Closed => "closed by the broker".to_owned(),
            other => other.to_string(),
        };
        finish(&self.rt, self.id, &reason);
    }
}

fn finish(rt: &ShardRt, id: ConnId, reason: &str) {
    rt.control.connections.fetch_sub(1, Ordering::AcqRel);
    rt.wakers.borrow_mut().remove(&id);
    rt.peers.borrow_mut().remove(&id);
    rt.shard.borrow_mut().close(Instant::now(), id, reason);
    rt.dispatch();
}
