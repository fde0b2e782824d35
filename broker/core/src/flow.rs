//! Flow control: how one slow, silent or hostile peer is kept from holding
//! up anyone else, and the broker's memory within what the config allows.
//! The pieces here are state with no I/O; [`crate::shard`] drives them.
//!
//! # Per-stream credit
//!
//! The broker is the requester towards every responder (and, on a channel,
//! the responder towards the requester), so the REQUEST_N it grants the
//! producer of a stream's items is its own to decide. A [`StreamCredit`]
//! sits on the shard of the connection the items are written to (the
//! consumer's) and grants the producer no more than that side can absorb:
//! items in flight (credit the producer holds, plus items queued for the
//! consumer) stay within `stream_window` items and `stream_buffer` bytes,
//! and within what is left of the consumer connection's
//! `max_pending_bytes`. Credit is topped up as the consumer's connection
//! takes the items ([`Backlog`] says when), and never more is granted in
//! total than the consumer asked for.
//!
//! Why this keeps RSocket's semantics: REQUEST_N is demand (Reactive
//! Streams' `request(n)`), not a promise to send. A responder may send up
//! to n items, any fewer, at any pace; the broker, as the responder's
//! subscriber, may request in whatever pieces it likes. The consumer still
//! gets every item, in order, never more than it asked for, and cancel,
//! complete and error pass through unchanged. What the producer sees is
//! its demand arriving in pieces as the consumer drains, as Reactor's
//! `limitRate` does inside one process. So a consumer that asked for
//! 2^31-1 and stopped reading slows exactly its own stream: the producer's
//! connection goes on carrying its other streams.
//!
//! # Pauses, the fallback
//!
//! Traffic no credit governs (requests and fire-and-forget towards a
//! responder, the fragments of one huge item) can still fill a connection.
//! Past `max_pending_bytes` unsent, the broker stops reading the connection
//! that fed it ([`ConnFlow::feeders`]), wherever it lives: a message to its
//! shard names it with its generation, so a stale one never reaches a new
//! connection in the same slot. It is read again once the full connection
//! is down to half. Only those connections stop; never a shard, never the
//! mesh between shards. Time not reading a peer is not that peer's silence
//! (`Connection::set_reading`). A connection that stays over its limit for
//! `backpressure_timeout` is closed as a slow consumer, so it cannot keep
//! others paused.
//!
//! # Memory
//!
//! What the broker holds for a connection ([`ConnFlow::held`]): its unsent
//! frames, the fragments of its requests that wait for their route (each
//! counted with [`FRAGMENT_OVERHEAD`], so empty fragments are not free),
//! and its transport's buffers beyond their base size. Past
//! `max_connection_memory` the connection is closed (a fragment that would
//! pass it has its request refused instead). For the whole broker,
//! `max_buffered_bytes`: each shard may use what the others leave
//! ([`Budget`]); over it, the shard stops reading the connections that hold
//! the most until it is down to three quarters, and if it stays over for
//! `backpressure_timeout` it closes the largest holder.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rsocket_proto::frame::MAX_REQUEST_N;

use crate::ids::ConnId;

/// Bytes a held fragment counts for beyond its length: the bookkeeping it
/// costs (its view, its place in a list, its own allocation).
pub const FRAGMENT_OVERHEAD: usize = 128;

/// The flow-control settings of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLimits {
    /// Most items in flight on one stream: credit its producer holds plus
    /// items queued for its consumer.
    pub stream_window: u32,
    /// Most bytes of one stream's items in flight (the window shrinks to
    /// fit items of the size seen so far).
    pub stream_buffer: usize,
    /// Unsent bytes for one connection above which no more credit is
    /// granted for it and the connections feeding it are paused.
    pub max_pending_bytes: usize,
    /// Most bytes held for one connection, of every kind.
    pub max_connection_memory: usize,
    /// Most bytes one request's fragments may hold while its route is
    /// still to come.
    pub max_unrouted_bytes: usize,
    /// How long a connection may stay over `max_pending_bytes`, or over a
    /// spent memory budget as its largest holder, before it is closed.
    pub backpressure_timeout: Duration,
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self {
            stream_window: 4096,
            stream_buffer: 256 << 10,
            max_pending_bytes: 4 << 20,
            max_connection_memory: 64 << 20,
            max_unrouted_bytes: 64 << 10,
            backpressure_timeout: Duration::from_secs(30),
        }
    }
}

