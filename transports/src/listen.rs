//! Listeners and connections of every transport, so that the broker's
//! runtime and the client never name one.
//!
//! A [`Listener`] accepts TCP connections for its [`ListenAddr`]; each
//! becomes an [`Incoming`], whose handshake (TLS, the WebSocket upgrade)
//! runs in the connection's own task, bounded by a timeout, and yields a
//! [`Conn`]: a [`FrameIo`] whatever the transport.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use glommio::net::{TcpListener, TcpStream};
use rsocket_proto::OutFrame;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::quic::{Handshaking, Placement, QuicConn, QuicEndpoint, QuicOptions};
use crate::stream::Prefixed;
use crate::tcp::{TcpFrames, io_error};
use crate::tls::TlsStream;
use crate::ws::WsFrames;
use crate::{FrameIo, ListenAddr, Scheme, TransportError, WireBytes};

/// One connection's frames, on any transport.
#[derive(Debug)]
pub enum Conn {
    /// `tcp://`
    Tcp(TcpFrames),
    /// `tls://` (boxed: the TLS session is large, and a connection over
    /// TCP should not pay for it)
    Tls(Box<Prefixed<TlsStream>>),
    /// `ws://`
    Ws(WsFrames<TcpStream>),
    /// `wss://` (boxed, as `tls://`)
    Wss(Box<WsFrames<TlsStream>>),
    /// `quic://`
    Quic(QuicConn),
}

macro_rules! each {
    ($self:expr, $io:ident => $e:expr) => {
        match $self {
            Conn::Tcp($io) => $e,
            Conn::Tls($io) => $e,
            Conn::Ws($io) => $e,
            Conn::Wss($io) => $e,
            Conn::Quic($io) => $e,
        }
    };
}

impl Conn {
    /// The transport.
    pub fn scheme(&self) -> Scheme {
        match self {
            Self::Tcp(_) => Scheme::Tcp,
            Self::Tls(_) => Scheme::Tls,
            Self::Ws(_) => Scheme::Ws,
            Self::Wss(_) => Scheme::Wss,
            Self::Quic(_) => Scheme::Quic,
        }
    }

    /// This side's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        each!(self, io => io.local_addr())
    }

    /// The certificate chain the peer presented (mutual TLS).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Self::Tls(io) => io.stream().peer_certificates(),
            Self::Wss(io) => io.stream().peer_certificates(),
            Self::Tcp(_) | Self::Ws(_) | Self::Quic(_) => None,
        }
    }
}

impl FrameIo for Conn {
    #[inline]
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Bytes>,
    ) -> Poll<Result<bool, TransportError>> {
        each!(self, io => io.poll_read(cx, frames))
    }

    #[inline]
    fn queue(&mut self, frame: &OutFrame) -> Result<(), TransportError> {
        each!(self, io => io.queue(frame))
    }

    #[inline]
    fn queued_bytes(&self) -> usize {
        each!(self, io => io.queued_bytes())
    }

    #[inline]
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        each!(self, io => io.poll_flush(cx))
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        each!(self, io => io.poll_close(cx))
    }

    fn peer(&self) -> Option<SocketAddr> {
        each!(self, io => io.peer())
    }

    #[inline]
    fn wire_bytes(&self) -> WireBytes {
        each!(self, io => io.wire_bytes())
    }

    #[inline]
    fn buffered_bytes(&self) -> usize {
        each!(self, io => io.buffered_bytes())
    }
}

/// Accepts connections for one address on this executor. Every shard binds
/// the same address (SO_REUSEPORT) and the kernel spreads connections (or,
/// for QUIC, datagrams) over them; each connection stays on the shard that
/// accepted it.
pub struct Listener {
    kind: Kind,
    addr: ListenAddr,
}

enum Kind {
    Tcp(TcpListener),
    Quic(QuicEndpoint),
}

/// What binding a listener needs beyond its address: for QUIC, the shard
/// it runs on, its settings and its TLS configuration.
#[derive(Clone, Debug, Default)]
pub struct BindOptions {
    /// The shard, for the connection ids of QUIC.
    pub placement: Placement,
    /// QUIC's settings.
    pub quic: QuicOptions,
    /// The TLS configuration (QUIC needs it at bind).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port; [`Listener::local`] says which).
    pub fn bind(addr: &ListenAddr) -> io::Result<Self> {
        Self::bind_with(addr, &BindOptions::default())
    }

