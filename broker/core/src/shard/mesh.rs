//! Messages to and from the other shards, and the in-flight bytes
//! between them.

use std::time::Instant;

use rsocket_proto::ErrorCode;

use super::Shard;
use super::stats::Count;
use crate::ids::{ConnId, ShardId, StreamRef};
use crate::message::{Message, Signal};
use crate::routes::{RouteChange, RouteUpdate};

impl Shard {
    /// Tells the shard of requester stream `to` that its responder side
    /// is gone (`code`, `reason`): failover or an ERROR there.
    pub(super) fn send_gone(&mut self, to: StreamRef, code: ErrorCode, reason: String) {
        self.send(to.conn.shard, Message::Gone { to, code, reason });
    }

    /// Messages for shard `to`, in order.
    pub fn take_outbox(&mut self, to: ShardId) -> Vec<Message> {
        self.outbox
            .get_mut(usize::from(to))
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Whether any message waits for another shard.
    pub fn has_outbox(&self) -> bool {
        self.outbox.iter().any(|o| !o.is_empty())
    }

    /// Messages from shard `from`.
    pub fn handle_messages(
        &mut self,
        now: Instant,
        from: ShardId,
        messages: impl IntoIterator<Item = Message>,
    ) {
        self.now = now;
        let mut handled = 0;
        for m in messages {
            handled += m.frame_bytes();
            self.on_message(m);
        }
        if handled > 0 && from != self.id {
            let ack = Message::Acked {
                from: self.id,
                bytes: handled,
            };
            self.send(from, ack);
        }
        self.finish_pass();
    }

    /// Frame bytes sent to other shards and not yet handled there.
    pub fn mesh_in_flight(&self) -> usize {
        self.mesh.in_flight()
    }

    pub(super) fn send(&mut self, to: ShardId, message: Message) {
        if to == self.id {
            self.local.push_back(message);
        } else if let Some(out) = self.outbox.get_mut(usize::from(to)) {
            out.push(message);
        }
    }

    /// [`Shard::send`] for a message with a frame read from connection
    /// `from`: when it goes to another shard that has too many of this
    /// shard's frames still to handle, `from` is not read until it has.
    #[inline]
    pub(super) fn send_frame(&mut self, from: ConnId, to: ShardId, message: Message) {
        if to == self.id {
            return self.local.push_back(message);
        }
        let bytes = message.frame_bytes();
        self.send(to, message);
        let limit = self.config.flow.max_pending_bytes;
        if bytes > 0 && self.mesh.sent(to, bytes, from, limit) {
            self.stats.mesh_pauses += 1;
            self.pause(from);
        }
    }

    pub(super) fn run_local(&mut self) {
        while let Some(m) = self.local.pop_front() {
            self.on_message(m);
        }
    }

    pub(super) fn broadcast(&mut self, change: RouteChange) {
        self.revision += 1;
        let update = RouteUpdate {
            origin: self.id,
            revision: self.revision,
            change,
        };
        self.routes.apply(&update);
        for shard in 0..self.shards {
            if shard != self.id
                && let Some(out) = self.outbox.get_mut(usize::from(shard))
            {
                out.push(Message::Route(update.clone()));
            }
        }
    }

    pub(super) fn on_message(&mut self, message: Message) {
        match message {
            Message::Route(update) => {
                if !self.routes.apply(&update) {
                    tracing::warn!(
                        origin = update.origin,
                        revision = update.revision,
                        "route update out of order, ignored"
                    );
                }
            }
            Message::Open {
                origin,
                to,
                frame,
                credit,
            } => self.on_open(origin, to, frame, credit),
            Message::ToResponder { origin, to, signal } => {
                let slot = to.slot as usize;
                let Some(stream) = self
                    .conn(to)
                    .and_then(|c| c.by_origin.get(&origin).copied())
                else {
                    return;
                };
                if !self.deliver(slot, stream, signal, origin.conn, true) {
                    // The requester sent something the responder's stream cannot take.
                    if let Some(c) = self.conns.get_mut(slot) {
                        let _ = c.proto.send_cancel(stream);
                    }
                    let reason = "the request could not be passed on to its responder".to_owned();
                    self.send_gone(origin, ErrorCode::CANCELED, reason);
                }
                self.check_downstream(slot, stream);
            }
            Message::ToRequester { to, signal } => {
                let slot = to.conn.slot as usize;
                let Some(up) = self.conn(to.conn).and_then(|c| c.upstream.get(&to.stream)) else {
                    return;
                };
                let Some(responder) = up.targets.first().copied() else {
                    return;
                };
                if let Signal::Error { .. } = signal {
                    let (service, interaction) = (up.service.clone(), up.interaction);
                    self.count(&service, interaction, Count::Error);
                }
                self.deliver(slot, to.stream, signal, responder, false);
                self.check_upstream(slot, to.stream);
            }
            Message::Gone { to, code, reason } => self.on_gone(to, code, reason),
            Message::Pause { conn } => self.pause(conn),
            Message::Resume { conn } => self.resume(conn),
            Message::Acked { from, bytes } => {
                let limit = self.config.flow.max_pending_bytes;
                for conn in self.mesh.acked(from, bytes, limit) {
                    self.resume(conn);
                }
            }
        }
    }
}
