//! Per-app limits: how many connections an identity may hold, how many
//! requester streams it may keep open, and how many requests a second it
//! may make (a token bucket, with a burst).
//!
//! An app is an identity (the name its credentials proved; every
//! anonymous connection is the identity `anonymous`). Its [`AppUsage`] is
//! shared by every shard, so each limit holds across the broker, not per
//! shard: connections and the rate are counted exactly, with atomics; open
//! streams are counted exactly as they open, and a stream that ends is
//! given back at the connection's next request or within a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one identity may use; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppLimits {
    /// Connections open at once.
    pub max_connections: Option<u32>,
    /// Requester streams (request-response, stream, channel) open at once.
    pub max_streams: Option<u32>,
    /// Requests a second, every interaction model counted.
    pub requests_per_second: Option<u32>,
    /// Requests let through at once above the rate (the bucket's size);
    /// the rate itself when not set.
    pub burst: Option<u32>,
}

impl AppLimits {
    /// Each limit `self` does not set taken from `defaults`.
    pub fn or(self, defaults: &AppLimits) -> AppLimits {
        AppLimits {
            max_connections: self.max_connections.or(defaults.max_connections),
            max_streams: self.max_streams.or(defaults.max_streams),
            requests_per_second: self.requests_per_second.or(defaults.requests_per_second),
            burst: self.burst.or(defaults.burst),
        }
    }

    /// Whether a request has anything to check.
    #[inline]
    pub fn limits_requests(&self) -> bool {
        self.max_streams.is_some() || self.requests_per_second.is_some()
    }
}

/// Which limit refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections`.
    Connections,
    /// `max_streams`.
    Streams,
    /// `requests_per_second`.
    Rate,
}

impl Limit {
    /// Every limit, in the order metrics list them.
    pub const ALL: [Limit; 3] = [Limit::Connections, Limit::Streams, Limit::Rate];

    /// As metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Streams => "streams",
            Limit::Rate => "rate",
        }
    }

    fn index(self) -> usize {
        match self {
            Limit::Connections => 0,
            Limit::Streams => 1,
            Limit::Rate => 2,
        }
    }
}

/// What one identity uses now, across every shard.
#[derive(Debug)]
pub struct AppUsage {
    name: Arc<str>,
    connections: AtomicU32,
    streams: AtomicI64,
    /// The token bucket, kept as the generic cell rate algorithm keeps it:
    /// the time (ns since the registry's epoch) at which the bucket is full
    /// again.
    full_at: AtomicU64,
    /// When the registry first saw no connection hold it (ns since the
    /// epoch, at least 1); 0 while one does.
    idle_since: AtomicU64,
    limited: [AtomicU64; 3],
}

