//! RSocket frame transports on glommio, for the broker and its client.
//!
//! # Layout
//!
//! - [`FrameIo`]: what the broker and the client need from a connection:
//!   whole frames in, frames out, one flush per pass. TCP implements it
//!   now; TLS, WebSocket and QUIC implement the same trait.
//! - [`tcp`]: TCP with the 24-bit length prefix.
//! - [`ReadBuf`]: the receive buffer frames are cut out of without copying.
//! - [`WriteQueue`]: outgoing frames, small ones coalesced into one write,
//!   large bodies written from their own buffers.
//! - [`ListenAddr`]: `tcp://host:port` and the like.
//! - [`driver`]: the one connection driver, generic over [`FrameIo`], that
//!   the broker's shard and the client both run.
//! - [`turns`]: how much a connection driver reads and writes before it
//!   lets the thread's other connections run.
//!
//! # What an idle connection costs
//!
//! Memory follows traffic, not connection count. An idle TCP connection
//! (its SETUP read, nothing in flight) holds no receive buffer and no write
//! buffer:
//!
//! - receive buffers come from the shard's pool
//!   ([`rsocket_proto::codec::pool`]): a connection takes one when it reads
//!   and gives it back once every byte it read is cut into frames, so the
//!   next connection reads into what is left of it; frames are still cut
//!   out of the buffer they arrived in, and a buffer is reused only when
//!   the last frame cut from it is gone. A connection whose socket runs
//!   dry in the middle of a frame moves what it has of that frame into a
//!   buffer of its own, when that is little (`PARK_COPY`, 16 KiB) or once
//!   the pool is more than half used, and reads the rest there; otherwise
//!   it keeps only that frame's room. Either way the frame in progress
//!   counts in the connection's buffered bytes. The pool holds at most each
//!   shard's share of `max_buffered_bytes`; at it, reads wait for buffers
//!   to come back instead of allocating more (`rsbroker_receive_pool_*`);
//! - the write batch comes from, and goes back to, the thread's idle
//!   batches once everything queued is written;
//! - the frames of one read are collected in the thread's one list.
//!
//! What stays is the connection's task (its driver and transport, under
//! 1 KiB over TCP; TLS and WebSocket sessions are boxed so TCP does not pay
//! for them), glommio's readiness poll, and the broker's per-connection
//! state (the app, its services, its counters; its stream tables and
//! queues keep room for up to 128 entries each and give back what a burst
//! of streams took within a second of its end). `perf/idle.py` measures it:
//! about 5 KiB per idle app connection after churn, where nats-server holds
//! about 21 KiB per subscribed connection (perf/RESULTS.md). The kernel's
//! socket buffers come on top, outside the process. rustls keeps its own
//! buffers per TLS session, and quinn its own per QUIC connection.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rsocket_proto::codec::{PREFIX_LEN, TooLong, put_prefix};
use rsocket_proto::{DecodeError, OutFrame};

pub mod driver;
pub mod listen;
pub mod quic;
pub mod stream;
pub mod tcp;
pub mod tls;
pub mod ws;

/// How a connection driver (the broker's shard or the client) takes turns
/// with the other connections of its thread.
pub mod turns {
    /// Bytes a connection's transport holds before its driver stops taking
    /// frames from the state machine (they wait there, counted, instead).
    pub const WRITE_HIGH: usize = 256 * 1024;
    /// Reads per connection before it yields to the others: a socket that
    /// never runs dry would otherwise starve every other task on the thread,
    /// the consumers of what it reads included.
    pub const READS_PER_TURN: usize = 4;
    /// Flushes of up to [`WRITE_HIGH`] bytes per connection before it yields.
    pub const WRITES_PER_TURN: usize = 4;
}

pub use listen::{Conn, Handshake, Incoming, Listener};
pub use rsocket_proto::codec::ReadBuf;
/// The TLS library the `tls` transports use (for its configuration types).
pub use rustls;
pub use tcp::TcpFrames;

