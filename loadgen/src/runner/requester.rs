//! A requester run. Every thread first connects (and starts its part of
//! the in-process responder); a gate holds them until all have, so the
//! schedule starts at once everywhere, or not at all when one could not
//! connect. Then [`Load::drive`] sends the thread's requests, open or
//! closed loop, and counts what comes back; the threads' records merge
//! into one [`Run`].

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Counts, Part, Share, join_all};
use crate::event_loop::{EventLoop, Place, Thread};
use crate::schedule::{Schedule, latency};
use crate::stats::Recorder;
use crate::{Mode, RequesterSpec, ResponderCounts, Run};

/// How long a finished run waits for answers still in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// How long after the last thread is ready the run starts: every thread
/// is out of the gate and waiting on its schedule when the first request
/// is due.
const START_DELAY: Duration = Duration::from_millis(20);

/// What a protocol does on one requester thread.
pub(crate) trait RequesterSide: Clone + Send + 'static {
    /// The event loop its client runs on.
    type Loop: EventLoop;
    /// What one thread opened: its connections and what it serves.
    type Thread;

    /// Opens this thread's connections and its part of the responder
    /// `spec.serve` asks for; the thread is ready to send when this returns.
    async fn connect(&self, part: Part<'_, RequesterSpec>) -> Result<Self::Thread, String>;

    /// Sends the thread's requests: [`Load::drive`], told how one request
    /// goes out.
    async fn send(&self, thread: &Self::Thread, load: Load<'_, Self::Loop>) -> Recorder;

    /// Closes what [`Self::connect`] opened.
    async fn close(&self, thread: Self::Thread);
}

/// Runs `spec` on one thread per CPU (no more threads than connections),
/// each driving `side`; returns what they recorded, merged.
pub(crate) fn run_requester<S: RequesterSide>(
    side: &S,
    spec: &RequesterSpec,
) -> Result<Run, String> {
    let threads = spec.cpus.len().clamp(1, spec.connections.max(1));
    let gate = Arc::new(Gate::new(threads));
    let progress: Vec<Arc<AtomicU64>> = (0..threads).map(|_| Arc::default()).collect();
    let (started, cannot_start) = start_threads(side, spec, &gate, &progress);
    let start = gate.wait_blocking();
    let live = start
        .filter(|_| spec.live)
        .map(|s| live(progress, s + spec.warmup + spec.duration));
    let merged = merge(started);
    if let Some(live) = live {
        let _ = live.join();
    }
    let (record, served) = cannot_start.map_or(merged, Err)?;
    Ok(Run {
        record,
        measured: spec.duration,
        started: start.unwrap_or_else(Instant::now) + spec.warmup,
        served: spec.serve.is_some().then_some(served),
    })
}

/// What a requester thread returns: its record and what it served.
type Joined = Result<(Recorder, ResponderCounts), String>;

/// Starts a thread per ticket of `gate`; returns those started, and why
/// the next one could not start.
fn start_threads<S: RequesterSide>(
    side: &S,
    spec: &RequesterSpec,
    gate: &Arc<Gate>,
    progress: &[Arc<AtomicU64>],
) -> (Vec<Thread<Joined>>, Option<String>) {
    let threads = progress.len();
    // Made before any thread starts: the tickets left over when one cannot
    // start drop with the loop, and the gate then fails for those started.
    let tickets: Vec<Ticket> = (0..threads).map(|_| Ticket::new(gate.clone())).collect();
    let mut started = Vec::new();
    for (index, ticket) in tickets.into_iter().enumerate() {
        let thread = RequesterThread {
            side: side.clone(),
            spec: spec.clone(),
            share: Share { index, threads },
            ticket,
            progress: progress[index].clone(),
        };
        let place = Place {
            name: format!("loadgen-{index}"),
            cpu: spec.cpus.get(index).copied(),
            spin: spec.spin,
        };
        match S::Loop::start(place, move || thread.run()) {
            Ok(t) => started.push(t),
            Err(e) => return (started, Some(e)),
        }
    }
    (started, None)
}

/// Joins the threads and adds up what they recorded and served.
fn merge(threads: Vec<Thread<Joined>>) -> Joined {
    let mut record = Recorder::default();
    let mut served = ResponderCounts::default();
    join_all(
        threads,
        |(r, s)| {
            record.merge(&r);
            served.add(&s);
        },
        || {},
    )?;
    Ok((record, served))
}

/// What one requester thread is given.
struct RequesterThread<S> {
    side: S,
    spec: RequesterSpec,
    share: Share,
    ticket: Ticket,
    progress: Arc<AtomicU64>,
}

impl<S: RequesterSide> RequesterThread<S> {
    /// Connects, waits for the others, sends, closes; returns what it
    /// recorded and what its part of the in-process responder served.
    async fn run(self) -> Joined {
        let counts = Rc::new(Counts::new());
        let part = Part::new(&self.spec, self.share, &counts);
        let thread = self.side.connect(part).await;
        let start = self.ticket.pass::<S::Loop>(thread.is_ok()).await;
        let thread = thread?;
        let record = match start {
            Some(start) => {
                let load = Load {
                    spec: &self.spec,
                    start,
                    progress: self.progress,
                    event_loop: PhantomData,
                };
                self.side.send(&thread, load).await
            }
            // Another thread could not connect: the run fails with its error.
            None => Recorder::default(),
        };
        self.side.close(thread).await;
        Ok((record, counts.totals()))
    }
}

/// Holds the requester threads until every one has connected.
struct Gate {
    arrivals: Mutex<Arrivals>,
    all_in: Condvar,
}

struct Arrivals {
    /// Threads still connecting.
    missing: usize,
    /// Whether one could not.
    failed: bool,
    /// When the run starts, once all are in and none failed.
    start: Option<Instant>,
}

impl Gate {
    fn new(threads: usize) -> Self {
        Self {
            arrivals: Mutex::new(Arrivals {
                missing: threads,
                failed: false,
                start: None,
            }),
            all_in: Condvar::new(),
        }
    }

    fn arrive(&self, ready: bool) {
        let mut a = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        a.missing = a.missing.saturating_sub(1);
        a.failed |= !ready;
        if a.missing == 0 {
            if !a.failed {
                a.start = Some(Instant::now() + START_DELAY);
            }
            self.all_in.notify_all();
        }
    }

    /// Waits until every thread has arrived; returns when the run starts,
    /// or `None` when one could not connect. The thread's event loop keeps
    /// running meanwhile: its connections must go on answering (a QUIC
    /// endpoint acknowledges and completes handshakes in this thread, not
    /// in the kernel), or a thread still connecting through them would
    /// never arrive.
    /// The same, blocking (for the thread that started the others).
    fn wait_blocking(&self) -> Option<Instant> {
        let a = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        let a = self
            .all_in
            .wait_while(a, |a| a.missing > 0)
            .unwrap_or_else(PoisonError::into_inner);
        a.start
    }

    async fn wait<L: EventLoop>(&self) -> Option<Instant> {
        loop {
            {
                let a = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
                if a.missing == 0 {
                    return a.start;
                }
            }
            L::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// One thread's place at the [`Gate`]. A thread that never gets there (it
/// could not start, or panicked) still arrives, as failed, when its ticket
/// drops, so the others are not held for ever.
struct Ticket {
    gate: Option<Arc<Gate>>,
}

impl Ticket {
    fn new(gate: Arc<Gate>) -> Self {
        Self { gate: Some(gate) }
    }

    /// Arrives (`ready` when this thread connected) and waits for the rest;
    /// returns when the run starts, or `None` when it does not.
    async fn pass<L: EventLoop>(mut self, ready: bool) -> Option<Instant> {
        let gate = self.gate.take()?;
        gate.arrive(ready);
        gate.wait::<L>().await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.arrive(false);
        }
    }
}

/// Prints the completions of every thread once a second until `end`.
fn live(progress: Vec<Arc<AtomicU64>>, end: Instant) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = 0u64;
        let mut t = 0;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_secs(1));
            t += 1;
            let now: u64 = progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
            eprintln!("  {t:>4} s  {:>10} completed/s", now - last);
            last = now;
        }
    })
}

