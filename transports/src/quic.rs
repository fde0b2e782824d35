//! RSocket over QUIC: each shard drives its own `quinn_proto::Endpoint`
//! from its own UDP socket, on its own executor.
//!
//! # Shape
//!
//! quinn's runtime needs `Send` sockets and futures; glommio's are not, so
//! the shard drives quinn's sans-IO state machine itself. A [`QuicEndpoint`]
//! is one UDP socket (SO_REUSEPORT: every shard binds the same port) and
//! one `quinn_proto::Endpoint` with all of its connections, behind an `Rc`
//! on the executor that made it. One task per endpoint reads datagrams
//! (quinn-udp's `recvmmsg` with GRO), fires the connections' timers and
//! retries sends the socket had no room for; every connection's own task
//! (the [connection driver](crate::driver)) reads and writes its stream
//! through a [`QuicConn`], and what that produces is sent at once, batched
//! with GSO where the kernel offers it.
//!
//! # Which shard answers a datagram
//!
//! The kernel spreads datagrams over the shards' sockets by their 4-tuple,
//! so a connection's datagrams all reach one shard until the client's
//! address changes (NAT rebinding, migration). Connection ids that this
//! broker issues carry the shard that owns the connection in their first
//! byte ([`ShardCids`]). A shard reads the destination id of every
//! datagram that carries one of ours (short headers, and long-header
//! Handshake packets) and passes a datagram for another shard to it over
//! the mesh ([`Forwarded`]); the owner handles it and answers from its own
//! socket, which has the same address. quinn sees the new client address
//! and validates the new path.
//!
//! - **Initial and 0-RTT packets** carry an id the *client* chose (random),
//!   which says nothing about a shard: they are always handled by the shard
//!   that received them, and that shard owns the connection. The client's
//!   further Initials come from the same 4-tuple and reach the same shard;
//!   once it has the server's first packet, the client uses an id of ours.
//!   A client that changes its address before the handshake finishes gets
//!   a new connection attempt on the other shard, which quinn refuses or
//!   times out like any handshake that does not complete.
//! - **An id of ours for a connection its owner no longer has** (or one
//!   whose first byte names no shard) is handled where it arrived: quinn
//!   answers an unknown short-header packet with a stateless reset. Every
//!   endpoint of the process derives reset tokens from one key, so the
//!   reset is valid whichever shard sends it.
//! - The shard byte tells an on-path observer which core owns a connection
//!   and nothing else; the other seven bytes are random.
//!
//! # RSocket mapping
//!
//! As the clients that exist do it (rsocket-py's aioquic transport): the
//! client opens a bidirectional stream and sends length-prefixed frames on
//! it. Frames are accepted on every client-opened bidirectional stream
//! (up to [`QuicOptions::max_streams`]); the broker answers on the first
//! one, where SETUP came. One RSocket connection per QUIC connection.
//!
//! # Copies
//!
//! Datagrams are received into blocks the endpoint owns and handed to quinn
//! as `BytesMut` slices of them; quinn decrypts in place, and stream data
//! comes out as `Bytes` pointing into the block. Frames are cut from those
//! chunks without copying ([`ChunkCutter`]); only a frame that spans two
//! chunks (two packets) is assembled, once. Outgoing frames go to quinn as
//! `Bytes` chunks ([`WriteQueue`] copies only heads and parts under 4 KiB);
//! quinn encrypts them into its datagram buffer: that copy is the
//! encryption's, and the one that remains. Tests hold both directions to
//! this: `quic_hands_payload_buffers_to_quinn_uncopied` (transports) sees
//! quinn keep the payload's own buffer until it is acknowledged, and the
//! broker's `frames_within_a_packet_cross_the_broker_uncopied` counts the
//! bytes assembled ([`QuicStats::assembled_bytes`]).
//!
//! # Memory
//!
//! What one connection may hold is bounded by [`QuicOptions`]: quinn keeps
//! data it sent until it is acknowledged, at most `send_window` bytes per
//! connection (past that, stream writes are refused and what waits stays
//! in the connection's [`WriteQueue`], where it counts as pending bytes and
//! pauses the feeders as on TCP; quinn's share is like a TCP socket's
//! kernel send buffer and is not counted there, since quinn does not expose
//! it). Received data waits in quinn until read, at most
//! `stream_receive_window` per stream and `receive_window` per connection;
//! the reader takes it as soon as the connection's task runs. A frame that
//! spans packets is assembled up to the frame size limit.
//!
//! # Sends
//!
//! A connection's packets are sent in GSO batches of at most
//! `MAX_GSO_SEGMENTS` datagrams, and never more than one UDP datagram's
//! worth of bytes (65 507): the kernel refuses a larger batch with
//! EMSGSIZE, and quinn-udp reports that send as done, so its packets would
//! be lost and sent again after a probe timeout.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::Future;
use glommio::net::UdpSocket;
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{
    ConnectionError, ConnectionHandle, ConnectionId, ConnectionIdGenerator, DatagramEvent, Dir,
    EndpointConfig, Event, IdleTimeout, RandomConnectionIdGenerator, ReadError, StreamEvent,
    StreamId, TransportConfig, VarInt, WriteError,
};
use rsocket_proto::codec::ChunkCutter;
use rsocket_proto::{DecodeError, OutFrame};
use rustc_hash::FxHashMap;

use crate::{FrameIo, TransportError, WireBytes, WriteQueue};

/// Length of the connection ids this broker issues.
pub const CID_LEN: usize = 8;
/// Datagrams read per receive call.
const BATCH: usize = 16;
/// Room one receive needs: a GRO batch is at most 64 KiB.
const SLOT: usize = 64 * 1024;
/// Size of a receive block; a block serves receives until less than a
/// [`SLOT`] is left, and is freed once nothing points into it.
const BLOCK: usize = 4 * SLOT;
/// Receive calls per turn of the endpoint task before it lets the
/// connections run.
const RECVS_PER_TURN: usize = 8;
/// How long a closing connection waits for the peer to acknowledge its
/// last frames before it closes anyway.
const LINGER: Duration = Duration::from_secs(3);
/// The endpoint task's longest sleep.
const SAFETY_TICK: Duration = Duration::from_millis(100);
/// Application error code of a normal close.
const CLOSE_NORMAL: u32 = 0;

