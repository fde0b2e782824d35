//! The stream maps: requester streams (upstream) and the streams the
//! broker opened on responders (downstream), frames passed between them,
//! and their cleanup when a connection goes.

use std::sync::Arc;

use rsocket_proto::conn::Interaction;
use rsocket_proto::frame::FrameType;
use rsocket_proto::{ErrorCode, FrameView};
use smallvec::SmallVec;

use super::routing::Outstanding;
use super::{Conn, Shard};
use crate::flow::StreamCredit;
use crate::ids::{ConnId, StreamRef};
use crate::message::{Message, Signal};
use crate::routes::RouteChange;
use crate::service::ServiceKey;

/// Where a requester's stream goes.
#[derive(Debug)]
pub(super) struct Upstream {
    /// Responder connections (more than one for a broadcast).
    pub(super) targets: SmallVec<[ConnId; 1]>,
    pub(super) service: ServiceKey,
    pub(super) interaction: Interaction,
    /// Instances tried so far (for failover).
    pub(super) tried: SmallVec<[Arc<str>; 1]>,
    /// The request, kept while a retry may still need it.
    pub(super) retry: Option<(FrameView, u32)>,
}

impl Conn {
    /// Ends the bookkeeping of requester stream `stream`: its credit meter
    /// and its upstream entry, whose requests stop counting as outstanding.
    pub(super) fn end_upstream(
        &mut self,
        stream: u32,
        outstanding: &mut Outstanding,
    ) -> Option<Upstream> {
        if let Some(m) = self.meters.remove(&stream) {
            self.flow.reserved -= m.reserved().min(self.flow.reserved);
        }
        let up = self.upstream.remove(&stream)?;
        for &t in &up.targets {
            outstanding.ended(t);
        }
        Some(up)
    }

    /// Gives back the room of stream tables a burst left mostly empty, so
    /// a connection that once had a thousand streams open does not keep
    /// their tables' memory.
    pub(super) fn let_go_of_burst(&mut self) {
        use rsocket_proto::conn::let_go_of_burst as let_go;
        self.proto.let_go_of_burst();
        let_go(&mut self.upstream);
        let_go(&mut self.meters);
        let_go(&mut self.downstream);
        let_go(&mut self.by_origin);
        let_go(&mut self.pending);
    }

    /// Entries the connection's stream tables and queues have room for, by
    /// name.
    pub(super) fn table_room(&self) -> Vec<(&'static str, usize)> {
        let mut room = vec![
            ("requested", self.upstream.capacity()),
            ("meters", self.meters.capacity()),
            ("opened", self.downstream.capacity()),
            ("by origin", self.by_origin.capacity()),
            ("waiting for a route", self.pending.capacity()),
            ("backlog", self.flow.backlog.room()),
        ];
        room.extend(self.proto.table_room());
        room
    }
}

