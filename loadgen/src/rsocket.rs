//! Load over RSocket with rsbroker-client: the requester (open or closed
//! loop, all four interaction models) and the responder (registered with a
//! broker, or a plain RSocket server with `--listen`). One glommio executor
//! per CPU, pinned; each keeps its own [`Recorder`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::Task;
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_client::metadata::route;
use rsbroker_client::{
    AppConfig, Client, ClientConfig, ClientError, LocalBoxFuture, Payload, Responder, Sink,
    Subscription,
};
use rsbroker_transports::TcpFrames;

use crate::event_loop::Glommio;
use crate::runner::{self, Counts, Part, ResponderSide, Share};
use crate::schedule::{SPIN, Schedule, latency, wait_until};
use crate::stats::Recorder;
use crate::{Interaction, Mode, RequesterSpec, ResponderCounts, ResponderSpec, Run};

/// A stream window this large is unbounded (2^31-1 saturates RSocket credit).
pub const UNBOUNDED: u32 = i32::MAX as u32;

/// How long a finished run waits for answers still in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// How long a spinning executor polls for work before it parks: longer
/// than the open loop's final wait before a due time, so that wait is spun.
const SPIN_BEFORE_PARK: Duration = SPIN.saturating_add(Duration::from_micros(50));

/// How long the requester waits for an in-process responder to be
/// reachable through the broker before the run starts.
const SERVE_READY: Duration = Duration::from_secs(5);

fn executor(cpu: Option<usize>, name: String, spin: bool) -> LocalExecutorBuilder {
    let placement = match cpu {
        Some(c) => Placement::Fixed(c),
        None => Placement::Unbound,
    };
    let b = LocalExecutorBuilder::new(placement)
        .name(&name)
        .io_memory(256 << 10);
    if spin {
        b.spin_before_park(SPIN_BEFORE_PARK)
    } else {
        b
    }
}

/// Runs the requester side against `addr`; returns the merged record and
/// when the measurement window started.
pub fn run_requester(spec: &RequesterSpec, addr: SocketAddr) -> Result<Run, String> {
    let threads = spec.cpus.len().clamp(1, spec.connections.max(1));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let start: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let progress: Vec<Arc<AtomicU64>> = (0..threads).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let failed_setup = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..threads {
        let conns = (t..spec.connections).step_by(threads).count();
        let spec = spec.clone();
        let barrier = barrier.clone();
        let start = start.clone();
        let progress = progress[t].clone();
        let failed_setup = failed_setup.clone();
        let cpu = spec.cpus.get(t).copied();
        let h = executor(cpu, format!("loadgen-{t}"), spec.spin)
            .spawn(move || async move {
                let counts = Rc::new(Counts::new());
                let setup = async {
                    let responders = match &spec.serve {
                        Some(serve) => {
                            let echo = Echo::new(serve, counts.clone());
                            connect_responders(serve, addr, Share { index: t, threads }, &echo)
                                .await?
                        }
                        None => Vec::new(),
                    };
                    let clients = connect_all(addr, conns).await?;
                    if spec.serve.is_some()
                        && let Some(first) = clients.first()
                    {
                        served_ready(first, &spec.route).await?;
                    }
                    Ok::<_, String>((responders, clients))
                }
                .await;
                if setup.is_err() {
                    failed_setup.store(true, Ordering::Release);
                }
                barrier.wait();
                let (responders, clients) = setup?;
                let record = if failed_setup.load(Ordering::Acquire) {
                    Recorder::default()
                } else {
                    let start = *start.get_or_init(|| Instant::now() + Duration::from_millis(20));
                    thread_main(&spec, clients, start, progress).await
                };
                for c in &responders {
                    c.close();
                }
                Ok((record, counts.totals()))
            })
            .map_err(|e| format!("cannot start a thread on CPU {cpu:?}: {e}"))?;
        handles.push(h);
    }
    barrier.wait();
    let started = Instant::now();
    let report_progress = spec.live;
    let measure_start_guess = started + Duration::from_millis(20) + spec.warmup;
    let end_guess = measure_start_guess + spec.duration;
    let live = std::thread::spawn({
        let progress = progress.clone();
        move || {
            if !report_progress {
                return;
            }
            let mut last = 0u64;
            let mut t = 0;
            while Instant::now() < end_guess {
                std::thread::sleep(Duration::from_secs(1));
                t += 1;
                let now: u64 = progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
                eprintln!("  {t:>4} s  {:>10} completed/s", now - last);
                last = now;
            }
        }
    });
    let mut total = Recorder::default();
    let mut served = ResponderCounts::default();
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok((r, s))) => {
                total.merge(&r);
                served.add(&s);
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(format!("a thread failed: {e}"));
            }
        }
    }
    let _ = live.join();
    if let Some(e) = first_error {
        return Err(e);
    }
    let measure_start = start.get().copied().unwrap_or(started) + spec.warmup;
    Ok(Run {
        record: total,
        measured: spec.duration,
        started: measure_start,
        served: spec.serve.is_some().then_some(served),
    })
}

