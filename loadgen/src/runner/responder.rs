//! A responder run: every thread starts serving its share, the run says
//! so once all do (or fails with the first that cannot), then serves until
//! told to stop; the threads' counts add up to what was served.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use super::{Part, Share, join_all};
use crate::event_loop::{EventLoop, Place};
use crate::{ResponderCounts, ResponderSpec};

/// How often a serving thread looks at the stop flag: a signal handler
/// can only set a flag, not wake an event loop.
const POLL: Duration = Duration::from_millis(20);

/// What a protocol does on one responder thread.
pub(crate) trait ResponderSide: Clone + Send + 'static {
    /// The event loop its client runs on.
    type Loop: EventLoop;
    /// What one thread keeps while it serves.
    type Serving;

    /// Starts serving this thread's part; requests reach it once this
    /// returns.
    async fn serve(&self, part: Part<'_, ResponderSpec>) -> Result<Self::Serving, String>;

    /// Whether serving has ended on its own (the peer went away).
    fn ended(_serving: &Self::Serving) -> bool {
        false
    }

    /// Stops serving.
    async fn stop(&self, serving: Self::Serving);

    /// The line printed once every thread serves.
    fn ready_line(&self, spec: &ResponderSpec) -> String;
}

/// Serves `spec` with `side` on one thread per CPU until `stop` is set;
/// returns what was served.
pub(crate) fn run_responder<S: ResponderSide>(
    side: &S,
    spec: &ResponderSpec,
    stop: Arc<AtomicBool>,
) -> Result<ResponderCounts, String> {
    let threads = spec.cpus.len().max(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut started = Vec::new();
    for index in 0..threads {
        let thread = ResponderThread {
            side: side.clone(),
            spec: spec.clone(),
            share: Share { index, threads },
            ready: Ready(Some(ready_tx.clone())),
            stop: stop.clone(),
        };
        let place = Place {
            name: format!("loadgen-responder-{index}"),
            cpu: spec.cpus.get(index).copied(),
            spin: false,
        };
        match S::Loop::start(place, move || thread.run()) {
            Ok(t) => started.push(t),
            Err(e) => {
                stop.store(true, Ordering::Release);
                return Err(e);
            }
        }
    }
    drop(ready_tx);
    if let Err(e) = all_ready(&ready_rx, threads) {
        stop.store(true, Ordering::Release);
        return Err(e);
    }
    eprintln!("{}", side.ready_line(spec));
    let since = Instant::now();
    let mut total = ResponderCounts::default();
    join_all(
        started,
        |c| total.add(&c),
        || stop.store(true, Ordering::Release),
    )?;
    total.seconds = since.elapsed().as_secs_f64();
    Ok(total)
}

/// Waits until each of `threads` serves; the first that cannot is the error.
fn all_ready(ready: &Receiver<Result<(), String>>, threads: usize) -> Result<(), String> {
    for _ in 0..threads {
        ready
            .recv()
            .map_err(|_| "a responder thread ended early".to_owned())??;
    }
    Ok(())
}

/// A thread's promise to say whether it serves. One that ends without
/// saying (it panicked) says it ended early, so the run does not wait for
/// it.
struct Ready(Option<Sender<Result<(), String>>>);

impl Ready {
    fn send(mut self, serving: Result<(), String>) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(serving);
        }
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Err("a responder thread ended early".into()));
        }
    }
}

/// What one responder thread is given.
struct ResponderThread<S> {
    side: S,
    spec: ResponderSpec,
    share: Share,
    ready: Ready,
    stop: Arc<AtomicBool>,
}

impl<S: ResponderSide> ResponderThread<S> {
    /// Serves until the run stops or the peer goes; returns what it served.
    async fn run(self) -> Result<ResponderCounts, String> {
        let counts = Rc::new(Counts::new());
        match self
            .side
            .serve(Part::new(&self.spec, self.share, &counts))
            .await
        {
            Ok(serving) => {
                self.ready.send(Ok(()));
                while !self.stop.load(Ordering::Acquire) && !S::ended(&serving) {
                    S::Loop::sleep(POLL).await;
                }
                self.side.stop(serving).await;
            }
            Err(e) => self.ready.send(Err(e)),
        }
        Ok(counts.totals())
    }
}

/// What one thread served, counted as it serves; the thread's own, so
/// plain cells.
#[derive(Debug)]
pub(crate) struct Counts {
    /// When the thread started serving.
    since: Instant,
    request_response: Cell<u64>,
    fire_and_forget: Cell<u64>,
    streams: Cell<u64>,
    channels: Cell<u64>,
    items: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

impl Counts {
    /// Nothing served yet, from now.
    pub(crate) fn new() -> Self {
        Self {
            since: Instant::now(),
            request_response: Cell::default(),
            fire_and_forget: Cell::default(),
            streams: Cell::default(),
            channels: Cell::default(),
            items: Cell::default(),
        }
    }

    /// A request-response answered.
    pub(crate) fn request_response(&self) {
        bump(&self.request_response);
    }

    /// A fire-and-forget received.
    pub(crate) fn fire_and_forget(&self) {
        bump(&self.fire_and_forget);
    }

    /// A stream served.
    pub(crate) fn stream(&self) {
        bump(&self.streams);
    }

    /// A channel served.
    pub(crate) fn channel(&self) {
        bump(&self.channels);
    }

    /// A stream or channel item sent.
    pub(crate) fn item(&self) {
        bump(&self.items);
    }

    /// The counts so far.
    pub(crate) fn totals(&self) -> ResponderCounts {
        ResponderCounts {
            request_response: self.request_response.get(),
            fire_and_forget: self.fire_and_forget.get(),
            streams: self.streams.get(),
            channels: self.channels.get(),
            items: self.items.get(),
            seconds: self.since.elapsed().as_secs_f64(),
        }
    }
}

/// Simulated work: the CPU is busy for `d` (a responder's `--work-us`).
pub(crate) fn work(d: Duration) {
    if !d.is_zero() {
        let until = Instant::now() + d;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
}