    /// Binds `addr` with `options`.
    pub fn bind_with(addr: &ListenAddr, options: &BindOptions) -> io::Result<Self> {
        if addr.scheme == Scheme::Quic {
            let tls = options.tls.as_ref().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{addr} needs a certificate and key ([tls] in the config)"),
                )
            })?;
            let server = crate::quic::server_config(tls, &options.quic)?;
            let ep = QuicEndpoint::bind_server(
                addr.addr,
                &options.placement,
                options.quic.clone(),
                Some(server),
            )?;
            let local = ep.local_addr();
            return Ok(Self {
                kind: Kind::Quic(ep),
                addr: addr.with_addr(local),
            });
        }
        let tcp = crate::tcp::bind(addr.addr)?;
        let local = tcp.local_addr().map_err(io_error)?;
        Ok(Self {
            kind: Kind::Tcp(tcp),
            addr: addr.with_addr(local),
        })
    }

    /// The address it listens on.
    pub fn local(&self) -> &ListenAddr {
        &self.addr
    }

    /// The QUIC endpoint, for a `quic://` listener.
    pub fn quic(&self) -> Option<&QuicEndpoint> {
        match &self.kind {
            Kind::Quic(ep) => Some(ep),
            Kind::Tcp(_) => None,
        }
    }

    /// The next connection; its handshake is still to run.
    pub async fn accept(&self) -> io::Result<Incoming> {
        match &self.kind {
            Kind::Tcp(tcp) => {
                let stream = tcp.accept().await.map_err(io_error)?;
                Ok(Incoming {
                    peer: stream.peer_addr().ok(),
                    stream: Pending::Stream(stream),
                    scheme: self.addr.scheme,
                    path: self.addr.path.clone(),
                })
            }
            Kind::Quic(ep) => {
                let hs = ep.accept().await;
                Ok(Incoming {
                    peer: hs.peer(),
                    stream: Pending::Quic(hs),
                    scheme: self.addr.scheme,
                    path: String::new(),
                })
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // A QUIC endpoint serves its open connections on; it only stops
        // taking new ones.
        if let Kind::Quic(ep) = &self.kind {
            ep.stop_accepting();
        }
    }
}

/// What a listener's handshakes need.
#[derive(Clone, Debug)]
pub struct Handshake {
    /// Largest frame accepted.
    pub max_frame: usize,
    /// The TLS configuration of `tls://` and `wss://` listeners.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How long a handshake may take.
    pub timeout: Duration,
}

/// Why a connection did not get through its handshake.
#[derive(Debug)]
pub struct HandshakeError {
    /// What went wrong.
    pub kind: HandshakeFailure,
    /// For the log.
    pub message: String,
}

/// The kinds of handshake failure, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not finished within the timeout.
    TimedOut,
    /// The TLS handshake failed (not TLS, a bad certificate, ...).
    Tls,
    /// The WebSocket upgrade was refused.
    Upgrade,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandshakeError {}

/// What an accepted connection is before its handshake.
enum Pending {
    Stream(TcpStream),
    Quic(Handshaking),
}

/// A connection accepted, before its handshake.
pub struct Incoming {
    stream: Pending,
    peer: Option<SocketAddr>,
    scheme: Scheme,
    path: String,
}

impl Incoming {
    /// The peer's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The transport it came in on.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Runs the handshake (none for TCP) within `hs.timeout`.
    pub async fn establish(self, hs: &Handshake) -> Result<Conn, HandshakeError> {
        let timeout = hs.timeout;
        futures_lite::future::or(self.handshake(hs), async move {
            glommio::timer::sleep(timeout).await;
            Err(HandshakeError {
                kind: HandshakeFailure::TimedOut,
                message: format!("the handshake did not finish within {timeout:?}"),
            })
        })
        .await
    }

    async fn handshake(self, hs: &Handshake) -> Result<Conn, HandshakeError> {
        let tls = |e: io::Error| HandshakeError {
            kind: HandshakeFailure::Tls,
            message: format!("TLS handshake failed: {e}"),
        };
        let upgrade = |e: crate::ws::UpgradeError| HandshakeError {
            kind: HandshakeFailure::Upgrade,
            message: format!("WebSocket upgrade refused: {e}"),
        };
        let config = || {
            hs.tls.clone().ok_or_else(|| HandshakeError {
                kind: HandshakeFailure::Tls,
                message: "this listener has no TLS configuration".into(),
            })
        };
        let stream = match self.stream {
            Pending::Quic(handshaking) => {
                return handshaking
                    .established(hs.max_frame)
                    .await
                    .map(Conn::Quic)
                    .map_err(|e| HandshakeError {
                        kind: HandshakeFailure::Tls,
                        message: format!("QUIC handshake failed: {e}"),
                    });
            }
            Pending::Stream(stream) => stream,
        };
        match self.scheme {
            Scheme::Quic => Err(HandshakeError {
                kind: HandshakeFailure::Tls,
                message: "a QUIC connection on a TCP listener".into(),
            }),
            Scheme::Tcp => Ok(Conn::Tcp(TcpFrames::new(stream, hs.max_frame))),
            Scheme::Tls => {
                let s = TlsStream::accept(stream, config()?).await.map_err(tls)?;
                Ok(Conn::Tls(Box::new(Prefixed::over(s, hs.max_frame))))
            }
            Scheme::Ws => {
                let _ = stream.set_nodelay(true);
                let ws = crate::ws::accept(stream, &self.path, hs.max_frame)
                    .await
                    .map_err(upgrade)?;
                Ok(Conn::Ws(ws))
            }
            Scheme::Wss => {
                let s = TlsStream::accept(stream, config()?).await.map_err(tls)?;
                let ws = crate::ws::accept(s, &self.path, hs.max_frame)
                    .await
                    .map_err(upgrade)?;
                Ok(Conn::Wss(Box::new(ws)))
            }
        }
    }
}

/// How a client connects.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Largest frame accepted.
    pub max_frame: usize,
    /// For `tls://`, `wss://` and `quic://`: whom to trust (see [`crate::tls`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// ALPN protocols a `quic://` connection offers (none by default).
    pub alpn: Vec<Vec<u8>>,
}