/// Waits until a request on `route` is answered: the in-process
/// responder's registration has reached the broker and every shard.
async fn served_ready(client: &Client, route_name: &str) -> Result<(), String> {
    let deadline = Instant::now() + SERVE_READY;
    let request = Payload {
        metadata: Some(route(&[route_name])),
        data: Bytes::from_static(b"ready?"),
    };
    loop {
        match client.request_response(request.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "the responder in this process was not reachable on route {route_name} within {SERVE_READY:?}: {e}"
                ));
            }
            Err(_) => glommio::timer::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn connect_all(addr: SocketAddr, n: usize) -> Result<Vec<Client>, String> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let c = Client::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        clients.push(c);
    }
    Ok(clients)
}

/// The window a request counts in.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

async fn thread_main(
    spec: &RequesterSpec,
    clients: Vec<Client>,
    start: Instant,
    progress: Arc<AtomicU64>,
) -> Recorder {
    let rec = Rc::new(RefCell::new(Recorder::default()));
    let window = Window {
        start: start + spec.warmup,
        end: start + spec.warmup + spec.duration,
    };
    let request = Rc::new(Request {
        interaction: spec.interaction,
        metadata: route(
            &std::iter::once(spec.route.as_str())
                .chain(spec.tags.iter().map(String::as_str))
                .collect::<Vec<_>>(),
        ),
        data: Bytes::from(vec![b'x'; spec.payload_size]),
        request_n: spec.request_n.max(1),
        items: spec.items.max(1),
    });
    let outstanding = Rc::new(Cell::new(0usize));
    match spec.mode {
        Mode::Open { rps } => {
            let share = clients.len() as f64 / spec.connections.max(1) as f64;
            let mut schedule = Schedule::ramped(start, rps * share, spec.warmup / 2, window.end);
            let mut i = 0usize;
            while let Some((_, due)) = schedule.next_due() {
                // Requests found due at one wake-up go out on one connection,
                // so they leave in one write; the next wake-up takes the next
                // connection.
                if Instant::now() < due {
                    i += 1;
                }
                let sent = wait_until(due, spec.spin).await;
                let measured = window.contains(due);
                rec.borrow_mut().record_send(due, sent, measured);
                let client = clients[i % clients.len()].clone();
                outstanding.set(outstanding.get() + 1);
                let (rec, request, outstanding, progress) = (
                    rec.clone(),
                    request.clone(),
                    outstanding.clone(),
                    progress.clone(),
                );
                glommio::spawn_local(async move {
                    let result = request.run(&client, &rec, window).await;
                    finish(&rec, &progress, window, due, measured, result);
                    outstanding.set(outstanding.get() - 1);
                })
                .detach();
            }
        }
        Mode::Closed { concurrency } => {
            let mut workers = Vec::new();
            for client in &clients {
                for _ in 0..concurrency.max(1) {
                    let (client, rec, request, progress) = (
                        client.clone(),
                        rec.clone(),
                        request.clone(),
                        progress.clone(),
                    );
                    workers.push(glommio::spawn_local(async move {
                        // The next request goes out as soon as one is
                        // recorded, so the time it was recorded is the next
                        // one's send time (one clock read per request).
                        let mut t0 = Instant::now();
                        while t0 < window.end {
                            rec.borrow_mut().sent += 1;
                            let result = request.run(&client, &rec, window).await;
                            t0 = finish(&rec, &progress, window, t0, window.contains(t0), result);
                        }
                    }));
                }
            }
            for w in workers {
                w.await;
            }
        }
    }
    // Answers still in flight get a little time; what does not come is counted.
    let deadline = Instant::now() + DRAIN;
    while outstanding.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let mut r = rec.borrow().clone();
    r.unanswered += outstanding.get() as u64;
    if outstanding.get() > 0 {
        r.errors += outstanding.get() as u64;
        if r.first_error.is_none() {
            r.first_error = Some(format!(
                "{} requests were not answered within {DRAIN:?} after the run",
                outstanding.get()
            ));
        }
    }
    for c in &clients {
        c.close();
    }
    r
}

