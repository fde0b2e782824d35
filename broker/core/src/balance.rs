//! Choosing an instance for a request: the per-service policy (balancer
//! and failover) and the balancers themselves.

use std::fmt;
use std::str::FromStr;

use rustc_hash::FxHashMap;

use crate::service::ServiceKey;

/// How requests to a service are spread over its instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Balancer {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// A uniformly random instance.
    Random,
    /// Random, in proportion to each app's `powerRating`.
    Weighted,
    /// The less busy of two random instances (requests this shard has
    /// outstanding on each).
    LeastOutstanding,
    /// The same instance for the same value of the routing tag `tag`
    /// (rendezvous hashing; instances joining or leaving move only their share).
    ConsistentHash {
        /// The routing tag whose value is hashed, as in `tag=value`.
        tag: String,
    },
}

impl Balancer {
    /// The names [`Balancer`]'s `FromStr` takes, for messages.
    pub const NAMES: &str = "round-robin, random, weighted, least-outstanding, hash:TAG";
}

/// How a balancer is written in the config and on the command line.
impl fmt::Display for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RoundRobin => f.write_str("round-robin"),
            Self::Random => f.write_str("random"),
            Self::Weighted => f.write_str("weighted"),
            Self::LeastOutstanding => f.write_str("least-outstanding"),
            Self::ConsistentHash { tag } => write!(f, "hash:{tag}"),
        }
    }
}

impl FromStr for Balancer {
    type Err = String;

    /// `round-robin`, `random`, `weighted`, `least-outstanding` or `hash:TAG`.
    fn from_str(name: &str) -> Result<Self, String> {
        Ok(match name {
            "round-robin" => Self::RoundRobin,
            "random" => Self::Random,
            "weighted" => Self::Weighted,
            "least-outstanding" => Self::LeastOutstanding,
            _ => match name.strip_prefix("hash:") {
                Some(tag) if !tag.is_empty() => Self::ConsistentHash {
                    tag: tag.to_owned(),
                },
                _ => return Err(format!("unknown balancer {name:?} ({})", Self::NAMES)),
            },
        })
    }
}

/// What happens to a request-response whose instance goes away before it answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Failover {
    /// The requester gets the error.
    #[default]
    FailFast,
    /// The request is sent to another instance, at most `attempts` more times.
    Retry {
        /// Retries allowed.
        attempts: u32,
    },
}

/// Balancer and failover of one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePolicy {
    /// How instances are chosen.
    pub balancer: Balancer,
    /// What happens when an instance disappears under a request.
    pub failover: Failover,
}

impl FromStr for ServicePolicy {
    type Err = String;

    /// `BALANCER[,retry=N]`: a balancer as [`Balancer`] parses it, and
    /// with `retry=N` (N > 0) a request-response is retried on another
    /// instance at most N times.
    fn from_str(spec: &str) -> Result<Self, String> {
        let mut policy = Self::default();
        for (i, part) in spec.split(',').enumerate() {
            if i == 0 {
                policy.balancer = part.parse()?;
            } else if let Some(n) = part.strip_prefix("retry=") {
                let attempts = n
                    .parse()
                    .map_err(|_| format!("retry must be a number, got {n:?}"))?;
                policy.failover = if attempts == 0 {
                    Failover::FailFast
                } else {
                    Failover::Retry { attempts }
                };
            } else {
                return Err(format!("unknown option {part:?} (expected retry=N)"));
            }
        }
        Ok(policy)
    }
}

/// Policies per service, with a default.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    /// For services not listed.
    pub default: ServicePolicy,
    /// By full service key (`group!service:version`) or by service name alone.
    pub services: FxHashMap<String, ServicePolicy>,
}

impl Policies {
    /// The policy for `key`: the one listed under the whole key, else the
    /// one under its service name alone, else the default.
    pub fn for_service(&self, key: &ServiceKey) -> &ServicePolicy {
        if self.services.is_empty() {
            // The common case, looked at on every request.
            return &self.default;
        }
        self.services
            .get(key.as_str())
            .or_else(|| self.services.get(key.name()))
            .unwrap_or(&self.default)
    }
}