/// Why a connection's byte stream ended.
#[derive(Debug)]
pub enum TransportError {
    /// The socket failed.
    Io(io::Error),
    /// The peer's bytes are not RSocket frames (or exceed the size limit).
    Decode(DecodeError),
    /// A frame this side tried to send cannot be framed.
    TooLong(TooLong),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o error: {e}"),
            Self::Decode(e) => write!(f, "unreadable frame: {e}"),
            Self::TooLong(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TransportError {}

impl From<io::Error> for TransportError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// One connection's frames, as the broker and the client use them.
pub trait FrameIo {
    /// Reads what the socket has and appends every whole frame to `frames`.
    /// `Ready(Ok(true))` when frames were added, `Ready(Ok(false))` at the
    /// end of the stream.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Bytes>,
    ) -> Poll<Result<bool, TransportError>>;

    /// Queues a frame; nothing is written until [`FrameIo::poll_flush`].
    fn queue(&mut self, frame: &OutFrame) -> Result<(), TransportError>;

    /// Bytes queued and not yet written.
    fn queued_bytes(&self) -> usize;

    /// Writes queued frames until done or the socket is full.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>>;

    /// Shuts the connection down for writing (after a flush).
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>>;

    /// The peer's address, where there is one.
    fn peer(&self) -> Option<SocketAddr>;

    /// Bytes read from and written to the wire so far, the transport's own
    /// framing (length prefixes, TLS records, WebSocket headers) included.
    fn wire_bytes(&self) -> WireBytes;

    /// Bytes the transport's buffers hold beyond their base size: frames
    /// queued and not yet written, and a frame longer than usual on its
    /// way in.
    fn buffered_bytes(&self) -> usize {
        self.queued_bytes()
    }
}

/// What a transport has moved over the wire so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireBytes {
    /// Bytes read.
    pub read: u64,
    /// Bytes written.
    pub written: u64,
}

impl WireBytes {
    /// Adds `n` bytes read.
    pub fn add_read(&mut self, n: usize) {
        self.read += n as u64;
    }

    /// Adds `n` bytes written.
    pub fn add_written(&mut self, n: usize) {
        self.written += n as u64;
    }
}

/// Frames waiting to be written.
///
/// Heads and small parts are copied into one batch buffer (one write for
/// many frames); a metadata or data part larger than the copy threshold is
/// written from its own buffer, never copied.
#[derive(Debug)]
pub struct WriteQueue {
    segments: std::collections::VecDeque<Bytes>,
    batch: BytesMut,
    queued: usize,
    copy_threshold: usize,
}

impl Default for WriteQueue {
    fn default() -> Self {
        Self::new(4096)
    }
}

/// Size of a write batch buffer.
const BATCH_SIZE: usize = 16 * 1024;

/// Batch buffers kept per thread for the next connection with frames to
/// write.
const BATCHES_KEPT: usize = 64;

