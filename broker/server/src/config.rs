//! The broker's settings and how policies are written on the command line.

use std::time::Duration;

use rsbroker_core::{Balancer, Failover, Policies, ServicePolicy};
use rsbroker_transports::ListenAddr;

/// Everything a broker needs to start.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Addresses to listen on; every shard listens on each.
    pub listen: Vec<ListenAddr>,
    /// Number of shards, one executor per core; 0 means one per available core.
    pub shards: usize,
    /// CPUs to pin shards to, in order (default: the available cores).
    pub cores: Option<Vec<usize>>,
    /// Balancer and failover per service.
    pub policies: Policies,
    /// Largest frame accepted (and sent), in bytes.
    pub max_frame_size: usize,
    /// Unsent bytes above which a connection pauses the connections feeding it.
    pub max_pending_bytes: usize,
    /// Most streams a connection may have open towards the broker.
    pub max_streams_per_connection: usize,
    /// Batches each cross-shard queue holds before its sender waits.
    pub mesh_capacity: usize,
    /// glommio I/O memory per shard (locked memory).
    pub io_memory: usize,
    /// How long an idle shard spins before it parks (0: park at once).
    pub spin_before_park: Duration,
    /// How long a stopping broker waits for connections to close.
    pub shutdown_grace: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: vec![ListenAddr::Tcp(([0, 0, 0, 0], 9999).into())],
            shards: 0,
            cores: None,
            policies: Policies::default(),
            max_frame_size: rsocket_proto::frame::MAX_U24,
            max_pending_bytes: 4 << 20,
            max_streams_per_connection: 65_536,
            mesh_capacity: 1024,
            io_memory: 512 << 10,
            spin_before_park: Duration::ZERO,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Parses `SERVICE=BALANCER[,retry=N]`, where BALANCER is `round-robin`,
/// `random`, `weighted`, `least-outstanding` or `hash:TAG`.
pub fn parse_policy(text: &str) -> Result<(String, ServicePolicy), String> {
    let (service, spec) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected SERVICE=BALANCER[,retry=N]"))?;
    if service.is_empty() {
        return Err(format!("{text:?}: the service name is empty"));
    }
    let mut policy = ServicePolicy::default();
    for (i, part) in spec.split(',').enumerate() {
        if i == 0 {
            policy.balancer = parse_balancer(part).map_err(|e| format!("{text:?}: {e}"))?;
        } else if let Some(n) = part.strip_prefix("retry=") {
            let attempts = n
                .parse()
                .map_err(|_| format!("{text:?}: retry must be a number, got {n:?}"))?;
            policy.failover = if attempts == 0 {
                Failover::FailFast
            } else {
                Failover::Retry { attempts }
            };
        } else {
            return Err(format!(
                "{text:?}: unknown option {part:?} (expected retry=N)"
            ));
        }
    }
    Ok((service.to_owned(), policy))
}

/// Parses a balancer name.
pub fn parse_balancer(name: &str) -> Result<Balancer, String> {
    Ok(match name {
        "round-robin" => Balancer::RoundRobin,
        "random" => Balancer::Random,
        "weighted" => Balancer::Weighted,
        "least-outstanding" => Balancer::LeastOutstanding,
        _ => match name.strip_prefix("hash:") {
            Some(tag) if !tag.is_empty() => Balancer::ConsistentHash {
                tag: tag.to_owned(),
            },
            _ => {
                return Err(format!(
                    "unknown balancer {name:?} (round-robin, random, weighted, least-outstanding, hash:TAG)"
                ));
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        assert_eq!(
            parse_policy("echo=random").unwrap(),
            (
                "echo".into(),
                ServicePolicy {
                    balancer: Balancer::Random,
                    failover: Failover::FailFast
                }
            )
        );
        assert_eq!(
            parse_policy("a.B=hash:user,retry=2").unwrap().1,
            ServicePolicy {
                balancer: Balancer::ConsistentHash { tag: "user".into() },
                failover: Failover::Retry { attempts: 2 }
            }
        );
        assert!(parse_policy("x").unwrap_err().contains("expected"));
        assert!(
            parse_policy("x=fastest")
                .unwrap_err()
                .contains("unknown balancer")
        );
        assert!(
            parse_policy("x=random,retry=lots")
                .unwrap_err()
                .contains("number")
        );
        assert!(parse_policy("x=hash:").is_err());
    }
}