/// One thread's requests, on the event loop `L`: what to send and when.
pub(crate) struct Load<'a, L> {
    spec: &'a RequesterSpec,
    start: Instant,
    progress: Arc<AtomicU64>,
    event_loop: PhantomData<L>,
}

impl<L: EventLoop> Load<'_, L> {
    /// Sends the run's requests over `conns`, open or closed loop, each with
    /// `send` (which sends one and returns its outcome); returns what this
    /// thread recorded once the answers still in flight are in or late.
    pub(crate) async fn drive<C, F, Fut>(self, conns: &[C], send: F) -> Recorder
    where
        C: Clone + 'static,
        F: Fn(C, Tally) -> Fut + 'static,
        Fut: Future<Output = Result<(), String>> + 'static,
    {
        let spec = self.spec;
        let tally = Tally {
            rec: Rc::default(),
            window: Window {
                start: self.start + spec.warmup,
                end: self.start + spec.warmup + spec.duration,
            },
            progress: self.progress.clone(),
            in_flight: Rc::default(),
        };
        match spec.mode {
            Mode::Open { rps } => {
                if let Err(e) = self.open(rps, conns, &tally, send).await {
                    tally.rec.borrow_mut().error(|| e);
                }
            }
            Mode::Closed { concurrency } => {
                closed::<L, _, _, _>(conns, concurrency, &tally, send).await
            }
        }
        tally.drain::<L>().await
    }

    /// This thread's part of the rate, each request sent at its due time
    /// whatever the answers do.
    async fn open<C, F, Fut>(
        &self,
        rps: f64,
        conns: &[C],
        tally: &Tally,
        send: F,
    ) -> Result<(), String>
    where
        C: Clone + 'static,
        F: Fn(C, Tally) -> Fut,
        Fut: Future<Output = Result<(), String>> + 'static,
    {
        let spec = self.spec;
        let share = conns.len() as f64 / spec.connections.max(1) as f64;
        let mut schedule =
            Schedule::ramped(self.start, rps * share, spec.warmup / 2, tally.window.end);
        let timer = L::timer()?;
        let mut i = 0usize;
        while let Some((_, due)) = schedule.next_due() {
            // Requests found due at one wake-up go out on one connection,
            // so they leave in one write; the next wake-up takes the next
            // connection.
            if Instant::now() < due {
                i += 1;
            }
            let sent = L::wait_until(&timer, due, spec.spin).await;
            let measured = tally.window.contains(due);
            tally.rec.borrow_mut().record_send(due, sent, measured);
            let request = send(conns[i % conns.len()].clone(), tally.clone());
            tally.in_flight.set(tally.in_flight.get() + 1);
            let tally = tally.clone();
            L::detach(async move {
                let result = request.await;
                tally.done(due, measured, result);
                tally.in_flight.set(tally.in_flight.get() - 1);
            });
        }
        Ok(())
    }
}