/// Records the outcome of one request that was due (or sent) at `due`;
/// returns the time it was recorded.
fn finish(
    rec: &RefCell<Recorder>,
    progress: &AtomicU64,
    window: Window,
    due: Instant,
    measured: bool,
    result: Result<(), String>,
) -> Instant {
    let done = Instant::now();
    let mut r = rec.borrow_mut();
    match result {
        Ok(()) => {
            if measured {
                r.record_latency(latency(due, done));
            }
            if window.contains(done) {
                r.ok += 1;
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => r.error(|| e),
    }
    done
}

/// One request of the run's interaction model.
struct Request {
    interaction: Interaction,
    metadata: Bytes,
    data: Bytes,
    request_n: u32,
    items: u32,
}

impl Request {
    fn payload(&self) -> Payload {
        Payload {
            metadata: Some(self.metadata.clone()),
            data: self.data.clone(),
        }
    }

    async fn run(
        &self,
        client: &Client,
        rec: &RefCell<Recorder>,
        window: Window,
    ) -> Result<(), String> {
        match self.interaction {
            Interaction::Rr => client
                .request_response(self.payload())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Interaction::Fnf => {
                client.writable().await;
                client
                    .fire_and_forget(self.payload())
                    .map_err(|e| e.to_string())
            }
            Interaction::Stream => {
                let sub = client
                    .request_stream(self.payload(), self.request_n)
                    .map_err(|e| e.to_string())?;
                consume(sub, self.request_n, rec, window).await
            }
            Interaction::Channel => {
                let (sink, sub) = client
                    .request_channel(self.payload(), self.request_n)
                    .map_err(|e| e.to_string())?;
                let items = self.items;
                let data = self.data.clone();
                let sending = glommio::spawn_local(async move {
                    for _ in 1..items {
                        if sink.send(Payload::data(data.clone())).await.is_err() {
                            return;
                        }
                    }
                    let _ = sink.complete();
                });
                let received = consume(sub, self.request_n, rec, window).await;
                sending.await;
                received
            }
        }
    }
}

/// Reads a stream to its end under a window of `n` items, asking for more
/// as it consumes; per-item latency is counted from the credit that allowed
/// the item (not for unbounded windows).
async fn consume(
    mut sub: Subscription,
    n: u32,
    rec: &RefCell<Recorder>,
    window: Window,
) -> Result<(), String> {
    let bounded = n < UNBOUNDED;
    let mut credits: VecDeque<(Instant, u32)> = VecDeque::new();
    if bounded {
        credits.push_back((Instant::now(), n));
    }
    let batch = (n / 2).max(1);
    let mut since_request = 0u32;
    // A stream still running when the run ends is cancelled (dropping the
    // subscription sends CANCEL). One timer for the whole stream: arming one
    // per item would cost more than the item.
    let mut deadline = std::pin::pin!(glommio::timer::sleep(
        window.end.saturating_duration_since(Instant::now())
    ));
    loop {
        let next = futures_lite::future::or(async { Some(sub.next().await) }, async {
            (&mut deadline).await;
            None
        })
        .await;
        let Some(Some(item)) = next else {
            break;
        };
        item.map_err(|e| e.to_string())?;
        let now = Instant::now();
        {
            let mut r = rec.borrow_mut();
            r.items_total += 1;
            if window.contains(now) {
                r.items += 1;
            }
            if bounded && let Some(front) = credits.front_mut() {
                if window.contains(now) {
                    r.record_item(now.saturating_duration_since(front.0));
                }
                front.1 -= 1;
                if front.1 == 0 {
                    credits.pop_front();
                }
            }
        }
        if bounded {
            since_request += 1;
            if since_request == batch {
                since_request = 0;
                credits.push_back((Instant::now(), batch));
                // The stream may have ended meanwhile; the next `next` says so.
                let _ = sub.request(batch);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- responder

/// Answers every model: echoes requests, streams `items` copies.
#[derive(Clone)]
struct Echo {
    counts: Rc<Counts>,
    work: Duration,
    items: u32,
}

impl Echo {
    fn new(spec: &ResponderSpec, counts: Rc<Counts>) -> Self {
        Self {
            counts,
            work: spec.work,
            items: spec.items,
        }
    }
}

impl Responder for Echo {
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        self.counts.request_response();
        runner::work(self.work);
        Box::pin(std::future::ready(Ok(Payload::data(request.data))))
    }

    fn fire_and_forget(&self, _request: Payload) {
        self.counts.fire_and_forget();
        runner::work(self.work);
    }

    fn request_stream(&self, request: Payload, sink: Sink) {
        self.counts.stream();
        runner::work(self.work);
        let (items, counts) = (self.items, self.counts.clone());
        glommio::spawn_local(async move {
            let item = Payload::data(request.data);
            for _ in 0..items {
                if sink.send(item.clone()).await.is_err() {
                    return;
                }
                counts.item();
            }
            let _ = sink.complete();
        })
        .detach();
    }

    fn request_channel(&self, request: Payload, mut inbound: Subscription, sink: Sink) {
        self.counts.channel();
        runner::work(self.work);
        let counts = self.counts.clone();
        glommio::spawn_local(async move {
            let _ = inbound.request(64);
            if sink.send(Payload::data(request.data)).await.is_err() {
                return;
            }
            counts.item();
            let mut since = 0;
            while let Some(Ok(item)) = inbound.next().await {
                since += 1;
                if since == 32 {
                    since = 0;
                    let _ = inbound.request(32);
                }
                if sink.send(Payload::data(item.data)).await.is_err() {
                    return;
                }
                counts.item();
            }
            let _ = sink.complete();
        })
        .detach();
    }
}

/// Runs responders until `stop` is set (or the spec's duration passes).
pub fn run_responder(
    spec: &ResponderSpec,
    stop: Arc<AtomicBool>,
) -> Result<ResponderCounts, String> {
    runner::run_responder(&EchoServer, spec, stop)
}

/// Serves [`Echo`] through a broker (`spec.broker`) or as a plain RSocket
/// server (`spec.listen`).
#[derive(Clone)]
struct EchoServer;

/// What one responder thread serves with.
struct Serving {
    /// Registered with the broker.
    clients: Vec<Client>,
    /// Accepting connections (`--listen`).
    server: Option<Task<()>>,
}

impl ResponderSide for EchoServer {
    type Loop = Glommio;
    type Serving = Serving;

    async fn serve(&self, part: Part<'_, ResponderSpec>) -> Result<Serving, String> {
        let spec = part.spec;
        let echo = Echo::new(spec, part.counts.clone());
        let (clients, server) = match (spec.broker, spec.listen) {
            (Some(addr), _) => (
                connect_responders(spec, addr, part.share, &echo).await?,
                None,
            ),
            (None, Some(addr)) => (Vec::new(), Some(listen(addr, echo)?)),
            (None, None) => return Err("responder: give --broker or --listen".into()),
        };
        Ok(Serving { clients, server })
    }

    fn ended(serving: &Serving) -> bool {
        serving.clients.iter().any(Client::is_closed)
    }

    async fn stop(&self, serving: Serving) {
        if Self::ended(&serving) {
            eprintln!("loadgen responder: the broker closed a connection; stopping");
        }
        drop(serving.server);
        for c in &serving.clients {
            c.close();
        }
        // The closes go out before the executor ends.
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }

    fn ready_line(&self, spec: &ResponderSpec) -> String {
        spec.ready_line()
    }
}

/// Serves every connection to `addr` with `echo`, on a task of the
/// current executor (dropping the task stops it).
fn listen(addr: SocketAddr, echo: Echo) -> Result<Task<()>, String> {
    let listener = rsbroker_transports::tcp::bind(addr)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    Ok(glommio::spawn_local(async move {
        let mut served = Vec::new();
        while let Ok(stream) = listener.accept().await {
            let io = TcpFrames::new(stream, rsocket_proto::frame::MAX_U24);
            served.push(
                Client::builder(ClientConfig::default())
                    .default_responder(echo.clone())
                    .serve(io),
            );
            served.retain(|c| !c.is_closed());
        }
    }))
}

/// Connects this thread's `share` of the responder connections `spec`
/// asks for: every instance's connections, registered with the broker at
/// `addr` and answered by `echo`.
async fn connect_responders(
    spec: &ResponderSpec,
    addr: SocketAddr,
    share: Share,
    echo: &Echo,
) -> Result<Vec<Client>, String> {
    let (group, service, version) = split_service(&spec.service);
    let mut clients = Vec::new();
    for k in share.of(spec.instances * spec.connections) {
        let instance = k / spec.connections.max(1);
        let config = ClientConfig {
            app: Some(AppConfig {
                name: spec.app.clone(),
                uuid: format!("{}-{instance}", spec.app),
                power_rating: 1,
            }),
            services: vec![(group.clone(), service.clone(), version.clone())],
            ..ClientConfig::default()
        };
        let client = Client::builder(config)
            .responder(&service, echo.clone())
            .connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        clients.push(client);
    }
    Ok(clients)
}

fn split_service(s: &str) -> (String, String, String) {
    let (group, rest) = s.split_once('!').unwrap_or(("", s));
    let (service, version) = rest.split_once(':').unwrap_or((rest, ""));
    (group.into(), service.into(), version.into())
}