/// Settings of a QUIC endpoint.
#[derive(Clone, Debug)]
pub struct QuicOptions {
    /// Largest frame accepted.
    pub max_frame: usize,
    /// A connection with no traffic for this long is closed (RSocket
    /// keepalives count as traffic).
    pub idle_timeout: Duration,
    /// Bytes a peer may send on one stream ahead of what was read.
    pub stream_receive_window: u64,
    /// Bytes a peer may send on all streams of a connection ahead of what
    /// was read.
    pub receive_window: u64,
    /// Bytes this side keeps unacknowledged per connection.
    pub send_window: u64,
    /// Connections one endpoint holds (handshakes included); more are refused.
    pub max_connections: usize,
    /// Handshakes in flight above which new clients must prove their
    /// address first (a Retry).
    pub retry_above: usize,
    /// Bidirectional streams a client may open.
    pub max_streams: u32,
    /// ALPN protocols offered (client) or accepted (server); none by default.
    pub alpn: Vec<Vec<u8>>,
}

impl Default for QuicOptions {
    fn default() -> Self {
        Self {
            max_frame: rsocket_proto::frame::MAX_U24,
            idle_timeout: Duration::from_secs(30),
            stream_receive_window: 1024 * 1024,
            receive_window: 2 * 1024 * 1024,
            send_window: 1024 * 1024,
            max_connections: 16 * 1024,
            retry_above: 128,
            max_streams: 4,
            alpn: Vec::new(),
        }
    }
}

impl QuicOptions {
    fn transport(&self, server: bool) -> TransportConfig {
        let mut t = TransportConfig::default();
        let var = |n: u64| VarInt::from_u64(n).unwrap_or(VarInt::MAX);
        t.max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
            .stream_receive_window(var(self.stream_receive_window))
            .receive_window(var(self.receive_window))
            .send_window(self.send_window)
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .max_concurrent_bidi_streams(VarInt::from_u32(if server {
                self.max_streams
            } else {
                0
            }));
        t
    }
}

/// Counters of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuicStats {
    /// Datagrams received from the socket.
    pub datagrams_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Datagrams passed to the shard that owns their connection.
    pub forwarded_out: u64,
    /// Datagrams another shard passed to this one.
    pub forwarded_in: u64,
    /// Datagrams that could not be passed on (the owner's queue was full).
    pub forward_dropped: u64,
    /// Handshakes answered with a Retry (address validation).
    pub retries: u64,
    /// Connection attempts refused (limits, not accepting).
    pub refused: u64,
    /// Handshakes in flight now.
    pub handshaking: u64,
    /// Connections open now (handshakes included).
    pub connections: u64,
    /// Bytes copied to assemble frames that spanned packets.
    pub assembled_bytes: u64,
}

impl QuicStats {
    /// Adds `other`'s counts (endpoints of one shard, shards of a broker).
    pub fn add(&mut self, other: &QuicStats) {
        self.datagrams_in += other.datagrams_in;
        self.datagrams_out += other.datagrams_out;
        self.forwarded_out += other.forwarded_out;
        self.forwarded_in += other.forwarded_in;
        self.forward_dropped += other.forward_dropped;
        self.retries += other.retries;
        self.refused += other.refused;
        self.handshaking += other.handshaking;
        self.connections += other.connections;
        self.assembled_bytes += other.assembled_bytes;
    }
}

/// Largest UDP payload of one datagram (what a GSO batch must fit in: the
/// kernel refuses a larger one, and quinn-udp drops it without a word).
const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;
/// Datagrams per GSO batch at most: more saves little and holds the socket
/// longer between the connections of a shard.
const MAX_GSO_SEGMENTS: usize = 44;

/// Datagrams one send may carry for a connection whose packets are `mtu`
/// bytes: what the socket offers, the batch within one UDP payload.
fn gso_segments(offered: usize, mtu: u16) -> usize {
    let fit = MAX_GSO_BYTES / usize::from(mtu).max(1);
    offered.min(fit).clamp(1, MAX_GSO_SEGMENTS)
}

/// Packets one connection sent, and how many of them were lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounts {
    /// Packets sent.
    pub sent: u64,
    /// Packets declared lost (and their data sent again).
    pub lost: u64,
}

/// A datagram one shard passes to the shard that owns its connection.
#[derive(Debug)]
pub struct Forwarded {
    /// Which of the shard's QUIC listeners received it.
    pub listener: usize,
    /// The client's address.
    pub remote: SocketAddr,
    /// The address it was sent to.
    pub local_ip: Option<IpAddr>,
    /// ECN bits.
    pub ecn: Option<u8>,
    /// The datagram.
    pub data: BytesMut,
}

/// Where a shard sends datagrams for connections of another shard.
pub type ForwardFn = Box<dyn Fn(usize, Forwarded) -> bool>;

/// Connection ids whose first byte names the shard that owns the connection.
#[derive(Debug)]
pub struct ShardCids {
    shard: u8,
    random: RandomConnectionIdGenerator,
}

impl ShardCids {
    /// Ids for connections of `shard`.
    pub fn new(shard: u8) -> Self {
        Self {
            shard,
            random: RandomConnectionIdGenerator::new(CID_LEN),
        }
    }
}

impl ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let random = self.random.generate_cid();
        let mut id = [0u8; CID_LEN];
        for (dst, src) in id.iter_mut().zip(random.iter()) {
            *dst = *src;
        }
        id[0] = self.shard;
        ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The shard whose id a datagram carries, if it carries one of ours.
///
/// `None` for Initial and 0-RTT packets (the client chose their id), for
/// version negotiation, and for anything too short to say.
pub fn owner_of(datagram: &[u8]) -> Option<u8> {
    let first = *datagram.first()?;
    if first & 0x80 == 0 {
        // Short header: the id follows the first byte.
        return datagram.get(1).copied();
    }
    let version = u32::from_be_bytes(datagram.get(1..5)?.try_into().ok()?);
    if version == 0 {
        return None;
    }
    // Long header types (v1 and the drafts): 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry.
    if (first >> 4) & 0x3 != 2 {
        return None;
    }
    if usize::from(*datagram.get(5)?) != CID_LEN {
        return None;
    }
    datagram.get(6).copied()
}

