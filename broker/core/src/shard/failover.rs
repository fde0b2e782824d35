//! Failover: a request whose instance went away before answering is
//! retried on another instance, or ended with an ERROR.

use bytes::Bytes;
use rsocket_proto::ErrorCode;

use super::Shard;
use super::stats::Count;
use super::streams::Upstream;
use crate::ids::StreamRef;
use crate::message::Message;

impl Shard {
    pub(super) fn on_gone(&mut self, to: StreamRef, code: ErrorCode, reason: String) {
        let slot = to.conn.slot as usize;
        let Some(c) = self.conn_mut(to.conn) else {
            return;
        };
        let Some(up) = c.upstream.remove(&to.stream) else {
            return;
        };
        if let Some(m) = c.meters.remove(&to.stream) {
            c.flow.reserved -= m.reserved().min(c.flow.reserved);
        }
        for t in &up.targets {
            if let Some(n) = self.outstanding.get_mut(t) {
                *n = n.saturating_sub(1);
            }
        }
        let requester = to.conn;
        // Failover: send the request to another instance.
        if let Some((frame, attempts)) = up.retry.clone()
            && attempts > 0
            && up.targets.len() == 1
        {
            let policy = self
                .config
                .policies
                .for_service(&up.service, Self::service_name(&up.service));
            let picked = self
                .routes
                .service(up.service.as_str().as_bytes())
                .and_then(|(_, uuids)| {
                    self.pick(
                        &up.service,
                        uuids,
                        &policy.balancer,
                        requester,
                        None,
                        false,
                        None,
                        &up.tried,
                    )
                });
            if let Some((instance, target)) = picked {
                self.stats.requests_retried += 1;
                tracing::debug!(conn = %requester, stream = to.stream, %instance, "request retried on another instance");
                let mut tried = up.tried;
                tried.push(instance);
                *self.outstanding.entry(target).or_default() += 1;
                let open = Message::Open {
                    origin: to,
                    to: target,
                    frame: frame.clone(),
                    credit: None,
                };
                self.send_frame(requester, target.shard, open);
                if let Some(c) = self.conns.get_mut(slot) {
                    c.upstream.insert(
                        to.stream,
                        Upstream {
                            targets: smallvec::smallvec![target],
                            service: up.service,
                            interaction: up.interaction,
                            tried,
                            retry: Some((frame, attempts - 1)),
                        },
                    );
                }
                return;
            }
        }
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.proto.is_stream_open(to.stream) {
            let message = format!("{reason} (service {})", up.service);
            let _ = c.proto.send_error(to.stream, code, Bytes::from(message));
        }
        self.count(&up.service, up.interaction, Count::Error);
        self.wake(slot);
    }
}
