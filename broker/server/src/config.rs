//! The broker's settings. One structure is at once the TOML file
//! (`/etc/rsbroker/rsbroker.toml`), the effective configuration that
//! `--dump-config` prints, and what the runtime reads. Every key has a
//! default, so no file at all is a valid configuration.
//!
//! Loading collects every error it can find, each with its line and column:
//! syntax errors, unknown sections and keys, values of the wrong type or out
//! of range. Sizes are written `"16 MiB"` or as a number of bytes; durations
//! `"30s"`, `"500ms"`, `"5m"`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

#[cfg(test)]
use rsbroker_core::ServiceKey;
use rsbroker_core::{Balancer, Failover, FlowLimits, Policies, ServicePolicy};
use rsbroker_transports::ListenAddr;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

pub use crate::trust::{
    AuthConfig, FailuresConfig, GrantConfig, IdentityConfig, JwtConfig, LimitsConfig,
};

/// Where the config file is read from when `--config` is not given (and
/// only if it exists).
pub const DEFAULT_PATH: &str = "/etc/rsbroker/rsbroker.toml";

/// Everything the broker is configured with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Listeners, shards and their executors.
    pub server: ServerConfig,
    /// The admin HTTP server.
    pub admin: AdminConfig,
    /// Limits on what connections may do.
    pub limits: Limits,
    /// Draining and stopping.
    pub shutdown: Shutdown,
    /// The certificate and key of `tls://`, `wss://` and `quic://` listeners.
    pub tls: TlsConfig,
    /// `quic://` listeners.
    pub quic: QuicConfig,
    /// Logging.
    pub log: LogConfig,
    /// Balancer and failover of services not listed under `services`.
    pub policy: PolicyConfig,
    /// Balancer and failover per service, by `group!service:version` or by
    /// service name alone.
    pub services: BTreeMap<String, PolicyConfig>,
    /// Who may connect, publish and call.
    pub auth: AuthConfig,
}

/// `[server]`: listeners, shards and their executors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Addresses to listen on: `tcp://host:port`, `tls://host:port`,
    /// `ws://host:port/path`, `wss://host:port/path` (the WebSocket path
    /// defaults to `/rsocket`); every shard listens on each.
    #[serde(
        serialize_with = "ser_display_vec",
        deserialize_with = "de_from_str_vec"
    )]
    pub listen: Vec<ListenAddr>,
    /// Shards, one executor pinned per core; 0 means one per available core.
    pub shards: usize,
    /// CPUs to pin the shards to, in order; empty means the available cores.
    pub cores: Vec<usize>,
    /// I/O memory per shard, registered with io_uring (locked memory).
    pub io_memory: Size,
    /// Batches each cross-shard queue holds before its sender waits.
    pub mesh_capacity: usize,
    /// How long an idle shard spins before it parks (0: park at once).
    /// The default, 100 µs, spares a request arriving soon after the last
    /// the wake-up of a parked core (about 50 µs on VMs) for at most 100 µs
    /// of CPU per idle period.
    #[serde(with = "humantime_serde")]
    pub spin_before_park: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec![ListenAddr::tcp(([0, 0, 0, 0], 9999).into())],
            shards: 0,
            cores: Vec::new(),
            io_memory: Size(512 << 10),
            mesh_capacity: 1024,
            spin_before_park: Duration::from_micros(100),
        }
    }
}

/// `[admin]`: the HTTP server for metrics, health and the status page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Whether it runs.
    pub enabled: bool,
    /// Where it listens.
    pub listen: SocketAddr,
    /// A file holding the admin token, read on every request that needs
    /// it (so it rotates without a restart). Requests that change
    /// something always need it (`Authorization: Bearer TOKEN`); without
    /// it they are refused.
    pub token_file: Option<PathBuf>,
    /// Reads (metrics, the API, the status page) need the token too;
    /// `/healthz` and `/readyz` never do.
    pub protect_reads: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: ([127, 0, 0, 1], 9998).into(),
            token_file: None,
            protect_reads: false,
        }
    }
}