/// The endpoint settings every endpoint of the process shares: one key for
/// stateless resets, so that any shard's reset is valid.
fn base_endpoint_config() -> &'static EndpointConfig {
    static BASE: OnceLock<EndpointConfig> = OnceLock::new();
    BASE.get_or_init(EndpointConfig::default)
}

fn endpoint_config(shard: u8) -> EndpointConfig {
    let mut c = base_endpoint_config().clone();
    c.cid_generator(move || Box::new(ShardCids::new(shard)));
    c
}

/// quinn's server configuration from the TLS one and the options.
pub fn server_config(
    tls: &Arc<rustls::ServerConfig>,
    options: &QuicOptions,
) -> io::Result<Arc<quinn_proto::ServerConfig>> {
    let mut tls = (**tls).clone();
    tls.alpn_protocols = options.alpn.clone();
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("QUIC needs TLS 1.3: {e}"),
        )
    })?;
    let mut c = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(Arc::new(options.transport(true)));
    // Connections quinn buffers before we decide on them; we decide on each
    // at once, so a few suffice.
    c.max_incoming(options.retry_above.max(1) * 2)
        .incoming_buffer_size(64 * 1024)
        .incoming_buffer_size_total(4 * 1024 * 1024);
    Ok(Arc::new(c))
}

fn client_config(
    tls: &Arc<rustls::ClientConfig>,
    options: &QuicOptions,
) -> io::Result<quinn_proto::ClientConfig> {
    let mut tls = (**tls).clone();
    tls.alpn_protocols = options.alpn.clone();
    tls.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("QUIC needs TLS 1.3: {e}"),
        )
    })?;
    let mut c = quinn_proto::ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(options.transport(false)));
    Ok(c)
}

/// A connection's place in its endpoint.
struct Slot {
    conn: quinn_proto::Connection,
    /// Tells a stale handle from the connection now at its index.
    generation: u64,
    /// The task that waits on it (its handshake or its driver).
    waker: Option<Waker>,
    /// When the endpoint task must act on it next (quinn's timer or the
    /// end of its linger).
    deadline: Option<Instant>,
    connected: bool,
    lost: Option<ConnectionError>,
    /// The stream this side answers on.
    send: Option<StreamId>,
    /// The handle ([`QuicConn`] or [`Handshaking`]) was dropped: the
    /// connection is closing once its last frames are acknowledged.
    linger: Option<Instant>,
    /// Counted as a handshake in flight.
    handshaking: bool,
}

struct State {
    endpoint: quinn_proto::Endpoint,
    conns: FxHashMap<usize, Slot>,
    next_generation: u64,
    /// Deadlines of the connections, for the endpoint task.
    timers: BTreeSet<(Instant, usize)>,
    /// Connections whose handshake started and that no one accepted yet.
    accepted: VecDeque<ConnectionHandle>,
    accept_waker: Option<Waker>,
    /// The listener is gone: refuse new connections.
    closed: bool,
    /// The socket had no room: a datagram waits, and connections that want
    /// to send wait for room.
    blocked: Option<(quinn_proto::Transmit, Vec<u8>)>,
    want_send: Vec<usize>,
    /// Datagrams other shards passed here, not handled yet.
    forwarded: VecDeque<Forwarded>,
    tx: Vec<u8>,
    stats: QuicStats,
}

/// One shard's (or one client's) QUIC endpoint.
#[derive(Clone)]
pub struct QuicEndpoint {
    shared: Rc<Shared>,
}

struct Shared {
    socket: UdpSocket,
    udp: quinn_udp::UdpSocketState,
    local: SocketAddr,
    shard: u8,
    shards: u8,
    listener: usize,
    options: RefCell<QuicOptions>,
    state: RefCell<State>,
    forward: RefCell<Option<ForwardFn>>,
    /// The endpoint task's waker, and the deadline its timer is armed for.
    driver: RefCell<Option<Waker>>,
    armed: Cell<Option<Instant>>,
}

impl fmt::Debug for QuicEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicEndpoint")
            .field("local", &self.shared.local)
            .field("shard", &self.shared.shard)
            .finish()
    }
}

/// Where a QUIC endpoint binds, and for whom.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// This shard's index (the first byte of the ids it issues).
    pub shard: u16,
    /// Shards in the broker.
    pub shards: u16,
    /// Which of the shard's QUIC listeners this is (for [`Forwarded`]).
    pub listener: usize,
}

impl QuicEndpoint {
    /// A server endpoint on `addr` for shard `placement.shard`.
    pub fn bind_server(
        addr: SocketAddr,
        placement: &Placement,
        options: QuicOptions,
        server: Option<Arc<quinn_proto::ServerConfig>>,
    ) -> io::Result<Self> {
        Self::bind(addr, placement, options, server, true)
    }

