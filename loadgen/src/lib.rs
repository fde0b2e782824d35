//! `loadgen`: load for rsbroker and the systems it is compared with.
//!
//! The requester sends requests of one interaction model either on an
//! open-loop schedule (a constant rate, latency measured from each
//! request's *due* time, so stalls show instead of hiding) or closed loop
//! (a fixed number in flight, to find the ceiling). The responder answers
//! every model. Both speak RSocket (through a broker, or directly with
//! `--listen`) or NATS, so every system is measured by the same program.
//!
//! # Layout
//!
//! - [`schedule`]: due times and waiting for them.
//! - [`stats`]: per-thread recorders, percentiles, the `.hgrm` format.
//! - `runner`: one pinned thread per CPU, the open and closed loops, and
//!   the merge of the threads' records, for either protocol.
//! - `event_loop`: the two event loops the runner starts (glommio, tokio).
//! - [`rsocket`]: the RSocket side: connect, send one request, answer one.
//! - [`nats`]: the same over NATS.
//! - this file: what a run asks for and what its summary says.

mod event_loop;
pub mod nats;
pub mod quinn_peer;
pub mod rsocket;
mod runner;
pub mod schedule;
pub mod stats;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::stats::{Percentiles, Recorder};

/// The interaction model a requester uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interaction {
    /// Request-response.
    Rr,
    /// Fire-and-forget.
    Fnf,
    /// Request-stream.
    Stream,
    /// Request-channel.
    Channel,
}

impl Interaction {
    /// The model's name as RSocket's spec writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rr => "request-response",
            Self::Fnf => "fire-and-forget",
            Self::Stream => "request-stream",
            Self::Channel => "request-channel",
        }
    }
}

/// Open or closed loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// A constant rate, whatever the answers do.
    Open {
        /// Requests per second over all connections.
        rps: f64,
    },
    /// `concurrency` requests in flight per connection, each sent when the
    /// previous one is answered.
    Closed {
        /// In flight per connection.
        concurrency: usize,
    },
}

/// What a requester run asks for.
#[derive(Clone, Debug)]
pub struct RequesterSpec {
    /// The model.
    pub interaction: Interaction,
    /// The route (RSocket) or subject (NATS).
    pub route: String,
    /// More routing tags after the route (RSocket), e.g. `broadcast=1`.
    pub tags: Vec<String>,
    /// Data bytes per request.
    pub payload_size: usize,
    /// Connections over all threads.
    pub connections: usize,
    /// Open or closed loop.
    pub mode: Mode,
    /// How long the measured part lasts.
    pub duration: Duration,
    /// Sent but not measured, before it.
    pub warmup: Duration,
    /// REQUEST_N window for streams and channels.
    pub request_n: u32,
    /// Items sent on each channel.
    pub items: u32,
    /// CPUs to run on, one thread each.
    pub cpus: Vec<usize>,
    /// Print a line every second.
    pub live: bool,
    /// Spin instead of sleeping: yield for the last stretch before each
    /// due time (open loop), and poll for a while before parking when
    /// there is nothing to do (every mode).
    pub spin: bool,
    /// Also answer the route in this process, on the requester's own
    /// threads: the responder's connections and the requester's share one
    /// event loop per CPU instead of two processes taking turns.
    pub serve: Option<ResponderSpec>,
}

/// A broker (or plain RSocket server) to connect to: its URL (tcp://,
/// tls://, ws://, wss://) and, for TLS, whom to trust.
#[derive(Clone, Debug)]
pub struct BrokerTarget {
    /// Where.
    pub url: rsbroker_transports::ListenAddr,
    /// The TLS client configuration of tls:// and wss://.
    pub tls: Option<std::sync::Arc<rsbroker_transports::rustls::ClientConfig>>,
    /// What its SETUPs prove an identity with.
    pub credentials: rsbroker_client::Credentials,
}

impl std::fmt::Display for BrokerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.url.fmt(f)
    }
}

/// Where a plain RSocket server (`responder --listen`) listens, and the
/// certificate of its `tls://`, `wss://` and `quic://` listeners.
#[derive(Clone, Debug)]
pub struct ListenServer {
    /// The address.
    pub url: rsbroker_transports::ListenAddr,
    /// The TLS configuration.
    pub tls: Option<std::sync::Arc<rsbroker_transports::rustls::ServerConfig>>,
}