thread_local! {
    /// Batch buffers of this thread's write queues that went idle.
    static BATCHES: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl WriteQueue {
    /// A queue that copies parts of at most `copy_threshold` bytes. It
    /// holds no buffer until a frame is queued, and gives its batch buffer
    /// back to the thread once everything queued is written.
    pub fn new(copy_threshold: usize) -> Self {
        Self {
            segments: std::collections::VecDeque::new(),
            batch: BytesMut::new(),
            queued: 0,
            copy_threshold,
        }
    }

    /// A batch buffer to copy into, from the thread's idle ones if it has none.
    #[inline]
    fn batch(&mut self) -> &mut BytesMut {
        if self.batch.capacity() == 0 {
            self.take_batch();
        }
        &mut self.batch
    }

    // Out of line: inlined, it made every push pay for its stack frame.
    #[cold]
    #[inline(never)]
    fn take_batch(&mut self) {
        self.batch = BATCHES
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| BytesMut::with_capacity(BATCH_SIZE));
    }

    /// Everything queued is written: the batch buffer goes back to the
    /// thread (whole again once the parts written from it are gone), and
    /// the part list lets go of what grew under a burst.
    fn idle(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        if batch.capacity() > 0 && batch.is_empty() && batch.try_reclaim(BATCH_SIZE) {
            BATCHES.with_borrow_mut(|kept| {
                if kept.len() < BATCHES_KEPT {
                    kept.push(batch);
                }
            });
        }
        if self.segments.capacity() > 16 {
            self.segments = std::collections::VecDeque::new();
        }
    }

    /// Queues a frame with its length prefix.
    pub fn push_prefixed(&mut self, frame: &OutFrame) -> Result<(), TooLong> {
        put_prefix(self.batch(), frame.len())?;
        self.push_parts(frame);
        self.queued += PREFIX_LEN + frame.len();
        Ok(())
    }

    /// Queues bytes of the transport's own framing (a message header).
    pub fn push_header(&mut self, header: &[u8]) {
        self.batch().put_slice(header);
        self.queued += header.len();
    }

    /// Queues a copy of `frame` that `transform` changes in place (a
    /// WebSocket client masks what it sends).
    pub fn push_copy_with(&mut self, frame: &OutFrame, transform: impl FnOnce(&mut [u8])) {
        let start = self.batch().len();
        for chunk in frame.chunks() {
            self.batch.put_slice(chunk);
        }
        if let Some(copy) = self.batch.get_mut(start..) {
            transform(copy);
        }
        self.queued += frame.len();
    }

    /// Queues a frame as it is (message transports frame it themselves).
    pub fn push_bare(&mut self, frame: &OutFrame) {
        self.push_parts(frame);
        self.queued += frame.len();
    }

    fn push_parts(&mut self, frame: &OutFrame) {
        self.batch().put_slice(frame.head());
        let (metadata, data) = frame.shared_parts();
        for part in [metadata, data] {
            if part.len() <= self.copy_threshold {
                self.batch().put_slice(part);
            } else {
                self.seal();
                self.segments.push_back(part.clone());
            }
        }
    }

    fn seal(&mut self) {
        if !self.batch.is_empty() {
            self.segments.push_back(self.batch.split().freeze());
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// The next bytes to write (sealing the batch first).
    pub fn front(&mut self) -> Option<&[u8]> {
        if self.segments.is_empty() {
            self.seal();
        }
        self.segments.front().map(|b| &b[..])
    }

    /// Fills `out` with the queued parts in order (sealing the batch
    /// first), for one vectored write; returns how many it filled.
    pub fn slices<'a>(&'a mut self, out: &mut [std::io::IoSlice<'a>]) -> usize {
        self.seal();
        let mut filled = 0;
        for (slot, part) in out.iter_mut().zip(self.segments.iter()) {
            *slot = std::io::IoSlice::new(part);
            filled += 1;
        }
        filled
    }

    /// `n` bytes from the front were written (they may span parts).
    pub fn advance(&mut self, mut n: usize) {
        self.queued = self.queued.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.segments.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        if self.queued == 0 && self.segments.is_empty() {
            self.idle();
        }
    }

    /// Hands the queued parts to `write` as shared chunks, in order (sealing
    /// the batch first). `write` takes what it can (advancing a chunk it
    /// takes part of, emptying those it takes whole) and says how many
    /// bytes it took.
    pub fn write_chunks<E>(
        &mut self,
        write: impl FnOnce(&mut [Bytes]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        self.seal();
        let n = write(self.segments.make_contiguous())?;
        self.queued = self.queued.saturating_sub(n);
        while self.segments.front().is_some_and(Bytes::is_empty) {
            self.segments.pop_front();
        }
        if self.queued == 0 && self.segments.is_empty() {
            self.idle();
        }
        Ok(n)
    }

    /// The shared parts queued right now, for tests that check nothing was copied.
    pub fn segments(&self) -> impl Iterator<Item = &Bytes> {
        self.segments.iter()
    }
}

/// A transport a broker listens on and a client connects with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `tcp://`: length-prefixed frames on TCP.
    Tcp,
    /// `tls://`: length-prefixed frames on TLS over TCP.
    Tls,
    /// `ws://`: one frame per binary WebSocket message.
    Ws,
    /// `wss://`: WebSocket over TLS.
    Wss,
    /// `quic://`: length-prefixed frames on a QUIC stream.
    Quic,
}

impl Scheme {
    /// The URL scheme.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Ws => "ws",
            Self::Wss => "wss",
            Self::Quic => "quic",
        }
    }

    /// Whether it runs over TLS (QUIC always does: TLS 1.3 inside).
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Tls | Self::Wss | Self::Quic)
    }

    /// Whether it runs over UDP.
    pub fn is_udp(self) -> bool {
        matches!(self, Self::Quic)
    }

    /// Whether it is WebSocket.
    pub fn is_websocket(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The WebSocket path when a `ws://` or `wss://` address names none.
pub const DEFAULT_WS_PATH: &str = "/rsocket";

/// Where to listen or connect: `tcp://host:port`, `tls://host:port`,
/// `ws://host:port/path`, `wss://host:port/path` (the path defaults to
/// `/rsocket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenAddr {
    /// The transport.
    pub scheme: Scheme,
    /// The resolved address.
    pub addr: SocketAddr,
    /// The host as written (the TLS server name and the HTTP Host of a client).
    pub host: String,
    /// The WebSocket path (empty for tcp and tls).
    pub path: String,
}