impl FlowLimits {
    /// Items granted to a producer before the size of its items is known:
    /// enough for small items to flow at once, few enough that large
    /// ones do not overshoot the stream's buffer by much.
    const FIRST_GRANT: u32 = 8;

    /// The item size assumed until one has been seen.
    fn assumed_item_size(&self) -> usize {
        (self.stream_buffer / Self::FIRST_GRANT as usize).max(1)
    }
}

// ------------------------------------------------------------ stream credit

/// Credit metering for one direction of one forwarded stream, kept beside
/// the consumer's connection (see the module docs).
#[derive(Debug)]
pub struct StreamCredit {
    /// Tells this stream's marks in a [`Backlog`] from those of an earlier
    /// stream with the same id.
    serial: u32,
    /// Credit the consumer granted that has not been passed on (2^31-1:
    /// unbounded, never decremented).
    wanted: u32,
    /// Credit passed on to the producer and not yet used.
    outstanding: u32,
    /// Items that arrived here and wait in the consumer's queue.
    queued_items: u32,
    queued_bytes: usize,
    /// Bytes of the consumer's budget set aside for the outstanding credit.
    reserved: usize,
    /// The size of the last items (0 until one arrived).
    item_size: usize,
    /// The window for items of that size (0 until one arrived).
    window: u32,
    /// A fragmented message is arriving, `item_bytes` of it so far; it is
    /// an item (its first frame had N).
    in_message: bool,
    message_is_item: bool,
    item_bytes: usize,
    /// Waiting for room in the consumer connection to grant more.
    starved: bool,
}

/// What an arriving frame did to a [`StreamCredit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// Bytes of the consumer's budget no longer set aside (the credit it used).
    pub released: usize,
    /// The frame starts an item (it used one credit).
    pub item: bool,
}

/// Credit to pass on to a stream's producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// REQUEST_N to send.
    pub n: u32,
    /// Bytes of the consumer connection's budget this set aside.
    pub reserved: usize,
}

impl StreamCredit {
    /// A stream whose consumer has asked for `asked` items so far.
    pub fn new(serial: u32, asked: u32) -> Self {
        Self {
            serial,
            wanted: asked.min(MAX_REQUEST_N),
            outstanding: 0,
            queued_items: 0,
            queued_bytes: 0,
            reserved: 0,
            item_size: 0,
            window: 0,
            in_message: false,
            message_is_item: false,
            item_bytes: 0,
            starved: false,
        }
    }

    /// This stream's serial (see [`Backlog::push`]).
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Bytes of the consumer's budget set aside for credit not yet used.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Whether the last grant waited for room in the consumer connection.
    pub fn is_starved(&self) -> bool {
        self.starved
    }

    /// Items in flight: credit the producer holds plus items queued here.
    pub fn in_flight(&self) -> u32 {
        self.outstanding.saturating_add(self.queued_items)
    }

    /// Bytes of this stream's items queued for the consumer.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The consumer asked for `n` more.
    pub fn ask(&mut self, n: u32) {
        if self.wanted != MAX_REQUEST_N {
            self.wanted = self.wanted.saturating_add(n).min(MAX_REQUEST_N);
        }
    }

    fn size(&self, limits: &FlowLimits) -> usize {
        if self.item_size == 0 {
            limits.assumed_item_size()
        } else {
            self.item_size
        }
    }

    /// Items in flight allowed for items of `size` bytes.
    fn window_for(limits: &FlowLimits, size: usize) -> u32 {
        limits
            .stream_window
            .min(u32::try_from(limits.stream_buffer / size.max(1)).unwrap_or(u32::MAX))
            .max(1)
    }

