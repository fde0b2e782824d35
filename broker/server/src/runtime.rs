//! Running the shards: one glommio executor per shard, pinned to its core,
//! each with its listeners, its connections, a timer, and one task per
//! peer shard for each direction of the cross-shard mesh.
//!
//! Each shard's [`Shard`] lives in an `Rc<RefCell<_>>` on its executor and
//! is only touched there. After every pass that changed it (frames read,
//! messages received, time passed) the runtime dispatches its outputs: it
//! wakes the connections that have frames to write and hands each peer
//! shard one batch of messages.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::net::TcpListener;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement, Task};
use rsbroker_core::{ConnId, Message, Shard, ShardConfig, ShardId};
use rsbroker_transports::{FrameIo, ListenAddr, TcpFrames, TransportError};
use rustc_hash::FxHashMap;

use crate::config::BrokerConfig;
use crate::notify::Notify;

/// One connection as a shard last reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionSnapshot {
    /// The connection.
    pub id: ConnId,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// App name and instance uuid, once the app registered.
    pub app: Option<(String, String)>,
    /// Bytes the broker holds for it, not yet handed to the transport.
    pub pending_bytes: usize,
}

/// What a shard last reported about itself (refreshed every 100 ms).
#[derive(Clone, Debug, Default)]
pub struct ShardSnapshot {
    /// The shard.
    pub shard: ShardId,
    /// Its connections.
    pub connections: Vec<ConnectionSnapshot>,
    /// Its counters.
    pub stats: rsbroker_core::ShardStats,
    /// Instances in its copy of the route table.
    pub instances: usize,
}

type Snapshots = Arc<Mutex<Vec<ShardSnapshot>>>;

/// A running broker.
#[derive(Debug)]
pub struct BrokerHandle {
    addrs: Vec<ListenAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<ExecutorJoinHandle<io::Result<()>>>,
    shards: usize,
    snapshots: Snapshots,
}

impl BrokerHandle {
    /// The addresses the broker listens on (ports resolved).
    pub fn addrs(&self) -> &[ListenAddr] {
        &self.addrs
    }

    /// The first TCP address, for clients and tests.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addrs.iter().map(|ListenAddr::Tcp(a)| *a).next()
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// What every shard last reported.
    pub fn snapshot(&self) -> Vec<ShardSnapshot> {
        self.snapshots.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The shard that accepted the connection from `peer`, once it has reported it.
    pub fn shard_of(&self, peer: SocketAddr) -> Option<ShardId> {
        self.snapshot()
            .iter()
            .find(|s| s.connections.iter().any(|c| c.peer == Some(peer)))
            .map(|s| s.shard)
    }

    /// Asks every shard to close its connections and stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// A flag that stops the broker when set (for signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Waits until every shard has stopped.
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
        first_error.map_or(Ok(()), Err)
    }
}

struct ShardRt {
    id: ShardId,
    shard: RefCell<Shard>,
    wakers: RefCell<FxHashMap<ConnId, Waker>>,
    peers: RefCell<FxHashMap<ConnId, Option<SocketAddr>>>,
    /// Batches waiting for each peer shard's queue.
    out: Vec<RefCell<VecDeque<Vec<Message>>>>,
    out_notify: Vec<Notify>,
    max_frame_size: usize,
    stopping: Cell<bool>,
    /// A connection stopped reading because a peer's queue was too long.
    read_blocked: Cell<bool>,
}

/// Batches that may wait for one peer before this shard stops reading its connections.
const MAX_WAITING_BATCHES: usize = 64;
/// Bytes a connection's transport holds before it stops taking frames from the shard.
const WRITE_HIGH: usize = 256 * 1024;
/// Reads per connection before it yields to the others.
const READS_PER_TURN: usize = 4;
/// Flushes of up to `WRITE_HIGH` bytes per connection before it yields.
const WRITES_PER_TURN: usize = 4;

