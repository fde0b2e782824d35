//! TLS over TCP with rustls: its sans-IO connection driven by the glommio
//! socket, as a [`ByteStream`] the framings run on.
//!
//! Received records are decrypted by rustls and copied once into the
//! framing's receive buffer; frames are then cut from it without copies,
//! as on plain TCP. Sending encrypts (which is the copy).

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::WireBytes;
use crate::stream::ByteStream;

/// Ciphertext read from the socket at a time.
const RAW_CHUNK: usize = 32 * 1024;
/// Plaintext rustls holds for sending before writes wait for the socket.
const SEND_BUFFER: usize = 256 * 1024;
/// Ciphertext buffers a thread keeps for its idle TLS connections' next
/// reads, and the size past which an emptied send buffer is let go.
const RAW_KEPT: usize = 64;
const RAW_OUT_KEPT: usize = 64 * 1024;

thread_local! {
    /// Ciphertext receive buffers of this thread's TLS connections that
    /// had nothing left to give rustls.
    static RAW_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A TLS connection on a TCP socket.
pub struct TlsStream {
    tcp: TcpStream,
    tls: rustls::Connection,
    /// Ciphertext from the socket not yet given to rustls; held only while
    /// the connection reads (empty, it is back with the thread).
    raw_in: Vec<u8>,
    raw_start: usize,
    raw_end: usize,
    /// Ciphertext rustls produced and the socket has not taken.
    raw_out: Vec<u8>,
    out_start: usize,
    /// The socket reached its end.
    eof: bool,
    wire: WireBytes,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.peer)
            .field("handshaking", &self.tls.is_handshaking())
            .finish()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsStream {
    fn new(tcp: TcpStream, tls: rustls::Connection) -> Self {
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr().ok();
        let local = tcp.local_addr().ok();
        let mut tls = tls;
        tls.set_buffer_limit(Some(SEND_BUFFER));
        Self {
            tcp,
            tls,
            raw_in: Vec::new(),
            raw_start: 0,
            raw_end: 0,
            raw_out: Vec::new(),
            out_start: 0,
            eof: false,
            wire: WireBytes::default(),
            peer,
            local,
        }
    }

    /// Runs the server side of the handshake on an accepted socket.
    pub async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_error)?;
        let mut s = Self::new(tcp, conn.into());
        s.handshake().await?;
        Ok(s)
    }

    /// Connects and runs the client side of the handshake for `name`.
    pub async fn connect(
        tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Self> {
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_error)?;
        let mut s = Self::new(tcp, conn.into());
        s.handshake().await?;
        Ok(s)
    }

    async fn handshake(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_handshake(cx)).await
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // The alert after a failure goes out too (best effort).
            let sent = self.poll_send(cx)?;
            if !self.tls.is_handshaking() {
                return match sent {
                    Poll::Ready(()) => Poll::Ready(Ok(())),
                    Poll::Pending => Poll::Pending,
                };
            }
            if sent.is_pending() {
                return Poll::Pending;
            }
            if !self.tls.wants_read() {
                continue;
            }
            match self.poll_receive(cx) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    )));
                }
                Poll::Ready(Err(e)) => {
                    // Send the alert rustls queued, if the socket takes it.
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes the ciphertext rustls has to the socket; `Ready` once all of
    /// it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> io::Result<Poll<()>> {
        loop {
            if self.out_start == self.raw_out.len() {
                self.raw_out.clear();
                self.out_start = 0;
                if !self.tls.wants_write() {
                    if self.raw_out.capacity() > RAW_OUT_KEPT {
                        // A burst is written: its buffer goes.
                        self.raw_out = Vec::new();
                    }
                    return Ok(Poll::Ready(()));
                }
                self.tls.write_tls(&mut self.raw_out)?;
                continue;
            }
            let pending = self.raw_out.get(self.out_start..).unwrap_or_default();
            match Pin::new(&mut self.tcp).poll_write(cx, pending) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.out_start += n;
                    self.wire.add_written(n);
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(Poll::Pending),
            }
        }
    }

    /// Reads ciphertext and hands it to rustls. `Ready(Ok(false))` at the
    /// socket's end.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.raw_start == self.raw_end {
            if self.eof {
                return Poll::Ready(Ok(false));
            }
            if self.raw_in.is_empty() {
                self.raw_in = RAW_BUFS
                    .with_borrow_mut(Vec::pop)
                    .unwrap_or_else(|| vec![0; RAW_CHUNK]);
            }
            match Pin::new(&mut self.tcp).poll_read(cx, &mut self.raw_in) {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    return Poll::Ready(Ok(false));
                }
                Poll::Ready(Ok(n)) => {
                    self.wire.add_read(n);
                    self.raw_start = 0;
                    self.raw_end = n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing buffered: the buffer waits with the thread.
                    let idle = std::mem::take(&mut self.raw_in);
                    RAW_BUFS.with_borrow_mut(|kept| {
                        if kept.len() < RAW_KEPT {
                            kept.push(idle);
                        }
                    });
                    return Poll::Pending;
                }
            }
        }
        // rustls refuses more records while its plaintext buffer is full:
        // what is left waits until that plaintext has been read.
        while self.raw_start < self.raw_end && self.tls.wants_read() {
            let mut rd = self
                .raw_in
                .get(self.raw_start..self.raw_end)
                .unwrap_or_default();
            let n = self.tls.read_tls(&mut rd)?;
            self.raw_start += n;
            self.tls.process_new_packets().map_err(tls_error)?;
            if n == 0 {
                // rustls holds as much as it will before its plaintext is read.
                break;
            }
        }
        Poll::Ready(Ok(true))
    }

    /// The peer's certificate chain, once the handshake is done (mutual TLS).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.tls.peer_certificates()
    }

    /// The ALPN protocol agreed on, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.tls.alpn_protocol()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            match this.tls.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed the socket without close_notify: the end
                // of the stream all the same (RSocket has its own framing,
                // so a truncated frame is still noticed).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Poll::Ready(Ok(0));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            // Records rustls must answer (key updates) go out with reads.
            let _ = this.poll_send(cx)?;
            match this.poll_receive(cx) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Err(e)) => {
                    let _ = this.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            let n = this.tls.writer().write_vectored(bufs)?;
            let sent = this.poll_send(cx)?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            if bufs.iter().all(|b| b.is_empty()) {
                return Poll::Ready(Ok(0));
            }
            // rustls's send buffer is full: wait for the socket.
            if sent.is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_send(cx)? {
            Poll::Ready(()) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.tls.send_close_notify();
        if this.poll_send(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.tcp).poll_close(cx)
    }
}

