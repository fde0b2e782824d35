//! The same load over NATS (async-nats on a current-thread tokio runtime
//! per CPU), so that nats-server is measured by the same program:
//! request-response is NATS request/reply, fire-and-forget is publish, and
//! the responder answers requests (a queue group, so each request is
//! answered once) or, with `--fanout`, has every connection subscribe so
//! each receives every message (publish/subscribe 1 -> N). The runner
//! ([`crate::runner`]) owns the threads and the request loops.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use futures_lite::StreamExt;

use crate::event_loop::Tokio;
use crate::runner::{self, Counts, Load, Part, RequesterSide, ResponderSide, Share};
use crate::stats::Recorder;
use crate::{Interaction, RequesterSpec, ResponderCounts, ResponderSpec, Run};

/// Runs the requester side against nats-server at `url`.
pub fn run_requester(spec: &RequesterSpec, url: &str) -> Result<Run, String> {
    if matches!(spec.interaction, Interaction::Stream | Interaction::Channel) {
        return Err(format!(
            "NATS has no {}: use --interaction rr (request/reply) or fnf (publish)",
            spec.interaction.name()
        ));
    }
    runner::run_requester(&Nats { url: url.into() }, spec)
}

/// Serves requests over NATS until `stop` is set.
pub fn run_responder(
    spec: &ResponderSpec,
    url: &str,
    stop: Arc<AtomicBool>,
) -> Result<ResponderCounts, String> {
    runner::run_responder(&Nats { url: url.into() }, spec, stop)
}

/// One nats-server, for either side.
#[derive(Clone)]
struct Nats {
    url: String,
}

async fn connect(url: &str) -> Result<async_nats::Client, String> {
    async_nats::ConnectOptions::new()
        .no_echo()
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))
}

/// What one requester thread opened.
struct Connections {
    /// Requests go out on these.
    clients: Vec<async_nats::Client>,
    /// The in-process responder's tasks.
    serving: Vec<tokio::task::JoinHandle<()>>,
    request: Rc<Request>,
}

/// One request: a request/reply or a publish.
struct Request {
    subject: String,
    payload: Bytes,
    reply: bool,
}

impl Request {
    /// Sends it on `client`; a request waits for its reply.
    async fn send(&self, client: &async_nats::Client) -> Result<(), String> {
        let (subject, payload) = (self.subject.clone(), self.payload.clone());
        if self.reply {
            client
                .request(subject, payload)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            client
                .publish(subject, payload)
                .await
                .map_err(|e| e.to_string())
        }
    }
}

impl RequesterSide for Nats {
    type Loop = Tokio;
    type Thread = Connections;

    async fn connect(&self, part: Part<'_, RequesterSpec>) -> Result<Connections, String> {
        let spec = part.spec;
        let subs = match &spec.serve {
            Some(serve) => subscribe(serve, &self.url, part.share).await?,
            None => Vec::new(),
        };
        let mut clients = Vec::new();
        for _ in 0..part.connections() {
            clients.push(connect(&self.url).await?);
        }
        // Served only once everything connected: a failed connect drops the
        // subscriptions here, while the runtime runs.
        let serving = match &spec.serve {
            Some(serve) => serve_all(subs, serve, part.counts),
            None => Vec::new(),
        };
        let request = Rc::new(Request {
            subject: spec.route.clone(),
            payload: Bytes::from(vec![b'x'; spec.payload_size]),
            reply: spec.interaction == Interaction::Rr,
        });
        Ok(Connections {
            clients,
            serving,
            request,
        })
    }

    async fn send(&self, c: &Connections, load: Load<'_, Tokio>) -> Recorder {
        let request = c.request.clone();
        load.drive(&c.clients, move |client: async_nats::Client, _| {
            let request = request.clone();
            async move { request.send(&client).await }
        })
        .await
    }

    async fn close(&self, c: Connections) {
        for client in &c.clients {
            let _ = client.flush().await;
        }
        stop_serving(c.serving).await;
    }
}

impl ResponderSide for Nats {
    type Loop = Tokio;
    type Serving = Vec<tokio::task::JoinHandle<()>>;

    async fn serve(&self, part: Part<'_, ResponderSpec>) -> Result<Self::Serving, String> {
        let subs = subscribe(part.spec, &self.url, part.share).await?;
        Ok(serve_all(subs, part.spec, part.counts))
    }

    async fn stop(&self, serving: Self::Serving) {
        stop_serving(serving).await;
    }

    fn ready_line(&self, spec: &ResponderSpec) -> String {
        format!(
            "loadgen responder: serving subject {} on {} with {} connection(s){}",
            spec.service,
            self.url,
            spec.instances * spec.connections,
            if spec.fanout {
                ", each receiving every message"
            } else {
                " in a queue group"
            }
        )
    }
}

/// This thread's `share` of the responder connections `spec` asks for,
/// each subscribed to the service's subject (in a queue group, or each on
/// its own with `fanout`); the subscriptions have reached the server when
/// this returns.
async fn subscribe(
    spec: &ResponderSpec,
    url: &str,
    share: Share,
) -> Result<Vec<(async_nats::Client, async_nats::Subscriber)>, String> {
    let mut subs = Vec::new();
    for _ in share.of(spec.instances * spec.connections) {
        let client = connect(url).await?;
        let sub = if spec.fanout {
            client.subscribe(spec.service.clone()).await
        } else {
            client
                .queue_subscribe(spec.service.clone(), "loadgen".into())
                .await
        };
        let sub = sub.map_err(|e| format!("cannot subscribe: {e}"))?;
        subs.push((client, sub));
    }
    // Subscriptions reach the server before anyone is told to send. A
    // flush only says they were written. A request to a subject nobody
    // serves is answered by the server itself ("no responders"), and only
    // after it has taken the subscriptions sent before it on the same
    // connection (it handles a connection's commands in order).
    for (c, _) in &subs {
        match c.request(c.new_inbox(), Bytes::new()).await {
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
            Ok(_) => {}
            Err(e) => return Err(format!("{url} did not confirm the subscriptions: {e}")),
        }
    }
    Ok(subs)
}

/// Answers (or just counts) every message of `subs`, each on a task of the
/// current `LocalSet`, spending `spec.work` of CPU on each.
fn serve_all(
    subs: Vec<(async_nats::Client, async_nats::Subscriber)>,
    spec: &ResponderSpec,
    counts: &Rc<Counts>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (work, fanout) = (spec.work, spec.fanout);
    subs.into_iter()
        .map(|(client, mut sub)| {
            let counts = counts.clone();
            tokio::task::spawn_local(async move {
                while let Some(msg) = sub.next().await {
                    // Requests carry a reply subject, published messages do
                    // not; one count serves both, named by the mode.
                    if fanout {
                        counts.fire_and_forget();
                    } else {
                        counts.request_response();
                    }
                    runner::work(work);
                    if let Some(reply) = msg.reply {
                        let _ = client.publish(reply, msg.payload).await;
                    }
                }
            })
        })
        .collect()
}

/// Ends the serving tasks; subscriptions must be dropped while the
/// runtime runs.
async fn stop_serving(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
}
