//! A small RSocket client for rsbroker, on glommio: for Rust apps, for
//! tests and for `loadgen`.
//!
//! A [`Client`] is one connection, driven by a task on the current glommio
//! executor. It registers the app and its services in SETUP, makes requests
//! of all four interaction models with explicit REQUEST_N control, answers
//! requests for the services it registered through [`Responder`]s, and sends
//! and receives METADATA_PUSH.
//!
//! # Layout
//!
//! - this file: [`Client`], its configuration and the driver task;
//! - [`Subscription`]: the items of a request-stream or request-channel;
//! - [`Sink`]: what a responder (or a channel's requester) sends;
//! - [`metadata`]: building routing and SETUP metadata.

pub mod metadata;
mod stream;

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rsbroker_transports::driver::{self, End, Endpoint, Written};
use rsbroker_transports::listen::ConnectOptions;
use rsbroker_transports::{FrameIo, ListenAddr, TcpFrames, TransportError};
use rsocket_proto::conn::{
    ClientSettings, Config, Connection, Event, Interaction, RequestKind, SetupPayload,
};
use rsocket_proto::metadata::{RequestMetadata, Route};
use rsocket_proto::{DecodeError, ErrorCode, FrameView, OutFrame, SendError};
use rustc_hash::FxHashMap;

pub use stream::{Sink, Subscription};

/// Whom a connection to `url` trusts: for tls:// and wss://, the CA
/// certificates in `ca` (PEM), or with `insecure` any certificate (test
/// brokers with self-signed certificates only). `None` for plain
/// transports; an error naming what to give when a TLS URL has neither.
pub fn trust(
    url: &ListenAddr,
    ca: Option<&std::path::Path>,
    insecure: bool,
) -> Result<Option<Arc<rsbroker_transports::rustls::ClientConfig>>, String> {
    match (ca, insecure) {
        (Some(ca), _) => rsbroker_transports::tls::client_config_with_ca(ca)
            .map(Some)
            .map_err(|e| e.to_string()),
        (None, true) => Ok(Some(rsbroker_transports::tls::client_config_insecure())),
        (None, false) if url.scheme.is_tls() => Err(format!(
            "{url}: give --ca FILE (the broker's CA), or --insecure for a test broker"
        )),
        (None, false) => Ok(None),
    }
}

/// A request's or response's metadata and data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    /// Metadata.
    pub metadata: Option<Bytes>,
    /// Data.
    pub data: Bytes,
}

impl Payload {
    /// A payload with data only.
    pub fn data(data: impl Into<Bytes>) -> Self {
        Self {
            metadata: None,
            data: data.into(),
        }
    }

    /// A payload with metadata and data.
    pub fn new(metadata: impl Into<Bytes>, data: impl Into<Bytes>) -> Self {
        Self {
            metadata: Some(metadata.into()),
            data: data.into(),
        }
    }

    /// The frame's metadata and data, taking its buffer.
    fn from_frame(frame: FrameView) -> Self {
        let (metadata, data) = frame.into_parts();
        Self { metadata, data }
    }
}

/// Why a request or the connection failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The responder (or the broker) answered with ERROR.
    #[error("{code}: {message}")]
    Remote {
        /// The error code.
        code: ErrorCode,
        /// The error data as text.
        message: String,
    },
    /// The stream was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The connection is closed.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The connection refused the call.
    #[error("{0}")]
    Send(#[from] SendError),
}

impl ClientError {
    /// The RSocket error code, for remote errors.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A future that lives on the current executor.
pub type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// Answers the requests for one service. Every method has a default that
/// refuses the interaction with ERROR[REJECTED].
pub trait Responder {
    /// A request-response.
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        let _ = request;
        Box::pin(async { Err(rejected("request-response is not served here")) })
    }

    /// A fire-and-forget.
    fn fire_and_forget(&self, request: Payload) {
        let _ = request;
    }

    /// A request-stream: send items on `sink` (each needs credit; `send` waits for it).
    fn request_stream(&self, request: Payload, sink: Sink) {
        let _ = request;
        sink.error(ErrorCode::REJECTED, "request-stream is not served here");
    }

    /// A request-channel: the requester's items arrive on `inbound`, the
    /// answers go on `sink`.
    fn request_channel(&self, request: Payload, inbound: Subscription, sink: Sink) {
        let _ = (request, inbound);
        sink.error(ErrorCode::REJECTED, "request-channel is not served here");
    }
}

