//! The admin HTTP server: `/metrics` (Prometheus), `/healthz`, `/readyz`,
//! `/api/apps`, `/api/services`, `/api/connections`, `/api/overview`, a
//! status page at `/`, and `POST /api/reload`. Changes need the admin
//! token always, reads when the config says so.
//!
//! It runs on a thread of its own with a current-thread tokio runtime, so a
//! slow scrape never stalls a shard. It reads only what the shards publish
//! in their slots (snapshots every 100 ms, heartbeats): counters are kept
//! per shard and summed here, at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use rsbroker_core::ServiceCounters;
use rsocket_proto::Interaction;
use serde::Serialize;

use crate::control::{Control, Phase, ShardSnapshot};

/// A shard whose timer loop has not run for this long is stuck.
pub(crate) const STUCK_AFTER: Duration = Duration::from_secs(2);

/// The running admin server.
#[derive(Debug)]
pub(crate) struct AdminServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `addr` and serves on a new thread.
    pub(crate) fn start(addr: SocketAddr, control: Arc<Control>) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("admin server on {addr}: {e}")))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rsbroker-admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "admin server cannot listen");
                            return;
                        }
                    };
                    let served = axum::serve(listener, router(control))
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "admin server failed");
                    }
                });
            })?;
        tracing::info!("admin server on http://{local}/");
        Ok(Self {
            addr: local,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/api/reload", post(reload))
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/apps", get(apps))
        .route("/api/services", get(services))
        .route("/api/connections", get(connections))
        .route("/api/overview", get(overview))
        .route("/api/config", get(config))
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            authorise,
        ))
        .with_state(control)
}

/// What a request needs: changes always need the admin token, reads when
/// `admin.protect_reads` says so, health checks never.
async fn authorise(
    State(control): State<Arc<Control>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    let changes =
        request.method() != axum::http::Method::GET && request.method() != axum::http::Method::HEAD;
    let settings = control.settings();
    let needed =
        changes || (settings.admin.protect_reads && !matches!(path, "/healthz" | "/readyz"));
    if !needed {
        return next.run(request).await;
    }
    let Some(file) = &settings.admin.token_file else {
        return refuse(
            StatusCode::FORBIDDEN,
            "this endpoint needs the admin token, and none is configured (admin.token_file)",
        );
    };
    let token = match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        Ok(_) | Err(_) => {
            tracing::error!(file = %file.display(), "the admin token file cannot be read or is empty");
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the admin token file cannot be read",
            );
        }
    };
    let offered = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    use subtle::ConstantTimeEq;
    if bool::from(offered.as_bytes().ct_eq(token.as_bytes())) {
        return next.run(request).await;
    }
    tracing::warn!(%path, "admin request refused: missing or wrong token");
    refuse(
        StatusCode::UNAUTHORIZED,
        "missing or wrong admin token (Authorization: Bearer TOKEN)",
    )
}

fn refuse(status: StatusCode, message: &'static str) -> Response {
    let mut r = (status, format!("{message}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// `POST /api/reload`: what SIGHUP does.
async fn reload(State(control): State<Arc<Control>>) -> Response {
    if control.request_reload() {
        (StatusCode::ACCEPTED, "reload requested\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "this broker cannot be reloaded from here\n",
        )
            .into_response()
    }
}

async fn metrics(State(control): State<Arc<Control>>) -> Response {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(control)));
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response(),
    }
}

async fn healthz(State(control): State<Arc<Control>>) -> Response {
    let stuck: Vec<String> = control
        .heartbeat_ages()
        .iter()
        .enumerate()
        .filter(|(_, age)| **age > STUCK_AFTER)
        .map(|(i, age)| format!("shard {i} has not run for {:.1} s", age.as_secs_f64()))
        .collect();
    if stuck.is_empty() || control.all_finished() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", stuck.join("\n")),
        )
            .into_response()
    }
}