impl Shard {
    /// A frame or signal from connection `slot` on an existing stream.
    pub(super) fn on_stream_signal(&mut self, slot: usize, stream: u32, signal: Signal) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let me = c.id;
        if let Some(p) = c.pending.get_mut(&stream) {
            match signal {
                Signal::Frame(f) => return self.on_pending_fragment(slot, stream, f),
                // More demand (a stream or channel requester may send
                // REQUEST_N between fragments): the request stays pending.
                Signal::RequestN(n) => {
                    p.requested = p.requested.saturating_add(n);
                    return;
                }
                _ => {
                    // Cancelled (or errored) before it could be routed.
                    if let Some(p) = c.pending.remove(&stream) {
                        c.flow.unrouted = c.flow.unrouted.saturating_sub(p.held);
                    }
                    return self.wake(slot);
                }
            }
        }
        if let Some(up) = c.upstream.get(&stream) {
            if let Signal::RequestN(n) = signal
                && let Some(m) = c.meters.get_mut(&stream)
            {
                // The requester's demand: passed on as its side drains.
                m.ask(n);
                self.top_up(slot, stream);
                return;
            }
            let targets = up.targets.clone();
            let origin = StreamRef { conn: me, stream };
            for to in targets {
                let message = Message::ToResponder {
                    origin,
                    to,
                    signal: signal.clone(),
                };
                self.send_frame(me, to.shard, message);
            }
            self.check_upstream(slot, stream);
            return;
        }
        if let Some(origin) = c.downstream.get(&stream).copied() {
            if let Signal::RequestN(n) = signal
                && let Some(m) = c.meters.get_mut(&stream)
            {
                // A channel's responder asks for the requester's items.
                m.ask(n);
                self.top_up(slot, stream);
                return;
            }
            let message = Message::ToRequester { to: origin, signal };
            self.send_frame(me, origin.conn.shard, message);
            self.check_downstream(slot, stream);
        }
    }

    /// Drops a requester stream's entry once its state machine says it ended.
    pub(super) fn check_upstream(&mut self, slot: usize, stream: u32) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.proto.is_stream_open(stream) {
            return;
        }
        c.end_upstream(stream, &mut self.outstanding);
    }

    /// Drops a responder stream's entries once its state machine says it ended.
    pub(super) fn check_downstream(&mut self, slot: usize, stream: u32) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.proto.is_stream_open(stream) {
            return;
        }
        if let Some(m) = c.meters.remove(&stream) {
            c.flow.reserved -= m.reserved().min(c.flow.reserved);
        }
        if let Some(origin) = c.downstream.remove(&stream) {
            c.by_origin.remove(&origin);
        }
    }

    /// Applies a signal to a stream of local connection `slot`, coming from
    /// connection `from`, and meters it where the stream is metered.
    /// `unrequested`: the signal goes to a responder (a request, its
    /// fragments, a channel's items), so `from` is paused if the
    /// connection is full. Towards a requester only the fragments that
    /// continue an item pause their producer; the rest was asked for.
    pub(super) fn deliver(
        &mut self,
        slot: usize,
        stream: u32,
        signal: Signal,
        from: ConnId,
        unrequested: bool,
    ) -> bool {
        let max_pending = self.config.flow.max_pending_bytes;
        let Some(c) = self.conns.get_mut(slot) else {
            return false;
        };
        let full = c.proto.pending_bytes() > max_pending;
        let continues = full && c.proto.is_sending_fragments(stream);
        let frame = match &signal {
            Signal::Frame(f) => Some((f.len(), f.next(), f.follows())),
            _ => None,
        };
        // The signal is taken by value: a frame's buffer moves on to the
        // outgoing queue instead of being shared (a reference count less).
        let ok = match signal {
            Signal::Frame(f) => c.proto.forward(stream, f).is_ok(),
            Signal::RequestN(n) => c.proto.send_request_n(stream, n).is_ok(),
            Signal::Cancel => c.proto.send_cancel(stream).is_ok(),
            Signal::Error { code, data } => {
                if code.is_connection_level() {
                    c.proto
                        .send_error(stream, ErrorCode::APPLICATION_ERROR, data)
                        .is_ok()
                } else {
                    c.proto.send_error(stream, code, data).is_ok()
                }
            }
        };
        if ok
            && let Some((len, next, follows)) = frame
            && !c.meters.is_empty()
            && let Some(m) = c.meters.get_mut(&stream)
        {
            let arrival = m.arrived(len, next, follows);
            c.flow.reserved -= arrival.released.min(c.flow.reserved);
            let (queued, _) = c.proto.transmit_positions();
            c.flow
                .backlog
                .push(queued, stream, m.serial(), arrival.item, len);
        }
        if (unrequested || continues) && c.proto.pending_bytes() > max_pending {
            self.note_feeder(slot, from);
        }
        self.wake(slot);
        ok
    }

    pub(super) fn on_open(
        &mut self,
        origin: StreamRef,
        to: ConnId,
        frame: FrameView,
        credit: Option<u32>,
    ) {
        let slot = to.slot as usize;
        // A channel whose requester goes on sending: its items are metered
        // here, where they are written to the responder.
        let channel_items = frame.frame_type() == FrameType::RequestChannel && !frame.complete();
        let result = match self.conn_mut(to) {
            Some(c) if !c.released => c
                .proto
                .forward_request_granting(frame, credit)
                .map_err(|e| e.to_string()),
            _ => Err("the instance's connection has closed".into()),
        };
        match result {
            Ok(stream) => {
                if let Some(c) = self.conns.get_mut(slot)
                    && c.proto.is_stream_open(stream)
                {
                    c.downstream.insert(stream, origin);
                    c.by_origin.insert(origin, stream);
                    if channel_items {
                        let serial = c.flow.serial();
                        c.meters.insert(stream, StreamCredit::new(serial, 0));
                    }
                }
                if self
                    .conns
                    .get(slot)
                    .is_some_and(|c| c.proto.pending_bytes() > self.config.flow.max_pending_bytes)
                {
                    self.note_feeder(slot, origin.conn);
                }
                self.wake(slot);
            }
            Err(reason) => {
                let reason = format!("the request could not reach the instance: {reason}");
                self.send_gone(origin, ErrorCode::REJECTED, reason);
            }
        }
    }

    /// Ends everything that involves connection `slot`: its requests are
    /// cancelled at their responders, the streams it served end at their
    /// requesters, and its instance leaves the route table everywhere.
    pub(super) fn release(&mut self, slot: usize, why: &str) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.released {
            return;
        }
        c.released = true;
        c.let_go_of_usage();
        let me = c.id;
        let upstream: Vec<(u32, Upstream)> = c.upstream.drain().collect();
        let downstream: Vec<(u32, StreamRef)> = c.downstream.drain().collect();
        c.by_origin.clear();
        c.pending.clear();
        c.meters.clear();
        c.flow.unrouted = 0;
        c.flow.reserved = 0;
        let feeders = std::mem::take(&mut c.flow.feeders);
        let instance = c.instance.clone();
        let name = c.app_name.clone().unwrap_or_else(|| "requester".to_owned());
        // Whoever paused it keeps a feeder entry; the Resume that comes
        // later names this connection's generation and finds nothing.
        c.flow.paused_by = 0;
        for (stream, up) in upstream {
            let origin = StreamRef { conn: me, stream };
            for to in up.targets {
                self.outstanding.ended(to);
                self.send(
                    to.shard,
                    Message::ToResponder {
                        origin,
                        to,
                        signal: Signal::Cancel,
                    },
                );
            }
        }
        for (_, origin) in downstream {
            let reason = match &instance {
                Some(i) => format!("instance {i} of {name} disconnected ({why})"),
                None => format!("the responder disconnected ({why})"),
            };
            self.send_gone(origin, ErrorCode::CANCELED, reason);
        }
        self.release_feeders(feeders);
        if instance.is_some() {
            self.broadcast(RouteChange::Leave { conn: me });
        }
        self.wake(slot);
    }
}