fn rejected(message: &str) -> ClientError {
    ClientError::Remote {
        code: ErrorCode::REJECTED,
        message: message.to_owned(),
    }
}

/// The app this client registers as.
#[derive(Clone, Debug)]
pub struct AppConfig {
    /// App name.
    pub name: String,
    /// Instance id; connections with the same uuid are one instance.
    pub uuid: String,
    /// Relative capacity for the weighted balancer.
    pub power_rating: u32,
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The app, or `None` for a plain requester.
    pub app: Option<AppConfig>,
    /// Services to publish: `(group, service, version)`.
    pub services: Vec<(String, String, String)>,
    /// Interval between KEEPALIVE frames.
    pub keepalive_interval: Duration,
    /// How long the broker may be silent.
    pub max_lifetime: Duration,
    /// Largest frame sent; larger messages are fragmented (0: only beyond 16 MiB).
    pub fragment_size: usize,
    /// Largest frame accepted.
    pub max_frame_size: usize,
    /// Data MIME type announced in SETUP.
    pub data_mime: String,
    /// ALPN protocols a `quic://` connection offers (none by default).
    pub alpn: Vec<String>,
    /// Credentials the SETUP carries.
    pub credentials: Credentials,
}

/// What a SETUP proves its identity with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    /// Nothing (the broker must allow anonymous connections).
    #[default]
    None,
    /// A bearer token (a JWT).
    Bearer(String),
    /// Simple authentication: user name and secret.
    Simple(String, String),
}

impl Credentials {
    /// From the command-line flags `--token TOKEN` and `--user NAME:SECRET`
    /// (at most one of them); the error says what is wrong with them.
    pub fn from_flags(token: Option<&str>, user: Option<&str>) -> Result<Self, String> {
        match (token, user) {
            (Some(_), Some(_)) => Err("give --token or --user, not both".into()),
            (Some(token), None) => Ok(Credentials::Bearer(token.to_owned())),
            (None, Some(user)) => match user.split_once(':') {
                Some((name, secret)) if !name.is_empty() => {
                    Ok(Credentials::Simple(name.to_owned(), secret.to_owned()))
                }
                _ => Err(format!("--user {user:?}: write it NAME:SECRET")),
            },
            (None, None) => Ok(Credentials::None),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            app: None,
            services: Vec::new(),
            keepalive_interval: Duration::from_secs(20),
            max_lifetime: Duration::from_secs(90),
            fragment_size: 0,
            max_frame_size: rsocket_proto::frame::MAX_U24,
            data_mime: "application/octet-stream".into(),
            alpn: Vec::new(),
            credentials: Credentials::None,
        }
    }
}

/// Per-stream state shared between the driver and the API objects.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) items: std::collections::VecDeque<Result<Payload, ClientError>>,
    /// No more items will come.
    pub(crate) finished: bool,
    pub(crate) reader: Option<Waker>,
    /// A sender waiting for credit (or for the stream to end).
    pub(crate) writer: Option<Waker>,
    /// The peer cancelled (or ended) the direction this side sends in.
    pub(crate) send_closed: bool,
}

pub(crate) struct Inner {
    pub(crate) conn: RefCell<Connection>,
    pub(crate) slots: RefCell<FxHashMap<u32, Slot>>,
    /// Slot count at which the next [`Inner::collect_slots`] pass runs.
    collect_at: Cell<usize>,
    handlers: RefCell<FxHashMap<String, Rc<dyn Responder>>>,
    default_handler: RefCell<Option<Rc<dyn Responder>>>,
    driver: RefCell<Option<Waker>>,
    pub(crate) closed: RefCell<Option<String>>,
    pushes: RefCell<std::collections::VecDeque<Bytes>>,
    push_waker: RefCell<Option<Waker>>,
    /// Senders waiting for the unsent bytes to drain below the low-water mark.
    pub(crate) send_waiters: RefCell<Vec<Waker>>,
    /// Bytes accepted but not yet written to the socket, as of the driver's last pass.
    unsent: Cell<usize>,
    closed_waker: RefCell<Option<Waker>>,
    setup_done: Cell<bool>,
    local: Cell<Option<SocketAddr>>,
    /// [`Client::abort`] was called: the driver closes without waiting for
    /// the peer to take what is queued.
    aborted: Cell<bool>,
}

