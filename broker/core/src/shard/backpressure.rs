//! Backpressure on this shard: what each connection holds, credit
//! top-ups as consumers take items, pauses of the connections that feed a
//! full one, the memory budget and the limits that close a connection.

use std::time::Instant;

use rsocket_proto::ErrorCode;
use smallvec::SmallVec;

use super::{Conn, Shard};
use crate::flow::{Budget, FlowLimits, Mark};
use crate::ids::{ConnId, StreamRef};
use crate::message::{Message, Signal};

impl Shard {
    /// Counts what connection `slot` holds now in the shard's total, and
    /// notes when it passes its limits.
    pub(super) fn account(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        Self::count_held(
            c,
            &self.config.flow,
            &mut self.budget,
            self.now,
            &mut self.overfull,
        );
    }

    #[inline]
    pub(super) fn count_held(
        c: &mut Conn,
        limits: &FlowLimits,
        budget: &mut Budget,
        now: Instant,
        overfull: &mut Vec<ConnId>,
    ) {
        let pending = c.proto.pending_bytes();
        let held = c.flow.held(pending);
        if held == c.flow.accounted {
            // Nothing changed since it was last counted (the common case:
            // nothing held before, nothing held now).
            return;
        }
        budget.account(&mut c.flow, held);
        if pending > limits.max_pending_bytes {
            c.flow.over_since.get_or_insert(now);
        } else {
            c.flow.over_since = None;
        }
        if held > limits.max_connection_memory && !c.proto.is_closed() {
            overfull.push(c.id);
        }
    }

    /// Ends a pass: messages to this shard are handled, connections over
    /// their memory cap are closed, and the memory budget is checked.
    #[inline]
    pub(super) fn finish_pass(&mut self) {
        self.run_local();
        if !self.overfull.is_empty() || self.budget.is_over() || self.budget.over_since.is_some() {
            self.enforce_memory_limits();
        }
    }

    #[cold]
    #[inline(never)]
    pub(super) fn enforce_memory_limits(&mut self) {
        for id in std::mem::take(&mut self.overfull) {
            let Some(c) = self.conn(id) else { continue };
            let held = c.flow.held(c.proto.pending_bytes());
            if held > self.config.flow.max_connection_memory {
                let max = self.config.flow.max_connection_memory;
                self.close_over_limit(
                    id.slot as usize,
                    format!(
                        "the broker holds {held} bytes for this connection, more than its limit of {max} (max_connection_memory)"
                    ),
                );
            }
        }
        self.check_budget();
        self.run_local();
    }

    /// Items of metered streams the transport of `slot` has taken: their
    /// streams may be granted more.
    #[inline(never)]
    pub(super) fn taken(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let (_, sent) = c.proto.transmit_positions();
        while let Some(mark) = self
            .conns
            .get_mut(slot)
            .and_then(|c| c.flow.backlog.pop_sent(sent))
        {
            self.on_taken(slot, mark);
        }
    }

    /// Whether the transport should read from `id` now: not while a
    /// connection it feeds is full, while the shard is over its memory
    /// budget and it holds the most, or while the runtime holds every
    /// connection back.
    pub fn may_read(&self, id: ConnId) -> bool {
        self.conn(id)
            .is_some_and(|c| Self::reads(c, self.reading_blocked))
    }

    pub(super) fn reads(c: &Conn, blocked: bool) -> bool {
        c.flow.paused_by == 0 && !c.flow.budget_paused && !blocked
    }

    /// The runtime stops (or resumes) reading every connection of the
    /// shard, as when its queues to another shard are too long.
    pub fn set_reading_blocked(&mut self, now: Instant, blocked: bool) {
        self.now = now;
        if self.reading_blocked == blocked {
            return;
        }
        self.reading_blocked = blocked;
        let slots: Vec<usize> = self.conns.iter().map(|(s, _)| s).collect();
        for slot in slots {
            self.sync_reading(slot);
        }
    }

    /// Tells connection `slot`'s state machine whether it is read (time
    /// not read is not the peer's silence), and wakes it when it is again.
    pub(super) fn sync_reading(&mut self, slot: usize) {
        let blocked = self.reading_blocked;
        let now = self.now;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let reads = Self::reads(c, blocked);
        if reads != c.proto.is_reading() {
            c.proto.set_reading(now, reads);
            self.wake(slot);
        }
    }

    /// The transport of `id` holds `bytes` beyond its base buffers (a
    /// frame larger than usual on its way in, frames not yet written).
    pub fn set_transport_bytes(&mut self, id: ConnId, bytes: usize) {
        let slot = id.slot as usize;
        let Some(c) = self.conn_mut(id) else { return };
        if c.flow.transport == bytes {
            return;
        }
        c.flow.transport = bytes;
        self.account(slot);
        self.finish_pass();
    }