    fn bind(
        addr: SocketAddr,
        placement: &Placement,
        options: QuicOptions,
        server: Option<Arc<quinn_proto::ServerConfig>>,
        is_server: bool,
    ) -> io::Result<Self> {
        // Servers share their port across shards (SO_REUSEPORT); a client
        // binds port 0 without it: with it, the kernel may hand out a port
        // another client socket holds, and the two would split each
        // other's datagrams.
        let socket = if is_server {
            UdpSocket::bind(addr).map_err(crate::tcp::io_error)?
        } else {
            UdpSocket::from(std::net::UdpSocket::bind(addr)?)
        };
        let sock = socket2::SockRef::from(&socket);
        sock.set_nonblocking(true)?;
        let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
        // Room for bursts: a shard's socket carries every connection of the shard.
        let _ = udp.set_recv_buffer_size((&socket).into(), 4 * 1024 * 1024);
        let _ = udp.set_send_buffer_size((&socket).into(), 4 * 1024 * 1024);
        let local = socket.local_addr().map_err(crate::tcp::io_error)?;
        let shard = u8::try_from(placement.shard).unwrap_or(u8::MAX);
        let endpoint = quinn_proto::Endpoint::new(
            Arc::new(endpoint_config(shard)),
            server,
            !udp.may_fragment(),
            None,
        );
        let shared = Rc::new(Shared {
            socket,
            udp,
            local,
            shard,
            shards: u8::try_from(placement.shards.max(1)).unwrap_or(u8::MAX),
            listener: placement.listener,
            options: RefCell::new(options),
            state: RefCell::new(State {
                endpoint,
                conns: FxHashMap::default(),
                next_generation: 0,
                timers: BTreeSet::new(),
                accepted: VecDeque::new(),
                accept_waker: None,
                closed: !is_server,
                blocked: None,
                want_send: Vec::new(),
                forwarded: VecDeque::new(),
                tx: Vec::with_capacity(64 * 1024),
                stats: QuicStats::default(),
            }),
            forward: RefCell::new(None),
            driver: RefCell::new(None),
            armed: Cell::new(None),
        });
        glommio::spawn_local(run(shared.clone())).detach();
        Ok(Self { shared })
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// The counters.
    pub fn stats(&self) -> QuicStats {
        self.shared.state.borrow().stats
    }

    /// Replaces the TLS configuration of new connections (certificate
    /// rotation); open connections keep theirs.
    pub fn set_server_config(&self, config: Option<Arc<quinn_proto::ServerConfig>>) {
        self.shared
            .state
            .borrow_mut()
            .endpoint
            .set_server_config(config);
    }

    /// The options new connections get.
    pub fn options(&self) -> QuicOptions {
        self.shared.options.borrow().clone()
    }

    /// Sets where datagrams for another shard's connections go.
    pub fn set_forward(&self, forward: ForwardFn) {
        *self.shared.forward.borrow_mut() = Some(forward);
    }

    /// A datagram another shard passed here.
    pub fn deliver(&self, datagram: Forwarded) {
        let mut st = self.shared.state.borrow_mut();
        st.stats.forwarded_in += 1;
        st.forwarded.push_back(datagram);
        drop(st);
        self.shared.wake_driver();
    }

    /// The next connection whose handshake started.
    pub async fn accept(&self) -> Handshaking {
        poll_fn(|cx| {
            let mut st = self.shared.state.borrow_mut();
            while let Some(ch) = st.accepted.pop_front() {
                if let Some(slot) = st.conns.get(&ch.0) {
                    let generation = slot.generation;
                    return Poll::Ready(Handshaking {
                        handle: Some(Handle {
                            shared: self.shared.clone(),
                            ch,
                            generation,
                        }),
                    });
                }
            }
            st.accept_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Stops accepting: new connection attempts are refused, and those not
    /// taken yet are closed. Open connections go on.
    pub fn stop_accepting(&self) {
        let now = Instant::now();
        let mut st = self.shared.state.borrow_mut();
        st.closed = true;
        let pending: Vec<ConnectionHandle> = st.accepted.drain(..).collect();
        for ch in pending {
            if let Some(slot) = st.conns.get_mut(&ch.0) {
                slot.conn
                    .close(now, VarInt::from_u32(CLOSE_NORMAL), Bytes::new());
            }
            self.shared.service(&mut st, ch, now);
        }
    }

    /// Connects to `remote` from a new endpoint of its own.
    pub async fn connect(
        remote: SocketAddr,
        server_name: &str,
        tls: &Arc<rustls::ClientConfig>,
        options: QuicOptions,
    ) -> io::Result<QuicConn> {
        let local: SocketAddr = if remote.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let config = client_config(tls, &options)?;
        let max_frame = options.max_frame;
        let ep = Self::bind(local, &Placement::default(), options, None, false)?;
        let now = Instant::now();
        let handle = {
            let mut st = ep.shared.state.borrow_mut();
            let (ch, conn) = st
                .endpoint
                .connect(now, config, remote, server_name)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            let generation = st.insert(ch, conn, false);
            ep.shared.service(&mut st, ch, now);
            Handle {
                shared: ep.shared.clone(),
                ch,
                generation,
            }
        };
        let hs = Handshaking {
            handle: Some(handle),
        };
        let mut conn = hs.established(max_frame).await?;
        conn.open_stream()?;
        Ok(conn)
    }
}

impl State {
    fn insert(
        &mut self,
        ch: ConnectionHandle,
        conn: quinn_proto::Connection,
        handshaking: bool,
    ) -> u64 {
        self.next_generation += 1;
        let generation = self.next_generation;
        if handshaking {
            self.stats.handshaking += 1;
        }
        self.stats.connections += 1;
        self.conns.insert(
            ch.0,
            Slot {
                conn,
                generation,
                waker: None,
                deadline: None,
                connected: false,
                lost: None,
                send: None,
                linger: None,
                handshaking,
            },
        );
        generation
    }
}

impl Shared {
    fn wake_driver(&self) {
        if let Some(w) = self.driver.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// Sends one datagram (or a GSO batch). `false` when the socket is full
    /// and the datagram was kept to send later.
    fn send(&self, st: &mut State, t: quinn_proto::Transmit) -> bool {
        let tx = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t
                .ecn
                .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
            contents: st.tx.get(..t.size).unwrap_or_default(),
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        match self.udp.send((&self.socket).into(), &tx) {
            Ok(()) => {
                st.stats.datagrams_out += t
                    .segment_size
                    .map_or(1, |s| t.size.div_ceil(s.max(1)) as u64);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let buf = std::mem::take(&mut st.tx);
                st.blocked = Some((t, buf));
                self.wake_driver();
                false
            }
            // quinn-udp logs and swallows the other errors; a lost datagram
            // is QUIC's to recover.
            Err(_) => true,
        }
    }

    /// Acts on everything a connection has to do: events for the endpoint,
    /// events for its task, datagrams to send, its next deadline; removes
    /// it once it is drained.
    fn service(&self, st: &mut State, ch: ConnectionHandle, now: Instant) {
        let Some(slot) = st.conns.get_mut(&ch.0) else {
            return;
        };
        let mut drained = false;
        let mut wake = false;
        loop {
            let mut again = false;
            while let Some(ev) = slot.conn.poll_endpoint_events() {
                drained |= ev.is_drained();
                if let Some(back) = st.endpoint.handle_event(ch, ev) {
                    slot.conn.handle_event(back);
                    again = true;
                }
            }
            while let Some(ev) = slot.conn.poll() {
                match ev {
                    Event::Connected => {
                        slot.connected = true;
                        if slot.handshaking {
                            slot.handshaking = false;
                            st.stats.handshaking = st.stats.handshaking.saturating_sub(1);
                        }
                        wake = true;
                    }
                    Event::ConnectionLost { reason } => {
                        if slot.handshaking {
                            slot.handshaking = false;
                            st.stats.handshaking = st.stats.handshaking.saturating_sub(1);
                        }
                        slot.lost = Some(reason);
                        wake = true;
                    }
                    Event::Stream(StreamEvent::Finished { id })
                        if slot.linger.is_some() && Some(id) == slot.send =>
                    {
                        // Everything this side sent was acknowledged.
                        slot.conn
                            .close(now, VarInt::from_u32(CLOSE_NORMAL), Bytes::new());
                        again = true;
                    }
                    Event::Stream(_) => wake = true,
                    _ => {}
                }
            }
            if !again {
                break;
            }
        }
        if let Some(at) = slot.linger
            && now >= at
            && !slot.conn.is_closed()
        {
            slot.conn
                .close(now, VarInt::from_u32(CLOSE_NORMAL), Bytes::new());
        }
        if st.blocked.is_some() {
            st.want_send.push(ch.0);
        } else {
            loop {
                st.tx.clear();
                let Some(slot) = st.conns.get_mut(&ch.0) else {
                    break;
                };
                let segments = gso_segments(self.udp.max_gso_segments(), slot.conn.current_mtu());
                let Some(t) = slot.conn.poll_transmit(now, segments, &mut st.tx) else {
                    break;
                };
                if !self.send(st, t) {
                    st.want_send.push(ch.0);
                    break;
                }
            }
        }
        let Some(slot) = st.conns.get_mut(&ch.0) else {
            return;
        };
        if wake && let Some(w) = slot.waker.as_ref() {
            w.wake_by_ref();
        }
        if drained || slot.conn.is_drained() {
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
            if slot.handshaking {
                st.stats.handshaking = st.stats.handshaking.saturating_sub(1);
            }
            if let Some(at) = slot.deadline {
                st.timers.remove(&(at, ch.0));
            }
            st.conns.remove(&ch.0);
            st.stats.connections = st.stats.connections.saturating_sub(1);
            return;
        }
        let next = match (slot.conn.poll_timeout(), slot.linger) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next != slot.deadline {
            if let Some(at) = slot.deadline {
                st.timers.remove(&(at, ch.0));
            }
            slot.deadline = next;
            if let Some(at) = next {
                st.timers.insert((at, ch.0));
                if self.armed.get().is_none_or(|armed| at < armed) {
                    self.wake_driver();
                }
            }
        }
    }

    /// One datagram from the socket (or from another shard).
    fn datagram(&self, st: &mut State, now: Instant, d: Forwarded, forwarded: bool) {
        if !forwarded
            && self.shards > 1
            && let Some(owner) = owner_of(&d.data)
            && owner != self.shard
            && owner < self.shards
            && let Some(forward) = self.forward.borrow().as_ref()
        {
            let sent = forward(
                usize::from(owner),
                Forwarded {
                    listener: self.listener,
                    ..d
                },
            );
            if sent {
                st.stats.forwarded_out += 1;
            } else {
                st.stats.forward_dropped += 1;
            }
            return;
        }
        let Forwarded {
            remote,
            local_ip,
            ecn,
            data,
            ..
        } = d;
        let ecn = ecn.and_then(quinn_proto::EcnCodepoint::from_bits);
        let mut buf = std::mem::take(&mut st.tx);
        buf.clear();
        let event = st
            .endpoint
            .handle(now, remote, local_ip, ecn, data, &mut buf);
        st.tx = buf;
        match event {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(slot) = st.conns.get_mut(&ch.0) {
                    slot.conn.handle_event(ev);
                }
                self.service(st, ch, now);
            }
            Some(DatagramEvent::Response(t)) => {
                self.send(st, t);
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.incoming(st, now, incoming);
            }
            None => {}
        }
    }

    /// A client's first packet: accept it, ask it to prove its address, or
    /// refuse it.
    fn incoming(&self, st: &mut State, now: Instant, incoming: quinn_proto::Incoming) {
        let (max, retry_above) = {
            let o = self.options.borrow();
            (o.max_connections, o.retry_above)
        };
        let mut buf = std::mem::take(&mut st.tx);
        buf.clear();
        if st.closed || st.conns.len() >= max {
            st.stats.refused += 1;
            let t = st.endpoint.refuse(incoming, &mut buf);
            st.tx = buf;
            self.send(st, t);
            return;
        }
        if st.stats.handshaking as usize >= retry_above
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            match st.endpoint.retry(incoming, &mut buf) {
                Ok(t) => {
                    st.stats.retries += 1;
                    st.tx = buf;
                    self.send(st, t);
                }
                Err(e) => {
                    st.endpoint.ignore(e.into_incoming());
                    st.tx = buf;
                }
            }
            return;
        }
        match st.endpoint.accept(incoming, now, &mut buf, None) {
            Ok((ch, conn)) => {
                st.tx = buf;
                st.insert(ch, conn, true);
                st.accepted.push_back(ch);
                if let Some(w) = st.accept_waker.take() {
                    w.wake();
                }
                self.service(st, ch, now);
            }
            Err(e) => {
                st.tx = buf;
                st.stats.refused += 1;
                if let Some(t) = e.response {
                    self.send(st, t);
                }
            }
        }
    }
}

/// Receive blocks: datagrams are cut from them and handed on without copying.
struct RecvBlocks {
    blocks: Vec<BytesMut>,
    metas: Vec<quinn_udp::RecvMeta>,
}

impl RecvBlocks {
    fn new() -> Self {
        Self {
            blocks: (0..BATCH).map(|_| BytesMut::new()).collect(),
            metas: vec![quinn_udp::RecvMeta::default(); BATCH],
        }
    }

    /// Reads what the socket has, handing each datagram to `each`; `Ok(false)`
    /// when the socket is empty.
    fn recv(
        &mut self,
        shared: &Shared,
        mut each: impl FnMut(BytesMut, &quinn_udp::RecvMeta),
    ) -> io::Result<bool> {
        for b in self.blocks.iter_mut() {
            if b.len() < SLOT {
                *b = BytesMut::zeroed(BLOCK);
            }
        }
        let n = {
            let mut slices: Vec<IoSliceMut<'_>> = self
                .blocks
                .iter_mut()
                .map(|b| IoSliceMut::new(b.get_mut(..SLOT).unwrap_or_default()))
                .collect();
            match shared
                .udp
                .recv((&shared.socket).into(), &mut slices, &mut self.metas)
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        };
        for (block, meta) in self.blocks.iter_mut().zip(self.metas.iter()).take(n) {
            let mut got = block.split_to(meta.len.min(block.len()));
            let stride = meta.stride.max(1);
            while !got.is_empty() {
                let d = got.split_to(stride.min(got.len()));
                each(d, meta);
            }
        }
        Ok(true)
    }
}

/// The endpoint task: datagrams in, timers, sends the socket had no room for.
async fn run(shared: Rc<Shared>) {
    let mut blocks = RecvBlocks::new();
    let mut timer: Option<glommio::timer::Timer> = None;
    let mut got: Vec<(BytesMut, quinn_udp::RecvMeta)> = Vec::with_capacity(BATCH);
    let mut due: Vec<(Instant, usize)> = Vec::new();
    poll_fn(|cx| {
        {
            let mut d = shared.driver.borrow_mut();
            match d.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *d = Some(cx.waker().clone()),
            }
        }
        let now = Instant::now();
        let mut st = shared.state.borrow_mut();
        // Datagrams other shards passed here.
        while let Some(f) = st.forwarded.pop_front() {
            shared.datagram(&mut st, now, f, true);
        }
        // The socket's datagrams, a few batches per turn.
        let mut recvs = 0;
        loop {
            if recvs == RECVS_PER_TURN {
                cx.waker().wake_by_ref();
                break;
            }
            recvs += 1;
            match blocks.recv(&shared, |d, meta| got.push((d, *meta))) {
                Ok(true) => {
                    for (d, meta) in got.drain(..) {
                        st.stats.datagrams_in += 1;
                        let ecn = meta.ecn.map(|e| e as u8);
                        let d = Forwarded {
                            listener: shared.listener,
                            remote: meta.addr,
                            local_ip: meta.dst_ip,
                            ecn,
                            data: d,
                        };
                        shared.datagram(&mut st, now, d, false);
                    }
                }
                Ok(false) => match shared.socket.poll_readable(cx) {
                    Poll::Ready(_) => continue,
                    Poll::Pending => break,
                },
                // An error the socket reports (an ICMP error queued for an
                // earlier send, say) concerns one datagram: read on.
                Err(_) => continue,
            }
        }
        // Timers that are due, each connection once per pass: what a
        // connection sets again for `now` or earlier (quinn's pacing can)
        // waits for the next pass, with a later clock.
        due.clear();
        due.extend(
            st.timers
                .iter()
                .take_while(|&&(at, _)| at <= now)
                .map(|&(at, key)| (at, key)),
        );
        for &(at, key) in &due {
            st.timers.remove(&(at, key));
            if let Some(slot) = st.conns.get_mut(&key) {
                slot.deadline = None;
                slot.conn.handle_timeout(now);
            }
            shared.service(&mut st, ConnectionHandle(key), now);
        }
        // A datagram waits for room in the socket.
        if st.blocked.is_some() {
            match shared.socket.poll_writable(cx) {
                Poll::Ready(_) => {
                    if let Some((t, buf)) = st.blocked.take() {
                        st.tx = buf;
                        if shared.send(&mut st, t) {
                            let waiting: Vec<usize> = std::mem::take(&mut st.want_send);
                            for key in waiting {
                                shared.service(&mut st, ConnectionHandle(key), now);
                            }
                        }
                    }
                    cx.waker().wake_by_ref();
                }
                Poll::Pending => {}
            }
        }
        // Done once no one can use it any more: no listener, no connection,
        // no handle.
        if st.closed && st.conns.is_empty() && Rc::strong_count(&shared) == 1 {
            return Poll::Ready(());
        }
        let next = st.timers.first().map(|&(at, _)| at);
        drop(st);
        shared.armed.set(next);
        // Never asleep for longer than a tick: a wake-up lost on the way
        // (a readiness poll, a timer) then costs one tick, not the
        // connection.
        let at = next.map_or(now + SAFETY_TICK, |at| at.min(now + SAFETY_TICK));
        {
            let wait = at.saturating_duration_since(Instant::now());
            let t = timer.get_or_insert_with(|| glommio::timer::Timer::new(wait));
            t.reset(wait);
            if Pin::new(t).poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    })
    .await
}

/// A connection handle that knows whether it is stale.
struct Handle {
    shared: Rc<Shared>,
    ch: ConnectionHandle,
    generation: u64,
}

impl Handle {
    fn with<R>(&self, f: impl FnOnce(&mut Slot, &mut QuicStats) -> R) -> Option<R> {
        let mut st = self.shared.state.borrow_mut();
        let State { conns, stats, .. } = &mut *st;
        let slot = conns.get_mut(&self.ch.0)?;
        if slot.generation != self.generation {
            return None;
        }
        Some(f(slot, stats))
    }

    fn service(&self) {
        let mut st = self.shared.state.borrow_mut();
        self.shared.service(&mut st, self.ch, Instant::now());
    }

    /// The connection is no longer wanted: on the server, finish its stream
    /// and close once the peer has acknowledged it (or after [`LINGER`]);
    /// on a client, close now.
    fn release(&self) {
        let now = Instant::now();
        let _ = self.with(|slot, _| {
            slot.waker = None;
            if slot.conn.is_closed() {
                return;
            }
            // A server lingers until the client has its last frames (an
            // ERROR, say). A client closes at once: its process may exit
            // right after, and a QUIC connection left without a close
            // would hold the broker's side (the app's registration
            // included) until the idle timeout.
            let server = slot.conn.side() == quinn_proto::Side::Server;
            let finished = server
                && slot
                    .send
                    .is_some_and(|id| slot.conn.send_stream(id).finish().is_ok());
            if finished && slot.connected {
                slot.linger = Some(now + LINGER);
            } else {
                slot.conn
                    .close(now, VarInt::from_u32(CLOSE_NORMAL), Bytes::new());
            }
        });
        self.service();
    }
}

/// A connection whose handshake is under way.
pub struct Handshaking {
    handle: Option<Handle>,
}

impl fmt::Debug for Handshaking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshaking")
            .field("peer", &self.peer())
            .finish()
    }
}

impl Handshaking {
    /// The client's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.handle
            .as_ref()?
            .with(|slot, _| slot.conn.remote_address())
    }

