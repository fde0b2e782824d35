//! The open-loop send schedule, and waiting for a due time.
//!
//! Request `i` of a sender with rate `r` per second is due at
//! `start + i / r`, whatever happened to the requests before it: a stall
//! delays the sends that were due during it, and their latency, measured
//! from the due time, shows it (no coordinated omission).
//!
//! A schedule may first ramp up: the rate grows linearly from 0 to `r`
//! over the ramp, so that connections, socket buffers and tables grow with
//! the load instead of all at once. A cold start at full rate builds a
//! backlog that a system near its limit may take seconds to work off. The
//! ramp lies inside the unmeasured warm-up.

use std::time::{Duration, Instant};

/// When each request of one sender is due.
#[derive(Clone, Debug)]
pub struct Schedule {
    start: Instant,
    /// Nanoseconds between requests at full rate, as a float so that rates
    /// that do not divide a second stay exact over long runs.
    period_ns: f64,
    /// Length of the ramp, in nanoseconds.
    ramp_ns: f64,
    /// Requests due during the ramp: `rate * ramp / 2`.
    ramp_requests: f64,
    end: Instant,
    next: u64,
}

impl Schedule {
    /// `rate` requests per second from `start` until `end` (exclusive).
    pub fn new(start: Instant, rate: f64, end: Instant) -> Self {
        Self::ramped(start, rate, Duration::ZERO, end)
    }

    /// `rate` requests per second, reached by a linear ramp over `ramp`
    /// from `start`, until `end` (exclusive).
    pub fn ramped(start: Instant, rate: f64, ramp: Duration, end: Instant) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            1.0
        };
        let ramp_ns = ramp.as_nanos() as f64;
        Self {
            start,
            period_ns: 1e9 / rate,
            ramp_ns,
            ramp_requests: rate * ramp_ns / 1e9 / 2.0,
            end,
            next: 0,
        }
    }

    /// Nanoseconds after the start that request `i` is due.
    fn offset_ns(&self, i: u64) -> f64 {
        let i = i as f64;
        if i < self.ramp_requests {
            // During the ramp, requests due by time t: rate t^2 / (2 ramp).
            (2.0 * self.ramp_ns * i * self.period_ns).sqrt()
        } else {
            // After it: ramp / 2 + i / rate.
            self.ramp_ns / 2.0 + i * self.period_ns
        }
    }

    /// When request `i` is due.
    pub fn due(&self, i: u64) -> Instant {
        // f64 has 53 bits: exact to the nanosecond for runs of months.
        self.start + Duration::from_nanos(self.offset_ns(i).round() as u64)
    }

    /// The next request: its index and due time, or `None` past the end.
    pub fn next_due(&mut self) -> Option<(u64, Instant)> {
        let due = self.due(self.next);
        if due >= self.end {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some((i, due))
    }

    /// How many requests the schedule holds in all.
    pub fn total(&self) -> u64 {
        let span = self.end.saturating_duration_since(self.start).as_nanos() as f64;
        if span <= self.ramp_ns {
            // rate t^2 / (2 ramp) requests by t, with rate = 1e9 / period.
            (span * span / (2.0 * self.ramp_ns * self.period_ns)).ceil() as u64
        } else {
            ((span - self.ramp_ns / 2.0) / self.period_ns).ceil() as u64
        }
    }
}

/// Latency of a request completed at `done` that was due at `due`: the
/// time it waited to be sent counts.
pub fn latency(due: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(due)
}

/// How long before a due time a spinning waiter stops sleeping.
pub const SPIN: Duration = Duration::from_micros(200);

/// Waits on the current glommio executor until `due`; returns when it
/// woke. A timer (an io_uring timeout) covers the wait.
///
/// Without `spin` the timer is never shorter than 20 µs: at high rates
/// each wake-up then finds several requests due and sends them in one
/// write, instead of parking and waking (a context switch each way on a
/// CPU shared with the responder) for every request; the delay shows in
/// the schedule lag and in the latency, which counts from the due time.
///
/// With `spin` the executor must have been built to spin before it parks
/// for longer than [`SPIN`] (the requester's are): the wait sleeps until
/// `SPIN` before the due time, where a parked executor may wake late, then
/// sleeps the rest on a timer the spinning executor checks on every pass
/// while it keeps polling its sockets. (Yielding in a loop instead would
/// keep the task queue busy, and glommio polls I/O only between queue
/// runs: answers would wait for its preemption timer.)
pub async fn wait_until(due: Instant, spin: bool) -> Instant {
    const MIN_SLEEP: Duration = Duration::from_micros(20);
    loop {
        let now = Instant::now();
        if now >= due {
            return now;
        }
        let left = due - now;
        let sleep = match spin {
            true if left > SPIN => left - SPIN,
            _ => left.max(MIN_SLEEP),
        };
        glommio::timer::sleep(sleep).await;
    }
}