    /// Bytes held for this shard's connections (see [`crate::flow`]).
    pub fn held_bytes(&self) -> usize {
        self.budget.held
    }

    /// Bytes this shard may hold: the broker-wide budget minus what the
    /// other shards hold.
    pub fn set_allowance(&mut self, now: Instant, bytes: usize) {
        self.now = now;
        self.budget.allowance = bytes;
        self.finish_pass();
    }

    /// Whether the shard is over its memory allowance (and has stopped
    /// reading its largest holders).
    pub fn is_over_budget(&self) -> bool {
        self.budget.over_since.is_some()
    }

    /// Enters or leaves overload: over its allowance, the shard stops
    /// reading the connections that hold the most; at three quarters of it
    /// they are read again.
    pub(super) fn check_budget(&mut self) {
        if self.budget.is_over() {
            if self.budget.over_since.is_none() {
                self.budget.over_since = Some(self.now);
                self.pause_largest_holders();
            }
        } else if self.budget.over_since.is_some() && self.budget.has_recovered() {
            self.budget.over_since = None;
            let paused = std::mem::take(&mut self.budget_paused);
            tracing::info!(
                shard = self.id,
                held = self.budget.held,
                allowance = self.budget.allowance,
                resumed = paused.len(),
                "back under the memory budget: reading every connection again"
            );
            for id in paused {
                if let Some(c) = self.conn_mut(id) {
                    c.flow.budget_paused = false;
                    self.sync_reading(id.slot as usize);
                }
            }
        }
    }

    pub(super) fn pause_largest_holders(&mut self) {
        let holders = self
            .conns
            .iter()
            .filter(|(_, c)| !c.flow.budget_paused)
            .map(|(slot, c)| (slot, c.flow.accounted))
            .collect();
        let slots = self.budget.to_pause(holders);
        let largest = slots
            .first()
            .and_then(|s| self.conns.get(*s))
            .map(|c| (c.id, c.flow.accounted));
        tracing::warn!(
            shard = self.id,
            held = self.budget.held,
            allowance = self.budget.allowance,
            paused = slots.len(),
            largest = ?largest,
            "over the memory budget (max_buffered_bytes): the connections that hold the most are not read until it recovers"
        );
        for slot in slots {
            if let Some(c) = self.conns.get_mut(slot) {
                c.flow.budget_paused = true;
                self.budget_paused.push(c.id);
                self.stats.overload_pauses += 1;
                self.sync_reading(slot);
            }
        }
    }