    /// Waits for the handshake to finish.
    pub async fn established(mut self, max_frame: usize) -> io::Result<QuicConn> {
        poll_fn(|cx| {
            let Some(h) = self.handle.as_ref() else {
                return Poll::Ready(Err(io::Error::other("no connection")));
            };
            let state = h.with(|slot, _| {
                if let Some(reason) = &slot.lost {
                    return Some(Err(lost_error(reason)));
                }
                if slot.connected {
                    return Some(Ok(()));
                }
                match slot.waker.as_ref() {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                None
            });
            match state {
                None => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the connection is gone",
                ))),
                Some(None) => Poll::Pending,
                Some(Some(r)) => Poll::Ready(r),
            }
        })
        .await?;
        let handle = self
            .handle
            .take()
            .ok_or_else(|| io::Error::other("no connection"))?;
        let peer = handle.with(|slot, _| slot.conn.remote_address());
        Ok(QuicConn {
            handle: Some(handle),
            streams: Vec::new(),
            queue: WriteQueue::default(),
            wire: WireBytes::default(),
            max_frame,
            peer,
            ended: false,
        })
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.release();
        }
    }
}

/// Whether the connection ended the way connections end: closed by either
/// side without an error.
fn closed_normally(reason: &ConnectionError) -> bool {
    match reason {
        ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed => true,
        ConnectionError::ConnectionClosed(c) => {
            c.error_code == quinn_proto::TransportErrorCode::NO_ERROR
        }
        _ => false,
    }
}