impl ShardRt {
    fn dispatch(&self) {
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
    }

    /// Whether a peer's queue is so far behind that reading more would only pile up messages.
    fn mesh_blocked(&self) -> bool {
        self.out
            .iter()
            .any(|q| q.borrow().len() > MAX_WAITING_BATCHES)
    }

    /// [`ShardRt::mesh_blocked`], for a reader that will stop: it is woken
    /// when the queue drains.
    fn mesh_blocks_reading(&self) -> bool {
        let blocked = self.mesh_blocked();
        if blocked {
            self.read_blocked.set(true);
        }
        blocked
    }

    fn wake_all(&self) {
        for w in self.wakers.borrow().values() {
            w.wake_by_ref();
        }
    }

    fn snapshot(&self) -> ShardSnapshot {
        let shard = self.shard.borrow();
        let peers = self.peers.borrow();
        let connections = shard
            .connections()
            .map(|id| ConnectionSnapshot {
                id,
                peer: peers.get(&id).copied().flatten(),
                app: shard
                    .connection_app(id)
                    .map(|(name, uuid)| (name, uuid.to_string())),
                pending_bytes: shard.pending_bytes(id),
            })
            .collect();
        ShardSnapshot {
            shard: self.id,
            connections,
            stats: shard.stats(),
            instances: shard.routes().instances().count(),
        }
    }
}

/// Starts a broker: binds every listen address on every shard and returns
/// once all of them listen.
pub fn start(config: BrokerConfig) -> io::Result<BrokerHandle> {
    let cores: Vec<usize> = match &config.cores {
        Some(c) if !c.is_empty() => c.clone(),
        _ => core_affinity::get_core_ids()
            .map(|ids| ids.into_iter().map(|c| c.id).collect())
            .filter(|ids: &Vec<usize>| !ids.is_empty())
            .unwrap_or_else(|| {
                (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
            }),
    };
    let shards = if config.shards == 0 {
        cores.len()
    } else {
        config.shards
    };
    if shards > usize::from(u16::MAX) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many shards",
        ));
    }
    if config.listen.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "nothing to listen on",
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let snapshots: Snapshots = Arc::new(Mutex::new(vec![ShardSnapshot::default(); shards]));
    let mesh: MeshBuilder<Vec<Message>, Full> =
        MeshBuilder::full(shards, config.mesh_capacity.max(1));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<ListenAddr>, String>>();

    let spawn =
        |id: usize, listen: Vec<ListenAddr>| -> io::Result<ExecutorJoinHandle<io::Result<()>>> {
            let cpu = cores[id % cores.len()];
            let config = config.clone();
            let mesh = mesh.clone();
            let stop = stop.clone();
            let ready = ready_tx.clone();
            let snapshots = snapshots.clone();
            LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("rsbroker-shard-{id}"))
                .io_memory(config.io_memory)
                .spin_before_park(config.spin_before_park)
                .spawn(move || async move {
                    let ctx = ShardCtx {
                        id: id as ShardId,
                        shards: shards as u16,
                        listen,
                        config,
                        mesh,
                        stop,
                        ready,
                        snapshots,
                    };
                    run_shard(ctx).await
                })
                .map_err(|e| io::Error::other(e.to_string()))
        };

    // Shard 0 binds first, so that port 0 resolves to one port every shard shares.
    let mut threads = vec![spawn(0, config.listen.clone())?];
    let resolved = match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => {
            stop.store(true, Ordering::Release);
            return Err(io::Error::other(e));
        }
        Err(_) => return Err(io::Error::other("shard 0 did not start")),
    };
    for id in 1..shards {
        threads.push(spawn(id, resolved.clone())?);
    }
    for _ in 1..shards {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                stop.store(true, Ordering::Release);
                return Err(io::Error::other(e));
            }
            Err(_) => {
                stop.store(true, Ordering::Release);
                return Err(io::Error::other("a shard did not start"));
            }
        }
    }
    Ok(BrokerHandle {
        addrs: resolved,
        stop,
        threads,
        shards,
        snapshots,
    })
}