async fn readyz(State(control): State<Arc<Control>>) -> Response {
    match control.phase() {
        Phase::Running if control.ready.load(std::sync::atomic::Ordering::Acquire) => {
            (StatusCode::OK, "ready\n").into_response()
        }
        Phase::Running => (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response(),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response(),
        Phase::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response(),
    }
}

/// An app and its instances, for `/api/apps`.
#[derive(Debug, Serialize)]
struct AppView {
    name: String,
    instances: Vec<InstanceJson>,
}

#[derive(Debug, Serialize)]
struct InstanceJson {
    uuid: String,
    ip: Option<String>,
    status: String,
    power_rating: u32,
    connections: usize,
    services: Vec<String>,
}

/// One connection, for `/api/connections`: where it is, whose it is, what
/// the broker holds for it and whether it is read.
#[derive(Debug, Serialize)]
struct ConnectionView {
    shard: u16,
    id: String,
    peer: Option<String>,
    transport: Option<String>,
    tls_subject: Option<String>,
    app: Option<String>,
    instance: Option<String>,
    pending_bytes: usize,
    reading: bool,
}

/// A service, its instances and its counters, for `/api/services`.
#[derive(Debug, Serialize)]
struct ServiceView {
    service: String,
    instances: Vec<String>,
    requests: BTreeMap<&'static str, u64>,
    errors: BTreeMap<&'static str, u64>,
}

/// Totals, for `/api/overview` and the status page.
#[derive(Debug, Serialize)]
struct Overview {
    phase: &'static str,
    shards: usize,
    uptime_seconds: f64,
    connections: usize,
    apps: usize,
    instances: usize,
    services: usize,
    open_streams: usize,
    requests: u64,
    request_errors: u64,
    rejected: u64,
    frames_in: u64,
    frames_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// The route table as the freshest shard reports it.
fn routes(snaps: &[ShardSnapshot]) -> Arc<Vec<crate::control::InstanceView>> {
    snaps
        .iter()
        .map(|s| s.routes.clone())
        .max_by_key(|r| r.len())
        .unwrap_or_default()
}

fn app_views(snaps: &[ShardSnapshot]) -> Vec<AppView> {
    let mut apps: BTreeMap<String, Vec<InstanceJson>> = BTreeMap::new();
    for i in routes(snaps).iter() {
        apps.entry(i.name.clone()).or_default().push(InstanceJson {
            uuid: i.uuid.clone(),
            ip: i.ip.clone(),
            status: i.status.clone(),
            power_rating: i.power_rating,
            connections: i.connections,
            services: i.services.clone(),
        });
    }
    apps.into_iter()
        .map(|(name, mut instances)| {
            instances.sort_by(|a, b| a.uuid.cmp(&b.uuid));
            AppView { name, instances }
        })
        .collect()
}

fn service_views(snaps: &[ShardSnapshot]) -> Vec<ServiceView> {
    let mut out: BTreeMap<String, ServiceView> = BTreeMap::new();
    for i in routes(snaps).iter() {
        for s in &i.services {
            let v = out.entry(s.clone()).or_insert_with(|| empty_service(s));
            v.instances.push(i.uuid.clone());
        }
    }
    for snap in snaps {
        for (name, c) in &snap.services {
            let v = out
                .entry(name.clone())
                .or_insert_with(|| empty_service(name));
            for interaction in ServiceCounters::INTERACTIONS {
                let label = interaction_label(interaction);
                *v.requests.entry(label).or_default() += c.requests(interaction);
                *v.errors.entry(label).or_default() += c.errors(interaction);
            }
        }
    }
    out.into_values()
        .map(|mut v| {
            v.instances.sort();
            v
        })
        .collect()
}

fn empty_service(name: &str) -> ServiceView {
    ServiceView {
        service: name.to_owned(),
        instances: Vec::new(),
        requests: interaction_labels().map(|l| (l, 0)).collect(),
        errors: interaction_labels().map(|l| (l, 0)).collect(),
    }
}

/// The `interaction` label of the request metrics (and the keys of a
/// service's counts in `/api/services`).
fn interaction_label(interaction: Interaction) -> &'static str {
    match interaction {
        Interaction::RequestResponse => "request_response",
        Interaction::FireAndForget => "fire_and_forget",
        Interaction::Stream => "request_stream",
        Interaction::Channel => "request_channel",
    }
}

fn interaction_labels() -> impl Iterator<Item = &'static str> {
    ServiceCounters::INTERACTIONS
        .into_iter()
        .map(interaction_label)
}

