//! Failed authentications, counted per peer address and per shard.
//!
//! Checking a bearer token's signature costs up to 170 µs of the shard
//! (ES256), a bad signature as much as a good one. A peer that opens
//! connection after connection with forged tokens, or guesses secrets,
//! would keep its shard busy checking them while the other connections
//! there waited. So a shard counts failed authentications: one peer address
//! may fail a few times in a row and then a few times a minute, and the
//! shard as a whole some number of times a second. Past either, SETUPs
//! with credentials to check are refused without checking them, which
//! costs about as much as an anonymous SETUP. Tokens the shard has already
//! verified (its token cache) and SETUPs without credentials are not
//! affected.

use std::collections::HashMap;
use std::net::IpAddr;

/// How many failed authentications a shard allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureLimits {
    /// Failures one peer address may have in a row (an IPv6 address counts
    /// with its /64).
    pub per_address_burst: u32,
    /// Failures one peer address may have a minute after those.
    pub per_address_per_minute: u32,
    /// Failures a second on one shard, from every address together (and as
    /// many in a row).
    pub per_shard_per_second: u32,
}

impl Default for FailureLimits {
    fn default() -> Self {
        Self {
            per_address_burst: 10,
            per_address_per_minute: 30,
            per_shard_per_second: 100,
        }
    }
}

/// Addresses a shard remembers failures of; failures from addresses past
/// them count only against the shard's own budget.
pub const MAX_ADDRESSES: usize = 4096;

/// A bucket of `burst` failures that refills one every `interval` ns:
/// `full_at` is when it is full again.
#[derive(Clone, Copy, Debug)]
struct Budget {
    interval: u64,
    burst: u32,
}

impl Budget {
    fn per_address(limits: &FailureLimits) -> Self {
        Self {
            interval: 60_000_000_000 / u64::from(limits.per_address_per_minute.max(1)),
            burst: limits.per_address_burst,
        }
    }

    fn per_shard(limits: &FailureLimits) -> Self {
        Self {
            interval: 1_000_000_000 / u64::from(limits.per_shard_per_second.max(1)),
            burst: limits.per_shard_per_second,
        }
    }

    /// Whether the bucket full at `full_at` has a failure left at `now`.
    fn has_room(self, full_at: u64, now: u64) -> bool {
        let tolerance = self
            .interval
            .saturating_mul(u64::from(self.burst.max(1) - 1));
        full_at.saturating_sub(now) <= tolerance
    }

    /// When the bucket full at `full_at` is full again once one more
    /// failure is taken from it at `now`.
    fn take(self, full_at: u64, now: u64) -> u64 {
        full_at.max(now).saturating_add(self.interval)
    }
}

/// The address failures from `ip` count against: an IPv4 address, or the
/// /64 an IPv6 address is in (what one host is usually given).
pub fn failure_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// The failed authentications of one shard.
#[derive(Debug, Default)]
pub struct FailedSetups {
    /// Per address (see [`failure_key`]): when its bucket is full again, in
    /// ns of the shard's clock.
    addresses: HashMap<IpAddr, u64>,
    /// When the shard's bucket is full again.
    shard: u64,
}

impl FailedSetups {
    /// Why a SETUP from `ip` is refused at `now` without its credentials
    /// being checked, if it is.
    pub fn refuses(&self, ip: Option<IpAddr>, now: u64, limits: &FailureLimits) -> Option<String> {
        if let Some(key) = ip.map(failure_key)
            && let Some(&full_at) = self.addresses.get(&key)
            && !Budget::per_address(limits).has_room(full_at, now)
        {
            let prefix = if key.is_ipv6() { "/64" } else { "" };
            return Some(format!(
                "too many failed authentications from {key}{prefix} (more than {} in a row, then {} a minute); \
                 this SETUP's credentials were not checked",
                limits.per_address_burst, limits.per_address_per_minute
            ));
        }
        if !Budget::per_shard(limits).has_room(self.shard, now) {
            return Some(format!(
                "too many failed authentications on this shard (more than {} a second); \
                 this SETUP's credentials were not checked, try again in a second",
                limits.per_shard_per_second
            ));
        }
        None
    }

    /// A SETUP from `ip` failed authentication at `now`. Returns whether
    /// that was its address's last failure let through for now.
    pub fn failed(&mut self, ip: Option<IpAddr>, now: u64, limits: &FailureLimits) -> bool {
        self.shard = Budget::per_shard(limits).take(self.shard, now);
        let Some(key) = ip.map(failure_key) else {
            return false;
        };
        if self.addresses.len() >= MAX_ADDRESSES && !self.addresses.contains_key(&key) {
            return false;
        }
        let budget = Budget::per_address(limits);
        let full_at = self.addresses.entry(key).or_insert(0);
        *full_at = budget.take(*full_at, now);
        !budget.has_room(*full_at, now)
    }

    /// Forgets the addresses whose bucket is full again at `now`.
    pub fn sweep(&mut self, now: u64) {
        self.addresses.retain(|_, full_at| *full_at > now);
    }