/// Unsent bytes above which [`Sink::send`] waits for the socket to drain.
pub(crate) const MAX_UNSENT: usize = 1 << 20;
/// Fewest slots that make a collection pass worth it.
const COLLECT_SLOTS_MIN: usize = 64;

impl Inner {
    /// Bytes accepted for sending that the socket has not taken yet.
    pub(crate) fn unsent(&self) -> usize {
        self.unsent.get() + self.conn.borrow().pending_bytes()
    }

    pub(crate) fn wake_driver(&self) {
        if let Some(w) = self.driver.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    pub(crate) fn closed_error(&self) -> ClientError {
        ClientError::Closed(
            self.closed
                .borrow()
                .clone()
                .unwrap_or_else(|| "closed".into()),
        )
    }
}

/// One connection to the broker (cheap to clone; all clones share it).
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("closed", &self.inner.closed.borrow())
            .finish()
    }
}

/// Builds a client: responders first, then [`ClientBuilder::connect`].
pub struct ClientBuilder {
    config: ClientConfig,
    handlers: FxHashMap<String, Rc<dyn Responder>>,
    default_handler: Option<Rc<dyn Responder>>,
}

impl ClientBuilder {
    /// Answers requests whose route names `service` with `responder`.
    pub fn responder(mut self, service: &str, responder: impl Responder + 'static) -> Self {
        self.handlers.insert(service.to_owned(), Rc::new(responder));
        self
    }

    /// Answers requests for any other service with `responder`.
    pub fn default_responder(mut self, responder: impl Responder + 'static) -> Self {
        self.default_handler = Some(Rc::new(responder));
        self
    }

    /// Connects over TCP and starts the driver task on the current executor.
    pub async fn connect(self, addr: SocketAddr) -> io::Result<Client> {
        let io = TcpFrames::connect(addr, self.config.max_frame_size).await?;
        let local = io.local_addr();
        let client = self.start(io);
        client.inner.local.set(local);
        Ok(client)
    }

    /// Connects to `url` (`tcp://`, `tls://`, `ws://`, `wss://`) and starts
    /// the driver task. `tls` says whom a TLS connection trusts (see
    /// [`rsbroker_transports::tls`]); plain transports ignore it.
    pub async fn connect_url(
        self,
        url: &ListenAddr,
        tls: Option<Arc<rsbroker_transports::rustls::ClientConfig>>,
    ) -> io::Result<Client> {
        let options = ConnectOptions {
            max_frame: self.config.max_frame_size,
            tls,
            alpn: self
                .config
                .alpn
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect(),
        };
        let io = rsbroker_transports::listen::connect(url, &options).await?;
        let local = io.local_addr();
        let client = self.start(io);
        client.inner.local.set(local);
        Ok(client)
    }

    /// Starts the client over an established transport.
    pub fn start(self, io: impl FrameIo + 'static) -> Client {
        let metadata = metadata::setup_with(
            self.config.app.as_ref(),
            &self.config.services,
            &self.config.credentials,
        );
        let conn = Connection::client(
            self.connection_config(),
            SetupPayload {
                metadata,
                data: Bytes::new(),
            },
            Instant::now(),
        );
        self.run(conn, io)
    }

    /// Serves a connection that a peer opened: the other side sends SETUP,
    /// this side answers its requests with the responders (and may send
    /// requests of its own). This is a plain RSocket server, with no broker
    /// in between.
    pub fn serve(self, io: impl FrameIo + 'static) -> Client {
        let conn = Connection::server(self.connection_config(), Instant::now());
        self.run(conn, io)
    }

    fn connection_config(&self) -> Config {
        Config {
            reassemble: true,
            fragment_size: self.config.fragment_size,
            client: ClientSettings {
                keepalive_interval: self.config.keepalive_interval,
                max_lifetime: self.config.max_lifetime,
                data_mime: Bytes::from(self.config.data_mime.clone()),
                ..ClientSettings::default()
            },
            ..Config::default()
        }
    }