fn overview_of(control: &Control, snaps: &[ShardSnapshot]) -> Overview {
    let routes = routes(snaps);
    let apps: std::collections::BTreeSet<&str> = routes.iter().map(|i| i.name.as_str()).collect();
    let services: std::collections::BTreeSet<&str> = routes
        .iter()
        .flat_map(|i| i.services.iter().map(String::as_str))
        .collect();
    let sum = |f: &dyn Fn(&ShardSnapshot) -> u64| snaps.iter().map(f).sum::<u64>();
    Overview {
        phase: match control.phase() {
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        },
        shards: snaps.len(),
        uptime_seconds: control.started.elapsed().as_secs_f64(),
        connections: snaps.iter().map(|s| s.connections.len()).sum(),
        apps: apps.len(),
        instances: routes.len(),
        services: services.len(),
        open_streams: snaps.iter().map(|s| s.open_streams).sum(),
        requests: sum(&|s| s.services.iter().map(|(_, c)| c.total_requests()).sum()),
        request_errors: sum(&|s| s.services.iter().map(|(_, c)| c.total_errors()).sum()),
        rejected: sum(&|s| s.stats.requests_rejected),
        frames_in: sum(&|s| s.stats.frames_in),
        frames_out: sum(&|s| s.io.frames_out),
        bytes_in: sum(&|s| s.io.bytes_in),
        bytes_out: sum(&|s| s.io.bytes_out),
    }
}

async fn apps(State(control): State<Arc<Control>>) -> Json<Vec<AppView>> {
    Json(app_views(&control.snapshots()))
}

async fn connections(State(control): State<Arc<Control>>) -> Json<Vec<ConnectionView>> {
    let views = control
        .snapshots()
        .iter()
        .flat_map(|s| {
            s.connections.iter().map(|c| ConnectionView {
                shard: s.shard,
                id: c.id.to_string(),
                peer: c.peer.map(|p| p.to_string()),
                transport: c.transport.map(|t| t.to_string()),
                tls_subject: c.tls_subject.clone(),
                app: c.app.as_ref().map(|(name, _)| name.clone()),
                instance: c.app.as_ref().map(|(_, uuid)| uuid.clone()),
                pending_bytes: c.pending_bytes,
                reading: c.reading,
            })
        })
        .collect();
    Json(views)
}

async fn services(State(control): State<Arc<Control>>) -> Json<Vec<ServiceView>> {
    Json(service_views(&control.snapshots()))
}

/// The settings in force (after reloads), as TOML.
async fn config(State(control): State<Arc<Control>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        control.settings().to_toml(),
    )
        .into_response()
}