/// `[limits]`: what one connection may do, and how many there may be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted, at most 16 MiB - 1 (the 24-bit length).
    pub max_frame_size: Size,
    /// Most bytes a request may hold while its routing metadata spans
    /// fragments and is joined before it can be routed (each fragment
    /// counts 128 bytes more than its length).
    pub max_reassembled_size: Size,
    /// Most streams a connection may have open towards the broker; requests
    /// beyond it get ERROR REJECTED.
    pub max_streams_per_connection: usize,
    /// Most connections at once, over all shards; more are refused with
    /// ERROR REJECTED_SETUP.
    pub max_connections: usize,
    /// Unsent bytes for one connection above which the broker grants no
    /// more credit for it and stops reading the connections that feed it
    /// unasked (requests, fire-and-forget, one huge item's fragments).
    pub max_pending_bytes: Size,
    /// Most items in flight on one stream: REQUEST_N credit its producer
    /// holds plus items waiting for its consumer. The broker passes on the
    /// consumer's REQUEST_N as the consumer drains.
    pub stream_window: u32,
    /// Most bytes of one stream's items in flight (the window shrinks for
    /// large items); at most half of max_pending_bytes is used.
    pub stream_buffer: Size,
    /// Most bytes held for one connection: unsent frames, its requests'
    /// fragments waiting for a route, its transport's buffers. Past it the
    /// connection is closed (a fragment that would pass it has its
    /// request refused instead).
    pub max_connection_memory: Size,
    /// Most bytes held for all connections together. At it the broker
    /// stops reading the connections that hold the most until it is down
    /// to three quarters.
    pub max_buffered_bytes: Size,
    /// How long a connection may stay over max_pending_bytes (a slow
    /// consumer), or be the largest holder of a spent max_buffered_bytes,
    /// before it is closed with ERROR CONNECTION_ERROR.
    #[serde(with = "humantime_serde")]
    pub backpressure_timeout: Duration,
    /// How long a new connection may take to send SETUP.
    #[serde(with = "humantime_serde")]
    pub setup_timeout: Duration,
    /// How long a TLS handshake or WebSocket upgrade may take.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Bounds on the max lifetime a client asks for in SETUP: the broker
    /// closes a connection silent for longer than the clamped value.
    #[serde(with = "humantime_serde")]
    pub min_keepalive_lifetime: Duration,
    /// See `min_keepalive_lifetime`.
    #[serde(with = "humantime_serde")]
    pub max_keepalive_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_size: Size(rsocket_proto::frame::MAX_U24),
            max_reassembled_size: Size(64 << 10),
            max_streams_per_connection: 65_536,
            max_connections: 100_000,
            max_pending_bytes: Size(4 << 20),
            stream_window: 4096,
            stream_buffer: Size(256 << 10),
            max_connection_memory: Size(64 << 20),
            max_buffered_bytes: Size(1 << 30),
            backpressure_timeout: Duration::from_secs(30),
            setup_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            min_keepalive_lifetime: Duration::from_secs(1),
            max_keepalive_lifetime: Duration::from_secs(600),
        }
    }
}

impl Limits {
    /// The flow-control settings the shards apply.
    pub fn flow(&self) -> FlowLimits {
        FlowLimits {
            stream_window: self.stream_window,
            // One stream alone never fills its connection.
            stream_buffer: self.stream_buffer.0.min(self.max_pending_bytes.0 / 2),
            max_pending_bytes: self.max_pending_bytes.0,
            max_connection_memory: self.max_connection_memory.0,
            max_unrouted_bytes: self.max_reassembled_size.0,
            backpressure_timeout: self.backpressure_timeout,
        }
    }
}

/// `[quic]`: `quic://` listeners (certificate and key from `[tls]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// A connection with no packets for this long is closed (RSocket
    /// keepalives are packets).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Bytes a client may send on one stream ahead of what the broker read.
    pub stream_receive_window: Size,
    /// Bytes a client may send on all streams of its connection ahead of
    /// what the broker read.
    pub receive_window: Size,
    /// Bytes the broker keeps unacknowledged per connection.
    pub send_window: Size,
    /// Connections (handshakes included) each shard's endpoint holds.
    pub max_connections_per_shard: usize,
    /// Handshakes in flight on a shard above which new clients must prove
    /// their address first (a Retry round trip).
    pub retry_above: usize,
    /// Bidirectional streams a client may open on its connection.
    pub max_streams: u32,
    /// ALPN protocols accepted, e.g. `["rsocket"]`; none by default (the
    /// clients that exist offer none).
    pub alpn: Vec<String>,
}

impl Default for QuicConfig {
    fn default() -> Self {
        let d = rsbroker_transports::quic::QuicOptions::default();
        Self {
            idle_timeout: d.idle_timeout,
            stream_receive_window: Size(d.stream_receive_window as usize),
            receive_window: Size(d.receive_window as usize),
            send_window: Size(d.send_window as usize),
            max_connections_per_shard: d.max_connections,
            retry_above: d.retry_above,
            max_streams: d.max_streams,
            alpn: Vec::new(),
        }
    }
}

impl QuicConfig {
    /// The endpoint settings.
    pub fn options(&self, max_frame: usize) -> rsbroker_transports::quic::QuicOptions {
        rsbroker_transports::quic::QuicOptions {
            max_frame,
            idle_timeout: self.idle_timeout,
            stream_receive_window: self.stream_receive_window.0 as u64,
            receive_window: self.receive_window.0 as u64,
            send_window: self.send_window.0 as u64,
            max_connections: self.max_connections_per_shard,
            retry_above: self.retry_above,
            max_streams: self.max_streams,
            alpn: self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }
}

/// `[tls]`: what `tls://` and `wss://` listeners present. SIGHUP reads the
/// files again: new connections get the new certificate, open ones keep
/// theirs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub certificate: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// When set, clients must present a certificate signed by this CA
    /// (PEM): mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols to offer, in order of preference; none by default.
    pub alpn: Vec<String>,
}

impl TlsConfig {
    /// The listener settings, when a certificate and key are configured.
    pub fn server(&self) -> Option<rsbroker_transports::tls::ServerTls> {
        Some(rsbroker_transports::tls::ServerTls {
            certificate: self.certificate.clone()?,
            key: self.key.clone()?,
            client_ca: self.client_ca.clone(),
            alpn: self.alpn.clone(),
        })
    }

    /// Loads the files and builds the TLS configuration (`None` when no
    /// certificate is configured). Every error names its file; a
    /// certificate that has expired or is not yet valid is one.
    pub fn build(&self) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
        let Some(server) = self.server() else {
            return Ok(None);
        };
        let config = server.build().map_err(|e| e.to_string())?;
        let certs =
            rsbroker_transports::tls::load_certs(&server.certificate).map_err(|e| e.to_string())?;
        if let Some(leaf) = certs.first() {
            check_validity(&server.certificate, leaf)?;
        }
        Ok(Some(config))
    }
}