    fn run(self, conn: Connection, io: impl FrameIo + 'static) -> Client {
        let inner = Rc::new(Inner {
            conn: RefCell::new(conn),
            slots: RefCell::new(FxHashMap::default()),
            collect_at: Cell::new(COLLECT_SLOTS_MIN),
            handlers: RefCell::new(self.handlers),
            default_handler: RefCell::new(self.default_handler),
            driver: RefCell::new(None),
            closed: RefCell::new(None),
            pushes: RefCell::new(std::collections::VecDeque::new()),
            push_waker: RefCell::new(None),
            send_waiters: RefCell::new(Vec::new()),
            unsent: Cell::new(0),
            closed_waker: RefCell::new(None),
            setup_done: Cell::new(false),
            aborted: Cell::new(false),
            local: Cell::new(None),
        });
        glommio::spawn_local(driver::drive(Driven(inner.clone()), io)).detach();
        Client { inner }
    }
}

impl Client {
    /// A client that will register as `config` says.
    pub fn builder(config: ClientConfig) -> ClientBuilder {
        ClientBuilder {
            config,
            handlers: FxHashMap::default(),
            default_handler: None,
        }
    }

    /// A plain requester connected to `addr`.
    pub async fn connect(addr: SocketAddr) -> io::Result<Client> {
        Self::builder(ClientConfig::default()).connect(addr).await
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if self.inner.closed.borrow().is_some() {
            Err(self.inner.closed_error())
        } else {
            Ok(())
        }
    }

    fn start_request(&self, kind: RequestKind, payload: Payload) -> Result<u32, ClientError> {
        self.check_open()?;
        let id = self
            .inner
            .conn
            .borrow_mut()
            .send_request(kind, payload.metadata, payload.data)?;
        if !matches!(kind, RequestKind::FireAndForget) {
            self.inner.slots.borrow_mut().insert(id, Slot::default());
        }
        self.inner.wake_driver();
        Ok(id)
    }

    /// A request-response.
    pub async fn request_response(&self, request: Payload) -> Result<Payload, ClientError> {
        let id = self.start_request(RequestKind::RequestResponse, request)?;
        let mut sub = Subscription::new(self.inner.clone(), id, false);
        match sub.next().await {
            Some(result) => result,
            None => Ok(Payload::default()),
        }
    }

    /// A fire-and-forget.
    pub fn fire_and_forget(&self, request: Payload) -> Result<(), ClientError> {
        self.start_request(RequestKind::FireAndForget, request)
            .map(|_| ())
    }

    /// A request-stream with `initial_n` (> 0) items requested.
    pub fn request_stream(
        &self,
        request: Payload,
        initial_n: u32,
    ) -> Result<Subscription, ClientError> {
        let id = self.start_request(RequestKind::Stream { initial_n }, request)?;
        Ok(Subscription::new(self.inner.clone(), id, true))
    }

    /// A request-channel with `initial_n` (> 0) items requested; the first
    /// payload goes with the request, later ones through the [`Sink`].
    pub fn request_channel(
        &self,
        request: Payload,
        initial_n: u32,
    ) -> Result<(Sink, Subscription), ClientError> {
        let id = self.start_request(
            RequestKind::Channel {
                initial_n,
                complete: false,
            },
            request,
        )?;
        Ok((
            Sink::new(self.inner.clone(), id),
            Subscription::new(self.inner.clone(), id, true),
        ))
    }

    /// Waits until the connection has room for more (at most about 1 MiB
    /// unsent), so that a sender of fire-and-forgets slows down to what the
    /// socket takes instead of queueing without limit.
    pub async fn writable(&self) {
        poll_fn(|cx| {
            if self.inner.unsent() <= MAX_UNSENT || self.inner.closed.borrow().is_some() {
                Poll::Ready(())
            } else {
                self.inner
                    .send_waiters
                    .borrow_mut()
                    .push(cx.waker().clone());
                self.inner.wake_driver();
                Poll::Pending
            }
        })
        .await
    }

    /// Sends METADATA_PUSH.
    pub fn metadata_push(&self, metadata: Bytes) -> Result<(), ClientError> {
        self.check_open()?;
        self.inner.conn.borrow_mut().send_metadata_push(metadata)?;
        self.inner.wake_driver();
        Ok(())
    }