impl ListenAddr {
    /// `tcp://addr`.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self::new(Scheme::Tcp, addr)
    }

    /// `scheme://addr`, with the default WebSocket path.
    pub fn new(scheme: Scheme, addr: SocketAddr) -> Self {
        Self {
            scheme,
            addr,
            host: addr.ip().to_string(),
            path: if scheme.is_websocket() {
                DEFAULT_WS_PATH.to_owned()
            } else {
                String::new()
            },
        }
    }

    /// The same transport on another address (the port a listener got).
    pub fn with_addr(&self, addr: SocketAddr) -> Self {
        Self {
            addr,
            ..self.clone()
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?}: expected scheme://host:port"))?;
        let scheme = match scheme {
            "tcp" => Scheme::Tcp,
            "tls" => Scheme::Tls,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            "quic" => Scheme::Quic,
            other => {
                return Err(format!(
                    "{s:?}: unsupported transport {other:?} (supported: tcp, tls, ws, wss, quic)"
                ));
            }
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let path = match (scheme.is_websocket(), path) {
            (true, "") => DEFAULT_WS_PATH.to_owned(),
            (true, p) => p.to_owned(),
            (false, "") => String::new(),
            (false, p) => return Err(format!("{s:?}: a {scheme}:// address has no path ({p:?})")),
        };
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("{s:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{s:?}: the host resolves to no address"))?;
        let host = hostport
            .rsplit_once(':')
            .map_or(hostport, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            scheme,
            addr,
            host,
            path,
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.addr, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsocket_proto::frame::{Frame, Payload};

    fn frame(len: usize) -> OutFrame {
        OutFrame::from_frame(&Frame::from(Payload {
            stream_id: 1,
            follows: false,
            complete: false,
            next: true,
            metadata: None,
            data: Bytes::from(vec![7; len]),
        }))
    }

    #[test]
    fn write_queue_shares_large_parts_and_copies_small_ones() {
        let mut q = WriteQueue::new(4096);
        let small = frame(100);
        let big = frame(65_536);
        q.push_prefixed(&small).unwrap();
        q.push_prefixed(&big).unwrap();
        q.push_prefixed(&small).unwrap();
        assert_eq!(q.len(), 3 * 3 + 2 * 106 + 65_542);
        let (_, big_data) = big.shared_parts();
        q.front();
        assert!(
            q.segments().any(|s| s.as_ptr() == big_data.as_ptr()),
            "the big body is queued by reference"
        );
        let mut total = 0;
        while let Some(f) = q.front() {
            let n = f.len().min(1000);
            total += n;
            q.advance(n);
        }
        assert_eq!(total, 3 * 3 + 2 * 106 + 65_542);
        assert!(q.is_empty());
    }

    proptest::proptest! {
        /// Vectored writes that stop anywhere, even inside a part, put the
        /// same bytes on the wire, in order, as one write per part did.
        #[test]
        fn vectored_writes_of_any_length_keep_the_wire_intact(
            lens in proptest::collection::vec(0usize..20_000, 1..12),
            cuts in proptest::collection::vec(1usize..30_000, 1..40),
        ) {
            let mut expected = WriteQueue::new(usize::MAX);
            let mut q = WriteQueue::new(4096);
            for (i, &len) in lens.iter().enumerate() {
                let mut f = frame(len);
                if i % 2 == 1 {
                    f = frame(len + 5000);
                }
                expected.push_prefixed(&f).unwrap();
                q.push_prefixed(&f).unwrap();
            }
            let mut want = Vec::new();
            while let Some(f) = expected.front() {
                let f = f.to_vec();
                expected.advance(f.len());
                want.extend_from_slice(&f);
            }
            let mut wire = Vec::new();
            let mut cut = cuts.iter().cycle();
            loop {
                let mut iov = [std::io::IoSlice::new(&[]); 4];
                let parts = q.slices(&mut iov);
                if parts == 0 {
                    break;
                }
                let limit = *cut.next().unwrap();
                let mut n = 0;
                for part in &iov[..parts] {
                    let take = part.len().min(limit - n);
                    wire.extend_from_slice(&part[..take]);
                    n += take;
                    if n == limit {
                        break;
                    }
                }
                q.advance(n);
            }
            proptest::prop_assert_eq!(wire, want);
            proptest::prop_assert!(q.is_empty());
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "tcp://127.0.0.1:9999".parse::<ListenAddr>(),
            Ok(ListenAddr::tcp("127.0.0.1:9999".parse().unwrap()))
        );
        let ws: ListenAddr = "ws://localhost:80".parse().unwrap();
        assert_eq!(
            (ws.scheme, ws.host.as_str(), ws.path.as_str()),
            (Scheme::Ws, "localhost", "/rsocket")
        );
        assert_eq!(ws.to_string(), format!("ws://{}/rsocket", ws.addr));
        let wss: ListenAddr = "wss://[::1]:8443/app/rs".parse().unwrap();
        assert_eq!(
            (wss.scheme, wss.host.as_str(), wss.path.as_str()),
            (Scheme::Wss, "::1", "/app/rs")
        );
        let tls: ListenAddr = "tls://127.0.0.1:1".parse().unwrap();
        assert!(tls.scheme.is_tls() && tls.path.is_empty());
        assert!(
            "tls://127.0.0.1:1/x"
                .parse::<ListenAddr>()
                .unwrap_err()
                .contains("no path")
        );
        assert!(
            "udp://127.0.0.1:1"
                .parse::<ListenAddr>()
                .unwrap_err()
                .contains("unsupported")
        );
        assert!("127.0.0.1:1".parse::<ListenAddr>().is_err());
    }
}