/// A certificate whose validity period does not include now is an error.
fn check_validity(path: &Path, der: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("{}: the certificate cannot be parsed: {e}", path.display()))?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(format!(
            "{}: the certificate expired on {} (subject {})",
            path.display(),
            validity.not_after,
            cert.subject()
        ));
    }
    if validity.not_before > now {
        return Err(format!(
            "{}: the certificate is not valid before {} (subject {})",
            path.display(),
            validity.not_before,
            cert.subject()
        ));
    }
    Ok(())
}

/// `[shutdown]`: what SIGTERM does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shutdown {
    /// After SIGTERM: how long in-flight streams may take to finish (new
    /// requests are refused meanwhile) before every connection is closed.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// After closing them: how long to wait for connections to go.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `rsbroker_core=debug,info`, ...
    pub level: String,
    /// `auto` (journald under systemd, else text), `text`, `json` or `journald`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// The journal when systemd started the broker with its output there,
    /// else text.
    #[default]
    Auto,
    /// Human-readable lines on stderr (coloured on a terminal).
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// The systemd journal, with structured fields.
    Journald,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            "journald" => Ok(Self::Journald),
            _ => Err(format!(
                "unknown log format {s:?} (auto, text, json, journald)"
            )),
        }
    }
}

/// Balancer and failover of a service (`[policy]`, `[services."name"]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// `round-robin`, `random`, `weighted`, `least-outstanding` or `hash:TAG`.
    #[serde(serialize_with = "ser_balancer", deserialize_with = "de_balancer")]
    pub balancer: Balancer,
    /// `fail-fast`, or `retry` a request-response on another instance when
    /// its instance disconnects before answering.
    pub failover: FailoverKind,
    /// With `retry`: how many times.
    pub retries: u32,
}

/// See [`PolicyConfig::failover`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverKind {
    /// The requester gets the error.
    #[default]
    FailFast,
    /// Another instance gets the request.
    Retry,
}

impl PolicyConfig {
    /// The policy the shards apply.
    pub fn to_policy(&self) -> ServicePolicy {
        ServicePolicy {
            balancer: self.balancer.clone(),
            failover: match self.failover {
                FailoverKind::Retry if self.retries > 0 => Failover::Retry {
                    attempts: self.retries,
                },
                _ => Failover::FailFast,
            },
        }
    }

    fn from_policy(policy: &ServicePolicy) -> Self {
        match policy.failover {
            Failover::FailFast => Self {
                balancer: policy.balancer.clone(),
                failover: FailoverKind::FailFast,
                retries: 0,
            },
            Failover::Retry { attempts } => Self {
                balancer: policy.balancer.clone(),
                failover: FailoverKind::Retry,
                retries: attempts,
            },
        }
    }
}

impl BrokerConfig {
    /// The policies of every service, as the shards take them.
    pub fn policies(&self) -> Policies {
        Policies {
            default: self.policy.to_policy(),
            services: self
                .services
                .iter()
                .map(|(k, v)| (k.clone(), v.to_policy()))
                .collect(),
        }
    }

    /// Sets a service's policy (as `--policy` does).
    pub fn set_policy(&mut self, service: &str, policy: &ServicePolicy) {
        self.services
            .insert(service.to_owned(), PolicyConfig::from_policy(policy));
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        let mut text =
            toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"));
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text
    }

