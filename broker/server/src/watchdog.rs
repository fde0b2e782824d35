//! The systemd watchdog: a thread that pings only while every shard's
//! heartbeat is fresh, so that a stuck core (a shard whose timer loop has
//! stopped running) stops the pings and systemd restarts the broker.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Controller;

/// The watchdog timeout systemd asked for (WatchdogSec= sets WATCHDOG_USEC),
/// as sd_watchdog_enabled(3) reads it: WATCHDOG_PID, when set, must be
/// this process.
pub fn systemd_timeout() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Starts the watchdog thread: every `interval` it calls `ping` if no
/// shard's heartbeat is older than `stuck_after`, and logs (once per
/// episode) the shards that are. It ends when the broker has stopped.
pub fn spawn(
    controller: Controller,
    interval: Duration,
    stuck_after: Duration,
    ping: impl Fn() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rsbroker-watchdog".into())
        .spawn(move || {
            let mut reported = false;
            while !controller.is_finished() {
                let stuck: Vec<usize> = controller
                    .heartbeat_ages()
                    .iter()
                    .enumerate()
                    .filter(|(_, age)| **age > stuck_after)
                    .map(|(i, _)| i)
                    .collect();
                if stuck.is_empty() {
                    ping();
                    if reported {
                        tracing::warn!("every shard runs again: watchdog pings resumed");
                    }
                    reported = false;
                } else if !reported {
                    tracing::error!(
                        ?stuck,
                        "shards have stopped running: watchdog pings withheld"
                    );
                    reported = true;
                }
                std::thread::sleep(interval);
            }
        })
}