fn lost_error(reason: &ConnectionError) -> io::Error {
    let kind = match reason {
        ConnectionError::TimedOut => io::ErrorKind::TimedOut,
        ConnectionError::ApplicationClosed(_) | ConnectionError::ConnectionClosed(_) => {
            io::ErrorKind::ConnectionReset
        }
        ConnectionError::TransportError(_) | ConnectionError::VersionMismatch => {
            io::ErrorKind::InvalidData
        }
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, format!("QUIC: {reason}"))
}

/// One client-opened stream's frames.
struct InStream {
    id: StreamId,
    cutter: ChunkCutter,
    finished: bool,
}

/// One RSocket connection over QUIC, as a [`FrameIo`].
pub struct QuicConn {
    handle: Option<Handle>,
    streams: Vec<InStream>,
    queue: WriteQueue,
    wire: WireBytes,
    max_frame: usize,
    peer: Option<SocketAddr>,
    ended: bool,
}

impl fmt::Debug for QuicConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicConn")
            .field("peer", &self.peer)
            .finish()
    }
}

impl QuicConn {
    /// This side's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.handle.as_ref().map(|h| h.shared.local)
    }

    /// The ALPN protocol agreed, if any.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.handle.as_ref()?.with(|slot, _| {
            slot.conn
                .crypto_session()
                .handshake_data()
                .and_then(|d| {
                    d.downcast::<quinn_proto::crypto::rustls::HandshakeData>()
                        .ok()
                })
                .and_then(|d| d.protocol)
        })?
    }

    /// Packets quinn sent on this connection and packets it declared lost;
    /// `None` once the connection is gone.
    pub fn packets(&self) -> Option<PacketCounts> {
        self.handle.as_ref()?.with(|slot, _| {
            let path = slot.conn.stats().path;
            PacketCounts {
                sent: path.sent_packets,
                lost: path.lost_packets,
            }
        })
    }

    /// The client opens the stream its frames go on.
    fn open_stream(&mut self) -> io::Result<()> {
        let max = self.max_frame;
        let id = self
            .handle
            .as_ref()
            .and_then(|h| {
                h.with(|slot, _| {
                    let id = slot.conn.streams().open(Dir::Bi)?;
                    slot.send = Some(id);
                    Some(id)
                })
            })
            .flatten()
            .ok_or_else(|| io::Error::other("QUIC: the server allows no stream"))?;
        self.streams.push(InStream {
            id,
            cutter: ChunkCutter::new(max),
            finished: false,
        });
        Ok(())
    }

    fn gone() -> TransportError {
        TransportError::Io(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the QUIC connection is gone",
        ))
    }
}