/// A small deterministic generator (xorshift64*), so a seeded shard makes
/// the same choices every run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 32) as usize * n) >> 32
    }
}

/// One candidate instance for a request (borrowed from the route table:
/// gathering candidates takes no reference count).
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Instance uuid.
    pub uuid: &'a str,
    /// Its power rating (>= 1).
    pub weight: u32,
    /// Requests this shard has outstanding on it.
    pub outstanding: u32,
    /// It has a connection on the requester's shard.
    pub local: bool,
}

/// Per-shard balancer state.
#[derive(Debug, Default)]
pub struct BalancerState {
    cursors: FxHashMap<ServiceKey, usize>,
}

fn hash64(bytes: &[u8], seed: u64) -> u64 {
    // FNV-1a then a mix: stable across runs and builds.
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

impl BalancerState {
    /// Index into `candidates` (non-empty) chosen by `balancer`; `hash_key`
    /// is the value of the consistent-hash tag, when the request has one.
    pub fn pick(
        &mut self,
        service: &ServiceKey,
        balancer: &Balancer,
        candidates: &[Candidate<'_>],
        hash_key: Option<&[u8]>,
        rng: &mut Rng,
    ) -> usize {
        let n = candidates.len();
        if n <= 1 {
            return 0;
        }
        match balancer {
            Balancer::RoundRobin => self.round_robin(service, n),
            Balancer::Random => rng.below(n),
            Balancer::Weighted => {
                let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
                let mut point = rng.next_u64() % total.max(1);
                for (i, c) in candidates.iter().enumerate() {
                    if point < u64::from(c.weight) {
                        return i;
                    }
                    point -= u64::from(c.weight);
                }
                n - 1
            }
            Balancer::LeastOutstanding => {
                let a = rng.below(n);
                let mut b = rng.below(n - 1);
                if b >= a {
                    b += 1;
                }
                // A local connection saves a hop across cores: prefer it when loads tie.
                let load = |i: usize| {
                    candidates.get(i).map_or(u64::MAX, |c| {
                        u64::from(c.outstanding) * 2 + u64::from(!c.local)
                    })
                };
                if load(b) < load(a) { b } else { a }
            }
            Balancer::ConsistentHash { .. } => match hash_key {
                Some(key) => {
                    let h = hash64(key, 0);
                    candidates
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, c)| hash64(c.uuid.as_bytes(), h))
                        .map_or(0, |(i, _)| i)
                }
                None => self.round_robin(service, n),
            },
        }
    }

    fn round_robin(&mut self, service: &ServiceKey, n: usize) -> usize {
        let cursor = match self.cursors.get_mut(service) {
            Some(c) => c,
            None => self.cursors.entry(service.clone()).or_insert(0),
        };
        let at = *cursor % n;
        *cursor = cursor.wrapping_add(1);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `consistent_hash_placement_does_not_change_between_builds`
    /// finds its keys, and two hashes it pins.
    const PLACEMENT: [usize; 16] = [0, 2, 0, 4, 2, 0, 0, 0, 2, 1, 4, 3, 4, 4, 4, 2];
    const HASH_OF_USER_1: u64 = 4_026_680_691_944_232_749;
    const HASH_OF_U1_SEEDED: u64 = 2_461_773_731_029_167_466;

    fn uuids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("u{i}")).collect()
    }

    fn candidates(uuids: &[String]) -> Vec<Candidate<'_>> {
        uuids
            .iter()
            .map(|u| Candidate {
                uuid: u,
                weight: 1,
                outstanding: 0,
                local: false,
            })
            .collect()
    }

    #[test]
    fn balancer_names_parse_back_to_themselves() {
        for name in [
            "round-robin",
            "random",
            "weighted",
            "least-outstanding",
            "hash:user",
        ] {
            let balancer: Balancer = name.parse().unwrap();
            assert_eq!(balancer.to_string(), name);
        }
        assert_eq!(
            "hash:user".parse::<Balancer>(),
            Ok(Balancer::ConsistentHash { tag: "user".into() })
        );
        for bad in ["", "hash:", "fastest", "Round-Robin"] {
            let err = bad.parse::<Balancer>().unwrap_err();
            assert!(err.contains(Balancer::NAMES), "{err}");
        }
        let policy: ServicePolicy = "weighted,retry=2".parse().unwrap();
        assert_eq!(policy.balancer, Balancer::Weighted);
        assert_eq!(policy.failover, Failover::Retry { attempts: 2 });
        assert_eq!(
            "random,retry=0".parse::<ServicePolicy>().unwrap().failover,
            Failover::FailFast
        );
        assert!("random,sticky".parse::<ServicePolicy>().is_err());
    }

    #[test]
    fn round_robin_cycles() {
        let mut s = BalancerState::default();
        let mut rng = Rng::new(1);
        let key = ServiceKey::new("", "s", "");
        let u = uuids(3);
        let c = candidates(&u);
        let picks: Vec<usize> = (0..6)
            .map(|_| s.pick(&key, &Balancer::RoundRobin, &c, None, &mut rng))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_follows_power_rating() {
        let mut s = BalancerState::default();
        let mut rng = Rng::new(7);
        let key = ServiceKey::new("", "s", "");
        let u = uuids(2);
        let mut c = candidates(&u);
        c[1].weight = 9;
        let heavy = (0..10_000)
            .filter(|_| s.pick(&key, &Balancer::Weighted, &c, None, &mut rng) == 1)
            .count();
        assert!((8_500..9_500).contains(&heavy), "{heavy}");
    }

    #[test]
    fn least_outstanding_avoids_the_busy_one() {
        let mut s = BalancerState::default();
        let mut rng = Rng::new(3);
        let key = ServiceKey::new("", "s", "");
        let u = uuids(2);
        let mut c = candidates(&u);
        c[0].outstanding = 50;
        for _ in 0..100 {
            assert_eq!(
                s.pick(&key, &Balancer::LeastOutstanding, &c, None, &mut rng),
                1
            );
        }
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_little() {
        let mut s = BalancerState::default();
        let mut rng = Rng::new(3);
        let key = ServiceKey::new("", "s", "");
        let b = Balancer::ConsistentHash { tag: "h".into() };
        let u = uuids(5);
        let c5 = candidates(&u);
        let before: Vec<&str> = (0..1000)
            .map(|k| c5[s.pick(&key, &b, &c5, Some(format!("k{k}").as_bytes()), &mut rng)].uuid)
            .collect();
        let again: Vec<&str> = (0..1000)
            .map(|k| c5[s.pick(&key, &b, &c5, Some(format!("k{k}").as_bytes()), &mut rng)].uuid)
            .collect();
        assert_eq!(before, again);
        let c4: Vec<Candidate<'_>> = c5[..4].to_vec();
        let moved = (0..1000)
            .filter(|k| {
                let now =
                    c4[s.pick(&key, &b, &c4, Some(format!("k{k}").as_bytes()), &mut rng)].uuid;
                now != before[*k as usize] && before[*k as usize] != "u4"
            })
            .count();
        assert_eq!(moved, 0, "only the removed instance's keys move");
    }

    #[test]
    fn consistent_hash_spreads_keys_over_every_instance() {
        let mut s = BalancerState::default();
        let mut rng = Rng::new(3);
        let key = ServiceKey::new("", "s", "");
        let b = Balancer::ConsistentHash { tag: "h".into() };
        let u = uuids(5);
        let c = candidates(&u);
        let mut per = [0usize; 5];
        for k in 0..1000 {
            per[s.pick(&key, &b, &c, Some(format!("k{k}").as_bytes()), &mut rng)] += 1;
        }
        // About 200 each; a hash that ignored the key would give one all.
        assert!(per.iter().all(|n| (120..280).contains(n)), "{per:?}");
    }

    #[test]
    fn consistent_hash_without_a_key_takes_turns() {
        let mut s = BalancerState::default();
        let mut rng = Rng::new(3);
        let key = ServiceKey::new("", "s", "");
        let b = Balancer::ConsistentHash { tag: "h".into() };
        let u = uuids(3);
        let c = candidates(&u);
        let picks: Vec<usize> = (0..6)
            .map(|_| s.pick(&key, &b, &c, None, &mut rng))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn rng_draws_are_uniform_and_do_not_repeat() {
        let mut rng = Rng::new(42);
        let mut per = [0usize; 4];
        for _ in 0..4000 {
            per[rng.below(4)] += 1;
        }
        assert!(per.iter().all(|n| (850..1150).contains(n)), "{per:?}");
        let draws: std::collections::HashSet<u64> = (0..1000).map(|_| rng.next_u64()).collect();
        assert_eq!(draws.len(), 1000, "a 64-bit generator repeating itself");
        let mut bits = [0u32; 64];
        for _ in 0..1000 {
            let x = rng.next_u64();
            for (i, b) in bits.iter_mut().enumerate() {
                *b += ((x >> i) & 1) as u32;
            }
        }
        assert!(
            bits.iter().all(|n| (400..600).contains(n)),
            "every bit is set about half the time: {bits:?}"
        );
    }

    #[test]
    fn consistent_hash_placement_does_not_change_between_builds() {
        // Every shard, and every broker of a release, must send a key to
        // the same instance: a change to the hash moves keys on upgrade.
        let mut s = BalancerState::default();
        let mut rng = Rng::new(1);
        let key = ServiceKey::new("", "s", "");
        let b = Balancer::ConsistentHash { tag: "h".into() };
        let u = uuids(5);
        let c = candidates(&u);
        let placed: Vec<usize> = (0..16)
            .map(|k| s.pick(&key, &b, &c, Some(format!("user-{k}").as_bytes()), &mut rng))
            .collect();
        assert_eq!(placed, PLACEMENT);
        assert_eq!(hash64(b"user-1", 0), HASH_OF_USER_1);
        assert_eq!(hash64(b"u1", HASH_OF_USER_1), HASH_OF_U1_SEEDED);
    }

    #[test]
    fn weighted_spreads_over_three_by_their_weights() {
        let mut s = BalancerState::default();
        let mut rng = Rng::new(11);
        let key = ServiceKey::new("", "s", "");
        let u = uuids(3);
        let mut c = candidates(&u);
        c[2].weight = 8;
        let mut per = [0usize; 3];
        for _ in 0..10_000 {
            per[s.pick(&key, &Balancer::Weighted, &c, None, &mut rng)] += 1;
        }
        // 10%, 10%, 80%.
        assert!((800..1200).contains(&per[0]), "{per:?}");
        assert!((800..1200).contains(&per[1]), "{per:?}");
        assert!((7600..8400).contains(&per[2]), "{per:?}");
    }

    #[test]
    fn least_outstanding_prefers_a_local_instance_only_when_loads_tie() {
        let mut s = BalancerState::default();
        let mut rng = Rng::new(5);
        let key = ServiceKey::new("", "s", "");
        let u = uuids(2);
        let mut c = candidates(&u);
        c[0].local = true;
        for _ in 0..100 {
            assert_eq!(
                s.pick(&key, &Balancer::LeastOutstanding, &c, None, &mut rng),
                0,
                "idle both: the local one saves a hop"
            );
        }
        c[0].outstanding = 1;
        for _ in 0..100 {
            assert_eq!(
                s.pick(&key, &Balancer::LeastOutstanding, &c, None, &mut rng),
                1,
                "one request more outweighs being local"
            );
        }
    }

    #[test]
    fn rng_below_is_in_range() {
        let mut rng = Rng::new(0);
        for n in 1..50 {
            assert!(rng.below(n) < n);
        }
    }
}