    /// What is allowed but unsafe: anonymous connections on a listener
    /// other hosts can reach, an admin server off loopback without a token.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.auth.allow_anonymous {
            let open: Vec<String> = self
                .server
                .listen
                .iter()
                .filter(|a| !a.addr.ip().is_loopback())
                .map(ToString::to_string)
                .collect();
            if !open.is_empty() {
                out.push(format!(
                    "{} accept connections without credentials from other hosts \
                     (auth.allow_anonymous = true): any of them may register as any service; \
                     configure [auth] (README, \"Authentication\")",
                    open.join(", ")
                ));
            }
        }
        if self.admin.enabled
            && !self.admin.listen.ip().is_loopback()
            && self.admin.token_file.is_none()
        {
            out.push(format!(
                "the admin server listens on {} without a token (admin.token_file): \
                 anyone who reaches it reads the broker's state",
                self.admin.listen
            ));
        }
        out
    }

    /// Checks values against each other and against what the broker can
    /// do; returns one problem per key: (`section.key`, what is wrong).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = self.auth.problems();
        if self.admin.protect_reads && self.admin.token_file.is_none() {
            out.push((
                "admin.protect_reads".to_owned(),
                "is true, but admin.token_file is not set".to_owned(),
            ));
        }
        let mut bad = |key: &str, msg: String| out.push((key.to_owned(), msg));
        if self.server.listen.is_empty() {
            bad("server.listen", "nothing to listen on".into());
        }
        if self.server.shards > usize::from(u16::MAX) {
            bad(
                "server.shards",
                format!("{} is more than {}", self.server.shards, u16::MAX),
            );
        }
        let cpus = available_cpus();
        for cpu in &self.server.cores {
            if !cpus.contains(cpu) {
                bad(
                    "server.cores",
                    format!("CPU {cpu} is not available (available: {cpus:?})"),
                );
                break;
            }
        }
        if self.server.io_memory.0 < 64 << 10 {
            bad(
                "server.io_memory",
                format!("{} is below the 64 KiB minimum", self.server.io_memory),
            );
        }
        if self.server.mesh_capacity == 0 {
            bad("server.mesh_capacity", "must be at least 1".into());
        }
        let frame = self.limits.max_frame_size.0;
        if !(64..=rsocket_proto::frame::MAX_U24).contains(&frame) {
            bad(
                "limits.max_frame_size",
                format!(
                    "{} is outside 64 B ..= 16777215 B (the 24-bit frame length)",
                    self.limits.max_frame_size
                ),
            );
        }
        if self.limits.max_streams_per_connection == 0 {
            bad(
                "limits.max_streams_per_connection",
                "must be at least 1".into(),
            );
        }
        if self.limits.max_connections == 0 {
            bad("limits.max_connections", "must be at least 1".into());
        }
        if self.limits.max_pending_bytes.0 < 16 << 10 {
            bad(
                "limits.max_pending_bytes",
                format!(
                    "{} is below the 16 KiB minimum",
                    self.limits.max_pending_bytes
                ),
            );
        }
        let l = &self.limits;
        if !(1..=rsocket_proto::frame::MAX_REQUEST_N).contains(&l.stream_window) {
            bad(
                "limits.stream_window",
                format!("{} is outside 1 ..= 2147483647", l.stream_window),
            );
        }
        if l.stream_buffer.0 < 1 << 10 {
            bad(
                "limits.stream_buffer",
                format!("{} is below the 1 KiB minimum", l.stream_buffer),
            );
        }
        let needed = l.max_pending_bytes.0.saturating_add(l.max_frame_size.0);
        if l.max_connection_memory.0 < needed {
            bad(
                "limits.max_connection_memory",
                format!(
                    "{} is less than limits.max_pending_bytes + limits.max_frame_size ({}): a connection could be closed for one frame",
                    l.max_connection_memory,
                    Size(needed)
                ),
            );
        }
        if l.max_buffered_bytes < l.max_connection_memory {
            bad(
                "limits.max_buffered_bytes",
                format!(
                    "{} is less than limits.max_connection_memory ({})",
                    l.max_buffered_bytes, l.max_connection_memory
                ),
            );
        }
        if l.backpressure_timeout.is_zero() {
            bad("limits.backpressure_timeout", "must be more than 0".into());
        }
        if self.limits.setup_timeout.is_zero() {
            bad("limits.setup_timeout", "must be more than 0".into());
        }
        if self.limits.handshake_timeout.is_zero() {
            bad("limits.handshake_timeout", "must be more than 0".into());
        }
        let q = &self.quic;
        if q.idle_timeout.is_zero() {
            bad("quic.idle_timeout", "must be more than 0".into());
        }
        if q.stream_receive_window.0 < 4096 {
            bad(
                "quic.stream_receive_window",
                format!("{} is below the 4 KiB minimum", q.stream_receive_window),
            );
        }
        if q.receive_window.0 < q.stream_receive_window.0 {
            bad(
                "quic.receive_window",
                format!(
                    "{} is less than quic.stream_receive_window ({})",
                    q.receive_window, q.stream_receive_window
                ),
            );
        }
        if q.send_window.0 < 4096 {
            bad(
                "quic.send_window",
                format!("{} is below the 4 KiB minimum", q.send_window),
            );
        }
        if q.max_connections_per_shard == 0 {
            bad(
                "quic.max_connections_per_shard",
                "must be at least 1".into(),
            );
        }
        if q.max_streams == 0 {
            bad("quic.max_streams", "must be at least 1".into());
        }
        let quic_listeners = self
            .server
            .listen
            .iter()
            .filter(|a| a.scheme.is_udp())
            .count();
        if quic_listeners > 0 && self.server.shards > usize::from(u8::MAX) + 1 {
            bad(
                "server.shards",
                "QUIC listeners support at most 256 shards (their connection ids name the shard in one byte)".into(),
            );
        }
        let tls_listeners: Vec<String> = self
            .server
            .listen
            .iter()
            .filter(|a| a.scheme.is_tls())
            .map(ToString::to_string)
            .collect();
        match (&self.tls.certificate, &self.tls.key) {
            (None, None) if !tls_listeners.is_empty() => bad(
                "tls.certificate",
                format!(
                    "{} need a certificate and key: set tls.certificate and tls.key",
                    tls_listeners.join(", ")
                ),
            ),
            (Some(_), None) => bad("tls.key", "tls.certificate is set without its key".into()),
            (None, Some(_)) => bad(
                "tls.certificate",
                "tls.key is set without a certificate".into(),
            ),
            (Some(_), Some(_)) => {
                if let Err(e) = self.tls.build() {
                    bad("tls", e);
                }
            }
            (None, None) => {
                if self.tls.client_ca.is_some() {
                    bad(
                        "tls.client_ca",
                        "is set without tls.certificate and tls.key".into(),
                    );
                }
            }
        }
        if self.limits.min_keepalive_lifetime > self.limits.max_keepalive_lifetime {
            bad(
                "limits.min_keepalive_lifetime",
                "is more than limits.max_keepalive_lifetime".into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            );
        }
        for (name, p) in &self.services {
            if name.is_empty() {
                bad("services", "a service name is empty".into());
            }
            if p.failover == FailoverKind::Retry && p.retries == 0 {
                bad(
                    &format!("services.{name:?}.retries"),
                    "retry needs retries >= 1".into(),
                );
            }
        }
        if self.policy.failover == FailoverKind::Retry && self.policy.retries == 0 {
            bad("policy.retries", "retry needs retries >= 1".into());
        }
        out
    }
}