    /// Addresses remembered.
    pub fn addresses(&self) -> usize {
        self.addresses.len()
    }
}

/// Refused SETUPs a shard logs a second, a line each; past them it counts
/// them, and says in its next line how many it left out.
pub const LOGGED_PER_SECOND: u32 = 20;

/// The refused SETUPs a shard has logged this second.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// When this second began (ns, the shard's clock).
    since: u64,
    logged: u32,
    left_out: u64,
}

impl RefusalLog {
    /// Whether a refusal at `now` gets its line; if it does, how many
    /// were left out before it.
    pub fn admit(&mut self, now: u64) -> Option<u64> {
        if now.saturating_sub(self.since) >= 1_000_000_000 {
            self.since = now;
            self.logged = 0;
        }
        if self.logged >= LOGGED_PER_SECOND {
            self.left_out += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    fn limits() -> FailureLimits {
        FailureLimits {
            per_address_burst: 3,
            per_address_per_minute: 60,
            per_shard_per_second: 100,
        }
    }

    #[test]
    fn an_address_fails_its_burst_then_once_a_refill() {
        let (l, mut f) = (limits(), FailedSetups::default());
        let a = ip("10.0.0.1");
        for i in 0..3 {
            assert_eq!(f.refuses(a, 0, &l), None, "failure {i}");
            assert_eq!(f.failed(a, 0, &l), i == 2, "failure {i}");
        }
        let why = f.refuses(a, 0, &l).unwrap();
        assert!(
            why.contains("from 10.0.0.1 (more than 3 in a row, then 60 a minute)"),
            "{why}"
        );
        assert!(f.refuses(a, SECOND - 1, &l).is_some());
        // One a second comes back.
        assert_eq!(f.refuses(a, SECOND, &l), None);
        assert!(f.failed(a, SECOND, &l));
        assert!(f.refuses(a, SECOND, &l).is_some());
        // Another address, and a SETUP without one, are not held to it.
        assert_eq!(f.refuses(ip("10.0.0.2"), SECOND, &l), None);
        assert_eq!(f.refuses(None, SECOND, &l), None);
    }

    #[test]
    fn the_shard_refuses_every_address_past_its_own_budget() {
        let (l, mut f) = (limits(), FailedSetups::default());
        for i in 0..100u32 {
            let a = Some(IpAddr::from([10, 0, (i >> 8) as u8, i as u8]));
            assert_eq!(f.refuses(a, 0, &l), None, "failure {i}");
            f.failed(a, 0, &l);
        }
        let why = f.refuses(ip("10.1.0.1"), 0, &l).unwrap();
        assert!(
            why.contains("on this shard (more than 100 a second)"),
            "{why}"
        );
        assert!(f.refuses(None, 0, &l).is_some());
        assert_eq!(f.refuses(ip("10.1.0.1"), SECOND / 100, &l), None);
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let (l, mut f) = (limits(), FailedSetups::default());
        for host in ["2001:db8::1", "2001:db8::2", "2001:db8::ffff:3"] {
            f.failed(ip(host), 0, &l);
        }
        let why = f.refuses(ip("2001:db8::9"), 0, &l).unwrap();
        assert!(why.contains("from 2001:db8::/64 ("), "{why}");
        assert_eq!(f.refuses(ip("2001:db8:0:1::1"), 0, &l), None);
        for _ in 0..3 {
            f.failed(ip("::ffff:192.0.2.7"), 0, &l);
        }
        assert!(f.refuses(ip("192.0.2.7"), 0, &l).is_some());
    }

    #[test]
    fn addresses_are_forgotten_once_refilled_and_bounded() {
        let mut l = limits();
        l.per_shard_per_second = u32::MAX;
        let mut f = FailedSetups::default();
        for i in 0..MAX_ADDRESSES as u32 + 10 {
            f.failed(Some(IpAddr::from(i.to_be_bytes())), 0, &l);
        }
        assert_eq!(f.addresses(), MAX_ADDRESSES);
        f.sweep(SECOND - 1);
        assert_eq!(f.addresses(), MAX_ADDRESSES);
        f.sweep(SECOND);
        assert_eq!(f.addresses(), 0);
    }

    #[test]
    fn refusals_are_logged_so_many_a_second_and_the_rest_counted() {
        let mut log = RefusalLog::default();
        for i in 0..LOGGED_PER_SECOND {
            assert_eq!(log.admit(u64::from(i)), Some(0), "refusal {i}");
        }
        for _ in 0..5 {
            assert_eq!(log.admit(SECOND - 1), None);
        }
        assert_eq!(log.admit(SECOND + 7), Some(5));
        assert_eq!(log.admit(SECOND + 8), Some(0));
        for _ in 2..LOGGED_PER_SECOND {
            assert!(log.admit(2 * SECOND + 6).is_some());
        }
        assert_eq!(log.admit(2 * SECOND + 6), None);
        assert_eq!(log.admit(2 * SECOND + 7), Some(1));
    }
}