impl ByteStream for TlsStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    fn wire_bytes(&self) -> Option<WireBytes> {
        Some(self.wire)
    }
}

/// Why TLS material could not be loaded; the message names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFileError(pub String);

impl std::fmt::Display for TlsFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFileError {}

/// The certificates of a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let text = std::fs::read(path)
        .map_err(|e| TlsFileError(format!("{}: cannot read: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError(format!("{}: not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsFileError(format!(
            "{}: holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let text = std::fs::read(path)
        .map_err(|e| TlsFileError(format!("{}: cannot read: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        TlsFileError(format!(
            "{}: holds no private key in PEM ({e})",
            path.display()
        ))
    })
}

/// What a TLS listener presents and whom it lets in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerTls {
    /// The certificate chain, leaf first (PEM).
    pub certificate: std::path::PathBuf,
    /// Its private key (PEM).
    pub key: std::path::PathBuf,
    /// When set, clients must present a certificate this CA (PEM) signed.
    pub client_ca: Option<std::path::PathBuf>,
    /// ALPN protocols offered, in order of preference (none: no ALPN).
    pub alpn: Vec<String>,
}

impl ServerTls {
    /// Loads the files and builds the rustls configuration; every failure
    /// names its file and what is wrong with it.
    pub fn build(&self) -> Result<Arc<rustls::ServerConfig>, TlsFileError> {
        let certs = load_certs(&self.certificate)?;
        let key = load_key(&self.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsFileError(format!("TLS: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in load_certs(ca)? {
                    roots.add(c).map_err(|e| {
                        TlsFileError(format!(
                            "{}: not a usable CA certificate: {e}",
                            ca.display()
                        ))
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .map_err(|e| TlsFileError(format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            TlsFileError(format!(
                "{} and {}: {}",
                self.certificate.display(),
                self.key.display(),
                match e {
                    rustls::Error::InconsistentKeys(_) =>
                        "the key does not match the certificate".to_owned(),
                    other => other.to_string(),
                }
            ))
        })?;
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// A client configuration that trusts the CA certificates in `ca` (PEM).
pub fn client_config_with_ca(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsFileError> {
    client_config(ca, None)
}

/// A client configuration that trusts `ca` and, for mutual TLS, presents
/// the certificate chain and key in `identity` (PEM files).
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsFileError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| {
            TlsFileError(format!(
                "{}: not a usable CA certificate: {e}",
                ca.display()
            ))
        })?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsFileError(format!("TLS: {e}")))?
    .with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some((cert, key)) => config
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsFileError(format!("{} and {}: {e}", cert.display(), key.display())))?,
    };
    Ok(Arc::new(config))
}

/// A client configuration that accepts any server certificate: for test
/// brokers with self-signed certificates only (anyone on the path can
/// read and change the traffic).
pub fn client_config_insecure() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
                .with_no_client_auth()
        });
    match config {
        Ok(c) => Arc::new(c),
        // The ring provider supports the default versions.
        Err(_) => Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    }
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