/// The CPUs this process may run on.
pub fn available_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_else(|| {
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
        })
}

/// A problem with the configuration, and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, if it came from one.
    pub file: Option<PathBuf>,
    /// 1-based line and column in the file.
    pub location: Option<(usize, usize)>,
    /// The key, as `section.key`, when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.location) {
            (Some(file), Some((line, col))) => write!(f, "{}:{line}:{col}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, _) => {}
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Reads and checks a config file.
pub fn load_file(path: &Path) -> Result<BrokerConfig, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: Some(path.to_owned()),
            location: None,
            key: None,
            message: format!("cannot read it: {e}"),
        }]
    })?;
    parse(&text).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| ConfigError {
                file: Some(path.to_owned()),
                ..e
            })
            .collect()
    })
}

/// Parses and checks a configuration, collecting every error it finds.
pub fn parse(text: &str) -> Result<BrokerConfig, Vec<ConfigError>> {
    let lines = LineIndex::new(text);
    let error = |span: Option<Range<usize>>, key: Option<String>, message: String| ConfigError {
        file: None,
        location: span.map(|s| lines.locate(s.start)),
        key,
        message,
    };
    let (doc, syntax) = DeTable::parse_recoverable(text);
    let mut errors: Vec<ConfigError> = syntax
        .into_iter()
        .map(|e| error(e.span(), None, e.message().to_owned()))
        .collect();
    let mut config = BrokerConfig::default();
    for (key, value) in doc.get_ref() {
        let name: &str = key.get_ref();
        let mut failed =
            |prefix: String, found: Vec<(Option<Range<usize>>, Option<String>, String)>| {
                for (span, field, message) in found {
                    let key = match field {
                        Some(f) => format!("{prefix}.{f}"),
                        None => prefix.clone(),
                    };
                    errors.push(error(span.or(Some(value.span())), Some(key), message));
                }
            };
        match name {
            "server" => load_into(&mut config.server, value),
            "admin" => load_into(&mut config.admin, value),
            "limits" => load_into(&mut config.limits, value),
            "shutdown" => load_into(&mut config.shutdown, value),
            "tls" => load_into(&mut config.tls, value),
            "quic" => load_into(&mut config.quic, value),
            "log" => load_into(&mut config.log, value),
            "policy" => load_into(&mut config.policy, value),
            "auth" => load_into(&mut config.auth, value),
            "services" => match value.get_ref() {
                // Each service on its own, so that one bad entry does not hide the others.
                DeValue::Table(services) => {
                    for (svc, policy) in services {
                        let name = svc.get_ref().to_string();
                        match section::<PolicyConfig>(policy) {
                            Ok(p) => {
                                config.services.insert(name, p);
                            }
                            Err((_, found)) => failed(format!("services.{name:?}"), found),
                        }
                    }
                    Ok(())
                }
                _ => Err(vec![(
                    None,
                    None,
                    "expected a table of services".to_owned(),
                )]),
            },
            _ => Err(vec![(
                Some(key.span()),
                None,
                "unknown section (server, admin, limits, shutdown, tls, quic, log, policy, services, auth)"
                    .to_owned(),
            )]),
        }
        .unwrap_or_else(|found| failed(name.to_owned(), found));
    }
    for (key, message) in config.problems() {
        let span = locate_key(doc.get_ref(), &key);
        errors.push(error(span, Some(key), message));
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        errors.sort_by_key(|e| e.location);
        Err(errors)
    }
}

/// Loads a section into `slot`. A section that fails still sets its good
/// keys, for the checks that compare values.
fn load_into<T: for<'de> Deserialize<'de>>(
    slot: &mut T,
    value: &Spanned<DeValue<'_>>,
) -> Result<(), Vec<Found>> {
    match section(value) {
        Ok(v) => {
            *slot = v;
            Ok(())
        }
        Err((partial, found)) => {
            if let Some(v) = partial {
                *slot = v;
            }
            Err(found)
        }
    }
}

/// An error found in a section: where, which key (if known), what.
type Found = (Option<Range<usize>>, Option<String>, String);

/// Deserializes a section. On failure it tries each key alone, so that
/// every bad key is reported with its own location, not just the first,
/// and returns the section built from the good keys (for the checks that
/// compare values) with the errors.
fn section<T: for<'de> Deserialize<'de>>(
    value: &Spanned<DeValue<'_>>,
) -> Result<T, (Option<T>, Vec<Found>)> {
    let whole = match T::deserialize(ValueDeserializer::from(value.clone())) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let DeValue::Table(table) = value.get_ref() else {
        return Err((None, vec![(whole.span(), None, whole.message().to_owned())]));
    };
    let mut found = Vec::new();
    let mut good = DeTable::new();
    for (k, v) in table {
        let mut single = DeTable::new();
        single.insert(k.clone(), v.clone());
        let alone = Spanned::new(value.span(), DeValue::Table(single));
        match T::deserialize(ValueDeserializer::from(alone)) {
            Ok(_) => {
                good.insert(k.clone(), v.clone());
            }
            Err(e) => found.push((
                e.span().or(Some(v.span())),
                Some(k.get_ref().to_string()),
                e.message().to_owned(),
            )),
        }
    }
    if found.is_empty() {
        found.push((whole.span(), None, whole.message().to_owned()));
    }
    let partial = T::deserialize(ValueDeserializer::from(Spanned::new(
        value.span(),
        DeValue::Table(good),
    )))
    .ok();
    Err((partial, found))
}