/// `concurrency` requests in flight on each connection, each sent when the
/// one before it is answered.
async fn closed<L, C, F, Fut>(conns: &[C], concurrency: usize, tally: &Tally, send: F)
where
    L: EventLoop,
    C: Clone + 'static,
    F: Fn(C, Tally) -> Fut + 'static,
    Fut: Future<Output = Result<(), String>> + 'static,
{
    let send = Rc::new(send);
    let mut workers = Vec::new();
    for conn in conns {
        for _ in 0..concurrency.max(1) {
            let (conn, tally, send) = (conn.clone(), tally.clone(), send.clone());
            workers.push(async move {
                // The next request goes out as soon as one is recorded, so
                // the time it was recorded is the next one's send time (one
                // clock read per request).
                let mut t0 = Instant::now();
                while t0 < tally.window.end {
                    tally.rec.borrow_mut().sent += 1;
                    let result = send(conn.clone(), tally.clone()).await;
                    t0 = tally.done(t0, tally.window.contains(t0), result);
                }
            });
        }
    }
    L::join_all(workers).await;
}

/// The window a request counts in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    /// The end of the warm-up.
    pub(crate) start: Instant,
    /// The end of the run.
    pub(crate) end: Instant,
}

impl Window {
    /// Whether `t` is inside.
    pub(crate) fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

/// What one thread counts as its requests end.
#[derive(Clone)]
pub(crate) struct Tally {
    /// The thread's record.
    pub(crate) rec: Rc<RefCell<Recorder>>,
    /// The measured window.
    pub(crate) window: Window,
    /// Completions, read by the live line.
    progress: Arc<AtomicU64>,
    /// Open-loop requests sent and not yet answered.
    in_flight: Rc<Cell<usize>>,
}

impl Tally {
    /// Records the outcome of one request that was due (or sent) at `due`;
    /// returns the time it was recorded.
    fn done(&self, due: Instant, measured: bool, result: Result<(), String>) -> Instant {
        let done = Instant::now();
        let mut r = self.rec.borrow_mut();
        match result {
            Ok(()) => {
                if measured {
                    r.record_latency(latency(due, done));
                }
                if self.window.contains(done) {
                    r.ok += 1;
                    self.progress.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => r.error(|| e),
        }
        done
    }

    /// Answers still in flight get a little time; what does not come is
    /// counted as failed. Returns the thread's record.
    async fn drain<L: EventLoop>(&self) -> Recorder {
        let deadline = Instant::now() + DRAIN;
        while self.in_flight.get() > 0 && Instant::now() < deadline {
            L::sleep(Duration::from_millis(1)).await;
        }
        let mut r = self.rec.borrow().clone();
        let left = self.in_flight.get() as u64;
        if left > 0 {
            r.unanswered += left;
            r.errors += left;
            r.first_error.get_or_insert_with(|| {
                format!("{left} requests were not answered within {DRAIN:?} after the run")
            });
        }
        r
    }
}