/// What a responder run asks for.
#[derive(Clone, Debug)]
pub struct ResponderSpec {
    /// Register with this broker ...
    pub broker: Option<BrokerTarget>,
    /// ... or serve RSocket here.
    pub listen: Option<ListenServer>,
    /// The service it registers (`[group!]service[:version]`).
    pub service: String,
    /// The app name; instances are `<app>-<n>`.
    pub app: String,
    /// Instances (distinct uuids) to register.
    pub instances: usize,
    /// Connections per instance.
    pub connections: usize,
    /// CPU time spent per request.
    pub work: Duration,
    /// Items per stream.
    pub items: u32,
    /// NATS: every connection subscribes and receives every message
    /// (publish/subscribe) instead of sharing them in a queue group.
    pub fanout: bool,
    /// CPUs to run on.
    pub cpus: Vec<usize>,
}

impl ResponderSpec {
    /// The line printed once the responder serves.
    pub fn ready_line(&self) -> String {
        match (&self.broker, &self.listen) {
            (Some(b), _) => format!(
                "loadgen responder: serving {} as {} instance(s) x {} connection(s) through {b}",
                self.service, self.instances, self.connections
            ),
            (None, Some(l)) => format!("loadgen responder: serving RSocket on {}", l.url),
            (None, None) => "loadgen responder: nothing to serve".into(),
        }
    }
}

/// What a responder served.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ResponderCounts {
    /// Request-responses answered.
    pub request_response: u64,
    /// Fire-and-forgets received.
    pub fire_and_forget: u64,
    /// Streams served.
    pub streams: u64,
    /// Channels served.
    pub channels: u64,
    /// Stream and channel items sent.
    pub items: u64,
    /// How long it served.
    pub seconds: f64,
}

impl ResponderCounts {
    /// What was served, in words.
    pub fn line(&self) -> String {
        format!(
            "{} request-response, {} fire-and-forget, {} streams, {} channels, {} items in {:.1} s ({:.0} messages/s)",
            self.request_response,
            self.fire_and_forget,
            self.streams,
            self.channels,
            self.items,
            self.seconds,
            self.messages() as f64 / self.seconds.max(1e-9)
        )
    }

    /// Messages that reached the responder or left it: requests answered,
    /// fire-and-forgets received, stream items sent.
    pub fn messages(&self) -> u64 {
        self.request_response + self.fire_and_forget + self.items
    }

    /// Adds another thread's counts (the longer time stands).
    pub fn add(&mut self, other: &ResponderCounts) {
        self.request_response += other.request_response;
        self.fire_and_forget += other.fire_and_forget;
        self.streams += other.streams;
        self.channels += other.channels;
        self.items += other.items;
        self.seconds = self.seconds.max(other.seconds);
    }
}

/// The outcome of a requester run, before it is summarized.
#[derive(Debug)]
pub struct Run {
    /// Everything the threads recorded.
    pub record: Recorder,
    /// Length of the measured window.
    pub measured: Duration,
    /// When the measured window started.
    pub started: Instant,
    /// What the in-process responder served (`RequesterSpec::serve`).
    pub served: Option<ResponderCounts>,
}