/// The span of `a.b.c`'s value in the document, or of the closest parent
/// (a segment may be quoted: `services."com.example.Echo".retries`).
fn locate_key(doc: &DeTable<'_>, key: &str) -> Option<Range<usize>> {
    let mut table = doc;
    let mut found = None;
    for part in key_segments(key) {
        let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part) else {
            break;
        };
        found = Some(value.span());
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    found
}

fn key_segments(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = key;
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            out.push(quoted[..end].to_owned());
            rest = quoted.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            out.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    out
}

/// Byte offsets to 1-based line and column.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { starts }
    }

    fn locate(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|s| *s <= offset).max(1);
        let start = self.starts.get(line - 1).copied().unwrap_or(0);
        (line, offset - start + 1)
    }
}

/// A number of bytes, written `"16 MiB"` (or a bare number) in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub usize);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Exact: a unit only where it divides the value.
        let n = self.0;
        for (unit, scale) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= scale && n.is_multiple_of(scale) {
                return write!(f, "{} {unit}", n / scale);
            }
        }
        write!(f, "{n} B")
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s
            .parse::<bytesize::ByteSize>()
            .map_err(|e| format!("{s:?} is not a size ({e}); write e.g. \"512 KiB\""))?;
        usize::try_from(bytes.as_u64())
            .map(Size)
            .map_err(|_| format!("{s:?} is too large"))
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => usize::try_from(n)
                .map(Size)
                .map_err(|_| serde::de::Error::custom(format!("{n} is too large"))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn ser_display_vec<S: Serializer, T: fmt::Display>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

fn de_from_str_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn ser_balancer<S: Serializer>(b: &Balancer, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&b.to_string())
}

fn de_balancer<'de, D: Deserializer<'de>>(d: D) -> Result<Balancer, D::Error> {
    String::deserialize(d)?
        .parse::<Balancer>()
        .map_err(serde::de::Error::custom)
}