enum ReadOutcome {
    Frames,
    Nothing,
    End,
    Lost(io::Error),
    Bad(DecodeError),
}

impl FrameIo for QuicConn {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Bytes>,
    ) -> Poll<Result<bool, TransportError>> {
        if self.ended {
            return Poll::Ready(Ok(false));
        }
        let Some(h) = self.handle.as_ref() else {
            return Poll::Ready(Err(Self::gone()));
        };
        let max_frame = self.max_frame;
        let before = frames.len();
        let streams = &mut self.streams;
        let wire = &mut self.wire;
        let outcome = h.with(|slot, st| {
            // Streams the client opened since the last read.
            let max_streams = 64;
            while let Some(id) = slot.conn.streams().accept(Dir::Bi) {
                if streams.len() >= max_streams {
                    let _ = slot.conn.recv_stream(id).stop(VarInt::from_u32(0));
                    continue;
                }
                if slot.send.is_none() {
                    slot.send = Some(id);
                }
                streams.push(InStream {
                    id,
                    cutter: ChunkCutter::new(max_frame),
                    finished: false,
                });
            }
            let mut outcome = ReadOutcome::Nothing;
            for s in streams.iter_mut().filter(|s| !s.finished) {
                let mut rs = slot.conn.recv_stream(s.id);
                let Ok(mut chunks) = rs.read(true) else {
                    s.finished = true;
                    continue;
                };
                loop {
                    match chunks.next(usize::MAX) {
                        Ok(Some(chunk)) => {
                            wire.add_read(chunk.bytes.len());
                            let before = s.cutter.assembled_bytes();
                            let r = s.cutter.push(chunk.bytes, frames);
                            st.assembled_bytes += s.cutter.assembled_bytes() - before;
                            if let Err(e) = r {
                                outcome = ReadOutcome::Bad(e);
                                break;
                            }
                        }
                        Ok(None) => {
                            s.finished = true;
                            break;
                        }
                        Err(ReadError::Blocked) => break,
                        Err(ReadError::Reset(code)) => {
                            s.finished = true;
                            outcome = ReadOutcome::Lost(io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                format!("QUIC: the peer reset its stream (code {code})"),
                            ));
                            break;
                        }
                    }
                }
                let _ = chunks.finalize();
                if matches!(outcome, ReadOutcome::Bad(_) | ReadOutcome::Lost(_)) {
                    return outcome;
                }
            }
            if frames.len() > before {
                return ReadOutcome::Frames;
            }
            if let Some(reason) = &slot.lost {
                return if closed_normally(reason) {
                    ReadOutcome::End
                } else {
                    ReadOutcome::Lost(lost_error(reason))
                };
            }
            // The client finished the stream it sends on: its end of stream.
            if streams.first().is_some_and(|s| s.finished) {
                return ReadOutcome::End;
            }
            match slot.waker.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => slot.waker = Some(cx.waker().clone()),
            }
            ReadOutcome::Nothing
        });
        // Acknowledgements and window updates go out now.
        h.service();
        match outcome {
            None => Poll::Ready(Err(Self::gone())),
            Some(ReadOutcome::Frames) => Poll::Ready(Ok(true)),
            Some(ReadOutcome::Nothing) => Poll::Pending,
            Some(ReadOutcome::End) => {
                self.ended = true;
                Poll::Ready(Ok(false))
            }
            Some(ReadOutcome::Lost(e)) => Poll::Ready(Err(TransportError::Io(e))),
            Some(ReadOutcome::Bad(e)) => Poll::Ready(Err(TransportError::Decode(e))),
        }
    }

    fn queue(&mut self, frame: &OutFrame) -> Result<(), TransportError> {
        self.queue
            .push_prefixed(frame)
            .map_err(TransportError::TooLong)
    }

    fn queued_bytes(&self) -> usize {
        self.queue.len()
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.queue.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let Some(h) = self.handle.as_ref() else {
            return Poll::Ready(Err(Self::gone()));
        };
        let queue = &mut self.queue;
        let wire = &mut self.wire;
        let r = h.with(|slot, _| {
            if let Some(reason) = &slot.lost {
                return Err(TransportError::Io(lost_error(reason)));
            }
            let Some(id) = slot.send else {
                // No stream yet (the client has not sent on one): wait.
                slot.waker = Some(cx.waker().clone());
                return Ok(false);
            };
            let mut stream = slot.conn.send_stream(id);
            // Write until everything is taken or quinn says Blocked: only
            // a write that was refused makes quinn report the stream
            // writable again later.
            let mut written = 0;
            loop {
                let mut blocked = false;
                let n = queue.write_chunks(|chunks| match stream.write_chunks(chunks) {
                    Ok(w) => Ok(w.bytes),
                    Err(WriteError::Blocked) => {
                        blocked = true;
                        Ok(0)
                    }
                    Err(WriteError::Stopped(code)) => Err(TransportError::Io(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!("QUIC: the peer stopped reading (code {code})"),
                    ))),
                    Err(WriteError::ClosedStream) => Err(TransportError::Io(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "QUIC: the stream is closed",
                    ))),
                })?;
                written += n;
                if blocked || queue.is_empty() || n == 0 {
                    break;
                }
            }
            wire.add_written(written);
            if queue.is_empty() {
                return Ok(true);
            }
            // The peer's window is full: wait for it to open.
            match slot.waker.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => slot.waker = Some(cx.waker().clone()),
            }
            Ok(false)
        });
        h.service();
        match r {
            None => Poll::Ready(Err(Self::gone())),
            Some(Err(e)) => Poll::Ready(Err(e)),
            Some(Ok(true)) => Poll::Ready(Ok(())),
            Some(Ok(false)) => Poll::Pending,
        }
    }

    fn poll_close(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if let Some(h) = self.handle.take() {
            h.release();
        }
        Poll::Ready(Ok(()))
    }

    fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn wire_bytes(&self) -> WireBytes {
        self.wire
    }

    fn buffered_bytes(&self) -> usize {
        self.queue.len()
            + self
                .streams
                .iter()
                .map(|s| s.cutter.buffered())
                .sum::<usize>()
    }
}

