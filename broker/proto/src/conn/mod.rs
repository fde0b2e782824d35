//! The RSocket connection state machine, for both roles.
//!
//! Inputs go in through `handle_*` (a received frame, a timeout) and local
//! calls (`send_*`, `forward*`, `close`); outputs come out through `poll_*`
//! (frames to transmit, events for the application, the next timeout). Time
//! is passed in; nothing here reads a clock or touches a socket.
//!
//! The state machine enforces the spec's rules for one connection: SETUP or
//! RESUME first, stream ids, the per-stream states of the four interaction
//! models, REQUEST_N credit, LEASE, KEEPALIVE and the "handling the
//! unexpected" rules. Bad input from the peer never panics: it is ignored
//! where the spec says so, ends its stream with ERROR (or CANCEL) where the
//! stream can be named, and ends the connection with ERROR on stream 0
//! otherwise.
//!
//! # Layout
//!
//! - `mod.rs` (here): the [`Connection`], its `State` and what can be read off it.
//! - `config`: [`Config`], [`Role`] and the client's [`SetupPayload`].
//! - `event`: the [`Event`]s it reports and its [`Stats`].
//! - `establish`: the client's SETUP; a server's checks of the first frame.
//! - `receive`: every received frame, from [`Connection::handle_frame`] on.
//! - `send`: local requests and stream frames, forwarding, the transmit queue.
//! - `lifetime`: KEEPALIVE, the peer's max lifetime, time not reading the peer.
//! - `lease`: LEASE windows both ways.
//! - `resume`: the resume buffer and RESUME / RESUME_OK.
//! - `close`: ERROR on stream 0, draining, graceful close and shut-down.
//! - `stream`: one stream's state; every transition of it happens there.

mod close;
mod config;
mod establish;
mod event;
mod lease;
mod lifetime;
mod receive;
mod resume;
mod send;
mod stream;

pub use config::{ClientSettings, Config, Role, ServerSettings, SetupPayload};
pub use event::{Event, Stats};
pub use send::{ForwardFrame, RequestKind};
pub use stream::{Credit, Interaction, StreamInfo};

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use self::close::Closing;
use self::lease::Leases;
use self::lifetime::Lifetime;
use self::resume::ResumeState;
use self::send::TransmitQueue;
use self::stream::{ReassemblyLimits, Stream};
use crate::frame::MAX_STREAM_ID;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Server: waiting for SETUP or RESUME.
    AwaitingSetup,
    /// Server: RESUME received, waiting for the application's decision.
    ResumeOffered,
    /// Client: SETUP sent; requests may flow, and the server may still
    /// refuse the SETUP ("A client assumes a SETUP is accepted if it
    /// receives a response to a request, a LEASE frame, or if it sees a
    /// REQUEST type").
    SetupSent,
    /// SETUP accepted (or a session resumed): streams flow.
    Established,
    /// Client: RESUME sent, waiting for RESUME_OK.
    AwaitingResumeOk,
    /// The transport is gone; the session is kept for resumption.
    Disconnected,
    Closed,
}

/// One RSocket connection, either role.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    config: Config,
    state: State,
    now: Instant,
    streams: FxHashMap<u32, Stream>,
    inbound_streams: usize,
    next_stream_id: u32,
    events: VecDeque<Event>,
    /// Frames waiting to be written.
    out: TransmitQueue,
    /// The peer's lifetime and this side's keepalives.
    lifetime: Lifetime,
    leases: Leases,
    resume: Option<ResumeState>,
    closing: Closing,
    /// Requests from the peer refused by this state machine (limits, draining, ...).
    requests_refused: u64,
    /// Bytes held by incoming messages being reassembled.
    reassembly_bytes: usize,
    stats: Stats,
}

fn ms(d: Duration) -> u32 {
    d.as_millis().clamp(1, MAX_STREAM_ID as u128) as u32
}