fn bind(listen: &[ListenAddr]) -> Result<(Vec<TcpListener>, Vec<ListenAddr>), String> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for addr in listen {
        match addr {
            ListenAddr::Tcp(a) => {
                let l = rsbroker_transports::tcp::bind(*a)
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                let local = l
                    .local_addr()
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                addrs.push(ListenAddr::Tcp(local));
                listeners.push(l);
            }
        }
    }
    Ok((listeners, addrs))
}

struct ShardCtx {
    id: ShardId,
    shards: u16,
    listen: Vec<ListenAddr>,
    config: BrokerConfig,
    mesh: MeshBuilder<Vec<Message>, Full>,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<Result<Vec<ListenAddr>, String>>,
    snapshots: Snapshots,
}

async fn run_shard(ctx: ShardCtx) -> io::Result<()> {
    let ShardCtx {
        id,
        shards,
        listen,
        config,
        mesh,
        stop,
        ready,
        snapshots,
    } = ctx;
    let (listeners, addrs) = match bind(&listen) {
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

    let now = Instant::now();
    let mut shard_config = ShardConfig::new(id, shards);
    shard_config.connection.max_inbound_streams = config.max_streams_per_connection;
    shard_config.policies = config.policies.clone();
    shard_config.max_pending_bytes = config.max_pending_bytes;
    let rt = Rc::new(ShardRt {
        id,
        shard: RefCell::new(Shard::new(shard_config, now)),
        wakers: RefCell::new(FxHashMap::default()),
        peers: RefCell::new(FxHashMap::default()),
        out: (0..shards).map(|_| RefCell::new(VecDeque::new())).collect(),
        out_notify: (0..shards).map(|_| Notify::default()).collect(),
        max_frame_size: config.max_frame_size,
        stopping: Cell::new(false),
        read_blocked: Cell::new(false),
    });

    let senders = Rc::new(senders);
    let receivers = Rc::new(receivers);
    let mut tasks: Vec<Task<()>> = Vec::new();
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
    let accepts: Vec<Task<()>> = listeners
        .into_iter()
        .map(|l| glommio::spawn_local(accept(rt.clone(), l)))
        .collect();

    // The timer: keepalives, lifetimes, the stop flag, and the snapshot.
    let mut last_snapshot = Instant::now() - Duration::from_secs(1);
    loop {
        let now = Instant::now();
        rt.shard.borrow_mut().handle_timeout(now);
        rt.dispatch();
        if now.duration_since(last_snapshot) >= Duration::from_millis(100) {
            last_snapshot = now;
            let snap = rt.snapshot();
            if let Ok(mut all) = snapshots.lock()
                && let Some(slot) = all.get_mut(usize::from(id))
            {
                *slot = snap;
            }
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        let next = rt
            .shard
            .borrow()
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100))
            });
        glommio::timer::sleep(next.max(Duration::from_millis(1))).await;
    }

    // Stop: no new connections, close the open ones, wait for them to go.
    drop(accepts);
    rt.stopping.set(true);
    rt.shard
        .borrow_mut()
        .close_all("the broker is shutting down");
    rt.dispatch();
    let deadline = Instant::now() + config.shutdown_grace;
    while rt.shard.borrow().connections().next().is_some() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    senders.close();
    drop(tasks);
    Ok(())
}

async fn accept(rt: Rc<ShardRt>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                if rt.stopping.get() {
                    continue;
                }
                let id = rt.shard.borrow_mut().open(Instant::now());
                let io = TcpFrames::new(stream, rt.max_frame_size);
                rt.peers.borrow_mut().insert(id, io.peer());
                glommio::spawn_local(drive(rt.clone(), io, id)).detach();
            }
            Err(e) => {
                tracing::warn!(shard = rt.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
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
            rt.wake_all();
        }
    }
}

