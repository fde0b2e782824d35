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

mod resume;
mod stream;

pub use stream::{Credit, Interaction, StreamInfo};

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;

use self::resume::ResumeState;
use self::stream::{InboundPartial, MessageRole, OutboundPartial, Stream};
use crate::error::{ConnectionError, DecodeError, ErrorCode, Initiator, SendError, StreamError};
use crate::fragment::{Fragmenter, MIN_FRAGMENT_SIZE, MessageKind, Reassembly};
use crate::frame::{
    Cancel, ErrorFrame, Flags, FrameType, FrameView, Header, Keepalive, Lease, MAX_STREAM_ID,
    MAX_U24, MetadataPush, RequestN, Resume, ResumeOk, Setup, VERSION,
};
use crate::out::OutFrame;

/// A received frame handed to [`Connection::forward_request`] or
/// [`Connection::forward`]: by reference, its body is shared with the
/// receive buffer (one more reference); by value, the buffer itself moves.
pub trait ForwardFrame {
    /// The frame.
    fn view(&self) -> &FrameView;
    /// The outgoing frame: `stream_id`, then the received bytes after the stream id.
    fn into_out(self, stream_id: u32) -> OutFrame;
    /// The outgoing REQUEST_STREAM or REQUEST_CHANNEL with `initial_n` in
    /// place of the received initial request n.
    fn into_out_with_request_n(self, stream_id: u32, initial_n: u32) -> OutFrame;
}

impl ForwardFrame for &FrameView {
    fn view(&self) -> &FrameView {
        self
    }
    fn into_out(self, stream_id: u32) -> OutFrame {
        OutFrame::forward(stream_id, self)
    }
    fn into_out_with_request_n(self, stream_id: u32, initial_n: u32) -> OutFrame {
        OutFrame::forward_with_request_n(stream_id, self.clone(), initial_n)
    }
}

impl ForwardFrame for FrameView {
    fn view(&self) -> &FrameView {
        self
    }
    fn into_out(self, stream_id: u32) -> OutFrame {
        OutFrame::forward_owned(stream_id, self)
    }
    fn into_out_with_request_n(self, stream_id: u32, initial_n: u32) -> OutFrame {
        OutFrame::forward_with_request_n(stream_id, self, initial_n)
    }
}

/// Which end of the transport this side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opened the connection; sends SETUP; odd stream ids.
    Client,
    /// Accepted the connection; even stream ids.
    Server,
}

/// Settings of one connection.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest frame this side sends; longer messages are fragmented.
    /// 0 means "only where a frame would not fit the 24-bit length".
    pub fragment_size: usize,
    /// Cap on one incoming fragmented message (metadata + data) when
    /// reassembling. Forwarded fragments are not buffered, so pass-through
    /// mode does not cap them.
    pub max_reassembled_size: usize,
    /// Cap on the bytes held by all incoming messages being reassembled at
    /// once; the message that would pass it ends its stream with REJECTED.
    pub max_reassembly_memory: usize,
    /// Deliver whole messages (reassembled) instead of each fragment.
    pub reassemble: bool,
    /// Most streams the peer may have open at once; requests beyond it get ERROR[REJECTED].
    pub max_inbound_streams: usize,
    /// Client: interval between its KEEPALIVE frames.
    pub keepalive_interval: Duration,
    /// Client: how long the server may stay silent before it is considered dead.
    pub max_lifetime: Duration,
    /// Server: how long a new connection may take to send SETUP or RESUME.
    pub setup_timeout: Duration,
    /// Server: the max lifetime a client asks for in SETUP is clamped to
    /// `peer_lifetime.0 ..= peer_lifetime.1` (a client asking for hours of
    /// silence cannot pin a dead connection that long).
    pub peer_lifetime: (Duration, Duration),
    /// Client: ask for LEASE semantics (the L flag).
    pub lease: bool,
    /// Client: the resume token to offer in SETUP (resume needs `resume_buffer` > 0 too).
    pub resume_token: Option<Bytes>,
    /// Bytes of sent frames kept for resumption; 0 disables resume (a server
    /// then refuses SETUP with the R flag and every RESUME).
    pub resume_buffer: usize,
    /// Client: metadata MIME type announced in SETUP.
    pub metadata_mime: Bytes,
    /// Client: data MIME type announced in SETUP.
    pub data_mime: Bytes,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fragment_size: 0,
            max_reassembled_size: MAX_U24,
            max_reassembly_memory: 64 << 20,
            reassemble: false,
            max_inbound_streams: 65_536,
            keepalive_interval: Duration::from_secs(20),
            max_lifetime: Duration::from_secs(90),
            setup_timeout: Duration::from_secs(30),
            peer_lifetime: (Duration::ZERO, Duration::MAX),
            lease: false,
            resume_token: None,
            resume_buffer: 0,
            metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
            data_mime: Bytes::from_static(b"application/octet-stream"),
        }
    }
}

/// The metadata and data a client sends in its SETUP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetupPayload {
    /// Setup metadata.
    pub metadata: Option<Bytes>,
    /// Setup data.
    pub data: Bytes,
}

/// What a local request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// REQUEST_RESPONSE
    RequestResponse,
    /// REQUEST_FNF
    FireAndForget,
    /// REQUEST_STREAM with its initial request n (> 0)
    Stream {
        /// Initial request n.
        initial_n: u32,
    },
    /// REQUEST_CHANNEL with its initial request n (> 0); `complete` if the
    /// requester sends nothing after the request.
    Channel {
        /// Initial request n.
        initial_n: u32,
        /// The requester's half is complete with this request.
        complete: bool,
    },
}

/// Something the application must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Server: the client's SETUP was valid and is accepted. The application
    /// may still refuse it with [`Connection::reject_setup`]. If it asked for
    /// LEASE (`lease`), the client sends no request until the application
    /// grants one with [`Connection::send_lease`].
    Setup(Box<Setup>),
    /// Server: a new connection opened with RESUME. Resume the session with
    /// that token ([`Connection::resume_session`]) or refuse
    /// ([`Connection::reject_resume`]).
    ResumeRequested(Box<Resume>),
    /// Client: the server accepted RESUME; lost frames have been queued again.
    Resumed,
    /// The first (or only) frame of a request from the peer. With
    /// `frame.follows()` the rest arrives as [`Event::Fragment`]s.
    Request {
        /// The stream.
        stream_id: u32,
        /// Its interaction model.
        interaction: Interaction,
        /// The request frame (a whole reassembled message when reassembling).
        frame: FrameView,
        /// The stream is already over (fire-and-forget).
        ended: bool,
    },
    /// A follow-up fragment of a message (only when not reassembling).
    Fragment {
        /// The stream.
        stream_id: u32,
        /// The PAYLOAD fragment.
        frame: FrameView,
        /// The stream ended with this fragment.
        ended: bool,
    },
    /// The first (or only) frame of a PAYLOAD message on a stream.
    Payload {
        /// The stream.
        stream_id: u32,
        /// The PAYLOAD frame (a whole reassembled message when reassembling).
        frame: FrameView,
        /// The stream ended with this payload.
        ended: bool,
    },
    /// The peer granted `n` more items.
    RequestN {
        /// The stream.
        stream_id: u32,
        /// Credit added.
        n: u32,
    },
    /// The peer cancelled the stream (or, on a channel, the requester's half of it).
    Cancel {
        /// The stream.
        stream_id: u32,
        /// The whole stream is over.
        ended: bool,
    },
    /// The peer ended the stream with an ERROR.
    Error {
        /// The stream.
        stream_id: u32,
        /// The error code.
        code: ErrorCode,
        /// The error data (usually a UTF-8 message).
        data: Bytes,
    },
    /// This side ended a stream because the peer broke a rule on it; the peer
    /// was sent ERROR (or CANCEL, where this side is the requester).
    StreamError {
        /// The stream.
        stream_id: u32,
        /// What happened.
        error: StreamError,
    },
    /// METADATA_PUSH from the peer.
    MetadataPush(Bytes),
    /// The peer granted a lease.
    Lease(Lease),
    /// The peer sent ERROR[CONNECTION_CLOSE]: no new streams; the connection
    /// closes when the open ones end.
    Closing(ConnectionError),
    /// The connection is closed; frames still queued (a final ERROR) should
    /// be flushed before the transport is closed.
    Closed(ConnectionError),
}