/// Connects to `url` over its transport.
pub async fn connect(url: &ListenAddr, options: &ConnectOptions) -> io::Result<Conn> {
    if url.scheme == Scheme::Quic {
        let config = options.tls.clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{url}: a QUIC connection needs a CA file (or --insecure for test brokers)"
                ),
            )
        })?;
        let quic = QuicOptions {
            max_frame: options.max_frame,
            alpn: options.alpn.clone(),
            ..QuicOptions::default()
        };
        return QuicEndpoint::connect(url.addr, &url.host, &config, quic)
            .await
            .map(Conn::Quic);
    }
    let tcp = TcpStream::connect(url.addr).await.map_err(io_error)?;
    let _ = tcp.set_nodelay(true);
    let tls = |tcp: TcpStream| async {
        let config = options.tls.clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{url}: a TLS connection needs a CA file (or --insecure for test brokers)"),
            )
        })?;
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{url}: {e}")))?;
        TlsStream::connect(tcp, config, name).await
    };
    let host = format!("{}:{}", url.host, url.addr.port());
    Ok(match url.scheme {
        Scheme::Tcp => Conn::Tcp(TcpFrames::new(tcp, options.max_frame)),
        Scheme::Tls => Conn::Tls(Box::new(Prefixed::over(tls(tcp).await?, options.max_frame))),
        Scheme::Ws => Conn::Ws(crate::ws::connect(tcp, &host, &url.path, options.max_frame).await?),
        Scheme::Wss => {
            let s = tls(tcp).await?;
            Conn::Wss(Box::new(
                crate::ws::connect(s, &host, &url.path, options.max_frame).await?,
            ))
        }
        Scheme::Quic => return Err(io::Error::other("QUIC does not run over TCP")),
    })
}
