//! Trust on a shard: a SETUP's credentials and what it publishes, each
//! request's service against what its connection may call, credentials
//! that expire while their connection is open, and rules replaced on
//! reload (see [`crate::trust`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rsocket_proto::ErrorCode;

use super::Shard;
use crate::app::SetupInfo;
use crate::routes::RouteChange;
use crate::service::ServiceKey;
use crate::trust::Credentials;

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
        let refusal = match verdict {
            Err(reason) => Err(format!("authentication failed: {reason}")),
            Ok(identity) => {
                let grant = trust.grant(&identity);
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
                } else {
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
                tracing::warn!(conn = %c.id, peer = ?c.peer.addr, %reason, "SETUP refused");
                c.proto.reject_setup(ErrorCode::REJECTED_SETUP, reason);
                self.stats.setups_refused += 1;
                false
            }
        }
    }

    /// Why connection `slot` may not call `service`, if it may not.
    #[inline]
    pub(super) fn may_not_call(&self, slot: usize, service: &ServiceKey) -> Option<String> {
        let c = self.conns.get(slot)?;
        if c.grant.as_ref().is_some_and(|g| g.may_call(service)) {
            return None;
        }
        Some(format!(
            "identity {} may not call service {service}",
            c.identity.as_ref().map_or("(none)", |i| &*i.name)
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