    /// Closes the connections that stayed over `max_pending_bytes` for
    /// `backpressure_timeout` (slow consumers), and, when the shard has
    /// been over its memory budget that long, its largest holder.
    pub(super) fn check_backpressure_timeouts(&mut self) {
        let limits = self.config.flow;
        let timeout = limits.backpressure_timeout;
        let now = self.now;
        let slow: Vec<(usize, usize)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.proto.is_closed() && c.flow.over_since.is_some_and(|t| now >= t + timeout)
            })
            .map(|(slot, c)| (slot, c.proto.pending_bytes()))
            .collect();
        for (slot, pending) in slow {
            self.close_over_limit(
                slot,
                format!(
                    "slow consumer: {pending} bytes not read for {} ms (more than max_pending_bytes = {} for backpressure_timeout)",
                    timeout.as_millis(),
                    limits.max_pending_bytes
                ),
            );
        }
        if self.budget.over_since.is_some_and(|t| now >= t + timeout) {
            let largest = self
                .conns
                .iter()
                .filter(|(_, c)| !c.proto.is_closed())
                .max_by_key(|(_, c)| c.flow.accounted)
                .map(|(slot, c)| (slot, c.flow.accounted));
            if let Some((slot, held)) = largest {
                self.close_over_limit(
                    slot,
                    format!(
                        "the broker is over its memory budget (max_buffered_bytes) and this connection holds the most ({held} bytes)"
                    ),
                );
            }
            // Another one after another timeout, if it is still over.
            self.budget.over_since = Some(now);
        }
    }

    /// Closes connection `slot` for a limit, with ERROR[CONNECTION_ERROR]
    /// saying which: what waited unsent for it is dropped (a peer that
    /// does not read would never take it).
    pub(super) fn close_over_limit(&mut self, slot: usize, message: String) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.proto.is_closed() {
            return;
        }
        tracing::warn!(conn = %c.id, %message, "connection closed for a limit");
        self.stats.closed_over_limit += 1;
        c.proto.abort(ErrorCode::CONNECTION_ERROR, message);
        c.flow.backlog = crate::flow::Backlog::default();
        self.drain_events(slot);
        self.wake(slot);
    }

    /// The transport wrote some of `id`'s frames: once below half the limit,
    /// the connections it stopped may go on, and its starved streams may
    /// be granted credit.
    #[inline]
    pub fn written(&mut self, id: ConnId) {
        let slot = id.slot as usize;
        let half = self.config.flow.max_pending_bytes / 2;
        let Some(c) = self.conn_mut(id) else { return };
        let pending = c.proto.pending_bytes();
        let release = !c.flow.feeders.is_empty() && pending <= half;
        if release || c.flow.starved {
            self.drained(slot, release, pending);
        }
        self.account(slot);
        self.finish_pass();
    }

    /// Connection `slot` drained (to `pending` bytes): the pauses it made
    /// end (`release`), and its streams waiting for room get credit.
    #[inline(never)]
    pub(super) fn drained(&mut self, slot: usize, release: bool, pending: usize) {
        let limits = self.config.flow;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if release {
            let feeders = std::mem::take(&mut c.flow.feeders);
            self.release_feeders(feeders);
        }
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.flow.starved && c.flow.room(&limits, pending) > 0 {
            c.flow.starved = false;
            let starved: SmallVec<[u32; 4]> = c
                .meters
                .iter()
                .filter(|(_, m)| m.is_starved())
                .map(|(s, _)| *s)
                .collect();
            for stream in starved {
                self.top_up(slot, stream);
            }
        }
    }

    /// Grants the producer of metered stream `stream` on connection `slot`
    /// what the meter allows now.
    pub(super) fn top_up(&mut self, slot: usize, stream: u32) {
        let limits = self.config.flow;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let room = c.flow.room(&limits, c.proto.pending_bytes());
        let Some(m) = c.meters.get_mut(&stream) else {
            return;
        };
        let grant = m.grant(&limits, room);
        c.flow.starved |= m.is_starved();
        if let Some(grant) = grant {
            self.send_credit(slot, stream, grant);
        }
    }

    /// Passes `grant` on to the producer of stream `stream` of connection `slot`.
    pub(super) fn send_credit(&mut self, slot: usize, stream: u32, grant: crate::flow::Grant) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        c.flow.reserved += grant.reserved;
        let signal = Signal::RequestN(grant.n);
        let me = c.id;
        if let Some(to) = c.upstream.get(&stream).and_then(|u| u.targets.first()) {
            let to = *to;
            let origin = StreamRef { conn: me, stream };
            self.send(to.shard, Message::ToResponder { origin, to, signal });
        } else if let Some(origin) = c.downstream.get(&stream).copied() {
            self.send(
                origin.conn.shard,
                Message::ToRequester { to: origin, signal },
            );
        }
    }

    /// The transport of connection `slot` took the items of `mark`.
    pub(super) fn on_taken(&mut self, slot: usize, mark: Mark) {
        let limits = &self.config.flow;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let room = c.flow.room(limits, c.proto.pending_bytes());
        let Some(m) = c
            .meters
            .get_mut(&mark.stream)
            .filter(|m| m.serial() == mark.serial)
        else {
            return;
        };
        m.transmitted(mark.items, mark.bytes);
        let grant = m.grant(limits, room);
        c.flow.starved |= m.is_starved();
        if let Some(grant) = grant {
            self.send_credit(slot, mark.stream, grant);
        }
    }

    /// If connection `slot` is over `max_pending_bytes`, stops reading
    /// `feeder` (on whichever shard) until `slot` is down to half.
    pub(super) fn note_feeder(&mut self, slot: usize, feeder: ConnId) {
        let max_pending = self.config.flow.max_pending_bytes;
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if feeder == c.id || c.proto.pending_bytes() <= max_pending || !c.flow.add_feeder(feeder) {
            return;
        }
        self.stats.pauses += 1;
        tracing::debug!(conn = %c.id, %feeder, pending = c.proto.pending_bytes(), "full: its feeder is paused");
        if feeder.shard == self.id {
            self.pause(feeder);
        } else {
            self.send(feeder.shard, Message::Pause { conn: feeder });
        }
    }

    /// Undoes the pauses a connection that drained (or closed) had made.
    pub(super) fn release_feeders(&mut self, feeders: Vec<ConnId>) {
        for f in feeders {
            if f.shard == self.id {
                self.resume(f);
            } else {
                self.send(f.shard, Message::Resume { conn: f });
            }
        }
    }

    pub(super) fn pause(&mut self, id: ConnId) {
        if let Some(c) = self.conn_mut(id) {
            c.flow.paused_by += 1;
            self.sync_reading(id.slot as usize);
        }
    }

    pub(super) fn resume(&mut self, id: ConnId) {
        if let Some(c) = self.conn_mut(id) {
            c.flow.paused_by = c.flow.paused_by.saturating_sub(1);
            self.sync_reading(id.slot as usize);
        }
    }
}