/// The summary a requester prints and writes as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// What was driven: `tcp://...` or `nats://...`.
    pub target: String,
    /// `rr`, `fnf`, `stream` or `channel`.
    pub interaction: Interaction,
    /// `open` or `closed`.
    pub mode: &'static str,
    /// Connections.
    pub connections: usize,
    /// Threads (one per CPU).
    pub threads: usize,
    /// In flight per connection (closed loop).
    pub concurrency: Option<usize>,
    /// Data bytes per request.
    pub payload_size: usize,
    /// The REQUEST_N window (streams and channels).
    pub request_n: Option<u32>,
    /// The rate asked for (open loop).
    pub target_rps: Option<f64>,
    /// Requests completed per second in the measured window.
    pub achieved_rps: f64,
    /// Length of the measured window.
    pub duration_s: f64,
    /// Warm-up before it.
    pub warmup_s: f64,
    /// Requests sent in all.
    pub sent: u64,
    /// Requests completed in the window.
    pub ok: u64,
    /// Requests that failed or were never answered.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Latency: from the due time (open loop) or the send (closed loop).
    pub latency_us: Percentiles,
    /// How late loadgen sent against the schedule (open loop).
    pub lag_us: Percentiles,
    /// Stream and channel items received in the window.
    pub items: u64,
    /// Items per second.
    pub items_per_s: f64,
    /// Items received in all, warm-up included (for CPU per item).
    pub items_total: u64,
    /// Items: from the credit that allowed each to its arrival.
    pub item_latency_us: Percentiles,
    /// loadgen's own CPU time during the run, in seconds.
    pub cpu_s: f64,
    /// What the in-process responder served, when there was one.
    pub served: Option<ResponderCounts>,
    /// What makes the figures less true than they look (loadgen's own
    /// schedule lag being a large part of the latencies, ...).
    pub warnings: Vec<String>,
    /// Whether the run met its target and nothing failed.
    pub passed: bool,
    /// Why not.
    pub failures: Vec<String>,
}

impl Summary {
    /// Summarizes a run.
    pub fn new(spec: &RequesterSpec, target: String, run: &Run, cpu_s: f64) -> Self {
        let r = &run.record;
        let secs = run.measured.as_secs_f64().max(1e-9);
        let achieved = r.ok as f64 / secs;
        let (mode, target_rps, concurrency) = match spec.mode {
            Mode::Open { rps, .. } => ("open", Some(rps), None),
            Mode::Closed { concurrency } => ("closed", None, Some(concurrency)),
        };
        let mut failures = Vec::new();
        if let Some(t) = target_rps
            && achieved < 0.95 * t
        {
            failures.push(format!(
                "achieved {achieved:.0} requests/s, below 95% of the target {t:.0}/s"
            ));
        }
        if r.errors > 0 {
            failures.push(format!(
                "{} requests failed (first: {})",
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            ));
        }
        if r.ok == 0 && r.errors == 0 && r.items == 0 {
            failures.push("no request completed".into());
        }
        let streaming = matches!(spec.interaction, Interaction::Stream | Interaction::Channel);
        Self {
            target,
            interaction: spec.interaction,
            mode,
            connections: spec.connections,
            threads: spec.cpus.len().clamp(1, spec.connections.max(1)),
            concurrency,
            payload_size: spec.payload_size,
            request_n: streaming.then_some(spec.request_n),
            target_rps,
            achieved_rps: achieved,
            duration_s: secs,
            warmup_s: spec.warmup.as_secs_f64(),
            sent: r.sent,
            ok: r.ok,
            errors: r.errors,
            first_error: r.first_error.clone(),
            latency_us: Percentiles::of(&r.latency),
            lag_us: Percentiles::of(&r.lag),
            items: r.items,
            items_per_s: r.items as f64 / secs,
            items_total: r.items_total,
            item_latency_us: Percentiles::of(&r.item_latency),
            cpu_s,
            served: run.served.clone(),
            warnings: target_rps
                .and_then(|_| lag_warning(&Percentiles::of(&r.latency), &Percentiles::of(&r.lag)))
                .into_iter()
                .collect(),
            passed: failures.is_empty(),
            failures,
        }
    }