/// A timerfd registered with the current tokio runtime: tokio's own timer
/// ticks in milliseconds, a timerfd fires to the microsecond.
pub struct TokioTimer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl TokioTimer {
    /// A timer on the current tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // The timerfd is owned here and lives as long as the AsyncFd, which
        // is what the deprecation of `new` (I/O safety) asks for.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(fd)?;
        Ok(Self { fd })
    }

    /// Sleeps for `d`.
    pub async fn sleep(&self, d: Duration) -> std::io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        let d = d.max(Duration::from_nanos(1));
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            },
        };
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &spec)?;
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match rustix::io::read(guard.get_inner(), &mut expirations) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// [`wait_until`] for a tokio runtime (the NATS driver), on a [`TokioTimer`].
pub async fn wait_until_tokio(due: Instant, spin: bool, timer: &TokioTimer) -> Instant {
    loop {
        let now = Instant::now();
        if now >= due {
            return now;
        }
        let left = due - now;
        if spin && left <= SPIN {
            tokio::task::yield_now().await;
            continue;
        }
        let sleep = if spin { left - SPIN } else { left };
        if timer.sleep(sleep).await.is_err() {
            // A timerfd that fails leaves the coarse timer.
            tokio::time::sleep(sleep).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_due_at_start_plus_i_over_rate() {
        let start = Instant::now();
        let mut s = Schedule::new(start, 4000.0, start + Duration::from_secs(1));
        assert_eq!(s.total(), 4000);
        let mut n = 0;
        while let Some((i, due)) = s.next_due() {
            assert_eq!(due - start, Duration::from_micros(250 * i));
            n += 1;
        }
        assert_eq!(n, 4000, "exactly rate x duration requests");
    }

    #[test]
    fn rates_that_do_not_divide_a_second_do_not_drift() {
        let start = Instant::now();
        let s = Schedule::new(start, 3.0, start + Duration::from_secs(3600));
        // Request 3 * 3600 - 1 is due a third of a second before the hour.
        let last = s.due(3 * 3600 - 1) - start;
        assert_eq!(last, Duration::from_nanos(3_599_666_666_667));
        assert_eq!(s.total(), 10_800);
    }

    #[test]
    fn a_ramp_reaches_the_rate_and_then_holds_it() {
        let start = Instant::now();
        let ramp = Duration::from_secs(1);
        let end = start + Duration::from_secs(3);
        let mut s = Schedule::ramped(start, 10_000.0, ramp, end);
        let mut per_100ms = [0u32; 30];
        let mut last = start;
        let mut n = 0u64;
        while let Some((i, due)) = s.next_due() {
            assert_eq!(i, n);
            assert!(due >= last, "due times never go back");
            last = due;
            per_100ms[((due - start).as_millis() / 100) as usize] += 1;
            n += 1;
        }
        // Linear: the k-th tenth of the ramp holds (2k + 1) / 200 of a
        // second's requests at full rate.
        for (k, &count) in per_100ms[..10].iter().enumerate() {
            let want = (2 * k as i64 + 1) * 10_000 / 200;
            assert!(
                (count as i64 - want).abs() <= 1,
                "ramp tenth {k}: {count}, want {want}"
            );
        }
        // Then the full rate, 1000 per 100 ms.
        for (k, &count) in per_100ms[10..].iter().enumerate() {
            assert!(
                (count as i64 - 1000).abs() <= 1,
                "after the ramp, {k}: {count}"
            );
        }
        // Half a second's worth during the ramp, then two seconds' worth.
        assert_eq!(n, 5_000 + 20_000);
        assert_eq!(s.total(), n);
    }

    #[test]
    fn a_schedule_ending_inside_its_ramp_counts_what_it_holds() {
        let start = Instant::now();
        let mut s = Schedule::ramped(
            start,
            1000.0,
            Duration::from_secs(2),
            start + Duration::from_secs(1),
        );
        let mut n = 0;
        while s.next_due().is_some() {
            n += 1;
        }
        // rate t^2 / (2 ramp) = 1000 * 1 / 4.
        assert_eq!(n, 250);
        assert_eq!(s.total(), 250);
    }

    #[test]
    fn latency_counts_from_the_due_time_not_the_send() {
        let start = Instant::now();
        let s = Schedule::new(start, 1000.0, start + Duration::from_secs(1));
        let due = s.due(10);
        // Sent 5 ms late (a stall), answered 100 µs after the send.
        let sent = due + Duration::from_millis(5);
        let done = sent + Duration::from_micros(100);
        assert_eq!(latency(due, done), Duration::from_micros(5100));
        // A completion that is somehow before its due time counts as 0.
        assert_eq!(latency(due, due - Duration::from_micros(1)), Duration::ZERO);
    }

    #[test]
    fn waiting_ends_at_or_after_the_due_time() {
        let lateness = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .spawn(|| async {
                let mut worst = Duration::ZERO;
                for spin in [false, true] {
                    for _ in 0..20 {
                        let due = Instant::now() + Duration::from_micros(700);
                        let woke = wait_until(due, spin).await;
                        assert!(woke >= due);
                        worst = worst.max(woke - due);
                    }
                }
                worst
            })
            .unwrap()
            .join()
            .unwrap();
        // Not a timing assertion: only that it returned at all, within reason.
        assert!(lateness < Duration::from_secs(1));
    }
}