/// Counters for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames handed to `handle_frame`.
    pub frames_received: u64,
    /// Frames queued for transmission.
    pub frames_sent: u64,
    /// Frames ignored under the spec's "handling the unexpected" rules.
    pub frames_ignored: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Server: waiting for SETUP or RESUME.
    AwaitingSetup,
    /// Server: RESUME received, waiting for the application's decision.
    ResumeOffered,
    Established,
    /// Client: RESUME sent, waiting for RESUME_OK.
    AwaitingResumeOk,
    /// The transport is gone; the session is kept for resumption.
    Disconnected,
    Closed,
}

#[derive(Clone, Copy, Debug)]
struct LeaseWindow {
    expires: Instant,
    remaining: u32,
}

impl LeaseWindow {
    fn take(lease: &mut Option<Self>, now: Instant) -> bool {
        match lease {
            Some(w) if w.remaining > 0 && now < w.expires => {
                w.remaining -= 1;
                true
            }
            _ => false,
        }
    }

    fn available(lease: &Option<Self>, now: Instant) -> bool {
        matches!(lease, Some(w) if w.remaining > 0 && now < w.expires)
    }
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
    out: VecDeque<OutFrame>,
    out_bytes: usize,
    max_lifetime: Duration,
    keepalive_interval: Duration,
    last_received: Instant,
    next_keepalive: Option<Instant>,
    setup_confirmed: bool,
    lease_enabled: bool,
    peer_lease: Option<LeaseWindow>,
    granted_lease: Option<LeaseWindow>,
    resume: Option<ResumeState>,
    draining: bool,
    /// Requests from the peer refused by this state machine (limits, draining, ...).
    requests_refused: u64,
    close_when_idle: bool,
    /// Who asked for the close that waits for streams to end.
    close_initiator: Initiator,
    /// Bytes held by incoming messages being reassembled.
    reassembly_bytes: usize,
    /// Bytes ever queued for transmission, and ever taken by
    /// [`Connection::poll_transmit`] (or dropped unsent): positions in the
    /// outgoing byte stream.
    queued_total: u64,
    sent_total: u64,
    /// Since when the transport has not been reading the peer's frames:
    /// that time is not the peer's silence.
    reading_paused_since: Option<Instant>,
    /// Server: when to tell a peer that is not being read that this side
    /// is alive (it cannot see that peer's KEEPALIVEs to answer them).
    next_liveness: Option<Instant>,
    /// After [`Connection::shut_down`]: when the connection closes.
    linger_until: Option<Instant>,
    stats: Stats,
}

fn interaction_of(t: FrameType) -> Option<Interaction> {
    Some(match t {
        FrameType::RequestResponse => Interaction::RequestResponse,
        FrameType::RequestFnf => Interaction::FireAndForget,
        FrameType::RequestStream => Interaction::Stream,
        FrameType::RequestChannel => Interaction::Channel,
        _ => return None,
    })
}

fn ms(d: Duration) -> u32 {
    d.as_millis().clamp(1, MAX_STREAM_ID as u128) as u32
}

impl Connection {
    fn new(role: Role, config: Config, now: Instant) -> Self {
        let max_lifetime = match role {
            Role::Client => config.max_lifetime,
            Role::Server => config.setup_timeout,
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
            out: VecDeque::new(),
            out_bytes: 0,
            max_lifetime,
            keepalive_interval: config.keepalive_interval,
            last_received: now,
            next_keepalive: None,
            setup_confirmed: false,
            lease_enabled: false,
            peer_lease: None,
            granted_lease: None,
            resume: None,
            draining: false,
            requests_refused: 0,
            close_when_idle: false,
            close_initiator: Initiator::Remote,
            reassembly_bytes: 0,
            queued_total: 0,
            sent_total: 0,
            reading_paused_since: None,
            next_liveness: None,
            linger_until: None,
            stats: Stats::default(),
            config,
        }
    }

    /// A client connection; its SETUP is queued at once.
    ///
    /// "Immediately upon successful connection, the client MUST send either a
    /// SETUP or RESUME frame with Stream ID of 0."
    pub fn client(config: Config, setup: SetupPayload, now: Instant) -> Self {
        let mut conn = Self::new(Role::Client, config, now);
        let resume_token = conn
            .config
            .resume_token
            .clone()
            .filter(|_| conn.config.resume_buffer > 0);
        let frame = Setup {
            version: VERSION,
            keepalive_interval: ms(conn.config.keepalive_interval),
            max_lifetime: ms(conn.config.max_lifetime),
            resume_token: resume_token.clone(),
            lease: conn.config.lease,
            metadata_mime: conn.config.metadata_mime.clone(),
            data_mime: conn.config.data_mime.clone(),
            metadata: setup.metadata,
            data: setup.data,
        };
        conn.lease_enabled = conn.config.lease;
        conn.resume = resume_token.map(|t| ResumeState::new(t, conn.config.resume_buffer));
        let frame = crate::frame::Frame::from(frame);
        if frame.encoded_len() > MAX_U24 {
            conn.state = State::Closed;
            conn.events.push_back(Event::Closed(ConnectionError::local(
                ErrorCode::INVALID_SETUP,
                "the SETUP payload does not fit one frame (16 MiB)",
            )));
            return conn;
        }
        conn.state = State::Established;
        conn.next_keepalive = Some(now + conn.keepalive_interval);
        conn.push_control(OutFrame::from_owned(frame));
        conn
    }

    /// A server connection, waiting for SETUP or RESUME.
    pub fn server(config: Config, now: Instant) -> Self {
        Self::new(Role::Server, config, now)
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
        self.state == State::Established
    }

    /// Whether LEASE semantics were negotiated.
    pub fn lease_enabled(&self) -> bool {
        self.lease_enabled
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

    /// The next frame to write, if any.
    pub fn poll_transmit(&mut self) -> Option<OutFrame> {
        let frame = self.out.pop_front()?;
        self.out_bytes -= frame.len();
        self.sent_total += frame.len() as u64;
        Some(frame)
    }

    /// Where the outgoing byte stream stands: bytes ever queued, and bytes
    /// ever taken by [`Connection::poll_transmit`]. A frame queued when the
    /// first was `q` has been taken once the second reaches `q`.
    pub fn transmit_positions(&self) -> (u64, u64) {
        (self.queued_total, self.sent_total)
    }

    /// Drops every frame waiting to be written.
    fn clear_out(&mut self) {
        self.out.clear();
        self.sent_total += self.out_bytes as u64;
        self.out_bytes = 0;
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

    /// Bytes queued for transmission.
    pub fn pending_bytes(&self) -> usize {
        self.out_bytes
    }

    /// The transport stops reading the peer's frames (to hold it back) or
    /// starts again. Time spent not reading is not the peer's silence: the
    /// max lifetime does not run out meanwhile, and a server tells the
    /// peer it is alive every keepalive interval, since the peer's own
    /// KEEPALIVEs wait unread.
    pub fn set_reading(&mut self, now: Instant, reading: bool) {
        match (reading, self.reading_paused_since) {
            (false, None) => {
                self.reading_paused_since = Some(now);
                if self.role == Role::Server {
                    self.next_liveness = Some(now + self.keepalive_interval);
                }
            }
            (true, Some(since)) => {
                // The peer's silence resumes where the pause found it.
                let silent_before = since.saturating_duration_since(self.last_received);
                self.last_received = now.checked_sub(silent_before).unwrap_or(self.last_received);
                self.reading_paused_since = None;
                self.next_liveness = None;
            }
            _ => {}
        }
    }

    /// Whether the transport is told to read (see [`Connection::set_reading`]).
    pub fn is_reading(&self) -> bool {
        self.reading_paused_since.is_none()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let lifetime = self.last_received + self.max_lifetime;
        // The peer cannot be heard while it is not read: no lifetime then.
        let peer_lifetime = Some(lifetime).filter(|_| self.reading_paused_since.is_none());
        match self.state {
            State::AwaitingSetup | State::ResumeOffered | State::AwaitingResumeOk => Some(lifetime),
            State::Established => [
                peer_lifetime,
                self.next_liveness,
                self.linger_until,
                self.next_keepalive,
                self.peer_lease
                    .filter(|l| l.remaining > 0)
                    .map(|l| l.expires),
                self.granted_lease
                    .filter(|l| l.remaining > 0)
                    .map(|l| l.expires),
            ]
            .into_iter()
            .flatten()
            .min(),
            State::Disconnected | State::Closed => None,
        }
    }

    /// Time has passed: send due KEEPALIVEs, close a connection whose peer
    /// has been silent past the max lifetime (or never sent SETUP).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        match self.state {
            State::AwaitingSetup | State::ResumeOffered => {
                if now >= self.last_received + self.max_lifetime {
                    self.fail(
                        ErrorCode::INVALID_SETUP,
                        format!(
                            "no SETUP or RESUME within {} ms",
                            self.max_lifetime.as_millis()
                        ),
                    );
                }
            }
            State::Established | State::AwaitingResumeOk => {
                // "When a LEASE expires due to time, the value of the Number of
                // Requests that a Requester may make is implicitly 0."
                for lease in [&mut self.peer_lease, &mut self.granted_lease]
                    .into_iter()
                    .flatten()
                {
                    if now >= lease.expires {
                        lease.remaining = 0;
                    }
                }
                if self.linger_until.is_some_and(|t| now >= t) {
                    self.state = State::Closed;
                    self.events.push_back(Event::Closed(ConnectionError::local(
                        ErrorCode::CONNECTION_CLOSE,
                        "closed by this side (ERROR[CONNECTION_CLOSE] was sent)",
                    )));
                    return;
                }
                if self.reading_paused_since.is_none()
                    && now >= self.last_received + self.max_lifetime
                {
                    self.fail(
                        ErrorCode::CONNECTION_ERROR,
                        format!(
                            "no frame from the peer for {} ms (max lifetime)",
                            self.max_lifetime.as_millis()
                        ),
                    );
                    return;
                }
                // Telling a peer that is not read that this side is alive
                // asks for nothing back (no R); the client's own asks for
                // an echo.
                self.next_liveness = self.keepalive_if_due(self.next_liveness, now, false);
                self.next_keepalive = self.keepalive_if_due(self.next_keepalive, now, true);
            }
            State::Disconnected | State::Closed => {}
        }
    }