    /// The readable summary.
    pub fn text(&self) -> String {
        let mut out = format!(
            "loadgen requester: {} via {}, {} connection(s) on {} thread(s), {} B payloads, {} loop{}\n",
            self.interaction.name(),
            self.target,
            self.connections,
            self.threads,
            self.payload_size,
            self.mode,
            self.concurrency
                .map(|c| format!(", {c} in flight per connection"))
                .unwrap_or_default()
        );
        match self.target_rps {
            Some(t) => {
                out += &format!(
                    "  rate: target {t:.0}/s, achieved {:.0}/s over {:.1} s ({} ok, {} errors)\n",
                    self.achieved_rps, self.duration_s, self.ok, self.errors
                )
            }
            None => {
                out += &format!(
                    "  rate: {:.0}/s over {:.1} s ({} ok, {} errors)\n",
                    self.achieved_rps, self.duration_s, self.ok, self.errors
                )
            }
        }
        let from = if self.target_rps.is_some() {
            "the scheduled send"
        } else {
            "the send"
        };
        out += &format!("  latency from {from}: {}\n", self.latency_us.line());
        if self.items > 0 {
            out += &format!(
                "  items: {:.0}/s ({} in the window)\n",
                self.items_per_s, self.items
            );
            if self.item_latency_us.count > 0 {
                out += &format!(
                    "  item latency from credit: {}\n",
                    self.item_latency_us.line()
                );
            }
        }
        if self.target_rps.is_some() {
            out += &format!(
                "  schedule lag: p50 {} p99 {} max {} (µs)\n",
                stats::short(self.lag_us.p50),
                stats::short(self.lag_us.p99),
                stats::short(self.lag_us.max)
            );
        }
        if let Some(c) = &self.served {
            out += &format!("  served in this process: {}\n", c.line());
        }
        out += &format!("  loadgen CPU: {:.2} s\n", self.cpu_s);
        for w in &self.warnings {
            out += &format!("WARNING: {w}\n");
        }
        for f in &self.failures {
            out += &format!("FAIL: {f}\n");
        }
        out
    }
}

/// Lag at or above this share of a latency percentile makes it loadgen's
/// figure more than the system's.
const LAG_SHARE: f64 = 0.2;
/// Lag below this (µs) is noise on any machine.
const LAG_FLOOR_US: f64 = 50.0;

/// A warning when loadgen's own schedule lag is a significant part of the
/// latencies it reports: latency is measured from the scheduled send, so
/// a loadgen thread waiting for a CPU adds its wait to every figure.
pub fn lag_warning(latency: &Percentiles, lag: &Percentiles) -> Option<String> {
    let (share, which, lag_us, lat_us) =
        [("p50", lag.p50, latency.p50), ("p99", lag.p99, latency.p99)]
            .into_iter()
            .filter(|(_, l, t)| *l >= LAG_FLOOR_US && *t > 0.0)
            .map(|(w, l, t)| (l / t, w, l, t))
            .max_by(|a, b| a.0.total_cmp(&b.0))?;
    (share >= LAG_SHARE).then(|| {
        format!(
            "loadgen itself sent late: its schedule lag {which} is {lag_us:.0} µs, {:.0}% of the \
             {which} latency it reports ({lat_us:.0} µs), so these latencies measure loadgen waiting \
             for a CPU as much as the system. Give loadgen CPUs of its own (--cpus) and the broker \
             others (server.cores), or lower --rps",
            share * 100.0
        )
    })
}

/// CPU time (user + system) this process has used, from /proc/self/stat.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at ") ".
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clock_ticks() as f64
}

fn clock_ticks() -> u64 {
    // The kernel's USER_HZ; 100 on every Linux architecture in use.
    100
}

/// The CPUs this process may run on.
pub fn available_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect::<Vec<_>>())
        .filter(|ids| !ids.is_empty())
        .unwrap_or_else(|| {
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(p50: f64, p99: f64) -> Percentiles {
        Percentiles {
            count: 1000,
            p50,
            p99,
            ..Percentiles::default()
        }
    }

    #[test]
    fn lag_that_is_a_large_part_of_the_latency_is_warned_about() {
        // README's example on a crowded 2-core host: p50 0.7 ms with lag p50 0.6 ms.
        let w = lag_warning(&p(700.0, 2000.0), &p(600.0, 900.0)).expect("a warning");
        assert!(w.contains("p50") && w.contains("86%"), "{w}");
        // Lag p99 at a third of latency p99.
        assert!(lag_warning(&p(100.0, 3000.0), &p(5.0, 1000.0)).is_some());
        // A few microseconds of lag against a millisecond: fine.
        assert_eq!(lag_warning(&p(1000.0, 3000.0), &p(3.0, 40.0)), None);
        // Small shares of large numbers: fine.
        assert_eq!(lag_warning(&p(5000.0, 20_000.0), &p(200.0, 1000.0)), None);
    }
}