/// Parses `SERVICE=BALANCER[,retry=N]` (see [`ServicePolicy`]'s `FromStr`).
pub fn parse_policy(text: &str) -> Result<(String, ServicePolicy), String> {
    let (service, spec) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected SERVICE=BALANCER[,retry=N]"))?;
    if service.is_empty() {
        return Err(format!("{text:?}: the service name is empty"));
    }
    let policy = spec.parse().map_err(|e| format!("{text:?}: {e}"))?;
    Ok((service.to_owned(), policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key, each set to something other than its default.
    const EVERY_KEY: &str = r#"
[server]
listen = ["tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"]
shards = 3
cores = [0]
io_memory = "1 MiB"
mesh_capacity = 64
spin_before_park = "50us"

[admin]
enabled = false
listen = "127.0.0.1:7002"

[limits]
max_frame_size = "1 MiB"
max_reassembled_size = "128 KiB"
max_streams_per_connection = 100
max_connections = 5000
max_pending_bytes = 1048576
setup_timeout = "3s"
min_keepalive_lifetime = "2s"
max_keepalive_lifetime = "2m"

[shutdown]
drain_timeout = "1m"
close_timeout = "2s"

[quic]
idle_timeout = "45s"
stream_receive_window = "512 KiB"
receive_window = "4 MiB"
send_window = "2 MiB"
max_connections_per_shard = 500
retry_above = 16
max_streams = 2
alpn = ["rsocket"]

[log]
level = "rsbroker_core=debug,info"
format = "json"

[policy]
balancer = "least-outstanding"
failover = "retry"
retries = 1

[services."com.example.Echo"]
balancer = "hash:user"

[services."g!com.example.Other:1.0"]
balancer = "weighted"
failover = "retry"
retries = 3
"#;

    #[test]
    fn anonymous_access_off_loopback_and_an_open_admin_server_are_warned_about() {
        let mut c = BrokerConfig::default();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("tcp://0.0.0.0:9999") && w[0].contains("without credentials"));
        c.server.listen = vec![ListenAddr::tcp(([127, 0, 0, 1], 9999).into())];
        assert!(c.warnings().is_empty());
        c.admin.listen = ([0, 0, 0, 0], 9998).into();
        assert!(c.warnings()[0].contains("admin server listens on 0.0.0.0:9998"));
        c.admin.token_file = Some("/etc/rsbroker/admin.token".into());
        c.server.listen = vec![ListenAddr::tcp(([10, 0, 0, 1], 9999).into())];
        c.auth.allow_anonymous = false;
        c.auth.certificate_identity = true;
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        c.admin.token_file = None;
        c.admin.protect_reads = true;
        assert!(c.problems().iter().any(|(k, _)| k == "admin.protect_reads"));
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(EVERY_KEY).unwrap();
        assert_eq!(
            c.server.listen,
            vec![
                ListenAddr::tcp(([127, 0, 0, 1], 7000).into()),
                ListenAddr::tcp(([127, 0, 0, 1], 7001).into())
            ]
        );
        assert_eq!(c.server.shards, 3);
        assert_eq!(c.server.cores, vec![0]);
        let q = c.quic.options(1024);
        assert_eq!(q.idle_timeout, Duration::from_secs(45));
        assert_eq!(
            (q.stream_receive_window, q.receive_window, q.send_window),
            (512 << 10, 4 << 20, 2 << 20)
        );
        assert_eq!(
            (q.max_connections, q.retry_above, q.max_streams),
            (500, 16, 2)
        );
        assert_eq!(q.alpn, vec![b"rsocket".to_vec()]);
        assert_eq!(c.server.io_memory, Size(1 << 20));
        assert_eq!(c.server.mesh_capacity, 64);
        assert_eq!(c.server.spin_before_park, Duration::from_micros(50));
        assert!(!c.admin.enabled);
        assert_eq!(c.admin.listen, SocketAddr::from(([127, 0, 0, 1], 7002)));
        assert_eq!(c.limits.max_frame_size, Size(1 << 20));
        assert_eq!(c.limits.max_reassembled_size, Size(128 << 10));
        assert_eq!(c.limits.max_streams_per_connection, 100);
        assert_eq!(c.limits.max_connections, 5000);
        assert_eq!(c.limits.max_pending_bytes, Size(1 << 20));
        assert_eq!(c.limits.setup_timeout, Duration::from_secs(3));
        assert_eq!(c.limits.min_keepalive_lifetime, Duration::from_secs(2));
        assert_eq!(c.limits.max_keepalive_lifetime, Duration::from_secs(120));
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(60));
        assert_eq!(c.shutdown.close_timeout, Duration::from_secs(2));
        assert_eq!(c.log.level, "rsbroker_core=debug,info");
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(
            c.policy.to_policy(),
            ServicePolicy {
                balancer: Balancer::LeastOutstanding,
                failover: Failover::Retry { attempts: 1 }
            }
        );
        let policies = c.policies();
        let echo = ServiceKey::new("", "com.example.Echo", "");
        assert_eq!(
            policies.for_service(&echo).balancer,
            Balancer::ConsistentHash { tag: "user".into() }
        );
        let other = ServiceKey::new("g", "com.example.Other", "1.0");
        assert_eq!(
            policies.for_service(&other),
            &ServicePolicy {
                balancer: Balancer::Weighted,
                failover: Failover::Retry { attempts: 3 }
            }
        );
        // Every key differs from its default: none was silently ignored.
        let d = BrokerConfig::default();
        assert_ne!(c.server, d.server);
        assert_ne!(c.admin, d.admin);
        assert_ne!(c.limits, d.limits);
        assert_ne!(c.shutdown, d.shutdown);
        assert_ne!(c.log, d.log);
        assert_ne!(c.policy, d.policy);
    }

    #[test]
    fn no_file_means_the_defaults_and_they_are_valid() {
        assert_eq!(parse("").unwrap(), BrokerConfig::default());
        assert!(BrokerConfig::default().problems().is_empty());
        assert_eq!(
            BrokerConfig::default().server.listen,
            vec![ListenAddr::tcp(([0, 0, 0, 0], 9999).into())]
        );
        assert_eq!(
            BrokerConfig::default().admin.listen,
            SocketAddr::from(([127, 0, 0, 1], 9998))
        );
    }

    #[test]
    fn dump_reads_back_the_same() {
        let c = parse(EVERY_KEY).unwrap();
        let text = c.to_toml();
        assert_eq!(parse(&text).unwrap(), c, "{text}");
        assert_eq!(
            parse(&BrokerConfig::default().to_toml()).unwrap(),
            BrokerConfig::default()
        );
    }

    #[test]
    fn unknown_keys_and_sections_are_errors_with_their_location() {
        let errors = parse(
            "[limits]
max_frame_size = 1000
max_frames = 3

[lmits]
x = 1
",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].location, Some((3, 1)));
        assert_eq!(errors[0].key.as_deref(), Some("limits.max_frames"));
        assert!(
            errors[0].message.contains("unknown field `max_frames`"),
            "{}",
            errors[0]
        );
        assert_eq!(errors[1].location, Some((5, 2)));
        assert!(errors[1].message.contains("unknown section"));
        let errors = parse(
            "[services.\"x\"]
balancer = \"random\"
weight = 2
",
        )
        .unwrap_err();
        assert_eq!(errors[0].key.as_deref(), Some("services.\"x\".weight"));
    }

    #[test]
    fn every_bad_value_is_reported_with_its_location() {
        let text = "[server]
shards = -1
listen = [\"udp://1.2.3.4:5\"]
io_memory = \"1 KiB\"

[limits]
max_frame_size = \"20 MiB\"
setup_timeout = \"soon\"
min_keepalive_lifetime = \"1h\"

[log]
format = \"xml\"
level = \"[[\"

[policy]
failover = \"retry\"
";
        let errors = parse(text).unwrap_err();
        let shown: Vec<String> = errors
            .iter()
            .map(|e| format!("{:?} {e}", e.location))
            .collect();
        let expect = [
            ("2:10", "server.shards"),
            ("3:10", "server.listen"),
            ("4:13", "server.io_memory"),
            ("7:18", "limits.max_frame_size"),
            ("8:17", "limits.setup_timeout"),
            ("9:26", "limits.min_keepalive_lifetime"),
            ("12:10", "log.format"),
            ("13:9", "log.level"),
            ("15:1", "policy.retries"),
        ];
        for (at, key) in expect {
            let (line, col) = at.split_once(':').unwrap();
            let location = Some((line.parse().unwrap(), col.parse().unwrap()));
            assert!(
                errors
                    .iter()
                    .any(|e| e.location == location && e.key.as_deref() == Some(key)),
                "no error for {key} at {at}: {shown:#?}"
            );
        }
        assert!(
            shown
                .iter()
                .any(|e| e.contains("unsupported transport \"udp\"")),
            "{shown:#?}"
        );
        assert!(
            shown.iter().any(|e| e.contains("below the 64 KiB minimum")),
            "{shown:#?}"
        );
    }

    #[test]
    fn syntax_errors_have_a_location() {
        let errors = parse(
            "[server
shards = 1
",
        )
        .unwrap_err();
        assert_eq!(errors[0].location.map(|(l, _)| l), Some(1), "{errors:?}");
        let errors = parse(
            "[server]
shards = = 2
",
        )
        .unwrap_err();
        assert_eq!(errors[0].location.map(|(l, _)| l), Some(2), "{errors:?}");
    }

    #[test]
    fn sizes_and_durations_as_operators_write_them() {
        for (text, bytes) in [
            ("\"512 KiB\"", 512 << 10),
            ("\"16MiB\"", 16 << 20),
            ("65536", 65536),
            ("\"1 MB\"", 1_000_000),
        ] {
            let c = parse(&format!("[limits]\nmax_pending_bytes = {text}\n")).unwrap();
            assert_eq!(c.limits.max_pending_bytes, Size(bytes), "{text}");
        }
        assert_eq!(Size(16 << 20).to_string(), "16 MiB");
        assert_eq!(
            Size(rsocket_proto::frame::MAX_U24).to_string(),
            "16777215 B"
        );
        let c = parse("[shutdown]\ndrain_timeout = \"1m 30s\"\n").unwrap();
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(90));
    }

    #[test]
    fn the_example_file_has_every_key_and_is_valid() {
        let example = include_str!("../../../systemd/rsbroker.toml");
        let parsed = parse(example).unwrap();
        // Every key the dump prints appears in the example, uncommented.
        let keys = |text: &str| -> Vec<String> {
            let mut section = String::new();
            let mut out = Vec::new();
            for line in text.lines().map(str::trim) {
                if line.starts_with('[') {
                    section = line.trim_matches(['[', ']']).to_owned();
                    if section.starts_with("services.") {
                        section = "services.*".into();
                    }
                } else if let Some((k, _)) = line.split_once('=')
                    && !line.starts_with('#')
                {
                    out.push(format!("{section}.{}", k.trim()));
                }
            }
            out.sort();
            out.dedup();
            out
        };
        let mut all = BrokerConfig::default();
        all.set_policy("x", &ServicePolicy::default());
        let documented = keys(example);
        for key in keys(&all.to_toml()) {
            assert!(
                documented.contains(&key),
                "systemd/rsbroker.toml lacks {key}"
            );
        }
        assert_eq!(
            parsed.server,
            BrokerConfig::default().server,
            "the example shows the defaults"
        );
        assert_eq!(parsed.limits, BrokerConfig::default().limits);
    }

    #[test]
    fn policies() {
        assert_eq!(
            parse_policy("echo=random").unwrap(),
            (
                "echo".into(),
                ServicePolicy {
                    balancer: Balancer::Random,
                    failover: Failover::FailFast
                }
            )
        );
        assert_eq!(
            parse_policy("a.B=hash:user,retry=2").unwrap().1,
            ServicePolicy {
                balancer: Balancer::ConsistentHash { tag: "user".into() },
                failover: Failover::Retry { attempts: 2 }
            }
        );
        assert!(parse_policy("x").unwrap_err().contains("expected"));
        assert!(
            parse_policy("x=fastest")
                .unwrap_err()
                .contains("unknown balancer")
        );
        assert!(
            parse_policy("x=random,retry=lots")
                .unwrap_err()
                .contains("number")
        );
        assert!(parse_policy("x=hash:").is_err());
    }

    /// Writes a self-signed certificate (valid `from`..`until`, years) and
    /// its key under a fresh directory; returns (dir, cert, key).
    fn cert_files(name: &str, from: i32, until: i32) -> (PathBuf, PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("rsbroker-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (dir, c, k)
    }

    fn tls_problems(cert: Option<&Path>, key: Option<&Path>) -> Vec<(String, String)> {
        let mut c = BrokerConfig::default();
        c.server.listen = vec!["tls://127.0.0.1:0".parse().unwrap()];
        c.tls.certificate = cert.map(Path::to_owned);
        c.tls.key = key.map(Path::to_owned);
        c.problems()
    }

    #[test]
    fn tls_files_are_checked_with_their_paths() {
        let (dir, cert, key) = cert_files("good", 2020, 2090);
        assert_eq!(tls_problems(Some(&cert), Some(&key)), vec![]);

        let none = tls_problems(None, None);
        assert_eq!(none.len(), 1, "{none:?}");
        assert_eq!(none[0].0, "tls.certificate");
        assert!(none[0].1.contains("tls://127.0.0.1:0"), "{none:?}");

        let missing = dir.join("missing.pem");
        let p = tls_problems(Some(&missing), Some(&key));
        assert!(
            p[0].1.contains("missing.pem") && p[0].1.contains("cannot read"),
            "{p:?}"
        );

        let (other, _, other_key) = cert_files("other", 2020, 2090);
        let p = tls_problems(Some(&cert), Some(&other_key));
        assert!(p[0].1.contains("does not match"), "{p:?}");

        let (old, old_cert, old_key) = cert_files("expired", 2000, 2001);
        let p = tls_problems(Some(&old_cert), Some(&old_key));
        assert!(
            p[0].1.contains("expired") && p[0].1.contains("cert.pem"),
            "{p:?}"
        );

        let p = tls_problems(Some(&key), Some(&key));
        assert!(p[0].1.contains("no certificate"), "{p:?}");
        for d in [dir, other, old] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
