//! Trust on a shard: a SETUP's credentials and what it publishes, each
//! request's service against what its connection may call, credentials
//! that expire while their connection is open, per-app limits, and rules
//! replaced on reload (see [`crate::trust`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rsocket_proto::ErrorCode;

use super::{Conn, Shard};
use crate::app::SetupInfo;
use crate::routes::RouteChange;
use crate::service::ServiceKey;
use crate::trust::{Credentials, Limit};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Shard {
    /// Checks a SETUP's credentials and the services it publishes. On
    /// success the connection has its identity and grant; otherwise its
    /// SETUP is refused with REJECTED_SETUP and `false` returned.
    pub(super) fn admit(&mut self, slot: usize, info: &SetupInfo) -> bool {
        let trust = self.config.trust.clone();
        let Some(c) = self.conns.get_mut(slot) else {
            return false;
        };
        let now = unix_now();
        // Credentials to check (a secret, a token not verified here
        // before, authentication metadata to make sense of) are not
        // checked for a peer, or a shard, that failed too often lately.
        let ip = c.peer.addr.map(|a| a.ip());
        let clock = self.config.usage.nanos(self.now);
        let checked = info.auth_problem.is_some()
            || info.simple.is_some()
            || info
                .bearer
                .as_deref()
                .is_some_and(|t| self.tokens.get(t, now).is_none());
        let unchecked = checked
            .then(|| self.failed.refuses(ip, clock, &trust.failures))
            .flatten();
        let unchecked_refusal = unchecked.is_some();
        let verdict = if let Some(why) = unchecked {
            self.stats.setups_throttled += 1;
            Err(format!("authentication refused: {why}"))
        } else {
            let verdict = match &info.auth_problem {
                Some(problem) => Err(problem.clone()),
                None => trust.authenticate(
                    &Credentials {
                        bearer: info.bearer.as_deref(),
                        simple: info.simple.as_ref().map(|(u, s)| (&u[..], &s[..])),
                        certificate: c.peer.certificate.as_deref(),
                    },
                    now,
                    &mut self.tokens,
                ),
            };
            verdict.map_err(|reason| {
                if checked && self.failed.failed(ip, clock, &trust.failures) {
                    tracing::warn!(peer = ?ip, "too many failed authentications: SETUPs from this address are refused unchecked for now");
                }
                format!("authentication failed: {reason}")
            })
        };
        let refusal = match verdict {
            Err(reason) => Err(reason),
            Ok(identity) => {
                let grant = trust.grant(&identity);
                let limits = trust.limits(&identity);
                let usage = self.config.usage.of(&identity.name);
                let owner = info
                    .app
                    .as_ref()
                    .and_then(|app| self.routes.instance(&app.uuid))
                    .and_then(|i| i.app.identity.clone());
                if let Some(s) = info.services.iter().find(|s| !grant.may_publish(s)) {
                    Err(format!(
                        "identity {} may not publish service {s}",
                        identity.name
                    ))
                } else if let Some(owner) = owner.filter(|o| **o != *identity.name) {
                    Err(format!(
                        "instance {} belongs to identity {owner}, not {}",
                        info.app.as_ref().map_or("", |a| &*a.uuid),
                        identity.name
                    ))
                } else if !usage.connect(limits.max_connections) {
                    usage.note_limited(Limit::Connections);
                    self.stats.setups_limited += 1;
                    Err(format!(
                        "identity {} already has {} connections open, its limit",
                        identity.name,
                        limits.max_connections.unwrap_or_default()
                    ))
                } else {
                    c.limits = limits;
                    c.checks_requests = checks_requests(&grant, &limits);
                    c.usage = Some(usage);
                    c.expires = identity
                        .expires
                        .map(|e| self.now + Duration::from_secs(e.saturating_sub(now)));
                    tracing::debug!(conn = %c.id, peer = ?c.peer.addr, identity = %identity.name, method = identity.method.as_str(), "authenticated");
                    c.grant = Some(Arc::new(grant));
                    c.identity = Some(identity);
                    Ok(())
                }
            }
        };
        match refusal {
            Ok(()) => true,
            Err(reason) => {
                // A flood of refused SETUPs must not fill the log: those
                // refused unchecked are not logged one by one (the address
                // running out was, and the metric counts them), and the
                // rest at most so many a second.
                let logged = (!unchecked_refusal)
                    .then(|| self.refusal_log.admit(clock))
                    .flatten();
                match logged {
                    Some(left_out) => {
                        // `not_logged_before`: refusals left out since the
                        // last line, past the lines a second a shard writes.
                        tracing::warn!(conn = %c.id, peer = ?c.peer.addr, %reason, not_logged_before = left_out, "SETUP refused");
                    }
                    None => {
                        self.stats.refusals_unlogged += u64::from(!unchecked_refusal);
                        tracing::debug!(conn = %c.id, peer = ?c.peer.addr, %reason, "SETUP refused");
                    }
                }
                c.proto.reject_setup(ErrorCode::REJECTED_SETUP, reason);
                self.stats.setups_refused += 1;
                false
            }
        }
    }

    /// Why connection `slot` may not make a request of `service` now, if
    /// it may not: its grant, then its identity's limits. Only called for
    /// connections whose `checks_requests` is set.
    #[cold]
    #[inline(never)]
    pub(super) fn check_request(
        &mut self,
        slot: usize,
        service: &ServiceKey,
        opens_stream: bool,
    ) -> Option<String> {
        if let Some(message) = self.may_not_call(slot, service) {
            self.stats.requests_denied += 1;
            return Some(message);
        }
        self.over_limit(slot, opens_stream)
    }

    /// Why connection `slot` may not call `service`, if it may not.
    fn may_not_call(&self, slot: usize, service: &ServiceKey) -> Option<String> {
        let c = self.conns.get(slot)?;
        if c.grant.as_ref().is_some_and(|g| g.may_call(service)) {
            return None;
        }
        Some(format!(
            "identity {} may not call service {service}",
            c.identity.as_ref().map_or("(none)", |i| &*i.name)
        ))
    }

    /// Why connection `slot` may not open one more request now, if its
    /// identity is at its limit of open streams (`opens_stream`: the
    /// request stays open for an answer) or of requests a second. A stream
    /// let through is counted at once.
    fn over_limit(&mut self, slot: usize, opens_stream: bool) -> Option<String> {
        let c = self.conns.get_mut(slot)?;
        if !c.limits.limits_requests() {
            return None;
        }
        let usage = c.usage.clone()?;
        let refused = if let Some(max) = c.limits.max_streams.filter(|_| opens_stream) {
            c.count_streams();
            if usage.open_stream(max) {
                c.counted_streams += 1;
                None
            } else {
                Some((Limit::Streams, format!("{max} streams open")))
            }
        } else {
            None
        };
        let refused = refused.or_else(|| {
            let rate = c.limits.requests_per_second?;
            let burst = c.limits.burst.unwrap_or(rate);
            if usage.take_request(self.config.usage.nanos(self.now), rate, burst) {
                return None;
            }
            if opens_stream && c.limits.max_streams.is_some() {
                // Not opened after all.
                usage.add_streams(-1);
                c.counted_streams -= 1;
            }
            Some((Limit::Rate, format!("{rate} requests a second")))
        });
        let (limit, what) = refused?;
        usage.note_limited(limit);
        self.stats.requests_limited += 1;
        Some(format!(
            "identity {} is over its limit of {what}",
            usage.name()
        ))
    }

    /// `services` without those connection `slot` may not publish.
    pub(super) fn publishable(
        &mut self,
        slot: usize,
        services: Vec<ServiceKey>,
    ) -> Vec<ServiceKey> {
        let Some(c) = self.conns.get(slot) else {
            return Vec::new();
        };
        let (allowed, refused): (Vec<_>, Vec<_>) = services
            .into_iter()
            .partition(|s| c.grant.as_ref().is_some_and(|g| g.may_publish(s)));
        if !refused.is_empty() {
            tracing::warn!(conn = %c.id, identity = %c.identity.as_ref().map_or("(none)", |i| &*i.name), services = ?refused, "services not exposed: the identity may not publish them");
            self.stats.publishes_refused += refused.len() as u64;
        }
        allowed
    }

    /// The rules changed (a reload): every connection's grant is worked
    /// out again, and services a connection may no longer publish are
    /// hidden. Tokens are verified again from now on.
    pub(super) fn apply_trust(&mut self) {
        self.tokens.clear();
        let trust = self.config.trust.clone();
        let mut hide = Vec::new();
        for (_, c) in &mut self.conns {
            let Some(identity) = &c.identity else {
                continue;
            };
            let grant = trust.grant(identity);
            if let Some(uuid) = &c.instance
                && let Some(instance) = self.routes.instance(uuid)
            {
                let lost: Vec<ServiceKey> = instance
                    .services
                    .iter()
                    .filter(|s| !grant.may_publish(s))
                    .cloned()
                    .collect();
                if !lost.is_empty() {
                    tracing::info!(conn = %c.id, identity = %identity.name, services = ?lost, "services hidden: the identity may no longer publish them");
                    hide.push((uuid.clone(), lost));
                }
            }
            c.limits = trust.limits(identity);
            c.checks_requests = checks_requests(&grant, &c.limits);
            c.grant = Some(Arc::new(grant));
        }
        for (instance, services) in hide {
            self.broadcast(RouteChange::Hide { instance, services });
        }
    }

    /// Ends the connections whose credentials expired.
    pub(super) fn end_expired_credentials(&mut self, now: Instant) {
        let mut ended = Vec::new();
        for (slot, c) in &mut self.conns {
            if c.expires.is_some_and(|t| t <= now) {
                c.expires = None;
                let name = c.identity.as_ref().map_or("(none)", |i| &*i.name);
                tracing::info!(conn = %c.id, peer = ?c.peer.addr, identity = %name, "credentials expired: connection closed");
                c.proto.close(
                    ErrorCode::CONNECTION_ERROR,
                    format!("the credentials of identity {name} expired"),
                );
                ended.push(slot);
            }
        }
        for slot in ended {
            self.stats.credentials_expired += 1;
            self.drain_events(slot);
            self.wake(slot);
        }
    }
}

/// Whether a connection with `grant` and `limits` has anything to check
/// on a request (a connection that may call everything, without limits,
/// has not).
fn checks_requests(grant: &crate::trust::Grant, limits: &crate::trust::AppLimits) -> bool {
    !grant.call.is_all() || limits.limits_requests()
}

impl Conn {
    /// Brings its identity's count of open streams up to date with the
    /// requester streams it has open.
    pub(super) fn count_streams(&mut self) {
        let Some(usage) = &self.usage else {
            return;
        };
        let open = i64::try_from(self.upstream.len() + self.pending.len()).unwrap_or(i64::MAX);
        usage.add_streams(open - self.counted_streams);
        self.counted_streams = open;
    }

    /// Gives back what it used of its identity's limits (it closed).
    pub(super) fn let_go_of_usage(&mut self) {
        if let Some(usage) = &self.usage {
            usage.add_streams(-self.counted_streams);
            usage.disconnect();
        }
        self.counted_streams = 0;
        self.usage = None;
    }
}
