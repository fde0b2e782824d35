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
    /// `tls://`
    Tls(Prefixed<TlsStream>),
    /// `ws://`
    Ws(WsFrames<TcpStream>),
    /// `wss://`
    Wss(WsFrames<TlsStream>),
}

macro_rules! each {
    ($self:expr, $io:ident => $e:expr) => {
        match $self {
            Conn::Tcp($io) => $e,
            Conn::Tls($io) => $e,
            Conn::Ws($io) => $e,
            Conn::Wss($io) => $e,
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
            Self::Tcp(_) | Self::Ws(_) => None,
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
/// the same address (SO_REUSEPORT) and the kernel spreads connections over
/// them; each connection stays on the shard that accepted it.
pub struct Listener {
    tcp: TcpListener,
    addr: ListenAddr,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port; [`Listener::local`] says which).
    pub fn bind(addr: &ListenAddr) -> io::Result<Self> {
        let tcp = crate::tcp::bind(addr.addr)?;
        let local = tcp.local_addr().map_err(io_error)?;
        Ok(Self {
            tcp,
            addr: addr.with_addr(local),
        })
    }

    /// The address it listens on.
    pub fn local(&self) -> &ListenAddr {
        &self.addr
    }

    /// The next connection; its handshake is still to run.
    pub async fn accept(&self) -> io::Result<Incoming> {
        let stream = self.tcp.accept().await.map_err(io_error)?;
        Ok(Incoming {
            peer: stream.peer_addr().ok(),
            stream,
            scheme: self.addr.scheme,
            path: self.addr.path.clone(),
        })
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

/// A connection accepted, before its handshake.
pub struct Incoming {
    stream: TcpStream,
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
        match self.scheme {
            Scheme::Tcp => Ok(Conn::Tcp(TcpFrames::new(self.stream, hs.max_frame))),
            Scheme::Tls => {
                let s = TlsStream::accept(self.stream, config()?)
                    .await
                    .map_err(tls)?;
                Ok(Conn::Tls(Prefixed::over(s, hs.max_frame)))
            }
            Scheme::Ws => {
                let _ = self.stream.set_nodelay(true);
                let ws = crate::ws::accept(self.stream, &self.path, hs.max_frame)
                    .await
                    .map_err(upgrade)?;
                Ok(Conn::Ws(ws))
            }
            Scheme::Wss => {
                let s = TlsStream::accept(self.stream, config()?)
                    .await
                    .map_err(tls)?;
                let ws = crate::ws::accept(s, &self.path, hs.max_frame)
                    .await
                    .map_err(upgrade)?;
                Ok(Conn::Wss(ws))
            }
        }
    }
}

/// How a client connects.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Largest frame accepted.
    pub max_frame: usize,
    /// For `tls://` and `wss://`: whom to trust (see [`crate::tls`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Connects to `url` over its transport.
pub async fn connect(url: &ListenAddr, options: &ConnectOptions) -> io::Result<Conn> {
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
        Scheme::Tls => Conn::Tls(Prefixed::over(tls(tcp).await?, options.max_frame)),
        Scheme::Ws => Conn::Ws(crate::ws::connect(tcp, &host, &url.path, options.max_frame).await?),
        Scheme::Wss => {
            let s = tls(tcp).await?;
            Conn::Wss(crate::ws::connect(s, &host, &url.path, options.max_frame).await?)
        }
    })
}