    /// The first credit, carried by the request itself: at least 1 (a
    /// REQUEST_STREAM or REQUEST_CHANNEL must grant some), at most what
    /// the consumer asked, [`FlowLimits::FIRST_GRANT`] and the room left.
    pub fn first_grant(&mut self, limits: &FlowLimits, room: usize) -> Grant {
        let size = limits.assumed_item_size();
        let n = self
            .wanted
            .min(FlowLimits::FIRST_GRANT)
            .min(limits.stream_window)
            .min(u32::try_from(room / size).unwrap_or(u32::MAX))
            .max(1);
        self.take(n, size)
    }

    /// More credit for the producer, if the consumer wants it and its side
    /// has room: `room` is what is left of the consumer connection's
    /// `max_pending_bytes`. Small top-ups wait until a quarter of the
    /// window is free, so a fast stream costs one REQUEST_N per batch of
    /// items rather than one per item.
    pub fn grant(&mut self, limits: &FlowLimits, room: usize) -> Option<Grant> {
        self.starved = false;
        if self.wanted == 0 || self.queued_bytes >= limits.stream_buffer {
            return None;
        }
        let size = self.size(limits);
        if self.window == 0 && self.item_size != 0 {
            self.window = Self::window_for(limits, size);
        }
        let window = match self.window {
            0 => Self::window_for(limits, size),
            w => w,
        };
        let in_flight = self.in_flight();
        let free = window.saturating_sub(in_flight).min(self.wanted);
        if free == 0 {
            return None;
        }
        let batch = (window / 4).max(1);
        if free < batch && in_flight > 0 && free < self.wanted {
            // Not a batch's worth yet (most items end here).
            return None;
        }
        let fits = u32::try_from(room / size).unwrap_or(u32::MAX);
        let n = free.min(fits);
        if n < batch && in_flight > 0 && n < self.wanted {
            self.starved = true;
            return None;
        }
        if n == 0 {
            self.starved = true;
            return None;
        }
        Some(self.take(n, size))
    }

    fn take(&mut self, n: u32, size: usize) -> Grant {
        self.outstanding = self.outstanding.saturating_add(n);
        if self.wanted != MAX_REQUEST_N {
            self.wanted -= n.min(self.wanted);
        }
        let reserved = (n as usize).saturating_mul(size);
        self.reserved += reserved;
        Grant { n, reserved }
    }

    /// A frame of this stream (`len` bytes) arrived for the consumer:
    /// `next` and `follows` are its flags.
    pub fn arrived(&mut self, len: usize, next: bool, follows: bool) -> Arrival {
        self.queued_bytes += len;
        let mut released = 0;
        let starts_item = !self.in_message && next;
        if !self.in_message {
            self.item_bytes = 0;
            self.message_is_item = next;
            if next {
                // An item: it uses one credit, and what was set aside for it.
                released = match self.outstanding {
                    0 => 0,
                    n => self.reserved / n as usize,
                };
                self.reserved -= released;
                self.outstanding = self.outstanding.saturating_sub(1);
                self.queued_items = self.queued_items.saturating_add(1);
            }
        }
        self.item_bytes += len;
        self.in_message = follows;
        if !follows && self.message_is_item && self.item_bytes.max(1) != self.item_size {
            self.item_size = self.item_bytes.max(1);
            self.window = 0;
        }
        Arrival {
            released,
            item: starts_item,
        }
    }

    /// The consumer's transport took `items` items (`bytes` bytes) of this
    /// stream.
    pub fn transmitted(&mut self, items: u32, bytes: usize) {
        self.queued_items = self.queued_items.saturating_sub(items);
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
    }
}

// ------------------------------------------------------------------ backlog

/// Room for this many marks an empty backlog keeps.
const MARKS_KEPT: usize = 128;

/// Where the items of metered streams sit in a connection's outgoing
/// queue, in order, so that their credit is topped up when the transport
/// takes them. Consecutive items of one stream share a mark.
#[derive(Debug, Default)]
pub struct Backlog {
    marks: VecDeque<Mark>,
}

