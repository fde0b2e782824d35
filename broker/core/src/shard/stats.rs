//! Counters: per shard, and per service by interaction model.

use rsocket_proto::conn::Interaction;

use super::Shard;
use crate::service::ServiceKey;

/// Counters of one shard, summed over shards for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Connections accepted.
    pub connections_opened: u64,
    /// Connections closed.
    pub connections_closed: u64,
    /// Requests routed to an instance.
    pub requests_routed: u64,
    /// Requests refused (no route, no live instance, stream limit, draining, ...).
    pub requests_rejected: u64,
    /// Requests refused because their connection may not call the service
    /// (counted in `requests_rejected` too).
    pub requests_denied: u64,
    /// SETUPs refused for their credentials, what they publish, or their
    /// identity's connection limit.
    pub setups_refused: u64,
    /// SETUPs refused because their identity had as many connections as
    /// its limit (counted in `setups_refused` too).
    pub setups_limited: u64,
    /// SETUPs refused without their credentials being checked: their peer
    /// address, or the shard, had too many failed authentications lately
    /// (counted in `setups_refused` too).
    pub setups_throttled: u64,
    /// Refused SETUPs not logged a line each: past
    /// [`crate::trust::failures::LOGGED_PER_SECOND`] a second (those refused
    /// unchecked are in `setups_throttled` instead).
    pub refusals_unlogged: u64,
    /// Requests refused because their identity was at its limit of open
    /// streams or of requests a second (counted in `requests_rejected` too).
    pub requests_limited: u64,
    /// Services not exposed by METADATA_PUSH because their connection may
    /// not publish them.
    pub publishes_refused: u64,
    /// Connections closed because their credentials expired.
    pub credentials_expired: u64,
    /// Requests retried on another instance.
    pub requests_retried: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Times a connection was paused because a connection it feeds was full.
    pub pauses: u64,
    /// Times a connection was paused because the shard its frames go to
    /// had too many of this shard's frames still to handle.
    pub mesh_pauses: u64,
    /// Times a connection was not read because the shard was over its
    /// memory budget and it held the most.
    pub overload_pauses: u64,
    /// Connections closed for a limit: a slow consumer past
    /// `backpressure_timeout`, `max_connection_memory`, or the largest
    /// holder of a spent memory budget.
    pub closed_over_limit: u64,
}

/// Requests and errors of one service on one shard, by interaction model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    requests: [u64; 4],
    errors: [u64; 4],
}

impl ServiceCounters {
    /// Every interaction model, in a fixed order.
    pub const INTERACTIONS: [Interaction; 4] = [
        Interaction::RequestResponse,
        Interaction::FireAndForget,
        Interaction::Stream,
        Interaction::Channel,
    ];

    /// Requests of `interaction` routed to an instance.
    pub fn requests(&self, interaction: Interaction) -> u64 {
        self.requests
            .get(interaction_index(interaction))
            .copied()
            .unwrap_or(0)
    }

    /// Requests routed, all interaction models together.
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Requests that ended with an error, all interaction models together.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Requests of `interaction` that ended with an ERROR from the
    /// instance, or because the instance went away.
    pub fn errors(&self, interaction: Interaction) -> u64 {
        self.errors
            .get(interaction_index(interaction))
            .copied()
            .unwrap_or(0)
    }
}

/// The index of an interaction model in [`ServiceCounters`]' arrays.
fn interaction_index(interaction: Interaction) -> usize {
    match interaction {
        Interaction::RequestResponse => 0,
        Interaction::FireAndForget => 1,
        Interaction::Stream => 2,
        Interaction::Channel => 3,
    }
}

#[derive(Clone, Copy)]
pub(super) enum Count {
    Request,
    Error,
}

impl Shard {
    /// Counters.
    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Requests and errors per service, counted on this shard (the
    /// requester's) since it started.
    pub fn service_counters(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceCounters)> {
        self.service_stats.iter()
    }

    pub(super) fn count(&mut self, service: &ServiceKey, interaction: Interaction, what: Count) {
        let i = interaction_index(interaction);
        let counters = match self.service_stats.get_mut(service) {
            Some(c) => c,
            None => self.service_stats.entry(service.clone()).or_default(),
        };
        let counts = match what {
            Count::Request => &mut counters.requests,
            Count::Error => &mut counters.errors,
        };
        if let Some(n) = counts.get_mut(i) {
            *n += 1;
        }
    }
}