impl Connection {
    fn new(role: Role, config: Config, now: Instant) -> Self {
        let max_lifetime = match role {
            Role::Client => config.client.max_lifetime,
            Role::Server => config.server.setup_timeout,
        };
        Self {
            role,
            state: State::AwaitingSetup,
            now,
            streams: FxHashMap::default(),
            inbound_streams: 0,
            next_stream_id: match role {
                Role::Client => 1,
                Role::Server => 2,
            },
            events: VecDeque::new(),
            out: TransmitQueue::default(),
            lifetime: Lifetime::new(max_lifetime, config.client.keepalive_interval, now),
            leases: Leases::default(),
            resume: None,
            closing: Closing::Open,
            requests_refused: 0,
            reassembly_bytes: 0,
            stats: Stats::default(),
            config,
        }
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the connection is closed (frames may still wait in `poll_transmit`).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether SETUP (or a resume) has completed and streams can flow.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established | State::SetupSent)
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Whether `stream_id` is open on this side.
    pub fn is_stream_open(&self, stream_id: u32) -> bool {
        self.streams.contains_key(&stream_id)
    }

    /// Whether this side is part way through sending a fragmented message
    /// on `stream_id` (the next PAYLOAD it sends there continues it).
    pub fn is_sending_fragments(&self, stream_id: u32) -> bool {
        self.streams
            .get(&stream_id)
            .is_some_and(|s| s.outbound_partial.is_some())
    }

    /// State of one stream.
    pub fn stream_info(&self, stream_id: u32) -> Option<StreamInfo> {
        self.streams.get(&stream_id).map(StreamInfo::from)
    }