impl Drop for QuicConn {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.release();
        }
    }
}

/// Waits (for tests and tools) until `f` holds for the endpoint's stats.
pub async fn wait_stats(
    ep: &QuicEndpoint,
    f: impl Fn(&QuicStats) -> bool,
    timeout: Duration,
) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f(&ep.stats()) {
            return true;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    f(&ep.stats())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_batches_fit_in_one_udp_datagram() {
        for mtu in [1200u16, 1280, 1452, 1472, 9000, 65_000] {
            let n = gso_segments(64, mtu);
            assert!(n >= 1);
            assert!(
                n * usize::from(mtu) <= MAX_GSO_BYTES,
                "{n} x {mtu} bytes is more than one UDP datagram"
            );
        }
        assert_eq!(gso_segments(1, 1452), 1, "no GSO: one datagram per send");
        assert_eq!(gso_segments(64, 1200), MAX_GSO_SEGMENTS.min(54));
    }

    #[test]
    fn owner_is_read_from_our_ids_only() {
        // Short header: the id's first byte.
        assert_eq!(owner_of(&[0x40, 3, 1, 2, 3, 4, 5, 6, 7, 9]), Some(3));
        // Long header Handshake (type 2) with an 8-byte id.
        let mut hs = vec![0xE0, 0, 0, 0, 1, 8, 1, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(owner_of(&hs), Some(1));
        // Initial (type 0) and 0-RTT (type 1): the client chose the id.
        hs[0] = 0xC0;
        assert_eq!(owner_of(&hs), None);
        hs[0] = 0xD0;
        assert_eq!(owner_of(&hs), None);
        // Version negotiation, a foreign id length, nothing at all.
        assert_eq!(owner_of(&[0xE0, 0, 0, 0, 0, 8, 1]), None);
        assert_eq!(owner_of(&[0xE0, 0, 0, 0, 1, 5, 1, 0, 0, 0, 0]), None);
        assert_eq!(owner_of(&[]), None);
        assert_eq!(owner_of(&[0x40]), None);
    }

    #[test]
    fn ids_name_their_shard() {
        let mut g = ShardCids::new(5);
        let a = g.generate_cid();
        let b = g.generate_cid();
        assert_eq!(a.len(), CID_LEN);
        assert_eq!(a[0], 5);
        assert_ne!(a, b);
    }
}
