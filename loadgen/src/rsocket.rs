//! Load over RSocket with rsbroker-client, on glommio: the requester (all
//! four interaction models) and the responder (registered with a broker,
//! or a plain RSocket server with `--listen`). The runner
//! ([`crate::runner`]) owns the threads and the request loops; this file
//! says how to connect, send one request and answer one.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::Task;
use rsbroker_client::metadata::route;
use rsbroker_client::{
    AppConfig, Client, ClientConfig, ClientError, LocalBoxFuture, Payload, Responder, Sink,
    Subscription,
};
use rsbroker_transports::listen::BindOptions;
use rsbroker_transports::{Handshake, Listener};

use crate::event_loop::Glommio;
use crate::runner::{self, Counts, Load, Part, RequesterSide, ResponderSide, Share, Tally};
use crate::stats::Recorder;
use crate::{
    BrokerTarget, Interaction, ListenServer, RequesterSpec, ResponderCounts, ResponderSpec, Run,
};

/// A stream window this large is unbounded (2^31-1 saturates RSocket credit).
pub const UNBOUNDED: u32 = i32::MAX as u32;

/// How long the requester waits for an in-process responder to be
/// reachable through the broker before the run starts.
const SERVE_READY: Duration = Duration::from_secs(5);

/// Runs the requester side against `addr`; returns the merged record and
/// when the measurement window started.
pub fn run_requester(spec: &RequesterSpec, target: BrokerTarget) -> Result<Run, String> {
    runner::run_requester(&Requester { target }, spec)
}

/// Requests to one broker or RSocket server.
#[derive(Clone)]
struct Requester {
    target: BrokerTarget,
}

/// What one requester thread opened.
struct Connections {
    /// Requests go out on these.
    clients: Vec<Client>,
    /// The in-process responder's, registered with the broker.
    responders: Vec<Client>,
    request: Rc<Request>,
}

impl RequesterSide for Requester {
    type Loop = Glommio;
    type Thread = Connections;

    async fn connect(&self, part: Part<'_, RequesterSpec>) -> Result<Connections, String> {
        let spec = part.spec;
        let responders = match &spec.serve {
            Some(serve) => {
                let echo = Echo::new(serve, part.counts.clone());
                connect_responders(serve, &self.target, part.share, &echo).await?
            }
            None => Vec::new(),
        };
        let clients = connect_all(&self.target, part.connections()).await?;
        if spec.serve.is_some()
            && let Some(first) = clients.first()
        {
            served_ready(first, &spec.route).await?;
        }
        Ok(Connections {
            clients,
            responders,
            request: Rc::new(Request::new(spec)),
        })
    }

    async fn send(&self, c: &Connections, load: Load<'_, Glommio>) -> Recorder {
        let request = c.request.clone();
        load.drive(&c.clients, move |client: Client, tally: Tally| {
            let request = request.clone();
            async move { request.run(&client, &tally).await }
        })
        .await
    }

    async fn close(&self, c: Connections) {
        let all: Vec<&Client> = c.clients.iter().chain(&c.responders).collect();
        close_all(&all).await;
    }
}

/// Waits until a request on `route` is answered: the in-process
/// responder's registration has reached the broker and every shard.
async fn served_ready(client: &Client, route_name: &str) -> Result<(), String> {
    let deadline = Instant::now() + SERVE_READY;
    let request = Payload {
        metadata: Some(route(&[route_name])),
        data: Bytes::from_static(b"ready?"),
    };
    loop {
        match client.request_response(request.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "the responder in this process was not reachable on route {route_name} within {SERVE_READY:?}: {e}"
                ));
            }
            Err(_) => glommio::timer::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn connect_all(target: &BrokerTarget, n: usize) -> Result<Vec<Client>, String> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let config = ClientConfig {
            credentials: target.credentials.clone(),
            ..ClientConfig::default()
        };
        let c = Client::builder(config)
            .connect_url(&target.url, target.tls.clone())
            .await
            .map_err(|e| format!("cannot connect to {target}: {e}"))?;
        clients.push(c);
    }
    Ok(clients)
}

/// One request of the run's interaction model.
struct Request {
    interaction: Interaction,
    metadata: Bytes,
    data: Bytes,
    request_n: u32,
    items: u32,
}

impl Request {
    fn new(spec: &RequesterSpec) -> Self {
        Self {
            interaction: spec.interaction,
            metadata: route(
                &std::iter::once(spec.route.as_str())
                    .chain(spec.tags.iter().map(String::as_str))
                    .collect::<Vec<_>>(),
            ),
            data: Bytes::from(vec![b'x'; spec.payload_size]),
            request_n: spec.request_n.max(1),
            items: spec.items.max(1),
        }
    }

    fn payload(&self) -> Payload {
        Payload {
            metadata: Some(self.metadata.clone()),
            data: self.data.clone(),
        }
    }