impl AppUsage {
    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            connections: AtomicU32::new(0),
            streams: AtomicI64::new(0),
            full_at: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            limited: Default::default(),
        }
    }

    /// The identity's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections it has open.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Requester streams it has open.
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed).max(0).unsigned_abs()
    }

    /// Times `limit` refused it something.
    pub fn limited(&self, limit: Limit) -> u64 {
        self.limited
            .get(limit.index())
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Counts a refusal by `limit`.
    pub fn note_limited(&self, limit: Limit) {
        if let Some(n) = self.limited.get(limit.index()) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes a connection, unless it already holds `max`.
    pub fn connect(&self, max: Option<u32>) -> bool {
        let held = self.connections.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|max| held >= max) {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives a connection back.
    pub fn disconnect(&self) {
        let _ = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Adds `delta` to the streams it has open (a connection's count
    /// brought up to date).
    pub fn add_streams(&self, delta: i64) {
        if delta != 0 {
            self.streams.fetch_add(delta, Ordering::AcqRel);
        }
    }

    /// Takes a stream, unless it already holds `max`.
    pub fn open_stream(&self, max: u32) -> bool {
        let held = self.streams.fetch_add(1, Ordering::AcqRel);
        if held >= i64::from(max) {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Takes a request from the bucket of `rate` a second holding `burst`,
    /// at `now` (ns since the registry's epoch); `false` when it is empty.
    pub fn take_request(&self, now: u64, rate: u32, burst: u32) -> bool {
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        let tolerance = interval.saturating_mul(u64::from(burst.max(1) - 1));
        self.full_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |full_at| {
                let from = full_at.max(now);
                (from - now <= tolerance).then(|| from.saturating_add(interval))
            })
            .is_ok()
    }

    /// Whether its bucket is full again at `now`.
    fn rested(&self, now: u64) -> bool {
        self.full_at.load(Ordering::Acquire) <= now
    }
}

/// The usage of every identity with a connection, shared by the shards.
#[derive(Debug)]
pub struct AppUsages {
    epoch: Instant,
    map: Mutex<HashMap<Arc<str>, Arc<AppUsage>>>,
}

impl Default for AppUsages {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl AppUsages {
    /// An empty registry whose bucket times count from `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            map: Mutex::default(),
        }
    }

    /// `now` as the buckets count time.
    pub fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<AppUsage>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long an identity no connection holds is kept, with its
    /// counters (its metrics stay that long after its last connection).
    pub const KEEP: Duration = Duration::from_secs(600);

    /// The usage of identity `name`.
    pub fn of(&self, name: &Arc<str>) -> Arc<AppUsage> {
        let usage = self
            .lock()
            .entry(name.clone())
            .or_insert_with(|| Arc::new(AppUsage::new(name.clone())))
            .clone();
        usage.idle_since.store(0, Ordering::Release);
        usage
    }

    /// Forgets the identities no connection has held for [`Self::KEEP`]
    /// whose bucket is full again (forgetting a bucket still being
    /// refilled would give a peer that reconnects a full one). The shards
    /// call this about once a second.
    pub fn sweep(&self, now: Instant) {
        let now = self.nanos(now).max(1);
        let keep = u64::try_from(Self::KEEP.as_nanos()).unwrap_or(u64::MAX);
        self.lock().retain(|_, u| {
            if Arc::strong_count(u) > 1 {
                return true;
            }
            let since = u.idle_since.load(Ordering::Acquire);
            if since == 0 {
                u.idle_since.store(now, Ordering::Release);
                return true;
            }
            now.saturating_sub(since) < keep || !u.rested(now)
        });
    }

    /// Every identity's usage, by name.
    pub fn snapshot(&self) -> Vec<Arc<AppUsage>> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_not_set_come_from_the_defaults() {
        let defaults = AppLimits {
            max_connections: Some(4),
            max_streams: Some(100),
            requests_per_second: Some(10),
            burst: None,
        };
        let own = AppLimits {
            max_streams: Some(5),
            burst: Some(20),
            ..AppLimits::default()
        };
        assert_eq!(
            own.or(&defaults),
            AppLimits {
                max_connections: Some(4),
                max_streams: Some(5),
                requests_per_second: Some(10),
                burst: Some(20),
            }
        );
        assert!(!AppLimits::default().limits_requests());
        assert!(own.limits_requests());
        assert!(
            AppLimits {
                requests_per_second: Some(1),
                ..AppLimits::default()
            }
            .limits_requests()
        );
    }

    #[test]
    fn connections_stop_at_the_limit_and_come_back() {
        let u = AppUsage::new("a".into());
        assert!(u.connect(Some(2)));
        assert!(u.connect(Some(2)));
        assert!(!u.connect(Some(2)));
        assert_eq!(u.connections(), 2);
        u.disconnect();
        assert_eq!(u.connections(), 1);
        assert!(u.connect(Some(2)));
        assert!(u.connect(None));
        assert_eq!(u.connections(), 3);
        for _ in 0..5 {
            u.disconnect();
        }
        assert_eq!(u.connections(), 0, "never below zero");
    }

    #[test]
    fn streams_stop_at_the_limit() {
        let u = AppUsage::new("a".into());
        u.add_streams(2);
        assert!(u.open_stream(3));
        assert!(!u.open_stream(3));
        assert_eq!(u.streams(), 3);
        u.add_streams(-3);
        assert_eq!(u.streams(), 0);
        assert!(u.open_stream(1));
        assert!(!u.open_stream(1));
    }

    #[test]
    fn the_bucket_lets_a_burst_through_then_the_rate() {
        let u = AppUsage::new("a".into());
        let second = 1_000_000_000;
        let t = 10 * second;
        // 10 a second, bursts of 3: three at once, then one every 100 ms.
        assert!((0..3).all(|_| u.take_request(t, 10, 3)));
        assert!(!u.take_request(t, 10, 3));
        assert!(!u.take_request(t + second / 20, 10, 3));
        assert!(u.take_request(t + second / 10, 10, 3));
        assert!(!u.take_request(t + second / 10, 10, 3));
        // A second later the bucket is full again, and holds no more.
        let later = t + 2 * second;
        assert!(u.rested(later));
        assert!((0..3).all(|_| u.take_request(later, 10, 3)));
        assert!(!u.take_request(later, 10, 3));
        // Over a long run the rate holds: 1 a second, burst 1.
        let v = AppUsage::new("b".into());
        let taken = (0..100)
            .filter(|i| v.take_request(i * second / 10, 1, 1))
            .count();
        assert_eq!(taken, 10);
    }

    #[test]
    fn refusals_are_counted_per_limit() {
        let u = AppUsage::new("a".into());
        u.note_limited(Limit::Rate);
        u.note_limited(Limit::Rate);
        u.note_limited(Limit::Streams);
        assert_eq!(u.limited(Limit::Rate), 2);
        assert_eq!(u.limited(Limit::Streams), 1);
        assert_eq!(u.limited(Limit::Connections), 0);
        let names: Vec<_> = Limit::ALL.iter().map(|l| l.as_str()).collect();
        assert_eq!(names, ["connections", "streams", "rate"]);
    }

    #[test]
    fn the_registry_forgets_only_identities_idle_for_a_while_and_rested() {
        let epoch = Instant::now();
        let usages = AppUsages::new(epoch);
        let names = || -> Vec<String> {
            usages
                .snapshot()
                .iter()
                .map(|u| u.name().to_owned())
                .collect()
        };
        let at = |d: Duration| epoch + d;
        let s = Duration::from_secs;
        let keep = AppUsages::KEEP;
        let held = usages.of(&"held".into());
        let busy = usages.of(&"busy".into());
        // Its bucket (1 a second) is full again 2 s after the epoch.
        assert!(busy.take_request(usages.nanos(at(s(1))), 1, 1));
        drop(busy);
        drop(usages.of(&"idle".into()));
        assert!(Arc::ptr_eq(&held, &usages.of(&"held".into())));
        // Idle ones are kept for KEEP, with their counters.
        usages.sweep(at(Duration::from_millis(1500)));
        assert_eq!(names(), ["busy", "held", "idle"]);
        usages.sweep(at(keep));
        assert_eq!(names(), ["busy", "held", "idle"]);
        usages.sweep(at(keep + s(2)));
        assert_eq!(names(), ["held"]);
        // An identity that connects again is idle from its last release.
        let back = usages.of(&"back".into());
        usages.sweep(at(keep * 2));
        drop(back);
        usages.sweep(at(keep * 3));
        drop(usages.of(&"back".into()));
        usages.sweep(at(keep * 4));
        usages.sweep(at(keep * 4 + s(1)));
        assert_eq!(names(), ["back", "held"], "idle again only since keep * 4");
        usages.sweep(at(keep * 5));
        assert_eq!(names(), ["held"]);
        // A bucket still refilling is kept past KEEP.
        let slow = usages.of(&"slow".into());
        let far = usages.nanos(at(keep * 6));
        assert!(slow.take_request(far, 1, 1));
        assert!(!slow.take_request(far, 1, 1));
        drop(slow);
        usages.sweep(at(keep * 5));
        usages.sweep(at(keep * 6));
        assert_eq!(names(), ["held", "slow"]);
        usages.sweep(at(keep * 6 + s(2)));
        assert_eq!(names(), ["held"]);
        assert_eq!(usages.nanos(epoch - s(1)), 0);
        assert_eq!(usages.nanos(at(s(2))), 2_000_000_000);
    }
}
