//! The two event loops loadgen runs on, behind one trait: glommio (what
//! rsbroker-client is built on) and a current-thread tokio runtime (what
//! async-nats needs). The runner starts one per thread, pinned, and asks
//! it for the few things a request loop needs: tasks, sleeps and waiting
//! for a due time.

use std::future::Future;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::schedule::{SPIN, TokioTimer, wait_until, wait_until_tokio};

/// Where and how a thread's event loop runs.
pub(crate) struct Place {
    /// The thread's name.
    pub(crate) name: String,
    /// The CPU it is pinned to, if any.
    pub(crate) cpu: Option<usize>,
    /// Poll for a while before sleeping when idle (see `RequesterSpec::spin`).
    pub(crate) spin: bool,
}

/// A started thread, to be joined for what its body returned.
pub(crate) struct Thread<T> {
    join: Box<dyn FnOnce() -> Result<T, String>>,
}

impl<T> Thread<T> {
    /// Waits for the thread; an error says why it returned nothing.
    pub(crate) fn join(self) -> Result<T, String> {
        (self.join)()
    }
}

/// What a thread runs: a future made on the thread (so it need not be
/// `Send`) whose result goes back to the thread that joins it.
pub(crate) trait Body: Future<Output: Send + 'static> + 'static {}

impl<F: Future<Output: Send + 'static> + 'static> Body for F {}

fn cannot_start(cpu: Option<usize>, e: impl std::fmt::Display) -> String {
    format!("cannot start a thread on CPU {cpu:?}: {e}")
}

/// One event loop per thread, as a protocol side needs it.
pub(crate) trait EventLoop {
    /// What waiting for a due time needs on this loop.
    type Timer;

    /// Starts a thread at `place` that runs the future `body` makes there.
    /// `body` is dropped unrun when the thread cannot start.
    fn start<F: Body>(
        place: Place,
        body: impl FnOnce() -> F + Send + 'static,
    ) -> Result<Thread<F::Output>, String>;

    /// Runs `task` on the current loop without waiting for it.
    fn detach(task: impl Future<Output = ()> + 'static);

    /// Runs every task on the current loop at once; returns when all ended.
    async fn join_all<F: Future<Output = ()> + 'static>(tasks: Vec<F>);

    /// Sleeps on the current loop.
    async fn sleep(d: Duration);

    /// A timer for [`Self::wait_until`], made on the current loop.
    fn timer() -> Result<Self::Timer, String>;

    /// Waits until `due` (see [`crate::schedule::wait_until`]); returns when
    /// it woke.
    async fn wait_until(timer: &Self::Timer, due: Instant, spin: bool) -> Instant;
}

/// glommio executors, for the RSocket side.
pub(crate) struct Glommio;

/// How long a spinning executor polls for work before it parks: longer
/// than the open loop's final wait before a due time, so that wait is spun.
const SPIN_BEFORE_PARK: Duration = SPIN.saturating_add(Duration::from_micros(50));

impl EventLoop for Glommio {
    type Timer = ();

    fn start<F: Body>(
        place: Place,
        body: impl FnOnce() -> F + Send + 'static,
    ) -> Result<Thread<F::Output>, String> {
        let cpu = place.cpu;
        let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
        let builder = LocalExecutorBuilder::new(placement)
            .name(&place.name)
            .io_memory(256 << 10);
        let builder = match place.spin {
            true => builder.spin_before_park(SPIN_BEFORE_PARK),
            false => builder,
        };
        let handle = builder.spawn(body).map_err(|e| cannot_start(cpu, e))?;
        Ok(Thread {
            join: Box::new(move || handle.join().map_err(|e| format!("a thread failed: {e}"))),
        })
    }

    fn detach(task: impl Future<Output = ()> + 'static) {
        glommio::spawn_local(task).detach();
    }

    async fn join_all<F: Future<Output = ()> + 'static>(tasks: Vec<F>) {
        let tasks: Vec<_> = tasks.into_iter().map(glommio::spawn_local).collect();
        for t in tasks {
            t.await;
        }
    }

    async fn sleep(d: Duration) {
        glommio::timer::sleep(d).await;
    }

    fn timer() -> Result<(), String> {
        Ok(())
    }

    async fn wait_until(_: &(), due: Instant, spin: bool) -> Instant {
        wait_until(due, spin).await
    }
}

/// Current-thread tokio runtimes with a `LocalSet`, for the NATS side.
pub(crate) struct Tokio;

impl EventLoop for Tokio {
    type Timer = TokioTimer;

    fn start<F: Body>(
        place: Place,
        body: impl FnOnce() -> F + Send + 'static,
    ) -> Result<Thread<F::Output>, String> {
        let cpu = place.cpu;
        // Built here, so that a runtime that cannot be made fails the start
        // like a glommio executor does.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| cannot_start(cpu, e))?;
        let handle = std::thread::Builder::new()
            .name(place.name)
            .spawn(move || {
                if let Some(c) = cpu {
                    core_affinity::set_for_current(core_affinity::CoreId { id: c });
                }
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    if place.spin {
                        spin();
                    }
                    body().await
                })
            })
            .map_err(|e| cannot_start(cpu, e))?;
        Ok(Thread {
            join: Box::new(move || handle.join().map_err(|_| "a thread panicked".to_owned())),
        })
    }

    fn detach(task: impl Future<Output = ()> + 'static) {
        tokio::task::spawn_local(task);
    }

    async fn join_all<F: Future<Output = ()> + 'static>(tasks: Vec<F>) {
        let tasks: Vec<_> = tasks.into_iter().map(tokio::task::spawn_local).collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn sleep(d: Duration) {
        tokio::time::sleep(d).await;
    }

    fn timer() -> Result<TokioTimer, String> {
        TokioTimer::new().map_err(|e| format!("cannot create a timerfd: {e}"))
    }

    async fn wait_until(timer: &TokioTimer, due: Instant, spin: bool) -> Instant {
        wait_until_tokio(due, spin, timer).await
    }
}

/// tokio's `spin_before_park`: a task that always yields keeps the runtime
/// polling its sockets instead of sleeping in epoll_wait. It ends with the
/// `LocalSet`, when the thread's body has returned.
fn spin() {
    tokio::task::spawn_local(async {
        loop {
            tokio::task::yield_now().await;
        }
    });
}