/// Items of one stream that end at byte position `end` of a connection's
/// outgoing queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// Position just after the last of these items.
    pub end: u64,
    /// The stream.
    pub stream: u32,
    /// Its [`StreamCredit::serial`].
    pub serial: u32,
    /// Items in the mark (the fragments of one item count once).
    pub items: u32,
    /// Their bytes.
    pub bytes: usize,
}

impl Backlog {
    /// A frame of a metered stream was queued, ending at `end`.
    pub fn push(&mut self, end: u64, stream: u32, serial: u32, item: bool, bytes: usize) {
        let items = u32::from(item);
        if let Some(last) = self.marks.back_mut()
            && last.stream == stream
            && last.serial == serial
        {
            last.end = end;
            last.items += items;
            last.bytes += bytes;
            return;
        }
        self.marks.push_back(Mark {
            end,
            stream,
            serial,
            items,
            bytes,
        });
    }

    /// The next mark the transport has taken completely, now that `sent`
    /// bytes of the queue are gone.
    pub fn pop_sent(&mut self, sent: u64) -> Option<Mark> {
        let Some(front) = self.marks.front() else {
            // Empty: the room a burst of marks took goes back.
            if self.marks.capacity() > MARKS_KEPT {
                self.marks = VecDeque::new();
            }
            return None;
        };
        if front.end <= sent {
            self.marks.pop_front()
        } else {
            None
        }
    }

    /// Marks the backlog has room for.
    pub fn room(&self) -> usize {
        self.marks.capacity()
    }

    /// Whether no item waits.
    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }
}

// --------------------------------------------------- per connection, pauses

/// The flow-control state of one connection.
#[derive(Debug, Default)]
pub struct ConnFlow {
    /// How many full connections have this one paused.
    pub paused_by: u32,
    /// Connections this one paused because it is full.
    pub feeders: Vec<ConnId>,
    /// Since when it has been over `max_pending_bytes`.
    pub over_since: Option<Instant>,
    /// Not read because the shard is over its memory budget and this
    /// connection is among the largest holders.
    pub budget_paused: bool,
    /// Bytes set aside for credit granted on its behalf and not yet used.
    pub reserved: usize,
    /// Bytes of its requests' fragments waiting for their route.
    pub unrouted: usize,
    /// Bytes its transport holds beyond its base buffers.
    pub transport: usize,
    /// What the shard's total counts for it (see [`Budget::account`]).
    pub accounted: usize,
    /// Items of its metered streams waiting in its queue.
    pub backlog: Backlog,
    /// Serial for the next [`StreamCredit`] on it.
    pub next_serial: u32,
    /// Some stream waits for room in this connection to be granted credit.
    pub starved: bool,
}

impl ConnFlow {
    /// Bytes held for the connection, with `pending` unsent.
    pub fn held(&self, pending: usize) -> usize {
        pending + self.unrouted + self.transport
    }

    /// What is left of `max_pending_bytes` for credit, with `pending` unsent.
    pub fn room(&self, limits: &FlowLimits, pending: usize) -> usize {
        limits
            .max_pending_bytes
            .saturating_sub(pending.saturating_add(self.reserved))
    }

    /// A serial for a new metered stream.
    pub fn serial(&mut self) -> u32 {
        self.next_serial = self.next_serial.wrapping_add(1);
        self.next_serial
    }

    /// Records `feeder` as paused by this connection; false if it already was.
    pub fn add_feeder(&mut self, feeder: ConnId) -> bool {
        if self.feeders.contains(&feeder) {
            return false;
        }
        self.feeders.push(feeder);
        true
    }
}

// ------------------------------------------------------- between shards

/// Frame bytes this shard sent to each other shard that the other has not
/// yet handled, and the connections here paused for it.
///
/// A pause takes effect one pass after the connection that asked for it
/// filled up, and until then a fast producer goes on being read; when the
/// producer is on another shard, what it sent meanwhile is in the queue
/// between the shards. Counting those bytes bounds it: a connection whose
/// frames go to a shard that has more than `max_pending_bytes` of this
/// shard's frames still to handle is not read until that shard has
/// handled half of them. The other connections, and the other shards,
/// are not held back.
#[derive(Debug)]
pub struct MeshFlow {
    in_flight: Vec<usize>,
    paused: Vec<Vec<ConnId>>,
}