async fn receive_from_peer(rt: Rc<ShardRt>, receivers: Rc<Receivers<Vec<Message>>>, peer: usize) {
    let from = peer as ShardId;
    loop {
        // While a local connection this peer feeds is full, leave its messages queued.
        while !rt.shard.borrow().may_receive_from(from) {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
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

/// Drives one connection: reads frames into the shard, writes what the
/// shard has for it, and closes it when the shard says so.
async fn drive(rt: Rc<ShardRt>, mut io: TcpFrames, id: ConnId) {
    let mut frames: Vec<Bytes> = Vec::with_capacity(64);
    let mut failed = false;
    poll_fn(|cx| {
        {
            let mut wakers = rt.wakers.borrow_mut();
            match wakers.get_mut(&id) {
                Some(w) if w.will_wake(cx.waker()) => {}
                Some(w) => *w = cx.waker().clone(),
                None => {
                    wakers.insert(id, cx.waker().clone());
                }
            }
        }
        // Read.
        let mut reads = 0;
        while !failed
            && rt.shard.borrow().may_read(id)
            && !rt.mesh_blocks_reading()
            && !rt.shard.borrow().is_closed(id)
        {
            if reads == READS_PER_TURN {
                cx.waker().wake_by_ref();
                break;
            }
            reads += 1;
            match io.poll_read(cx, &mut frames) {
                Poll::Ready(Ok(true)) => {
                    let now = Instant::now();
                    {
                        let mut shard = rt.shard.borrow_mut();
                        for f in frames.drain(..) {
                            shard.handle_frame(now, id, f);
                        }
                    }
                    rt.dispatch();
                }
                Poll::Ready(Ok(false)) => {
                    return finish(&rt, id);
                }
                Poll::Ready(Err(TransportError::Decode(e))) => {
                    rt.shard
                        .borrow_mut()
                        .handle_decode_error(Instant::now(), id, e);
                    rt.dispatch();
                    failed = true;
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(conn = %id, error = %e, "connection read failed");
                    return finish(&rt, id);
                }
                Poll::Pending => break,
            }
        }
        // Write: take frames from the shard while the transport has room and
        // flush; when a flush empties the transport and the shard holds more,
        // go again (nothing else would wake this task for them).
        let mut rounds = 0;
        loop {
            {
                let mut shard = rt.shard.borrow_mut();
                while io.queued_bytes() < WRITE_HIGH {
                    let Some(frame) = shard.poll_transmit(id) else {
                        break;
                    };
                    if let Err(e) = io.queue(&frame) {
                        tracing::warn!(conn = %id, error = %e, "frame dropped");
                    }
                }
            }
            match io.poll_flush(cx) {
                Poll::Pending => break,
                Poll::Ready(Ok(())) => {
                    if rt.shard.borrow().pending_bytes(id) == 0 {
                        break;
                    }
                    rounds += 1;
                    if rounds == WRITES_PER_TURN {
                        // Let the other connections have the core; come back soon.
                        cx.waker().wake_by_ref();
                        break;
                    }
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(conn = %id, error = %e, "connection write failed");
                    return finish(&rt, id);
                }
            }
        }
        rt.shard.borrow_mut().written(id);
        rt.dispatch();
        // Close once the shard is done with the connection and everything is written.
        let done = {
            let shard = rt.shard.borrow();
            (shard.is_closed(id) || failed)
                && shard.pending_bytes(id) == 0
                && io.queued_bytes() == 0
        };
        if done {
            let _ = io.poll_close(cx);
            return finish(&rt, id);
        }
        Poll::Pending
    })
    .await
}

fn finish(rt: &ShardRt, id: ConnId) -> Poll<()> {
    rt.wakers.borrow_mut().remove(&id);
    rt.peers.borrow_mut().remove(&id);
    rt.shard.borrow_mut().close(Instant::now(), id);
    rt.dispatch();
    Poll::Ready(())
}