    /// The next METADATA_PUSH from the broker, or `None` once closed.
    pub async fn next_metadata_push(&self) -> Option<Bytes> {
        poll_fn(|cx| {
            if let Some(m) = self.inner.pushes.borrow_mut().pop_front() {
                return Poll::Ready(Some(m));
            }
            if self.inner.closed.borrow().is_some() {
                return Poll::Ready(None);
            }
            *self.inner.push_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// This side's address, for TCP connections.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local.get()
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.borrow().is_some()
    }

    /// Why the connection closed (the error code and message of the ERROR
    /// that ended it), once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.inner.closed.borrow().clone()
    }

    /// Streams this client has open.
    pub fn open_streams(&self) -> usize {
        self.inner.conn.borrow().stream_count()
    }

    /// Closes the connection (ERROR[CONNECTION_CLOSE] once its streams end).
    pub fn close(&self) {
        self.inner
            .conn
            .borrow_mut()
            .close_gracefully("client closing");
        self.inner.wake_driver();
    }

    /// Closes at once, without waiting for streams.
    pub fn abort(&self) {
        self.inner.aborted.set(true);
        self.inner
            .conn
            .borrow_mut()
            .close(ErrorCode::CONNECTION_ERROR, "client aborted");
        self.inner.wake_driver();
    }

    /// Waits until the connection has closed.
    pub async fn closed(&self) {
        poll_fn(|cx| {
            if self.inner.closed.borrow().is_some() {
                Poll::Ready(())
            } else {
                *self.inner.closed_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl Inner {
    /// The handler for a request: by its route key (`service.method`), then
    /// by its service, then the default. Looks up by borrowed text, so
    /// dispatch allocates nothing.
    fn handler_for(&self, frame: &FrameView) -> Option<Rc<dyn Responder>> {
        let handlers = self.handlers.borrow();
        let lookup = |name: &[u8]| {
            std::str::from_utf8(name)
                .ok()
                .and_then(|name| handlers.get(name).cloned())
        };
        let found = frame
            .metadata_slice()
            .filter(|_| !handlers.is_empty())
            .and_then(|m| RequestMetadata::scan(m).ok());
        let by_key = found
            .as_ref()
            .and_then(|f| f.routing)
            .and_then(|tags| Route::from_tags(tags).ok())
            .and_then(|route| lookup(route.key));
        by_key
            .or_else(|| {
                let route = found?.route().ok()??;
                lookup(route.service)
            })
            .or_else(|| self.default_handler.borrow().clone())
    }

    fn on_event(self: &Rc<Self>, event: Event) {
        match event {
            Event::Request {
                stream_id,
                interaction,
                frame,
                ..
            } => self.on_request(stream_id, interaction, frame),
            Event::Payload {
                stream_id,
                frame,
                ended,
            } => {
                let mut slots = self.slots.borrow_mut();
                if let Some(slot) = slots.get_mut(&stream_id) {
                    let complete = frame.complete();
                    if frame.next() {
                        slot.items.push_back(Ok(Payload::from_frame(frame)));
                    }
                    if complete
                        || ended
                        || !self
                            .conn
                            .borrow()
                            .stream_info(stream_id)
                            .is_some_and(|i| i.inbound_open)
                    {
                        slot.finished = true;
                    }
                    if ended {
                        slot.send_closed = true;
                        wake(&mut slot.writer);
                    }
                    wake(&mut slot.reader);
                }
            }
            Event::Error {
                stream_id,
                code,
                data,
            } => {
                let error = ClientError::Remote {
                    code,
                    message: String::from_utf8_lossy(&data).into_owned(),
                };
                self.end_slot(stream_id, Some(error));
            }
            Event::StreamError { stream_id, error } => {
                let error = ClientError::Remote {
                    code: error.code,
                    message: error.message.into_owned(),
                };
                self.end_slot(stream_id, Some(error));
            }
            Event::Cancel { stream_id, ended } => {
                let mut slots = self.slots.borrow_mut();
                if let Some(slot) = slots.get_mut(&stream_id) {
                    slot.send_closed = true;
                    if ended {
                        slot.finished = true;
                        slot.items.push_back(Err(ClientError::Cancelled));
                        wake(&mut slot.reader);
                    }
                    wake(&mut slot.writer);
                }
            }
            Event::RequestN { stream_id, .. } => {
                if let Some(slot) = self.slots.borrow_mut().get_mut(&stream_id) {
                    wake(&mut slot.writer);
                }
            }
            Event::MetadataPush(m) => {
                self.pushes.borrow_mut().push_back(m);
                wake(&mut self.push_waker.borrow_mut());
            }
            Event::Closed(e) => {
                // The first reason is the real one; the driver's own
                // closing event after it must not overwrite it.
                self.closed
                    .borrow_mut()
                    .get_or_insert_with(|| format!("{}: {}", e.code, e.message));
                let mut slots = self.slots.borrow_mut();
                for slot in slots.values_mut() {
                    if !slot.finished {
                        slot.items
                            .push_back(Err(ClientError::Closed(e.message.to_string())));
                        slot.finished = true;
                    }
                    slot.send_closed = true;
                    wake(&mut slot.reader);
                    wake(&mut slot.writer);
                }
                wake(&mut self.push_waker.borrow_mut());
                wake(&mut self.closed_waker.borrow_mut());
            }
            Event::Setup(_)
            | Event::ResumeRequested(_)
            | Event::Resumed
            | Event::Lease(_)
            | Event::Closing(_)
            | Event::Fragment { .. } => {}
        }
    }

    fn end_slot(&self, stream_id: u32, error: Option<ClientError>) {
        if let Some(slot) = self.slots.borrow_mut().get_mut(&stream_id) {
            if let Some(e) = error {
                slot.items.push_back(Err(e));
            }
            slot.finished = true;
            slot.send_closed = true;
            wake(&mut slot.reader);
            wake(&mut slot.writer);
        }
    }

    fn on_request(self: &Rc<Self>, id: u32, interaction: Interaction, frame: FrameView) {
        let handler = self.handler_for(&frame);
        let request = Payload::from_frame(frame);
        let Some(handler) = handler else {
            if interaction != Interaction::FireAndForget {
                let _ = self.conn.borrow_mut().send_error(
                    id,
                    ErrorCode::REJECTED,
                    Bytes::from_static(b"no responder for this route"),
                );
            }
            return;
        };
        match interaction {
            Interaction::FireAndForget => handler.fire_and_forget(request),
            Interaction::RequestResponse => {
                let mut future = handler.request_response(request);
                // An answer that is ready at once goes out without a task of
                // its own (a task per request costs more than an echo). A
                // future polled here with a no-op waker and still pending is
                // polled again by its task, which registers the real waker.
                let mut cx = Context::from_waker(Waker::noop());
                if let Poll::Ready(result) = future.as_mut().poll(&mut cx) {
                    self.answer(id, result);
                    return;
                }
                let inner = self.clone();
                glommio::spawn_local(async move {
                    let result = future.await;
                    inner.answer(id, result);
                    inner.wake_driver();
                })
                .detach();
            }
            Interaction::Stream => {
                self.slots.borrow_mut().insert(
                    id,
                    Slot {
                        finished: true,
                        ..Slot::default()
                    },
                );
                handler.request_stream(request, Sink::new(self.clone(), id));
            }
            Interaction::Channel => {
                let finished = !self
                    .conn
                    .borrow()
                    .stream_info(id)
                    .is_some_and(|i| i.inbound_open);
                self.slots.borrow_mut().insert(
                    id,
                    Slot {
                        finished,
                        ..Slot::default()
                    },
                );
                let inbound = Subscription::new(self.clone(), id, true);
                handler.request_channel(request, inbound, Sink::new(self.clone(), id));
            }
        }
    }

    /// Sends a request-response's answer, unless the requester cancelled.
    fn answer(&self, id: u32, result: Result<Payload, ClientError>) {
        let mut conn = self.conn.borrow_mut();
        if conn.is_stream_open(id) {
            let _ = match result {
                Ok(p) => conn.send_payload(id, p.metadata, p.data, true, true),
                Err(e) => {
                    let (code, message) = match e {
                        ClientError::Remote { code, message } => (code, message),
                        other => (ErrorCode::APPLICATION_ERROR, other.to_string()),
                    };
                    conn.send_error(id, code, Bytes::from(message))
                }
            };
        }
    }

    /// Drops slots of streams that have ended and that nobody will read.
    /// A pass visits every slot, so it runs once the map has doubled since
    /// the last one: amortised O(1) per stream, whatever is in flight.
    fn collect_slots(&self) {
        let mut slots = self.slots.borrow_mut();
        if slots.len() < self.collect_at.get() {
            return;
        }
        let conn = self.conn.borrow();
        slots.retain(|id, slot| {
            conn.is_stream_open(*id) || !slot.items.is_empty() || slot.reader.is_some()
        });
        self.collect_at
            .set((slots.len() * 2).max(COLLECT_SLOTS_MIN));
    }
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}

/// How long a closed connection waits for the broker to take its last frames.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an aborted connection waits for its ERROR to be taken.
const ABORT_TIMEOUT: Duration = Duration::from_millis(50);

/// The client's side of its connection, for the transport driver.
struct Driven(Rc<Inner>);

impl Driven {
    fn events(&self) {
        loop {
            let event = self.0.conn.borrow_mut().poll_event();
            let Some(event) = event else { break };
            self.0.on_event(event);
        }
    }
}

impl Endpoint for Driven {
    fn register(&mut self, waker: &Waker) {
        let mut d = self.0.driver.borrow_mut();
        if !d.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *d = Some(waker.clone());
        }
    }

    fn may_read(&self) -> bool {
        true
    }

    fn received(&mut self, now: Instant, frames: &mut Vec<Bytes>, _wire_bytes: u64) {
        let mut conn = self.0.conn.borrow_mut();
        for f in frames.drain(..) {
            conn.handle_frame(now, f);
        }
    }

    fn unreadable(&mut self, _now: Instant, error: DecodeError) {
        self.0.conn.borrow_mut().close(
            ErrorCode::CONNECTION_ERROR,
            format!("unreadable frame: {error}"),
        );
    }

    fn before_write(&mut self) {
        self.0.conn.borrow_mut().handle_timeout(Instant::now());
        self.events();
        self.0.collect_slots();
    }

    fn poll_transmit(&mut self) -> Option<OutFrame> {
        self.0.conn.borrow_mut().poll_transmit()
    }

    fn pending_bytes(&self) -> usize {
        self.0.conn.borrow().pending_bytes()
    }

    fn unsendable(&mut self, error: TransportError) {
        self.0.conn.borrow_mut().close(
            ErrorCode::CONNECTION_ERROR,
            format!("a frame could not be sent: {error}"),
        );
    }

    fn written(&mut self, written: Written) {
        let inner = &self.0;
        inner.unsent.set(written.queued);
        if inner.unsent() <= MAX_UNSENT / 2 {
            for w in inner.send_waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
        inner.setup_done.set(true);
    }

    fn is_closed(&self) -> bool {
        self.0.conn.borrow().is_closed()
    }

    fn close_timeout(&self) -> Duration {
        if self.0.aborted.get() {
            ABORT_TIMEOUT
        } else {
            CLOSE_TIMEOUT
        }
    }

    fn next_timeout(&self) -> Option<Instant> {
        self.0.conn.borrow().poll_timeout()
    }

    fn finish(&mut self, end: End) {
        let inner = &self.0;
        // What arrived last (an ERROR that closed the connection, say) is
        // the reason, ahead of the transport's end.
        self.events();
        if !inner.conn.borrow().is_closed() {
            inner.conn.borrow_mut().transport_lost();
            self.events();
        }
        inner
            .closed
            .borrow_mut()
            .get_or_insert_with(|| end.to_string());
        for w in inner.send_waiters.borrow_mut().drain(..) {
            w.wake();
        }
        inner.on_event(Event::Closed(rsocket_proto::ConnectionError::local(
            ErrorCode::CONNECTION_CLOSE,
            "closed",
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::Credentials;

    #[test]
    fn credentials_from_flags_and_what_is_wrong_with_them() {
        assert_eq!(Credentials::from_flags(None, None), Ok(Credentials::None));
        assert_eq!(
            Credentials::from_flags(Some("t.o.k"), None),
            Ok(Credentials::Bearer("t.o.k".into()))
        );
        assert_eq!(
            Credentials::from_flags(None, Some("billing:s3:cr3t")),
            Ok(Credentials::Simple("billing".into(), "s3:cr3t".into()))
        );
        let e = Credentials::from_flags(None, Some("billing")).unwrap_err();
        assert!(e.contains("NAME:SECRET"), "{e}");
        assert!(Credentials::from_flags(None, Some(":secret")).is_err());
        let e = Credentials::from_flags(Some("t"), Some("a:b")).unwrap_err();
        assert!(e.contains("not both"), "{e}");
    }
}