    /// Sends it on `client` and waits for the answer (a stream's or
    /// channel's items are counted in `tally` as they come).
    async fn run(&self, client: &Client, tally: &Tally) -> Result<(), String> {
        match self.interaction {
            Interaction::Rr => client
                .request_response(self.payload())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Interaction::Fnf => {
                client.writable().await;
                client
                    .fire_and_forget(self.payload())
                    .map_err(|e| e.to_string())
            }
            Interaction::Stream => {
                let sub = client
                    .request_stream(self.payload(), self.request_n)
                    .map_err(|e| e.to_string())?;
                consume(sub, self.request_n, tally).await
            }
            Interaction::Channel => {
                let (sink, sub) = client
                    .request_channel(self.payload(), self.request_n)
                    .map_err(|e| e.to_string())?;
                let items = self.items;
                let data = self.data.clone();
                let sending = glommio::spawn_local(async move {
                    for _ in 1..items {
                        if sink.send(Payload::data(data.clone())).await.is_err() {
                            return;
                        }
                    }
                    let _ = sink.complete();
                });
                let received = consume(sub, self.request_n, tally).await;
                sending.await;
                received
            }
        }
    }
}

/// Reads a stream to its end under a window of `n` items, asking for more
/// as it consumes; per-item latency is counted from the credit that allowed
/// the item (not for unbounded windows).
async fn consume(mut sub: Subscription, n: u32, tally: &Tally) -> Result<(), String> {
    let window = tally.window;
    let bounded = n < UNBOUNDED;
    let mut credits: VecDeque<(Instant, u32)> = VecDeque::new();
    if bounded {
        credits.push_back((Instant::now(), n));
    }
    let batch = (n / 2).max(1);
    let mut since_request = 0u32;
    // A stream still running when the run ends is cancelled (dropping the
    // subscription sends CANCEL). One timer for the whole stream: arming one
    // per item would cost more than the item.
    let mut deadline = std::pin::pin!(glommio::timer::sleep(
        window.end.saturating_duration_since(Instant::now())
    ));
    loop {
        let next = futures_lite::future::or(async { Some(sub.next().await) }, async {
            (&mut deadline).await;
            None
        })
        .await;
        let Some(Some(item)) = next else {
            break;
        };
        item.map_err(|e| e.to_string())?;
        let now = Instant::now();
        {
            let mut r = tally.rec.borrow_mut();
            r.items_total += 1;
            if window.contains(now) {
                r.items += 1;
            }
            if bounded && let Some(front) = credits.front_mut() {
                if window.contains(now) {
                    r.record_item(now.saturating_duration_since(front.0));
                }
                front.1 -= 1;
                if front.1 == 0 {
                    credits.pop_front();
                }
            }
        }
        if bounded {
            since_request += 1;
            if since_request == batch {
                since_request = 0;
                credits.push_back((Instant::now(), batch));
                // The stream may have ended meanwhile; the next `next` says so.
                let _ = sub.request(batch);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- responder

/// Answers every model: echoes requests, streams `items` copies.
#[derive(Clone)]
struct Echo {
    counts: Rc<Counts>,
    work: Duration,
    items: u32,
}

impl Echo {
    fn new(spec: &ResponderSpec, counts: Rc<Counts>) -> Self {
        Self {
            counts,
            work: spec.work,
            items: spec.items,
        }
    }
}

impl Responder for Echo {
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        self.counts.request_response();
        runner::work(self.work);
        Box::pin(std::future::ready(Ok(Payload::data(request.data))))
    }

    fn fire_and_forget(&self, _request: Payload) {
        self.counts.fire_and_forget();
        runner::work(self.work);
    }

    fn request_stream(&self, request: Payload, sink: Sink) {
        self.counts.stream();
        runner::work(self.work);
        let (items, counts) = (self.items, self.counts.clone());
        glommio::spawn_local(async move {
            let item = Payload::data(request.data);
            for _ in 0..items {
                if sink.send(item.clone()).await.is_err() {
                    return;
                }
                counts.item();
            }
            let _ = sink.complete();
        })
        .detach();
    }

    fn request_channel(&self, request: Payload, mut inbound: Subscription, sink: Sink) {
        self.counts.channel();
        runner::work(self.work);
        let counts = self.counts.clone();
        glommio::spawn_local(async move {
            let _ = inbound.request(64);
            if sink.send(Payload::data(request.data)).await.is_err() {
                return;
            }
            counts.item();
            let mut since = 0;
            while let Some(Ok(item)) = inbound.next().await {
                since += 1;
                if since == 32 {
                    since = 0;
                    let _ = inbound.request(32);
                }
                if sink.send(Payload::data(item.data)).await.is_err() {
                    return;
                }
                counts.item();
            }
            let _ = sink.complete();
        })
        .detach();
    }
}

/// Runs responders until `stop` is set (or the spec's duration passes).
pub fn run_responder(
    spec: &ResponderSpec,
    stop: Arc<AtomicBool>,
) -> Result<ResponderCounts, String> {
    runner::run_responder(&EchoServer, spec, stop)
}

/// Serves [`Echo`] through a broker (`spec.broker`) or as a plain RSocket
/// server (`spec.listen`).
#[derive(Clone)]
struct EchoServer;

/// What one responder thread serves with.
struct Serving {
    /// Registered with the broker.
    clients: Vec<Client>,
    /// Accepting connections (`--listen`).
    server: Option<Task<()>>,
}

impl ResponderSide for EchoServer {
    type Loop = Glommio;
    type Serving = Serving;

    async fn serve(&self, part: Part<'_, ResponderSpec>) -> Result<Serving, String> {
        let spec = part.spec;
        let echo = Echo::new(spec, part.counts.clone());
        let (clients, server) = match (&spec.broker, &spec.listen) {
            (Some(addr), _) => (
                connect_responders(spec, addr, part.share, &echo).await?,
                None,
            ),
            (None, Some(addr)) => (Vec::new(), Some(listen(addr, echo)?)),
            (None, None) => return Err("responder: give --broker or --listen".into()),
        };
        Ok(Serving { clients, server })
    }

    fn ended(serving: &Serving) -> bool {
        serving.clients.iter().any(Client::is_closed)
    }

    async fn stop(&self, serving: Serving) {
        if Self::ended(&serving) {
            eprintln!("loadgen responder: the broker closed a connection; stopping");
        }
        drop(serving.server);
        let all: Vec<&Client> = serving.clients.iter().collect();
        close_all(&all).await;
    }

    fn ready_line(&self, spec: &ResponderSpec) -> String {
        spec.ready_line()
    }
}

/// Serves every connection to `server` with `echo`, on a task of the
/// current executor (dropping the task stops it).
fn listen(server: &ListenServer, echo: Echo) -> Result<Task<()>, String> {
    let options = BindOptions {
        tls: server.tls.clone(),
        ..BindOptions::default()
    };
    let listener = Listener::bind_with(&server.url, &options)
        .map_err(|e| format!("cannot listen on {}: {e}", server.url))?;
    let hs = Handshake {
        max_frame: rsocket_proto::frame::MAX_U24,
        tls: server.tls.clone(),
        timeout: Duration::from_secs(10),
    };
    Ok(glommio::spawn_local(async move {
        let served: Rc<RefCell<Vec<Client>>> = Rc::default();
        while let Ok(incoming) = listener.accept().await {
            let (hs, echo, served) = (hs.clone(), echo.clone(), served.clone());
            glommio::spawn_local(async move {
                let Ok(io) = incoming.establish(&hs).await else {
                    return;
                };
                let client = Client::builder(ClientConfig::default())
                    .default_responder(echo)
                    .serve(io);
                let mut served = served.borrow_mut();
                served.retain(|c| !c.is_closed());
                served.push(client);
            })
            .detach();
        }
    }))
}

/// Closes every client and waits, briefly, until they are closed: over
/// QUIC nothing tells the peer once the process has exited (no kernel
/// closes the connection), so the close must go out first. A client still
/// sending a stream's items is aborted after half a second.
async fn close_all(clients: &[&Client]) {
    for c in clients {
        c.close();
    }
    let all_closed = || clients.iter().all(|c| c.is_closed());
    let wait = |within: Duration| async move {
        let until = Instant::now() + within;
        while !all_closed() && Instant::now() < until {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    };
    wait(Duration::from_millis(500)).await;
    for c in clients.iter().filter(|c| !c.is_closed()) {
        c.abort();
    }
    wait(Duration::from_millis(500)).await;
    // The last closes go out before the executor ends.
    glommio::timer::sleep(Duration::from_millis(20)).await;
}

/// Connects this thread's `share` of the responder connections `spec`
/// asks for: every instance's connections, registered with the broker at
/// `addr` and answered by `echo`.
async fn connect_responders(
    spec: &ResponderSpec,
    target: &BrokerTarget,
    share: Share,
    echo: &Echo,
) -> Result<Vec<Client>, String> {
    let (group, service, version) = split_service(&spec.service);
    let mut clients = Vec::new();
    for k in share.of(spec.instances * spec.connections) {
        let instance = k / spec.connections.max(1);
        let config = ClientConfig {
            app: Some(AppConfig {
                name: spec.app.clone(),
                uuid: format!("{}-{instance}", spec.app),
                power_rating: 1,
            }),
            services: vec![(group.clone(), service.clone(), version.clone())],
            credentials: target.credentials.clone(),
            ..ClientConfig::default()
        };
        let client = Client::builder(config)
            .responder(&service, echo.clone())
            .connect_url(&target.url, target.tls.clone())
            .await
            .map_err(|e| format!("cannot connect to {target}: {e}"))?;
        clients.push(client);
    }
    Ok(clients)
}

fn split_service(s: &str) -> (String, String, String) {
    let (group, rest) = s.split_once('!').unwrap_or(("", s));
    let (service, version) = rest.split_once(':').unwrap_or((rest, ""));
    (group.into(), service.into(), version.into())
}