    /// Ids of the open streams.
    pub fn open_streams(&self) -> impl Iterator<Item = u32> + '_ {
        self.streams.keys().copied()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Requests from the peer this connection refused itself (stream
    /// limit, draining, invalid initial request n, lease) since it opened.
    pub fn requests_refused(&self) -> u64 {
        self.requests_refused
    }

    /// Changes how many streams the peer may have open; streams already
    /// open stay, new ones beyond the limit are refused.
    pub fn set_max_inbound_streams(&mut self, max: usize) {
        self.config.max_inbound_streams = max;
    }

    #[inline]
    fn remove_stream(&mut self, id: u32) -> Option<Stream> {
        let stream = self.streams.remove(&id)?;
        self.reassembly_bytes = self.reassembly_bytes.saturating_sub(stream.buffered());
        if !stream.local_requester {
            self.inbound_streams -= 1;
        }
        Some(stream)
    }

    /// Gives back the room a burst of streams left in the stream table
    /// (the shard calls it now and then, not on every stream's end).
    pub fn let_go_of_burst(&mut self) {
        let_go_of_burst(&mut self.streams);
    }

    /// Entries the connection's stream table and transmit queue have room
    /// for (what they hold, and what a burst left them), by name.
    pub fn table_room(&self) -> [(&'static str, usize); 2] {
        [
            ("streams", self.streams.capacity()),
            ("transmit queue", self.out.room()),
        ]
    }

    /// Applies `f` to stream `id` (`None` if it is not open), keeping the
    /// connection's reassembly total in step with what the stream holds.
    #[inline]
    fn with_stream<R>(&mut self, id: u32, f: impl FnOnce(&mut Stream) -> R) -> Option<R> {
        let stream = self.streams.get_mut(&id)?;
        let before = stream.buffered();
        let r = f(stream);
        let after = stream.buffered();
        self.reassembly_bytes = self.reassembly_bytes.saturating_sub(before) + after;
        Some(r)
    }

    /// What one more fragment may hold, when this side reassembles.
    fn reassembly_limits(&self) -> Option<ReassemblyLimits> {
        self.config.reassemble.then(|| ReassemblyLimits {
            max_message: self.config.max_reassembled_size,
            room: self
                .config
                .max_reassembly_memory
                .saturating_sub(self.reassembly_bytes),
        })
    }

    fn end_stream(&mut self, id: u32) {
        self.remove_stream(id);
        self.after_stream_end();
    }
}

/// Room for this many entries a table keeps whatever it holds; beyond it,
/// room more than eight times what it holds goes back, so a connection
/// that once had a burst of streams does not keep the burst's memory.
pub const TABLE_KEPT: usize = 128;

/// Gives back the room of a per-connection map that a burst left mostly
/// empty (call it after removing from the map; it costs two loads when
/// there is nothing to give back).
#[inline]
pub fn let_go_of_burst<K: Eq + std::hash::Hash, V>(map: &mut FxHashMap<K, V>) {
    if map.capacity() > TABLE_KEPT && map.len() * 8 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn tables_give_back_what_a_burst_left() {
        let now = Instant::now();
        let mut c = Connection::client(Config::default(), SetupPayload::default(), now);
        c.state = State::Established;
        let ids: Vec<u32> = (0..1000)
            .map(|_| {
                c.send_request(RequestKind::Stream { initial_n: 1 }, None, Bytes::new())
                    .unwrap()
            })
            .collect();
        let [(_, streams), (_, queue)] = c.table_room();
        assert!(streams >= 1000 && queue >= 1000, "room for the burst");
        while c.poll_transmit().is_some() {}
        assert_eq!(
            c.table_room(),
            [("streams", streams), ("transmit queue", 0)]
        );
        let mut map: FxHashMap<u32, u32> = ids.iter().map(|&i| (i, i)).collect();
        let full = map.capacity();
        for i in &ids[..700] {
            map.remove(i);
            let_go_of_burst(&mut map);
        }
        assert_eq!(map.capacity(), full, "more than an eighth held: kept");
        for i in &ids[700..800] {
            map.remove(i);
            let_go_of_burst(&mut map);
        }
        // It shrank once, below an eighth, to twice what it held then.
        assert!(map.capacity() < full / 2, "{} of {full}", map.capacity());
        assert!(
            map.capacity() >= 400,
            "{}: room for twice 200",
            map.capacity()
        );
        for i in &ids[800..900] {
            map.remove(i);
            let_go_of_burst(&mut map);
        }
        assert_eq!(map.len(), 100);
        for i in &ids[900..] {
            map.remove(i);
            let_go_of_burst(&mut map);
        }
        assert!(map.capacity() <= TABLE_KEPT, "empty: {}", map.capacity());
        let mut small: FxHashMap<u32, u32> = (0..100).map(|i| (i, i)).collect();
        let kept = small.capacity();
        small.retain(|_, _| false);
        let_go_of_burst(&mut small);
        assert_eq!(small.capacity(), kept, "small tables keep their room");
        // A queue of ordinary length keeps its room too.
        for _ in 0..100 {
            c.send_request(RequestKind::FireAndForget, None, Bytes::new())
                .unwrap();
        }
        while c.poll_transmit().is_some() {}
        let [_, (_, queue)] = c.table_room();
        assert!((100..=TABLE_KEPT).contains(&queue), "{queue}");
    }

    #[test]
    fn stream_ids_wrap_and_skip_ids_in_use() {
        let now = Instant::now();
        let mut c = Connection::client(Config::default(), SetupPayload::default(), now);
        let stream = RequestKind::Stream { initial_n: 1 };
        assert_eq!(c.send_request(stream, None, Bytes::new()), Ok(1));
        c.next_stream_id = MAX_STREAM_ID - 2;
        assert_eq!(
            c.send_request(stream, None, Bytes::new()),
            Ok(MAX_STREAM_ID - 2)
        );
        assert_eq!(
            c.send_request(stream, None, Bytes::new()),
            Ok(MAX_STREAM_ID)
        );
        // Wraps to 1, which is still in use, so 3.
        assert_eq!(c.send_request(stream, None, Bytes::new()), Ok(3));

        let mut s = Connection::server(Config::default(), now);
        s.state = State::Established;
        s.next_stream_id = MAX_STREAM_ID - 1;
        assert_eq!(
            s.send_request(stream, None, Bytes::new()),
            Ok(MAX_STREAM_ID - 1)
        );
        assert_eq!(s.send_request(stream, None, Bytes::new()), Ok(2));
    }
}
