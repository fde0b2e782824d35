//! The same load over NATS (async-nats on a current-thread tokio runtime
//! per CPU), so that nats-server is measured by the same program:
//! request-response is NATS request/reply, fire-and-forget is publish, and
//! the responder answers requests (a queue group, so each request is
//! answered once) or, with `--fanout`, has every connection subscribe so
//! each receives every message (publish/subscribe 1 -> N).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::StreamExt;

use crate::event_loop::Tokio;
use crate::runner::{self, Counts, Part, ResponderSide, Share};
use crate::schedule::{Schedule, latency, wait_until_tokio};
use crate::stats::Recorder;
use crate::{Interaction, Mode, RequesterSpec, ResponderCounts, ResponderSpec, Run};

const DRAIN: Duration = Duration::from_secs(5);

fn runtime(cpu: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    if let Some(c) = cpu {
        core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn connect(url: &str) -> Result<async_nats::Client, String> {
    async_nats::ConnectOptions::new()
        .no_echo()
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))
}

/// Serves requests over NATS until `stop` is set.
pub fn run_responder(
    spec: &ResponderSpec,
    url: &str,
    stop: Arc<AtomicBool>,
) -> Result<ResponderCounts, String> {
    runner::run_responder(&Nats { url: url.into() }, spec, stop)
}

/// One nats-server.
#[derive(Clone)]
struct Nats {
    url: String,
}

/// Runs the requester side against nats-server at `url`.
pub fn run_requester(spec: &RequesterSpec, url: &str) -> Result<Run, String> {
    if matches!(spec.interaction, Interaction::Stream | Interaction::Channel) {
        return Err(format!(
            "NATS has no {}: use --interaction rr (request/reply) or fnf (publish)",
            spec.interaction.name()
        ));
    }
    let threads = spec.cpus.len().clamp(1, spec.connections.max(1));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let start: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let failed = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..threads {
        let conns = (t..spec.connections).step_by(threads).count();
        let (spec, barrier, start, failed, url) = (
            spec.clone(),
            barrier.clone(),
            start.clone(),
            failed.clone(),
            url.to_owned(),
        );
        let progress = progress.clone();
        let cpu = spec.cpus.get(t).copied();
        handles.push(std::thread::spawn(
            move || -> Result<(Recorder, ResponderCounts), String> {
                let rt = runtime(cpu).map_err(|e| e.to_string());
                let rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        failed.store(true, Ordering::Release);
                        barrier.wait();
                        return Err(e);
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let counts = Rc::new(Counts::new());
                    let mut error = None;
                    let mut serving = Vec::new();
                    if let Some(serve) = &spec.serve {
                        match subscribe(serve, &url, Share { index: t, threads }).await {
                            Ok(subs) => serving = serve_all(subs, serve, &counts),
                            Err(e) => {
                                error = Some(e);
                                failed.store(true, Ordering::Release);
                            }
                        }
                    }
                    let spinning = Rc::new(Cell::new(spec.spin));
                    if spec.spin {
                        let spinning = spinning.clone();
                        // A task that always yields keeps the runtime polling its
                        // sockets instead of sleeping in epoll_wait.
                        tokio::task::spawn_local(async move {
                            while spinning.get() {
                                tokio::task::yield_now().await;
                            }
                        });
                    }
                    let mut clients = Vec::new();
                    for _ in 0..conns {
                        if error.is_some() {
                            break;
                        }
                        match connect(&url).await {
                            Ok(c) => clients.push(c),
                            Err(e) => {
                                error = Some(e);
                                failed.store(true, Ordering::Release);
                                break;
                            }
                        }
                    }
                    barrier.wait();
                    let record = match error {
                        Some(e) => Err(e),
                        None if failed.load(Ordering::Acquire) => Ok(Recorder::default()),
                        None => {
                            let start =
                                *start.get_or_init(|| Instant::now() + Duration::from_millis(20));
                            Ok(thread_main(&spec, clients, start, progress).await)
                        }
                    };
                    spinning.set(false);
                    stop_serving(serving).await;
                    record.map(|r| (r, counts.totals()))
                })
            },
        ));
    }
    barrier.wait();
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
            Err(_) => {
                first_error.get_or_insert("a thread panicked".to_owned());
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(Run {
        record: total,
        measured: spec.duration,
        started: start.get().copied().unwrap_or_else(Instant::now) + spec.warmup,
        served: spec.serve.is_some().then_some(served),
    })
}