impl MeshFlow {
    /// For `shards` shards.
    pub fn new(shards: u16) -> Self {
        Self {
            in_flight: vec![0; usize::from(shards)],
            paused: (0..shards).map(|_| Vec::new()).collect(),
        }
    }

    /// `bytes` of frames read from `from` went to `shard`. Returns whether
    /// `from` is to be paused now.
    pub fn sent(&mut self, shard: u16, bytes: usize, from: ConnId, limit: usize) -> bool {
        let (Some(n), Some(paused)) = (
            self.in_flight.get_mut(usize::from(shard)),
            self.paused.get_mut(usize::from(shard)),
        ) else {
            return false;
        };
        *n += bytes;
        if *n <= limit || paused.contains(&from) {
            return false;
        }
        paused.push(from);
        true
    }

    /// `shard` handled `bytes` of them. Returns the connections to read
    /// again, once it is down to half the limit.
    pub fn acked(&mut self, shard: u16, bytes: usize, limit: usize) -> Vec<ConnId> {
        let (Some(n), Some(paused)) = (
            self.in_flight.get_mut(usize::from(shard)),
            self.paused.get_mut(usize::from(shard)),
        ) else {
            return Vec::new();
        };
        *n = n.saturating_sub(bytes);
        if *n > limit / 2 {
            return Vec::new();
        }
        std::mem::take(paused)
    }

    /// Bytes not yet handled by the other shards, in all.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().sum()
    }
}

// ------------------------------------------------------------------- budget

/// A shard's share of the broker-wide memory budget and what it holds.
#[derive(Debug)]
pub struct Budget {
    /// Bytes this shard may hold: the budget minus what the other shards
    /// hold (set by the runtime).
    pub allowance: usize,
    /// Bytes its connections hold (the sum of their `held`).
    pub held: usize,
    /// Since when it has been over its allowance.
    pub over_since: Option<Instant>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            allowance: usize::MAX,
            held: 0,
            over_since: None,
        }
    }
}

impl Budget {
    /// Brings the total up to date with a connection now holding `held`.
    pub fn account(&mut self, conn: &mut ConnFlow, held: usize) {
        self.held = self.held.saturating_sub(conn.accounted) + held;
        conn.accounted = held;
    }

    /// Whether the shard holds more than its allowance.
    pub fn is_over(&self) -> bool {
        self.held > self.allowance
    }

    /// Whether it is back down to three quarters of its allowance, where
    /// paused connections may be read again.
    pub fn has_recovered(&self) -> bool {
        self.held <= self.allowance / 4 * 3
    }