async fn overview(State(control): State<Arc<Control>>) -> Json<Overview> {
    let snaps = control.snapshots();
    Json(overview_of(&control, &snaps))
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn status_page(State(control): State<Arc<Control>>) -> Html<String> {
    let snaps = control.snapshots();
    let o = overview_of(&control, &snaps);
    let mut apps_rows = String::new();
    for app in app_views(&snaps) {
        for i in &app.instances {
            let _ = write!(
                apps_rows,
                "<tr><td class=app>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&app.name),
                esc(&i.uuid),
                esc(i.ip.as_deref().unwrap_or("")),
                esc(&i.status),
                i.connections,
                esc(&i.services.join(", ")),
            );
        }
    }
    if apps_rows.is_empty() {
        apps_rows = "<tr><td colspan=6>No app is connected.</td></tr>".into();
    }
    let mut service_rows = String::new();
    for s in service_views(&snaps) {
        let total: u64 = s.requests.values().sum();
        let errors: u64 = s.errors.values().sum();
        let _ = write!(
            service_rows,
            "<tr data-service=\"{0}\"><td>{0}</td><td>{1}</td><td class=num>{2}</td><td class=num>{3}</td><td class=\"num rate\">–</td></tr>",
            esc(&s.service),
            s.instances.len(),
            total,
            errors,
        );
    }
    if service_rows.is_empty() {
        service_rows = "<tr><td colspan=5>No service is registered.</td></tr>".into();
    }
    Html(format!(
        include_str!("status.html"),
        phase = o.phase,
        shards = o.shards,
        connections = o.connections,
        apps = o.apps,
        instances = o.instances,
        services = o.services,
        apps_rows = apps_rows,
        service_rows = service_rows,
        version = env!("CARGO_PKG_VERSION"),
    ))
}

/// Encodes every shard's last snapshot as Prometheus metrics, summed where
/// a per-shard label would add nothing.
#[derive(Debug)]
struct SnapshotCollector(Arc<Control>);

type Labels = Vec<(&'static str, String)>;

/// Escapes a label value as the text format needs (the encoder writes
/// values as they are): service and identity names come from peers, and a
/// quote or a newline in one must not end the value or the line.
fn escape_label(v: &mut String) {
    if v.contains(['\\', '"', '\n']) {
        *v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
    }
}

fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    values: Vec<(Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (mut labels, value) in values {
        for (_, v) in &mut labels {
            escape_label(v);
        }
        let family = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(family)?,
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family)?,
        }
    }
    Ok(())
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let control = &self.0;
        let snaps = control.snapshots();
        let per_shard = |f: &dyn Fn(&ShardSnapshot) -> u64| -> Vec<(Labels, u64)> {
            snaps
                .iter()
                .map(|s| (vec![("shard", s.shard.to_string())], f(s)))
                .collect()
        };
        use MetricType::{Counter, Gauge};
        let e = &mut encoder;
        family(
            e,
            "rsbroker_connections",
            "Open connections.",
            Gauge,
            per_shard(&|s| s.connections.len() as u64),
        )?;
        family(
            e,
            "rsbroker_connections_opened",
            "Connections accepted.",
            Counter,
            per_shard(&|s| s.stats.connections_opened),
        )?;
        family(
            e,
            "rsbroker_connections_closed",
            "Connections closed.",
            Counter,
            per_shard(&|s| s.stats.connections_closed),
        )?;
        family(
            e,
            "rsbroker_connections_refused",
            "Connections refused at max_connections.",
            Counter,
            per_shard(&|s| s.io.refused_connections),
        )?;
        family(
            e,
            "rsbroker_tls_handshakes_failed",
            "TLS handshakes that failed.",
            Counter,
            per_shard(&|s| s.io.tls_handshakes_failed),
        )?;
        family(
            e,
            "rsbroker_websocket_upgrades_refused",
            "WebSocket upgrades refused (not HTTP, a wrong path, not an upgrade).",
            Counter,
            per_shard(&|s| s.io.upgrades_refused),
        )?;
        family(
            e,
            "rsbroker_handshake_timeouts",
            "Handshakes not finished within limits.handshake_timeout.",
            Counter,
            per_shard(&|s| s.io.handshake_timeouts),
        )?;
        family(
            e,
            "rsbroker_connections_unreadable",
            "Connections closed because what they sent was not RSocket frames on their transport.",
            Counter,
            per_shard(&|s| s.io.unreadable_connections),
        )?;
        for (name, help, kind, get) in [
            (
                "rsbroker_quic_datagrams_received",
                "UDP datagrams QUIC endpoints read.",
                Counter,
                (|s: &ShardSnapshot| s.quic.datagrams_in) as fn(&ShardSnapshot) -> u64,
            ),
            (
                "rsbroker_quic_datagrams_sent",
                "UDP datagrams QUIC endpoints sent.",
                Counter,
                |s| s.quic.datagrams_out,
            ),
            (
                "rsbroker_quic_datagrams_forwarded",
                "QUIC datagrams passed to the shard that owns their connection (after a client's address changed).",
                Counter,
                |s| s.quic.forwarded_out,
            ),
            (
                "rsbroker_quic_datagrams_forward_dropped",
                "QUIC datagrams dropped because the owning shard's queue was full.",
                Counter,
                |s| s.quic.forward_dropped,
            ),
            (
                "rsbroker_quic_retries",
                "QUIC handshakes answered with a Retry (address validation above quic.retry_above).",
                Counter,
                |s| s.quic.retries,
            ),
            (
                "rsbroker_quic_refused",
                "QUIC connection attempts refused (quic.max_connections_per_shard, draining).",
                Counter,
                |s| s.quic.refused,
            ),
            (
                "rsbroker_quic_handshakes",
                "QUIC handshakes in flight.",
                Gauge,
                |s| s.quic.handshaking,
            ),
            (
                "rsbroker_quic_connections",
                "QUIC connections held (handshakes and closing ones included).",
                Gauge,
                |s| s.quic.connections,
            ),
            (
                "rsbroker_quic_assembled_bytes",
                "Bytes copied to assemble received frames that spanned QUIC packets (frames within a packet are not copied).",
                Counter,
                |s| s.quic.assembled_bytes,
            ),
            (
                "rsbroker_receive_pool_bytes",
                "Bytes of receive buffers alive: held by connections, by frames cut from them, or kept for reuse.",
                Gauge,
                |s| s.pool.live_bytes as u64,
            ),
            (
                "rsbroker_receive_pool_limit_bytes",
                "The most bytes of receive buffers a shard allocates (its share of max_buffered_bytes).",
                Gauge,
                |s| s.pool.limit as u64,
            ),
            (
                "rsbroker_receive_pool_held",
                "Receive buffers held by connections reading or with a frame in progress.",
                Gauge,
                |s| s.pool.held as u64,
            ),
            (
                "rsbroker_receive_pool_spent",
                "Used-up receive buffers that frames still in the broker may point into.",
                Gauge,
                |s| s.pool.spent as u64,
            ),
            (
                "rsbroker_receive_pool_free",
                "Receive buffers kept for reuse (whole free ones and ones with room left).",
                Gauge,
                |s| (s.pool.free + s.pool.tails) as u64,
            ),
            (
                "rsbroker_receive_pool_allocated",
                "Receive buffers allocated.",
                Counter,
                |s| s.pool.allocated,
            ),
            (
                "rsbroker_receive_pool_exhausted",
                "Times a connection was not read because its shard's receive buffers were at their limit.",
                Counter,
                |s| s.pool.exhausted,
            ),
        ] {
            family(e, name, help, kind, per_shard(&get))?;
        }
        let routes = routes(&snaps);
        let apps: std::collections::BTreeSet<&str> =
            routes.iter().map(|i| i.name.as_str()).collect();
        family(
            e,
            "rsbroker_apps",
            "Apps with at least one live instance.",
            Gauge,
            vec![(vec![], apps.len() as u64)],
        )?;
        family(
            e,
            "rsbroker_instances",
            "App instances connected.",
            Gauge,
            vec![(vec![], routes.len() as u64)],
        )?;
        let services = service_views(&snaps);
        family(
            e,
            "rsbroker_service_instances",
            "Instances serving each service.",
            Gauge,
            services
                .iter()
                .map(|s| {
                    (
                        vec![("service", s.service.clone())],
                        s.instances.len() as u64,
                    )
                })
                .collect(),
        )?;
        let by_interaction =
            |pick: &dyn Fn(&crate::admin::ServiceView) -> &BTreeMap<&'static str, u64>| {
                services
                    .iter()
                    .flat_map(|s| {
                        pick(s).iter().map(move |(i, n)| {
                            (
                                vec![
                                    ("service", s.service.clone()),
                                    ("interaction", (*i).to_owned()),
                                ],
                                *n,
                            )
                        })
                    })
                    .collect::<Vec<_>>()
            };
        family(
            e,
            "rsbroker_requests",
            "Requests routed to an instance, by service and interaction model.",
            Counter,
            by_interaction(&|s| &s.requests),
        )?;
        family(
            e,
            "rsbroker_request_errors",
            "Requests that ended with an ERROR from the instance or because it went away.",
            Counter,
            by_interaction(&|s| &s.errors),
        )?;
        family(
            e,
            "rsbroker_requests_rejected",
            "Requests refused: no route, no live instance, stream limit, draining, invalid request.",
            Counter,
            per_shard(&|s| s.stats.requests_rejected),
        )?;
        family(
            e,
            "rsbroker_requests_denied",
            "Requests refused because their connection's identity may not call the service.",
            Counter,
            per_shard(&|s| s.stats.requests_denied),
        )?;
        family(
            e,
            "rsbroker_setups_refused",
            "SETUPs refused: missing or bad credentials, or services the identity may not publish.",
            Counter,
            per_shard(&|s| s.stats.setups_refused),
        )?;
        family(
            e,
            "rsbroker_publishes_refused",
            "Services not exposed (METADATA_PUSH) because the identity may not publish them.",
            Counter,
            per_shard(&|s| s.stats.publishes_refused),
        )?;
        family(
            e,
            "rsbroker_setups_limited",
            "SETUPs refused because their identity had as many connections open as auth.limits allows.",
            Counter,
            per_shard(&|s| s.stats.setups_limited),
        )?;
        family(
            e,
            "rsbroker_setups_throttled",
            "SETUPs refused without their credentials checked: their address, or the shard, had more failed authentications lately than auth.failures allows.",
            Counter,
            per_shard(&|s| s.stats.setups_throttled),
        )?;
        family(
            e,
            "rsbroker_setup_refusals_unlogged",
            "Refused SETUPs not logged a line each: past the 20 a second a shard logs (those refused unchecked are in rsbroker_setups_throttled).",
            Counter,
            per_shard(&|s| s.stats.refusals_unlogged),
        )?;
        family(
            e,
            "rsbroker_requests_limited",
            "Requests refused because their identity was at its auth.limits of open streams or requests a second.",
            Counter,
            per_shard(&|s| s.stats.requests_limited),
        )?;
        let apps = control.usage.snapshot();
        let by_app = |f: &dyn Fn(&rsbroker_core::trust::AppUsage) -> u64| -> Vec<(Labels, u64)> {
            apps.iter()
                .map(|u| (vec![("app", u.name().to_owned())], f(u)))
                .collect()
        };
        family(
            e,
            "rsbroker_app_connections",
            "Open connections per identity (app), across shards.",
            Gauge,
            by_app(&|u| u64::from(u.connections())),
        )?;
        family(
            e,
            "rsbroker_app_streams",
            "Open requester streams per identity (app), across shards (brought up to date at least once a second).",
            Gauge,
            by_app(&|u| u.streams()),
        )?;
        family(
            e,
            "rsbroker_app_limited",
            "Refusals per identity (app) and limit of auth.limits (connections, streams, rate).",
            Counter,
            apps.iter()
                .flat_map(|u| {
                    rsbroker_core::trust::Limit::ALL.into_iter().map(move |l| {
                        (
                            vec![
                                ("app", u.name().to_owned()),
                                ("limit", l.as_str().to_owned()),
                            ],
                            u.limited(l),
                        )
                    })
                })
                .collect(),
        )?;
        family(
            e,
            "rsbroker_credentials_expired",
            "Connections closed because their token expired.",
            Counter,
            per_shard(&|s| s.stats.credentials_expired),
        )?;
        family(
            e,
            "rsbroker_requests_retried",
            "Requests retried on another instance (failover).",
            Counter,
            per_shard(&|s| s.stats.requests_retried),
        )?;
        family(
            e,
            "rsbroker_frames_received",
            "Frames received.",
            Counter,
            per_shard(&|s| s.stats.frames_in),
        )?;
        family(
            e,
            "rsbroker_frames_sent",
            "Frames sent.",
            Counter,
            per_shard(&|s| s.io.frames_out),
        )?;
        family(
            e,
            "rsbroker_received_bytes",
            "Bytes received on the wire, transport framing included.",
            Counter,
            per_shard(&|s| s.io.bytes_in),
        )?;
        family(
            e,
            "rsbroker_sent_bytes",
            "Bytes sent on the wire, transport framing included.",
            Counter,
            per_shard(&|s| s.io.bytes_out),
        )?;
        family(
            e,
            "rsbroker_slow_consumer_pauses",
            "Times a connection over max_pending_bytes paused a connection feeding it unasked.",
            Counter,
            per_shard(&|s| s.stats.pauses),
        )?;
        family(
            e,
            "rsbroker_mesh_pauses",
            "Times a connection was not read because the shard its frames go to had more than max_pending_bytes of them still to handle.",
            Counter,
            per_shard(&|s| s.stats.mesh_pauses),
        )?;
        family(
            e,
            "rsbroker_overload_pauses",
            "Times a connection was not read because its shard was over its share of max_buffered_bytes and it held the most.",
            Counter,
            per_shard(&|s| s.stats.overload_pauses),
        )?;
        family(
            e,
            "rsbroker_connections_closed_over_limit",
            "Connections closed for a limit: a slow consumer past backpressure_timeout, max_connection_memory, or the largest holder of a spent max_buffered_bytes.",
            Counter,
            per_shard(&|s| s.stats.closed_over_limit),
        )?;
        family(
            e,
            "rsbroker_buffered_bytes",
            "Bytes held for connections: unsent frames, fragments waiting for a route, transport buffers beyond their base size.",
            Gauge,
            per_shard(&|s| s.held_bytes as u64),
        )?;
        family(
            e,
            "rsbroker_over_memory_budget",
            "1 while a shard is over its share of max_buffered_bytes and does not read the connections that hold the most.",
            Gauge,
            per_shard(&|s| u64::from(s.over_budget)),
        )?;
        family(
            e,
            "rsbroker_open_streams",
            "Streams open on connections.",
            Gauge,
            per_shard(&|s| s.open_streams as u64),
        )?;
        family(
            e,
            "rsbroker_mesh_queue_depth",
            "Message batches waiting for a peer shard's queue.",
            Gauge,
            snaps
                .iter()
                .flat_map(|s| {
                    s.queue_depths
                        .iter()
                        .enumerate()
                        .filter(move |(p, _)| *p != usize::from(s.shard))
                        .map(move |(p, d)| {
                            (
                                vec![("shard", s.shard.to_string()), ("peer", p.to_string())],
                                *d as u64,
                            )
                        })
                })
                .collect(),
        )?;
        family(
            e,
            "rsbroker_shard_heartbeat_age_milliseconds",
            "Time since each shard last went round its timer loop.",
            Gauge,
            control
                .heartbeat_ages()
                .iter()
                .enumerate()
                .map(|(i, a)| (vec![("shard", i.to_string())], a.as_millis() as u64))
                .collect(),
        )?;
        family(
            e,
            "rsbroker_draining",
            "1 while the broker drains or stops.",
            Gauge,
            vec![(vec![], u64::from(control.phase() != Phase::Running))],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::escape_label;

    #[test]
    fn label_values_from_peers_cannot_end_the_value_or_the_line() {
        let mut v = "a\"} 1\nrsbroker_fake 9 \\".to_owned();
        escape_label(&mut v);
        assert_eq!(v, r#"a\"} 1\nrsbroker_fake 9 \\"#);
        assert!(!v.contains('\n'));
        let mut plain = "com.example.Echo".to_owned();
        escape_label(&mut plain);
        assert_eq!(plain, "com.example.Echo");
    }
}
