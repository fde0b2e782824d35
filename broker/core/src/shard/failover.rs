//! Failover: a request whose instance went away before answering is
//! retried on another instance, or ended with an ERROR.

use bytes::Bytes;
use rsocket_proto::ErrorCode;

use super::Shard;
use super::routing::PickRequest;
use super::stats::Count;
use super::streams::Upstream;
use crate::ids::StreamRef;
use crate::message::Message;

impl Shard {
    pub(super) fn on_gone(&mut self, to: StreamRef, code: ErrorCode, reason: String) {
        let slot = to.conn.slot as usize;
        let Some(c) = self.conns.get_mut(slot).filter(|c| c.id == to.conn) else {
            return;
        };
        let Some(up) = c.end_upstream(to.stream, &mut self.outstanding) else {
            return;
        };
        let requester = to.conn;
        // Failover: send the request to another instance.
        if let Some((frame, attempts)) = up.retry.clone()
            && attempts > 0
            && up.targets.len() == 1
        {
            let policy = self.config.policies.for_service(&up.service);
            let picked = self
                .routes
                .service(up.service.as_str().as_bytes())
                .and_then(|(_, uuids)| {
                    self.pick(PickRequest {
                        service: &up.service,
                        uuids,
                        balancer: &policy.balancer,
                        requester,
                        endpoint: None,
                        sticky: false,
                        hash_key: None,
                        exclude: &up.tried,
                    })
                });
            if let Some((instance, target)) = picked {
                self.stats.requests_retried += 1;
                tracing::debug!(conn = %requester, stream = to.stream, %instance, "request retried on another instance");
                let mut tried = up.tried;
                tried.push(instance);
                self.outstanding.started(target);
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