async fn thread_main(
    spec: &RequesterSpec,
    clients: Vec<async_nats::Client>,
    start: Instant,
    progress: Arc<AtomicU64>,
) -> Recorder {
    let rec = Rc::new(RefCell::new(Recorder::default()));
    let (w_start, w_end) = (start + spec.warmup, start + spec.warmup + spec.duration);
    let in_window = move |t: Instant| t >= w_start && t < w_end;
    let subject = spec.route.clone();
    let payload = Bytes::from(vec![b'x'; spec.payload_size]);
    let rr = spec.interaction == Interaction::Rr;
    let outstanding = Rc::new(Cell::new(0usize));
    let one = move |client: async_nats::Client, subject: String, payload: Bytes| async move {
        if rr {
            client
                .request(subject, payload)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            client
                .publish(subject, payload)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let record = {
        let rec = rec.clone();
        let progress = progress.clone();
        move |due: Instant, measured: bool, result: Result<(), String>| {
            let done = Instant::now();
            let mut r = rec.borrow_mut();
            match result {
                Ok(()) => {
                    if measured {
                        r.record_latency(latency(due, done));
                    }
                    if in_window(done) {
                        r.ok += 1;
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => r.error(|| e),
            }
        }
    };
    match spec.mode {
        Mode::Open { rps } => {
            let share = clients.len() as f64 / spec.connections.max(1) as f64;
            let mut schedule = Schedule::ramped(start, rps * share, spec.warmup / 2, w_end);
            let timer = match crate::schedule::TokioTimer::new() {
                Ok(t) => t,
                Err(e) => {
                    rec.borrow_mut()
                        .error(|| format!("cannot create a timerfd: {e}"));
                    return rec.borrow().clone();
                }
            };
            let mut i = 0usize;
            while let Some((_, due)) = schedule.next_due() {
                // As over RSocket: one connection per wake-up.
                if Instant::now() < due {
                    i += 1;
                }
                let sent = wait_until_tokio(due, spec.spin, &timer).await;
                let measured = in_window(due);
                rec.borrow_mut().record_send(due, sent, measured);
                let client = clients[i % clients.len()].clone();
                outstanding.set(outstanding.get() + 1);
                let (outstanding, record, subject, payload) = (
                    outstanding.clone(),
                    record.clone(),
                    subject.clone(),
                    payload.clone(),
                );
                tokio::task::spawn_local(async move {
                    let result = one(client, subject, payload).await;
                    record(due, measured, result);
                    outstanding.set(outstanding.get() - 1);
                });
            }
        }
        Mode::Closed { concurrency } => {
            let mut workers = Vec::new();
            for client in &clients {
                for _ in 0..concurrency.max(1) {
                    let (client, record, subject, payload, rec) = (
                        client.clone(),
                        record.clone(),
                        subject.clone(),
                        payload.clone(),
                        rec.clone(),
                    );
                    workers.push(tokio::task::spawn_local(async move {
                        loop {
                            let t0 = Instant::now();
                            if t0 >= w_end {
                                break;
                            }
                            rec.borrow_mut().sent += 1;
                            let result =
                                one(client.clone(), subject.clone(), payload.clone()).await;
                            record(t0, in_window(t0), result);
                        }
                    }));
                }
            }
            for w in workers {
                let _ = w.await;
            }
        }
    }
    let deadline = Instant::now() + DRAIN;
    while outstanding.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for c in &clients {
        let _ = c.flush().await;
    }
    let mut r = rec.borrow().clone();
    let left = outstanding.get() as u64;
    if left > 0 {
        r.unanswered += left;
        r.errors += left;
        r.first_error.get_or_insert_with(|| {
            format!("{left} requests were not answered within {DRAIN:?} after the run")
        });
    }
    r
}

impl ResponderSide for Nats {
    type Loop = Tokio;
    type Serving = Vec<tokio::task::JoinHandle<()>>;

    async fn serve(&self, part: Part<'_, ResponderSpec>) -> Result<Self::Serving, String> {
        let subs = subscribe(part.spec, &self.url, part.share).await?;
        Ok(serve_all(subs, part.spec, part.counts))
    }

    async fn stop(&self, serving: Self::Serving) {
        stop_serving(serving).await;
    }

    fn ready_line(&self, spec: &ResponderSpec) -> String {
        format!(
            "loadgen responder: serving subject {} on {} with {} connection(s){}",
            spec.service,
            self.url,
            spec.instances * spec.connections,
            if spec.fanout {
                ", each receiving every message"
            } else {
                " in a queue group"
            }
        )
    }
}

/// This thread's `share` of the responder connections `spec` asks for,
/// each subscribed to the service's subject (in a queue group, or each on
/// its own with `fanout`); the subscriptions have reached the server when
/// this returns.
async fn subscribe(
    spec: &ResponderSpec,
    url: &str,
    share: Share,
) -> Result<Vec<(async_nats::Client, async_nats::Subscriber)>, String> {
    let mut subs = Vec::new();
    for _ in share.of(spec.instances * spec.connections) {
        let client = connect(url).await?;
        let sub = if spec.fanout {
            client.subscribe(spec.service.clone()).await
        } else {
            client
                .queue_subscribe(spec.service.clone(), "loadgen".into())
                .await
        };
        let sub = sub.map_err(|e| format!("cannot subscribe: {e}"))?;
        subs.push((client, sub));
    }
    // Subscriptions reach the server before anyone is told to send.
    for (c, _) in &subs {
        c.flush()
            .await
            .map_err(|e| format!("cannot reach {url}: {e}"))?;
    }
    Ok(subs)
}

/// Answers (or just counts) every message of `subs`, each on a task of the
/// current `LocalSet`, spending `spec.work` of CPU on each.
fn serve_all(
    subs: Vec<(async_nats::Client, async_nats::Subscriber)>,
    spec: &ResponderSpec,
    counts: &Rc<Counts>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (work, fanout) = (spec.work, spec.fanout);
    subs.into_iter()
        .map(|(client, mut sub)| {
            let counts = counts.clone();
            tokio::task::spawn_local(async move {
                while let Some(msg) = sub.next().await {
                    // Requests carry a reply subject, published messages do
                    // not; one count serves both, named by the mode.
                    if fanout {
                        counts.fire_and_forget();
                    } else {
                        counts.request_response();
                    }
                    runner::work(work);
                    if let Some(reply) = msg.reply {
                        let _ = client.publish(reply, msg.payload).await;
                    }
                }
            })
        })
        .collect()
}

/// Ends the serving tasks; subscriptions must be dropped while the
/// runtime runs.
async fn stop_serving(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
}