    /// Which of `holders` (connection, bytes held) to stop reading: the
    /// largest first, until they hold what must be shed to get back to
    /// three quarters of the allowance.
    pub fn to_pause(&self, mut holders: Vec<(usize, usize)>) -> Vec<usize> {
        holders.sort_unstable_by_key(|h| std::cmp::Reverse(h.1));
        let target = self.allowance / 4 * 3;
        let mut shed = self.held.saturating_sub(target);
        let mut out = Vec::new();
        for (slot, held) in holders {
            if shed == 0 || held == 0 {
                break;
            }
            out.push(slot);
            shed = shed.saturating_sub(held);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FlowLimits {
        FlowLimits {
            stream_window: 64,
            stream_buffer: 64 << 10,
            max_pending_bytes: 1 << 20,
            ..FlowLimits::default()
        }
    }

    /// Drives a stream whose consumer never reads: credit stops once the
    /// window is full, and what arrived stays within the stream buffer.
    #[test]
    fn a_consumer_that_never_reads_stops_its_credit_at_the_window() {
        let l = limits();
        let mut c = StreamCredit::new(1, MAX_REQUEST_N);
        let mut granted = c.first_grant(&l, 1 << 20).n;
        assert_eq!(granted, FlowLimits::FIRST_GRANT);
        assert_eq!(granted, 8);
        let mut arrived = 0u32;
        loop {
            while arrived < granted {
                c.arrived(1024, true, false);
                arrived += 1;
            }
            match c.grant(&l, 1 << 20) {
                Some(g) => granted += g.n,
                None => break,
            }
        }
        assert_eq!(granted, 64, "the window, in 1 KiB items");
        assert!(c.queued_bytes() <= l.stream_buffer);
        // It drains: credit comes back in batches of a quarter window.
        c.transmitted(10, 10 << 10);
        assert_eq!(c.grant(&l, 1 << 20), None, "10 free: less than a batch");
        c.transmitted(6, 6 << 10);
        assert_eq!(c.grant(&l, 1 << 20).map(|g| g.n), Some(16));
    }

    #[test]
    fn large_items_shrink_the_window_to_the_stream_buffer() {
        let l = limits();
        let mut c = StreamCredit::new(1, MAX_REQUEST_N);
        let first = c.first_grant(&l, 1 << 20);
        assert_eq!(first.n, 8, "64 KiB / 8: 8 KiB assumed per item");
        // The items are 16 KiB: four fit the 64 KiB buffer.
        for _ in 0..8 {
            c.arrived(16 << 10, true, false);
        }
        assert_eq!(c.grant(&l, 1 << 20), None, "over the buffer already");
        c.transmitted(8, 128 << 10);
        assert_eq!(c.grant(&l, 1 << 20).map(|g| g.n), Some(4));
    }

    #[test]
    fn never_more_than_asked_and_unbounded_stays_unbounded() {
        let l = limits();
        let mut c = StreamCredit::new(1, 5);
        assert_eq!(c.first_grant(&l, 1 << 20).n, 5);
        assert_eq!(c.grant(&l, 1 << 20), None, "all 5 passed on");
        c.ask(3);
        assert_eq!(c.grant(&l, 1 << 20).map(|g| g.n), Some(3));
        let mut u = StreamCredit::new(2, MAX_REQUEST_N);
        u.first_grant(&l, 1 << 20);
        for _ in 0..8 {
            u.arrived(10, true, false);
        }
        u.transmitted(8, 80);
        assert!(u.grant(&l, 1 << 20).is_some());
        u.ask(7);
        assert_eq!(u.wanted, MAX_REQUEST_N);
    }

    #[test]
    fn a_full_consumer_connection_starves_the_stream_until_it_has_room() {
        let l = limits();
        let mut c = StreamCredit::new(1, MAX_REQUEST_N);
        // No room at all: the request still grants one item.
        assert_eq!(c.first_grant(&l, 0).n, 1);
        c.arrived(100, true, false);
        c.transmitted(1, 100);
        assert_eq!(c.grant(&l, 0), None);
        assert!(c.is_starved());
        assert!(c.grant(&l, 1 << 20).is_some());
        assert!(!c.is_starved());
    }

    #[test]
    fn fragments_of_one_item_use_one_credit_and_release_its_reservation() {
        let l = limits();
        let mut c = StreamCredit::new(1, 2);
        let g = c.first_grant(&l, 1 << 20);
        assert_eq!((g.n, c.reserved()), (2, g.reserved));
        let first = c.arrived(100, true, true);
        assert_eq!(first.released, g.reserved / 2);
        assert!(first.item);
        assert_eq!(c.arrived(100, false, true).released, 0);
        assert!(!c.arrived(100, true, false).item, "a continuation");
        assert_eq!(c.in_flight(), 2, "one credit left, one item queued");
        let second = c.arrived(50, true, false);
        assert_eq!(second.released, g.reserved - g.reserved / 2);
        assert_eq!(c.reserved(), 0);
        assert_eq!(c.queued_bytes(), 350);
    }

    #[test]
    fn the_first_grant_reserves_the_assumed_size_and_fits_the_room() {
        let l = limits();
        let mut c = StreamCredit::new(1, MAX_REQUEST_N);
        let g = c.first_grant(&l, 1 << 20);
        // 8 items of 64 KiB / 8 assumed each.
        assert_eq!((g.n, g.reserved), (8, 64 << 10));
        let mut c = StreamCredit::new(2, MAX_REQUEST_N);
        assert_eq!(c.first_grant(&l, 3 * (8 << 10)).n, 3, "room for three");
    }

    #[test]
    fn less_than_a_batch_free_waits_without_starving() {
        let l = limits();
        let mut c = StreamCredit::new(1, MAX_REQUEST_N);
        c.first_grant(&l, 1 << 20);
        for _ in 0..8 {
            c.arrived(1024, true, false);
        }
        // 1 KiB items: a window of 64, batches of 16; 8 in flight.
        assert_eq!(c.grant(&l, 1 << 20).map(|g| g.n), Some(56));
        for _ in 0..56 {
            c.arrived(1024, true, false);
        }
        c.transmitted(15, 15 << 10);
        assert_eq!(c.grant(&l, 1 << 20), None, "15 free of a batch of 16");
        assert!(!c.is_starved(), "waiting for a batch is not starving");
        c.transmitted(1, 1 << 10);
        assert_eq!(c.grant(&l, 1 << 20).map(|g| g.n), Some(16), "a batch");
    }

    #[test]
    fn the_rest_of_what_was_asked_goes_at_once_below_a_batch() {
        let l = limits();
        // 1 KiB items, 10 asked beyond the first 8: 2 left after 16 more.
        let mut c = StreamCredit::new(1, 26);
        c.first_grant(&l, 1 << 20);
        for _ in 0..8 {
            c.arrived(1024, true, false);
        }
        assert_eq!(
            c.grant(&l, 1 << 20).map(|g| g.n),
            Some(18),
            "all that is left"
        );
        c.ask(3);
        assert_eq!(
            c.grant(&l, 1 << 20).map(|g| g.n),
            Some(3),
            "3 more asked: less than a batch, but all the consumer wants"
        );
        // The room allows exactly what is wanted: granted, not starved.
        c.ask(2);
        assert_eq!(c.grant(&l, 2 << 10).map(|g| g.n), Some(2));
    }

    #[test]
    fn the_room_left_in_the_consumer_bounds_each_grant() {
        let l = limits();
        let mut c = StreamCredit::new(1, MAX_REQUEST_N);
        c.first_grant(&l, 1 << 20);
        for _ in 0..8 {
            c.arrived(1024, true, false);
        }
        // 56 free; room for 20 items of 1 KiB.
        assert_eq!(c.grant(&l, 20 << 10).map(|g| g.n), Some(20));
        assert!(!c.is_starved());
        // 36 free, room for 15: fewer than a batch while items are in flight.
        assert_eq!(c.grant(&l, 15 << 10), None);
        assert!(c.is_starved());
        // Room for exactly a batch.
        assert_eq!(c.grant(&l, 16 << 10).map(|g| g.n), Some(16));
        // Nothing in flight: whatever fits goes, even below a batch.
        let mut idle = StreamCredit::new(2, MAX_REQUEST_N);
        idle.first_grant(&l, 1 << 20);
        for _ in 0..8 {
            idle.arrived(1024, true, false);
        }
        idle.transmitted(8, 8 << 10);
        // The 8 granted were used: nothing in flight.
        assert_eq!(idle.in_flight(), 0);
        assert_eq!(idle.grant(&l, 2 << 10).map(|g| g.n), Some(2));
    }

    #[test]
    fn a_stream_over_its_byte_buffer_gets_no_credit_even_after_a_small_item() {
        let l = limits();
        let mut c = StreamCredit::new(1, MAX_REQUEST_N);
        c.first_grant(&l, 1 << 20);
        // 80 KiB queued (over the 64 KiB buffer), the last item small: its
        // window would allow more, the bytes do not.
        for _ in 0..4 {
            c.arrived(20 << 10, true, false);
        }
        c.arrived(100, true, false);
        assert!(c.queued_bytes() > l.stream_buffer);
        assert_eq!(c.grant(&l, 1 << 20), None);
    }

    #[test]
    fn frames_that_are_no_items_do_not_change_the_item_size() {
        let l = limits();
        let mut c = StreamCredit::new(1, 4);
        assert_eq!(c.first_grant(&l, 1 << 20).n, 4);
        for _ in 0..4 {
            c.arrived(16 << 10, true, false);
        }
        // A frame without N (a bare COMPLETE, say) is no item.
        c.arrived(10, false, false);
        c.transmitted(4, (64 << 10) + 10);
        c.ask(100);
        assert_eq!(
            c.grant(&l, 1 << 20).map(|g| g.n),
            Some(4),
            "the window still fits 16 KiB items"
        );
    }

    #[test]
    fn connection_held_bytes_add_every_kind() {
        let f = ConnFlow {
            unrouted: 5,
            transport: 7,
            ..ConnFlow::default()
        };
        assert_eq!(f.held(10), 22);
    }

    #[test]
    fn the_budget_boundaries_are_exact() {
        let at = |held| Budget {
            allowance: 1000,
            held,
            over_since: None,
        };
        assert!(!at(1000).is_over(), "at the allowance is not over it");
        assert!(at(1001).is_over());
        assert!(at(750).has_recovered(), "three quarters");
        assert!(!at(751).has_recovered());
    }

    #[test]
    fn backlog_marks_merge_per_stream_and_come_out_when_sent() {
        let mut b = Backlog::default();
        b.push(100, 1, 1, true, 100);
        b.push(150, 1, 1, true, 50);
        b.push(170, 3, 2, true, 20);
        b.push(200, 1, 1, false, 30);
        assert_eq!(b.pop_sent(149), None);
        assert_eq!(
            b.pop_sent(150),
            Some(Mark {
                end: 150,
                stream: 1,
                serial: 1,
                items: 2,
                bytes: 150
            })
        );
        assert_eq!(b.pop_sent(1000).map(|m| m.stream), Some(3));
        assert_eq!(b.pop_sent(1000).map(|m| (m.items, m.bytes)), Some((0, 30)));
        assert!(b.is_empty());
    }

    #[test]
    fn an_emptied_backlog_gives_back_what_a_burst_took() {
        for (marks, kept) in [(MARKS_KEPT, true), (1000, false)] {
            let mut b = Backlog::default();
            for i in 0..marks {
                // Streams taking turns: a mark each.
                b.push(i as u64 + 1, (i % 2) as u32 + 1, 1, true, 1);
            }
            let room = b.room();
            assert!(room >= marks);
            while b.pop_sent(u64::MAX).is_some() {}
            assert_eq!(b.pop_sent(u64::MAX), None);
            if kept {
                assert_eq!(b.room(), room, "{marks} marks: room kept");
            } else {
                assert_eq!(b.room(), 0, "{marks} marks: room given back");
            }
        }
    }

    #[test]
    fn a_queue_between_shards_past_its_limit_pauses_its_feeders_until_half() {
        let id = |slot| ConnId {
            shard: 0,
            slot,
            generation: 1,
        };
        let mut m = MeshFlow::new(2);
        assert!(!m.sent(1, 600, id(1), 1000));
        assert!(m.sent(1, 600, id(2), 1000), "over the limit: paused");
        assert!(!m.sent(1, 600, id(2), 1000), "paused once");
        assert!(m.sent(1, 10, id(1), 1000));
        assert_eq!(m.acked(1, 1000, 1000), [], "810 left: more than half");
        assert_eq!(m.acked(1, 310, 1000), [id(2), id(1)], "down to half");
        assert_eq!(m.in_flight(), 500);
        assert!(!m.sent(0, 10, id(1), 1000) || m.in_flight() > 0);
    }

    #[test]
    fn the_budget_pauses_the_largest_holders_first() {
        let budget = Budget {
            allowance: 1000,
            held: 1400,
            over_since: None,
        };
        // Down to 750 means shedding 650: the 500 and the 300.
        let paused = budget.to_pause(vec![(1, 100), (2, 500), (3, 300), (4, 0), (5, 200)]);
        assert_eq!(paused, [2, 3]);
        assert!(budget.is_over());
        assert!(!budget.has_recovered());
    }
}