    /// Sends a KEEPALIVE (with R if `respond`) once `due` has come, on an
    /// established connection; returns when the next one is due.
    fn keepalive_if_due(
        &mut self,
        due: Option<Instant>,
        now: Instant,
        respond: bool,
    ) -> Option<Instant> {
        match due {
            Some(t) if now >= t && self.state == State::Established => {
                let position = self.resume.as_ref().map_or(0, |r| r.received_position);
                let frame = Keepalive {
                    respond,
                    last_received_position: position,
                    data: Bytes::new(),
                };
                self.push_control(OutFrame::from_owned(frame));
                Some(now + self.keepalive_interval)
            }
            other => other,
        }
    }

    // ---------------------------------------------------------------- input

    /// Handles one received frame (without length prefix).
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) {
        self.now = now;
        if matches!(self.state, State::Closed | State::Disconnected) {
            return;
        }
        self.last_received = now;
        self.stats.frames_received += 1;
        let header = match Header::parse(&frame) {
            Ok(h) => h,
            Err(e) => {
                let code = self.protocol_error_code();
                return self.fail(code, format!("malformed frame: {e}"));
            }
        };
        if header.stream_id != 0
            && header.known_type().is_some_and(FrameType::is_resumable)
            && let Some(r) = self.resume.as_mut()
        {
            r.received(frame.len());
        }
        let view = match FrameView::parse(frame) {
            Ok(v) => v,
            Err(e) => return self.on_malformed(header, e),
        };
        match self.state {
            State::AwaitingSetup => self.on_first_frame(view),
            State::AwaitingResumeOk => self.on_resume_reply(view),
            State::Established => self.on_frame(view),
            State::ResumeOffered => self.ignore(),
            State::Disconnected | State::Closed => {}
        }
    }

    fn ignore(&mut self) {
        self.stats.frames_ignored += 1;
    }

    fn protocol_error_code(&self) -> ErrorCode {
        if self.state == State::AwaitingSetup {
            ErrorCode::INVALID_SETUP
        } else {
            ErrorCode::CONNECTION_ERROR
        }
    }

    fn is_peer_stream_id(&self, id: u32) -> bool {
        // "a client MUST generate odd Stream IDs and a server MUST generate even Stream IDs."
        match self.role {
            Role::Server => id % 2 == 1,
            Role::Client => id.is_multiple_of(2),
        }
    }

    fn on_malformed(&mut self, header: Header, err: DecodeError) {
        let Some(frame_type) = header.known_type() else {
            // "An implementation MAY send an ERROR[CONNECTION_ERROR] frame and close the underlying
            // transport connection on reception of a frame that it does not understand with this bit not set."
            if header.flags.has(Flags::IGNORE) && self.state != State::AwaitingSetup {
                return self.ignore();
            }
            let code = self.protocol_error_code();
            return self.fail(
                code,
                format!(
                    "unknown frame type {:#04x} without the Ignore flag",
                    header.frame_type
                ),
            );
        };
        if self.state == State::AwaitingSetup {
            return self.fail(
                ErrorCode::INVALID_SETUP,
                format!("malformed {frame_type}: {err}"),
            );
        }
        if self.state == State::ResumeOffered {
            return self.ignore();
        }
        let id = header.stream_id;
        if frame_type.is_request() {
            if id == 0 || !self.is_peer_stream_id(id) {
                return self.fail(
                    ErrorCode::CONNECTION_ERROR,
                    format!("{frame_type} on invalid stream id {id}"),
                );
            }
            if self.streams.contains_key(&id) {
                return self.ignore();
            }
            let error = ErrorFrame {
                stream_id: id,
                code: ErrorCode::INVALID,
                data: Bytes::from(format!("malformed {frame_type}: {err}")),
            };
            return self.push_stream_frame(OutFrame::from_owned(error));
        }
        let stream_frame = matches!(
            frame_type,
            FrameType::Payload
                | FrameType::RequestN
                | FrameType::Error
                | FrameType::Cancel
                | FrameType::Ext
        );
        // The well-formed frame would be ignored here, so the malformed one is too:
        // stream frames on stream 0, EXT with Ignore, a second SETUP, a
        // RESUME_OK nobody asked for.
        let ignorable = (stream_frame && frame_type != FrameType::Error && id == 0)
            || (frame_type == FrameType::Ext && header.flags.has(Flags::IGNORE))
            || matches!(frame_type, FrameType::Setup | FrameType::ResumeOk);
        if ignorable {
            return self.ignore();
        }
        if stream_frame && id != 0 {
            if self.streams.contains_key(&id) {
                return self.stream_error(
                    id,
                    ErrorCode::INVALID,
                    format!("malformed {frame_type}: {err}"),
                );
            }
            return self.ignore();
        }
        self.fail(
            ErrorCode::CONNECTION_ERROR,
            format!("malformed {frame_type}: {err}"),
        )
    }

    fn on_first_frame(&mut self, view: FrameView) {
        // "Any other frame received that is NOT a SETUP|RESUME frame or a SETUP|RESUME frame with
        // a Stream ID > 0, MUST cause the server to send an ERROR[INVALID_SETUP] and close the connection."
        if view.stream_id() != 0
            || !matches!(view.frame_type(), FrameType::Setup | FrameType::Resume)
        {
            return self.fail(
                ErrorCode::INVALID_SETUP,
                format!(
                    "the first frame must be SETUP or RESUME on stream 0, not {} on stream {}",
                    view.frame_type(),
                    view.stream_id()
                ),
            );
        }
        if view.frame_type() == FrameType::Resume {
            return self.on_resume_offer(view);
        }
        let setup = match Setup::from_view(&view) {
            Ok(s) => s,
            Err(e) => return self.fail(ErrorCode::INVALID_SETUP, format!("malformed SETUP: {e}")),
        };
        if setup.version.major != VERSION.major || setup.version.minor != VERSION.minor {
            return self.fail(
                ErrorCode::UNSUPPORTED_SETUP,
                format!(
                    "protocol version {}.{} is not supported (this server speaks {}.{})",
                    setup.version.major, setup.version.minor, VERSION.major, VERSION.minor
                ),
            );
        }
        if setup.keepalive_interval == 0 || setup.max_lifetime == 0 {
            return self.fail(
                ErrorCode::INVALID_SETUP,
                "keepalive interval and max lifetime must be > 0",
            );
        }
        if let Some(token) = &setup.resume_token {
            // "A server that receives a SETUP frame that has (R)esume Enabled set, but does not support
            // resuming operation, must reject the SETUP with an ERROR[REJECTED_SETUP]."
            if self.config.resume_buffer == 0 {
                return self.fail(
                    ErrorCode::REJECTED_SETUP,
                    "resume is not supported by this server",
                );
            }
            self.resume = Some(ResumeState::new(token.clone(), self.config.resume_buffer));
        }
        self.lease_enabled = setup.lease;
        let (min, max) = self.config.peer_lifetime;
        self.max_lifetime = Duration::from_millis(u64::from(setup.max_lifetime))
            .max(min)
            .min(max);
        self.keepalive_interval = Duration::from_millis(u64::from(setup.keepalive_interval));
        self.state = State::Established;
        self.events.push_back(Event::Setup(Box::new(setup)));
    }

    fn on_resume_offer(&mut self, view: FrameView) {
        // "MUST send an ERROR[REJECTED_RESUME] frame if the server does not support resuming operation."
        if self.config.resume_buffer == 0 {
            return self.fail(
                ErrorCode::REJECTED_RESUME,
                "resume is not supported by this server",
            );
        }
        match Resume::from_view(&view) {
            Ok(resume) => {
                self.state = State::ResumeOffered;
                self.events
                    .push_back(Event::ResumeRequested(Box::new(resume)));
            }
            Err(e) => self.fail(ErrorCode::INVALID_SETUP, format!("malformed RESUME: {e}")),
        }
    }

    fn on_resume_reply(&mut self, view: FrameView) {
        match view.frame_type() {
            FrameType::ResumeOk => {
                let Ok(ok) = ResumeOk::from_view(&view) else {
                    return self.fail(ErrorCode::CONNECTION_ERROR, "malformed RESUME_OK");
                };
                let position = ok.last_received_client_position;
                let Some(r) = self.resume.as_mut() else {
                    return self.ignore();
                };
                if !r.can_resume_from(position) {
                    return self.fail(
                        ErrorCode::CONNECTION_ERROR,
                        format!(
                            "cannot resume: frames from position {position} are no longer buffered"
                        ),
                    );
                }
                let frames = r.frames_from(position);
                self.state = State::Established;
                self.next_keepalive = Some(self.now + self.keepalive_interval);
                for f in frames {
                    self.transmit(f);
                }
                self.events.push_back(Event::Resumed);
            }
            FrameType::Error if view.stream_id() == 0 => {
                let error = self.remote_error(&view);
                self.close_remote(error);
            }
            _ => self.ignore(),
        }
    }

    fn remote_error(&self, view: &FrameView) -> ConnectionError {
        ConnectionError {
            code: view.error_code().unwrap_or(ErrorCode::CONNECTION_ERROR),
            message: String::from_utf8_lossy(view.data_slice())
                .into_owned()
                .into(),
            initiator: Initiator::Remote,
        }
    }

    fn on_frame(&mut self, view: FrameView) {
        if self.role == Role::Client
            && !self.setup_confirmed
            && (view.frame_type() == FrameType::Lease
                || view.frame_type().is_request()
                || (view.stream_id() != 0 && self.streams.contains_key(&view.stream_id())))
        {
            // "A client assumes a SETUP is accepted if it receives a response to a request, a LEASE
            // frame, or if it sees a REQUEST type."
            self.setup_confirmed = true;
        }
        match view.frame_type() {
            // "A server MUST ignore a SETUP frame after it has accepted a previous SETUP."
            // "A client MUST ignore a SETUP frame."
            FrameType::Setup | FrameType::ResumeOk => self.ignore(),
            FrameType::Resume => {
                if self.role == Role::Server {
                    // "A Server that receives a RESUME frame after a SETUP frame, SHOULD send an ERROR[CONNECTION_ERROR]."
                    self.fail(
                        ErrorCode::CONNECTION_ERROR,
                        "RESUME received on an established connection",
                    );
                } else {
                    self.ignore();
                }
            }
            FrameType::Lease => self.on_lease(view),
            FrameType::Keepalive => self.on_keepalive(view),
            FrameType::MetadataPush => {
                // "Receiving a METADATA_PUSH with a non-0 Stream ID MUST be ignored."
                if view.stream_id() != 0 {
                    return self.ignore();
                }
                self.events
                    .push_back(Event::MetadataPush(view.metadata().unwrap_or_default()));
            }
            FrameType::Error => self.on_error(view),
            FrameType::RequestResponse
            | FrameType::RequestFnf
            | FrameType::RequestStream
            | FrameType::RequestChannel => self.on_request(view),
            FrameType::RequestN => self.on_request_n(view),
            FrameType::Cancel => self.on_cancel(view),
            FrameType::Payload => self.on_payload(view),
            FrameType::Ext => {
                if view.ignore() {
                    return self.ignore();
                }
                let ext_type = crate::frame::Ext::from_view(&view).extended_type;
                self.fail(
                    ErrorCode::CONNECTION_ERROR,
                    format!("EXT frame of extended type {ext_type} is not supported and lacks the Ignore flag"),
                );
            }
        }
    }

    fn on_lease(&mut self, view: FrameView) {
        if view.stream_id() != 0 || !self.lease_enabled {
            return self.ignore();
        }
        let lease = Lease::from_view(&view);
        self.peer_lease = Some(LeaseWindow {
            expires: self.now + Duration::from_millis(u64::from(lease.ttl)),
            remaining: lease.number_of_requests & crate::frame::MAX_REQUEST_N,
        });
        self.events.push_back(Event::Lease(lease));
    }

    fn on_keepalive(&mut self, view: FrameView) {
        if view.stream_id() != 0 {
            return self.ignore();
        }
        let Ok(keepalive) = Keepalive::from_view(&view) else {
            return self.fail(ErrorCode::CONNECTION_ERROR, "malformed KEEPALIVE");
        };
        if let Some(r) = self.resume.as_mut() {
            r.acknowledge(keepalive.last_received_position);
        }
        if keepalive.respond {
            let position = self.resume.as_ref().map_or(0, |r| r.received_position);
            let echo = Keepalive {
                respond: false,
                last_received_position: position,
                // A copy: the echo must not pin the peer's receive buffer.
                data: Bytes::copy_from_slice(&keepalive.data),
            };
            self.push_control(OutFrame::from_owned(echo));
        }
    }

    fn on_error(&mut self, view: FrameView) {
        let id = view.stream_id();
        let code = view.error_code().unwrap_or(ErrorCode::CONNECTION_ERROR);
        if id == 0 {
            if code.is_setup_rejection() {
                // "A server MUST ignore an ERROR[INVALID_SETUP|UNSUPPORTED_SETUP|REJECTED_SETUP|REJECTED_RESUME] frame."
                // "A client MUST ignore an ERROR[...] frame after it has completed connection establishment."
                if self.role == Role::Server || self.setup_confirmed {
                    return self.ignore();
                }
            }
            let error = self.remote_error(&view);
            if code == ErrorCode::CONNECTION_CLOSE {
                // "Sender or Receiver of this frame MUST wait for outstanding streams to terminate
                // before closing the connection."
                self.draining = true;
                self.close_when_idle = true;
                self.close_initiator = Initiator::Remote;
                self.events.push_back(Event::Closing(error.clone()));
                if self.streams.is_empty() {
                    self.close_remote(error);
                }
                return;
            }
            return self.close_remote(error);
        }
        // "Receiving an ERROR on an unknown Stream ID MUST be ignored."
        if self.remove_stream(id).is_none() {
            return self.ignore();
        }
        self.events.push_back(Event::Error {
            stream_id: id,
            code,
            data: view.data(),
        });
        self.after_stream_end();
    }

    fn on_request(&mut self, view: FrameView) {
        let id = view.stream_id();
        let frame_type = view.frame_type();
        let Some(interaction) = interaction_of(frame_type) else {
            return self.ignore();
        };
        if id == 0 || !self.is_peer_stream_id(id) {
            return self.fail(
                ErrorCode::CONNECTION_ERROR,
                format!("{frame_type} on stream {id}, which the peer may not open"),
            );
        }
        // "Receiving a Request frame on a Stream ID that is already in use MUST be ignored."
        if self.streams.contains_key(&id) {
            return self.ignore();
        }
        if self.draining {
            return self.refuse(id, ErrorCode::REJECTED, "the connection is closing");
        }
        if self.inbound_streams >= self.config.max_inbound_streams {
            let msg = format!(
                "too many concurrent streams (limit {})",
                self.config.max_inbound_streams
            );
            return self.refuse(id, ErrorCode::REJECTED, msg);
        }
        let initial_n = view.request_n();
        if matches!(interaction, Interaction::Stream | Interaction::Channel) && initial_n == 0 {
            return self.refuse(id, ErrorCode::INVALID, "initial request n must be > 0");
        }
        if self.config.reassemble
            && view.follows()
            && self.reassembly_bytes + view.payload_len() > self.config.max_reassembly_memory
        {
            let msg = "too many fragmented messages in progress on this connection";
            return self.refuse(id, ErrorCode::REJECTED, msg);
        }
        // "A Responder that receives a REQUEST that it can not honor due to LEASE restrictions
        // MUST respond with an ERROR[REJECTED]."
        if self.lease_enabled && !LeaseWindow::take(&mut self.granted_lease, self.now) {
            return self.refuse(
                id,
                ErrorCode::REJECTED,
                "no lease: the request exceeds the lease granted",
            );
        }
        let mut stream = Stream::accepted(interaction, initial_n);
        if view.follows() {
            let reassembly = if self.config.reassemble {
                match Reassembly::start(&view, self.config.max_reassembled_size) {
                    Ok(r) => Some(r),
                    Err(e) => return self.refuse(id, ErrorCode::REJECTED, e.to_string()),
                }
            } else {
                None
            };
            let partial = InboundPartial {
                role: MessageRole::Request,
                complete: view.complete(),
                len: view.payload_len(),
                data_started: !view.data_slice().is_empty(),
                reassembly,
            };
            self.reassembly_bytes += partial.buffered();
            stream.inbound_partial = Some(partial);
            self.streams.insert(id, stream);
            self.inbound_streams += 1;
            if !self.config.reassemble {
                self.events.push_back(Event::Request {
                    stream_id: id,
                    interaction,
                    frame: view,
                    ended: false,
                });
            }
            return;
        }
        stream.request_done(view.complete());
        let ended = stream.is_done();
        if !ended {
            self.streams.insert(id, stream);
            self.inbound_streams += 1;
        }
        self.events.push_back(Event::Request {
            stream_id: id,
            interaction,
            frame: view,
            ended,
        });
    }

    fn on_payload(&mut self, view: FrameView) {
        let id = view.stream_id();
        let max = self.config.max_reassembled_size;
        // "Receiving a PAYLOAD on an unknown Stream ID (including 0) MUST be ignored."
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.ignore();
        };
        if let Some(partial) = stream.inbound_partial.as_mut() {
            // A follow-up fragment of a message in progress.
            let added = view.payload_len();
            let reassembling = partial.reassembly.is_some();
            if reassembling {
                if partial.len + added > max {
                    let msg =
                        format!("fragmented message exceeds the reassembly limit of {max} bytes");
                    return self.stream_error(id, ErrorCode::REJECTED, msg);
                }
                if self.reassembly_bytes + added > self.config.max_reassembly_memory {
                    let msg = "too many fragmented messages in progress on this connection";
                    return self.stream_error(id, ErrorCode::REJECTED, msg);
                }
            } else if partial.data_started && view.metadata_slice().is_some_and(|m| !m.is_empty()) {
                // "When fragmented, the Metadata MUST be transmitted completely before the Data."
                let msg = "fragment carries metadata after data";
                return self.stream_error(id, ErrorCode::INVALID, msg);
            }
            partial.len += added;
            partial.data_started |= !view.data_slice().is_empty();
            partial.complete |= view.complete();
            if reassembling {
                self.reassembly_bytes += added;
            }
            let whole = match partial.reassembly.as_mut().map(|r| r.push(&view)) {
                Some(Err(e)) => return self.stream_error(id, ErrorCode::INVALID, e.to_string()),
                Some(Ok(whole)) => whole,
                None => None,
            };
            let mut role = None;
            if !view.follows()
                && let Some(p) = stream.inbound_partial.take()
            {
                self.reassembly_bytes -= p.buffered();
                match p.role {
                    MessageRole::Request => stream.request_done(p.complete),
                    MessageRole::Item => stream.item_received(p.complete),
                }
                role = Some(p.role);
            }
            let ended = stream.is_done();
            let interaction = stream.interaction;
            let event = match (whole, role) {
                (Some(frame), Some(MessageRole::Request)) => Some(Event::Request {
                    stream_id: id,
                    interaction,
                    frame,
                    ended,
                }),
                (Some(frame), _) => Some(Event::Payload {
                    stream_id: id,
                    frame,
                    ended,
                }),
                (None, _) if reassembling => None,
                (None, _) => Some(Event::Fragment {
                    stream_id: id,
                    frame: view,
                    ended,
                }),
            };
            self.events.extend(event);
            if ended {
                self.end_stream(id);
            }
            return;
        }
        if !stream.inbound_open {
            return self.ignore();
        }
        let next = view.next();
        let complete = view.complete();
        if !next && !complete && stream.interaction != Interaction::RequestResponse {
            // "A PAYLOAD MUST NOT have both (C)omplete and (N)ext empty (false)."
            return self.ignore();
        }
        if next && !stream.recv_credit.take() {
            return self.stream_error(
                id,
                ErrorCode::INVALID,
                "PAYLOAD sent without REQUEST_N credit",
            );
        }
        if view.follows() {
            let reassembly = if self.config.reassemble {
                if self.reassembly_bytes + view.payload_len() > self.config.max_reassembly_memory {
                    let msg = "too many fragmented messages in progress on this connection";
                    return self.stream_error(id, ErrorCode::REJECTED, msg);
                }
                match Reassembly::start(&view, max) {
                    Ok(r) => Some(r),
                    Err(e) => return self.stream_error(id, ErrorCode::REJECTED, e.to_string()),
                }
            } else {
                None
            };
            let partial = InboundPartial {
                role: MessageRole::Item,
                complete,
                len: view.payload_len(),
                data_started: !view.data_slice().is_empty(),
                reassembly,
            };
            self.reassembly_bytes += partial.buffered();
            stream.inbound_partial = Some(partial);
            if !self.config.reassemble {
                self.events.push_back(Event::Payload {
                    stream_id: id,
                    frame: view,
                    ended: false,
                });
            }
            return;
        }
        stream.item_received(complete);
        let ended = stream.is_done();
        self.events.push_back(Event::Payload {
            stream_id: id,
            frame: view,
            ended,
        });
        if ended {
            self.end_stream(id);
        }
    }

    fn on_request_n(&mut self, view: FrameView) {
        let id = view.stream_id();
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.ignore();
        };
        if !stream.sends_items() || !stream.outbound_open {
            return self.ignore();
        }
        let n = view.request_n();
        // "Request N: ... Value MUST be > 0."
        if n == 0 {
            return self.stream_error(id, ErrorCode::INVALID, "REQUEST_N with n = 0");
        }
        stream.send_credit.add(n);
        self.events.push_back(Event::RequestN { stream_id: id, n });
    }

    fn on_cancel(&mut self, view: FrameView) {
        let id = view.stream_id();
        // "Receiving a CANCEL on an unknown Stream ID (including 0) MUST be ignored."
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.ignore();
        };
        // "If the sender wants to cancel sending a fragmented sequence, it MAY send a CANCEL frame
        // without finishing delivery of the fragments."
        let aborted = stream.inbound_partial.take();
        let aborted_partial = aborted.is_some();
        self.reassembly_bytes -= aborted.map_or(0, |p| p.buffered());
        let ended = if !stream.local_requester || aborted_partial {
            // "Upon receiving a CANCEL, the stream is terminated on the Responder."
            true
        } else if stream.interaction == Interaction::Channel {
            // The channel's responder no longer wants the requester's items.
            stream.outbound_open = false;
            stream.outbound_partial = None;
            stream.is_done()
        } else {
            return self.ignore();
        };
        self.events.push_back(Event::Cancel {
            stream_id: id,
            ended,
        });
        if ended {
            self.end_stream(id);
        }
    }

    // ------------------------------------------------------------ local calls

    /// Server: refuses the client's SETUP (after [`Event::Setup`]) with
    /// REJECTED_SETUP, INVALID_SETUP or UNSUPPORTED_SETUP, and closes.
    pub fn reject_setup(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.refuse_establishment(code, message.into());
    }

    /// Nothing the connection did after the SETUP or RESUME counts: queued
    /// frames (a KEEPALIVE echo, answers to early requests) and events are
    /// dropped, and only the ERROR goes out.
    fn refuse_establishment(&mut self, code: ErrorCode, message: String) {
        if self.state == State::Closed {
            return;
        }
        self.events.clear();
        self.clear_out();
        self.streams.clear();
        self.inbound_streams = 0;
        self.reassembly_bytes = 0;
        self.fail(code, message);
    }

    /// Server: refuses a RESUME (after [`Event::ResumeRequested`]) with REJECTED_RESUME, and closes.
    pub fn reject_resume(&mut self, message: impl Into<String>) {
        self.refuse_establishment(ErrorCode::REJECTED_RESUME, message.into());
    }

    /// Server: continues this (disconnected) session on the transport that
    /// offered `resume`. On success RESUME_OK and the frames the client
    /// missed are queued; on failure nothing changes and the error says why
    /// (refuse the offer with [`Connection::reject_resume`]).
    pub fn resume_session(&mut self, resume: &Resume, now: Instant) -> Result<(), ConnectionError> {
        let refuse = |m: String| Err(ConnectionError::local(ErrorCode::REJECTED_RESUME, m));
        if resume.version != VERSION {
            return refuse(format!(
                "protocol version {}.{} is not supported",
                resume.version.major, resume.version.minor
            ));
        }
        if !matches!(self.state, State::Disconnected | State::Established) {
            return refuse("the session is not resumable".into());
        }
        let Some(r) = self.resume.as_mut() else {
            return refuse("the session was not set up for resumption".into());
        };
        if r.token != resume.token {
            return refuse("unknown resume token".into());
        }
        if resume.first_available_client_position > r.received_position {
            return refuse(format!(
                "the client no longer has frames from position {} on",
                r.received_position
            ));
        }
        if !r.can_resume_from(resume.last_received_server_position) {
            return refuse(format!(
                "frames from position {} are no longer buffered",
                resume.last_received_server_position
            ));
        }
        let ok = ResumeOk {
            last_received_client_position: r.received_position,
        };
        let frames = r.frames_from(resume.last_received_server_position);
        self.clear_out();
        self.state = State::Established;
        self.now = now;
        self.last_received = now;
        self.push_control(OutFrame::from_owned(ok));
        for f in frames {
            self.transmit(f);
        }
        Ok(())
    }

    /// The transport is gone. With resume enabled the session is kept
    /// (returns true) until [`Connection::resume`] (client) or
    /// [`Connection::resume_session`] (server); otherwise the connection closes.
    pub fn transport_lost(&mut self) -> bool {
        if self.state == State::Closed {
            return false;
        }
        self.clear_out();
        if self.resume.is_some()
            && matches!(self.state, State::Established | State::AwaitingResumeOk)
        {
            self.state = State::Disconnected;
            return true;
        }
        self.state = State::Closed;
        self.events.push_back(Event::Closed(ConnectionError::local(
            ErrorCode::CONNECTION_ERROR,
            "the transport closed",
        )));
        false
    }

    /// Client: starts resuming a disconnected session on a new transport by
    /// queueing RESUME.
    pub fn resume(&mut self, now: Instant) -> Result<(), SendError> {
        if self.role != Role::Client || self.state != State::Disconnected {
            return Err(SendError::InvalidArgument(
                "only a disconnected client session can resume",
            ));
        }
        let Some(r) = self.resume.as_ref() else {
            return Err(SendError::InvalidArgument("resume is not enabled"));
        };
        let frame = Resume {
            version: VERSION,
            token: r.token.clone(),
            last_received_server_position: r.received_position,
            first_available_client_position: r.first_available(),
        };
        self.now = now;
        self.last_received = now;
        self.state = State::AwaitingResumeOk;
        self.push_control(OutFrame::from_owned(frame));
        Ok(())
    }

    /// Stops new streams from the peer (they get ERROR[REJECTED]); open
    /// streams go on. Close with [`Connection::close`] once they are done.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Sends ERROR on stream 0 with `code` and closes at once.
    pub fn close(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.fail(code, message.into());
    }

    /// [`Connection::close`] for a peer that does not read: every frame
    /// not yet written is dropped first, so the ERROR is all that waits.
    pub fn abort(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.clear_out();
        self.fail(code, message.into());
    }

    /// Sends ERROR[CONNECTION_CLOSE]: no new streams either way; the
    /// connection closes when the open streams have ended ("Sender or
    /// Receiver of this frame MUST wait for outstanding streams to terminate
    /// before closing the connection").
    pub fn close_gracefully(&mut self, message: impl Into<String>) {
        if self.state != State::Established || self.close_when_idle {
            return;
        }
        self.announce_close(message.into());
        self.close_when_idle = true;
        self.close_if_idle(Initiator::Local);
    }

    /// Sends ERROR[CONNECTION_CLOSE]; no new streams from the peer from now on.
    fn announce_close(&mut self, message: String) {
        let error = ErrorFrame {
            stream_id: 0,
            code: ErrorCode::CONNECTION_CLOSE,
            data: Bytes::from(message),
        };
        self.push_control(OutFrame::from_owned(error));
        self.draining = true;
        self.close_initiator = Initiator::Local;
    }

    /// Sends ERROR[CONNECTION_CLOSE] and closes after `linger`, whatever
    /// is open then. Meanwhile the connection goes on reading: a request
    /// that was already on its way gets ERROR[REJECTED] ("not processed")
    /// instead of no answer, and frames of open streams are handled as
    /// usual. Before establishment it closes at once.
    pub fn shut_down(&mut self, now: Instant, message: impl Into<String>, linger: Duration) {
        self.now = now;
        if self.state != State::Established {
            return self.fail(ErrorCode::CONNECTION_CLOSE, message.into());
        }
        if self.linger_until.is_some() {
            return;
        }
        if self.close_when_idle {
            // ERROR[CONNECTION_CLOSE] went one way or the other already.
            self.draining = true;
            self.close_initiator = Initiator::Local;
        } else {
            self.announce_close(message.into());
        }
        self.linger_until = Some(now + linger);
    }

    fn fail(&mut self, code: ErrorCode, message: impl Into<std::borrow::Cow<'static, str>>) {
        if self.state == State::Closed {
            return;
        }
        let message = message.into();
        if self.state != State::Disconnected {
            let error = ErrorFrame {
                stream_id: 0,
                code,
                data: Bytes::from(message.clone().into_owned()),
            };
            self.push_control(OutFrame::from_owned(error));
        }
        self.state = State::Closed;
        self.events.push_back(Event::Closed(ConnectionError {
            code,
            message,
            initiator: Initiator::Local,
        }));
    }

    fn close_remote(&mut self, error: ConnectionError) {
        self.state = State::Closed;
        self.events.push_back(Event::Closed(error));
    }

    fn check_can_request(&self) -> Result<(), SendError> {
        match self.state {
            State::Established => {}
            State::Disconnected | State::AwaitingResumeOk if self.resume.is_some() => {}
            State::Closed => return Err(SendError::Closed),
            _ => return Err(SendError::NotEstablished),
        }
        if self.draining {
            return Err(SendError::Closed);
        }
        if self.lease_enabled && !LeaseWindow::available(&self.peer_lease, self.now) {
            return Err(SendError::NoLease);
        }
        Ok(())
    }

    fn check_open(&self) -> Result<(), SendError> {
        match self.state {
            State::Established => Ok(()),
            State::Disconnected | State::AwaitingResumeOk if self.resume.is_some() => Ok(()),
            State::Closed => Err(SendError::Closed),
            _ => Err(SendError::NotEstablished),
        }
    }

    fn allocate_stream_id(&mut self) -> Result<u32, SendError> {
        let first = match self.role {
            Role::Client => 1,
            Role::Server => 2,
        };
        // "The Requester MUST re-use IDs by wrapping and restarting at ID 1 for client, and ID 2
        // for server [...] The Requester MUST skip IDs still in use."
        for _ in 0..=self.streams.len() {
            let id = self.next_stream_id;
            self.next_stream_id = if id > MAX_STREAM_ID - 2 {
                first
            } else {
                id + 2
            };
            if !self.streams.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(SendError::StreamIdsExhausted)
    }

    fn mtu(&self) -> usize {
        match self.config.fragment_size {
            0 => MAX_U24,
            n => n.clamp(MIN_FRAGMENT_SIZE, MAX_U24),
        }
    }

    /// Starts a request; returns its stream id. The message is fragmented
    /// if it is larger than the fragment size.
    pub fn send_request(
        &mut self,
        kind: RequestKind,
        metadata: Option<Bytes>,
        data: Bytes,
    ) -> Result<u32, SendError> {
        self.check_can_request()?;
        let (interaction, initial_n, complete, message) = match kind {
            RequestKind::RequestResponse => (
                Interaction::RequestResponse,
                0,
                false,
                MessageKind::RequestResponse,
            ),
            RequestKind::FireAndForget => (
                Interaction::FireAndForget,
                0,
                false,
                MessageKind::RequestFnf,
            ),
            RequestKind::Stream { initial_n } => (
                Interaction::Stream,
                initial_n,
                false,
                MessageKind::RequestStream { initial_n },
            ),
            RequestKind::Channel {
                initial_n,
                complete,
            } => (
                Interaction::Channel,
                initial_n,
                complete,
                MessageKind::RequestChannel { initial_n },
            ),
        };
        if matches!(interaction, Interaction::Stream | Interaction::Channel) && initial_n == 0 {
            return Err(SendError::InvalidArgument("initial request n must be > 0"));
        }
        let id = self.allocate_stream_id()?;
        if self.lease_enabled {
            LeaseWindow::take(&mut self.peer_lease, self.now);
        }
        let mut stream = Stream::requested(interaction, initial_n);
        stream.request_done(complete);
        if !stream.is_done() {
            self.streams.insert(id, stream);
        }
        for frame in Fragmenter::new(id, message, complete, metadata, data, self.mtu()) {
            self.push_stream_frame(OutFrame::from_owned(frame));
        }
        Ok(id)
    }

    /// Sends an item (`next`), the end of the stream (`complete`), or both.
    /// An item needs REQUEST_N credit from the peer.
    pub fn send_payload(
        &mut self,
        stream_id: u32,
        metadata: Option<Bytes>,
        data: Bytes,
        next: bool,
        complete: bool,
    ) -> Result<(), SendError> {
        self.check_open()?;
        if !next && (metadata.is_some() || !data.is_empty()) {
            return Err(SendError::InvalidArgument(
                "a PAYLOAD without next carries no data",
            ));
        }
        // A response to REQUEST_RESPONSE is always N|C.
        let complete = complete
            || self.streams.get(&stream_id).is_some_and(|s| {
                s.interaction == Interaction::RequestResponse && !s.local_requester
            });
        let done = self.on_send_payload(stream_id, next, complete, false)?;
        for frame in Fragmenter::new(
            stream_id,
            MessageKind::Payload { next },
            complete,
            metadata,
            data,
            self.mtu(),
        ) {
            self.push_stream_frame(OutFrame::from_owned(frame));
        }
        if done {
            self.end_stream(stream_id);
        }
        Ok(())
    }

    /// Grants the peer `n` (> 0) more items.
    pub fn send_request_n(&mut self, stream_id: u32, n: u32) -> Result<(), SendError> {
        self.check_open()?;
        self.on_send_request_n(stream_id, n)?;
        self.push_stream_frame(OutFrame::from_owned(RequestN { stream_id, n }));
        Ok(())
    }

    /// Cancels a stream this side requested (or, on a channel this side
    /// answers, the requester's half of it; or a fragmented message this side
    /// was sending).
    pub fn send_cancel(&mut self, stream_id: u32) -> Result<(), SendError> {
        self.check_open()?;
        let done = self.on_send_cancel(stream_id)?;
        self.push_stream_frame(OutFrame::from_owned(Cancel { stream_id }));
        if done {
            self.end_stream(stream_id);
        }
        Ok(())
    }

    /// Ends a stream with ERROR (a stream-level code: APPLICATION_ERROR,
    /// REJECTED, CANCELED, INVALID or an application code).
    pub fn send_error(
        &mut self,
        stream_id: u32,
        code: ErrorCode,
        data: Bytes,
    ) -> Result<(), SendError> {
        self.check_open()?;
        if code.is_connection_level() {
            return Err(SendError::InvalidArgument(
                "connection-level error code on a stream",
            ));
        }
        // An error message longer than a frame can hold is cut.
        let data = data.slice(..data.len().min(MAX_U24 - crate::frame::HEADER_LEN - 4));
        self.on_send_error(stream_id)?;
        self.push_stream_frame(OutFrame::from_owned(ErrorFrame {
            stream_id,
            code,
            data,
        }));
        self.end_stream(stream_id);
        Ok(())
    }

    /// Sends METADATA_PUSH.
    pub fn send_metadata_push(&mut self, metadata: Bytes) -> Result<(), SendError> {
        if self.state != State::Established {
            return Err(if self.state == State::Closed {
                SendError::Closed
            } else {
                SendError::NotEstablished
            });
        }
        if metadata.len() > MAX_U24 - crate::frame::HEADER_LEN {
            return Err(SendError::InvalidArgument(
                "metadata does not fit one frame",
            ));
        }
        self.push_control(OutFrame::from_owned(MetadataPush { metadata }));
        Ok(())
    }

    /// Grants the peer a lease of `number_of_requests` requests for `ttl`.
    /// Only valid when LEASE was negotiated in SETUP.
    pub fn send_lease(
        &mut self,
        now: Instant,
        ttl: Duration,
        number_of_requests: u32,
        metadata: Option<Bytes>,
    ) -> Result<(), SendError> {
        if self.state != State::Established {
            return Err(if self.state == State::Closed {
                SendError::Closed
            } else {
                SendError::NotEstablished
            });
        }
        if metadata
            .as_ref()
            .is_some_and(|m| m.len() > MAX_U24 - crate::frame::HEADER_LEN - 8)
        {
            return Err(SendError::InvalidArgument(
                "metadata does not fit one frame",
            ));
        }
        if !self.lease_enabled {
            return Err(SendError::InvalidArgument(
                "LEASE was not negotiated in SETUP",
            ));
        }
        self.now = now;
        let lease = Lease {
            ttl: ms(ttl),
            number_of_requests,
            metadata,
        };
        self.granted_lease = Some(LeaseWindow {
            expires: now + Duration::from_millis(u64::from(lease.ttl)),
            remaining: lease.number_of_requests,
        });
        self.push_control(OutFrame::from_owned(lease));
        Ok(())
    }

    /// Sends a request received on another connection: allocates a stream id
    /// here and writes the frame with only the stream id replaced. Further
    /// fragments follow with [`Connection::forward`].
    pub fn forward_request(&mut self, received: impl ForwardFrame) -> Result<u32, SendError> {
        self.forward_request_granting(received, None)
    }

    /// [`Connection::forward_request`], granting the responder `initial_n`
    /// items (> 0) instead of the initial request n the request carries
    /// (REQUEST_STREAM and REQUEST_CHANNEL; other requests carry none).
    pub fn forward_request_granting(
        &mut self,
        received: impl ForwardFrame,
        initial_n: Option<u32>,
    ) -> Result<u32, SendError> {
        self.check_can_request()?;
        let frame = received.view();
        let Some(interaction) = interaction_of(frame.frame_type()) else {
            return Err(SendError::InvalidArgument("not a request frame"));
        };
        if frame.len() > MAX_U24 {
            return Err(SendError::InvalidArgument(
                "frame does not fit a 24-bit length",
            ));
        }
        let carries_n = matches!(interaction, Interaction::Stream | Interaction::Channel);
        let initial_n = match initial_n {
            Some(n) if carries_n => n.min(crate::frame::MAX_REQUEST_N),
            _ => frame.request_n(),
        };
        if carries_n && initial_n == 0 {
            return Err(SendError::InvalidArgument("initial request n must be > 0"));
        }
        let rewrite = carries_n && initial_n != frame.request_n();
        let id = self.allocate_stream_id()?;
        if self.lease_enabled {
            LeaseWindow::take(&mut self.peer_lease, self.now);
        }
        let mut stream = Stream::requested(interaction, initial_n);
        if frame.follows() {
            stream.outbound_partial = Some(OutboundPartial {
                role: MessageRole::Request,
                complete: frame.complete(),
            });
        } else {
            stream.request_done(frame.complete());
        }
        if !stream.is_done() {
            self.streams.insert(id, stream);
        }
        let out = if rewrite {
            received.into_out_with_request_n(id, initial_n)
        } else {
            received.into_out(id)
        };
        self.push_stream_frame(out);
        Ok(id)
    }

    /// Sends a PAYLOAD, REQUEST_N, CANCEL or ERROR received on another
    /// connection on `stream_id` here, with only the stream id replaced.
    pub fn forward(
        &mut self,
        stream_id: u32,
        received: impl ForwardFrame,
    ) -> Result<(), SendError> {
        self.check_open()?;
        let frame = received.view();
        if frame.len() > MAX_U24 {
            return Err(SendError::InvalidArgument(
                "frame does not fit a 24-bit length",
            ));
        }
        let done = match frame.frame_type() {
            FrameType::Payload => {
                self.on_send_payload(stream_id, frame.next(), frame.complete(), frame.follows())?
            }
            FrameType::RequestN => {
                self.on_send_request_n(stream_id, frame.request_n())?;
                false
            }
            FrameType::Cancel => self.on_send_cancel(stream_id)?,
            FrameType::Error => self.on_send_error(stream_id)?,
            _ => {
                return Err(SendError::InvalidArgument(
                    "only PAYLOAD, REQUEST_N, CANCEL and ERROR are forwarded on a stream",
                ));
            }
        };
        self.push_stream_frame(received.into_out(stream_id));
        if done {
            self.end_stream(stream_id);
        }
        Ok(())
    }

    /// Applies a PAYLOAD this side sends; returns whether the stream is now over.
    fn on_send_payload(
        &mut self,
        id: u32,
        next: bool,
        complete: bool,
        follows: bool,
    ) -> Result<bool, SendError> {
        let stream = self
            .streams
            .get_mut(&id)
            .ok_or(SendError::UnknownStream(id))?;
        if let Some(partial) = stream.outbound_partial.as_mut() {
            partial.complete |= complete;
            if !follows {
                let p = *partial;
                stream.outbound_partial = None;
                match p.role {
                    MessageRole::Request => stream.request_done(p.complete),
                    MessageRole::Item => stream.item_sent(p.complete),
                }
            }
            return Ok(stream.is_done());
        }
        if !stream.outbound_open {
            return Err(SendError::InvalidState {
                stream_id: id,
                reason: "the stream is complete for sending",
            });
        }
        // A forwarded response to REQUEST_RESPONSE without C completes it,
        // as it does where it was received.
        if !next && !complete && stream.interaction != Interaction::RequestResponse {
            return Err(SendError::InvalidArgument(
                "a PAYLOAD needs next or complete",
            ));
        }
        if next && !stream.send_credit.take() {
            return Err(SendError::NoCredit(id));
        }
        if follows {
            stream.outbound_partial = Some(OutboundPartial {
                role: MessageRole::Item,
                complete,
            });
        } else {
            stream.item_sent(complete);
        }
        Ok(stream.is_done())
    }

    fn on_send_request_n(&mut self, id: u32, n: u32) -> Result<(), SendError> {
        if n == 0 {
            return Err(SendError::InvalidArgument("request n must be > 0"));
        }
        let stream = self
            .streams
            .get_mut(&id)
            .ok_or(SendError::UnknownStream(id))?;
        if !stream.receives_items() || !stream.inbound_open {
            return Err(SendError::InvalidState {
                stream_id: id,
                reason: "no items are expected on this stream",
            });
        }
        stream.recv_credit.add(n);
        Ok(())
    }

    /// Applies a CANCEL this side sends; returns whether the stream is now over.
    fn on_send_cancel(&mut self, id: u32) -> Result<bool, SendError> {
        let stream = self
            .streams
            .get_mut(&id)
            .ok_or(SendError::UnknownStream(id))?;
        if stream.local_requester || stream.outbound_partial.is_some() {
            stream.inbound_open = false;
            stream.outbound_open = false;
            self.reassembly_bytes -= stream.inbound_partial.take().map_or(0, |p| p.buffered());
            stream.outbound_partial = None;
        } else if stream.interaction == Interaction::Channel {
            stream.inbound_open = false;
            self.reassembly_bytes -= stream.inbound_partial.take().map_or(0, |p| p.buffered());
        } else {
            return Err(SendError::InvalidState {
                stream_id: id,
                reason: "only the requester cancels this stream",
            });
        }
        Ok(stream.is_done())
    }

    /// Applies an ERROR this side sends; the stream is over.
    fn on_send_error(&mut self, id: u32) -> Result<bool, SendError> {
        let stream = self
            .streams
            .get_mut(&id)
            .ok_or(SendError::UnknownStream(id))?;
        stream.inbound_open = false;
        stream.outbound_open = false;
        self.reassembly_bytes -= stream.inbound_partial.take().map_or(0, |p| p.buffered());
        stream.outbound_partial = None;
        Ok(true)
    }

    // -------------------------------------------------------------- helpers

    fn remove_stream(&mut self, id: u32) -> Option<Stream> {
        let stream = self.streams.remove(&id)?;
        self.reassembly_bytes -= stream
            .inbound_partial
            .as_ref()
            .map_or(0, InboundPartial::buffered);
        if !stream.local_requester {
            self.inbound_streams -= 1;
        }
        Some(stream)
    }

    fn end_stream(&mut self, id: u32) {
        self.remove_stream(id);
        self.after_stream_end();
    }

    fn after_stream_end(&mut self) {
        let initiator = self.close_initiator;
        self.close_if_idle(initiator);
    }

    fn close_if_idle(&mut self, initiator: Initiator) {
        if self.close_when_idle
            && self.linger_until.is_none()
            && self.streams.is_empty()
            && self.state == State::Established
        {
            self.state = State::Closed;
            self.events.push_back(Event::Closed(ConnectionError {
                code: ErrorCode::CONNECTION_CLOSE,
                message: "closed after the open streams ended".into(),
                initiator,
            }));
        }
    }

    /// Refuses a request before any stream exists for it.
    fn refuse(&mut self, id: u32, code: ErrorCode, message: impl Into<String>) {
        self.requests_refused += 1;
        let error = ErrorFrame {
            stream_id: id,
            code,
            data: Bytes::from(message.into()),
        };
        self.push_stream_frame(OutFrame::from_owned(error));
    }

    /// Ends a stream on which the peer broke a rule, and tells the peer:
    /// ERROR where this side responds, CANCEL where it requested.
    fn stream_error(&mut self, id: u32, code: ErrorCode, message: impl Into<String>) {
        let Some(stream) = self.remove_stream(id) else {
            return;
        };
        let message = message.into();
        let frame = if stream.local_requester {
            OutFrame::from_owned(Cancel { stream_id: id })
        } else {
            OutFrame::from_owned(ErrorFrame {
                stream_id: id,
                code,
                data: Bytes::from(message.clone()),
            })
        };
        self.push_stream_frame(frame);
        self.events.push_back(Event::StreamError {
            stream_id: id,
            error: StreamError::local(code, message),
        });
        self.after_stream_end();
    }

    /// Queues a frame on a stream (counted for resumption).
    fn push_stream_frame(&mut self, frame: OutFrame) {
        if let Some(r) = self.resume.as_mut() {
            r.sent(&frame);
        }
        if !matches!(self.state, State::Disconnected | State::AwaitingResumeOk) {
            self.transmit(frame);
        }
    }

    /// Queues a connection-level frame (never resent after a resume).
    fn push_control(&mut self, frame: OutFrame) {
        if self.state != State::Disconnected {
            self.transmit(frame);
        }
    }

    fn transmit(&mut self, frame: OutFrame) {
        self.out_bytes += frame.len();
        self.queued_total += frame.len() as u64;
        self.stats.frames_sent += 1;
        self.out.push_back(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
