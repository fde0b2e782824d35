//! Start-up checks: io_uring must be usable and the locked-memory limit
//! large enough. When one fails, the message says what to change, instead
//! of a shard dying with `ENOMEM`.

use std::time::Duration;

/// glommio refuses to start an executor below this locked-memory limit.
pub const MIN_MEMLOCK: u64 = 512 << 10;

/// CAP_IPC_LOCK lifts the locked-memory limit.
const CAP_IPC_LOCK: u32 = 14;

/// Checks what `shards` executors with `io_memory` bytes of io_uring
/// buffers each will need. Returns warnings (the broker runs, but slower)
/// or the error that stops it.
pub fn run(shards: usize, io_memory: usize) -> Result<Vec<String>, String> {
    let warnings = memlock(shards, io_memory)?;
    io_uring()?;
    Ok(warnings)
}

/// The locked-memory limit: below [`MIN_MEMLOCK`] nothing starts; below
/// what registering every shard's buffers with io_uring takes (three rings
/// per shard, and the limit counts all of this user's locked memory) the
/// buffers stay unregistered and I/O costs a copy more.
pub fn memlock(shards: usize, io_memory: usize) -> Result<Vec<String>, String> {
    if has_capability(CAP_IPC_LOCK) {
        return Ok(Vec::new());
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    let Some(current) = limit.current else {
        return Ok(Vec::new()); // unlimited
    };
    let how = "raise it: `ulimit -l unlimited` in the shell, LimitMEMLOCK=infinity in the \
               systemd unit, or `memlock` in /etc/security/limits.conf";
    if current < MIN_MEMLOCK {
        return Err(format!(
            "the locked-memory limit is {} KiB and io_uring needs at least {} KiB; {how}",
            current / 1024,
            MIN_MEMLOCK / 1024
        ));
    }
    let registered = (shards as u64)
        .saturating_mul(io_memory as u64)
        .saturating_mul(3);
    if current < registered {
        return Ok(vec![format!(
            "the locked-memory limit is {} KiB; registering {shards} shards' io_uring buffers \
             takes about {} KiB, so they may stay unregistered (slower I/O); {how}",
            current / 1024,
            registered / 1024
        )]);
    }
    Ok(Vec::new())
}

/// Starts and stops a small glommio executor: io_uring works, or the
/// error says why it may not.
pub fn io_uring() -> Result<(), String> {
    let started = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("rsbroker-check")
        .io_memory(64 << 10)
        .spawn(|| async {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        })
        .map_err(|e| e.to_string())
        .and_then(|h| h.join().map_err(|e| e.to_string()));
    started.map_err(|e| {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|s| s.trim().parse::<u8>().ok());
        let hint = match disabled {
            Some(2) => "io_uring is disabled on this host (sysctl kernel.io_uring_disabled = 2); \
                        set it to 0"
                .to_owned(),
            Some(1) => "io_uring is limited to privileged processes and the group in \
                        kernel.io_uring_gid (sysctl kernel.io_uring_disabled = 1); set it to 0 \
                        or run rsbroker in that group"
                .to_owned(),
            _ => "rsbroker needs Linux 5.8 or later with io_uring, not blocked by a seccomp \
                  filter (containers: allow io_uring_setup, io_uring_enter, io_uring_register)"
                .to_owned(),
        };
        format!("io_uring is not usable: {e}. {hint}")
    })
}

/// Whether this process holds capability `cap` (from /proc/self/status).
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|bits| bits & (1 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_limit_below_the_minimum_says_what_to_change() {
        // Only observable without CAP_IPC_LOCK and with a finite limit;
        // tests/operate.rs drives the binary under such a limit.
        if has_capability(CAP_IPC_LOCK) {
            return;
        }
        let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
        if let Some(current) = limit.current
            && current >= MIN_MEMLOCK
        {
            let warnings = memlock(1_000_000, 512 << 10).unwrap();
            assert!(
                warnings[0].contains("LimitMEMLOCK=infinity"),
                "{warnings:?}"
            );
        }
    }

    #[test]
    fn io_uring_works_here() {
        io_uring().unwrap();
    }
}
