//! `loadgen requester` and `loadgen responder`: see the crate docs and
//! `loadgen --help`.

// The summary and JSON go to stdout.
#![allow(clippy::print_stdout)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loadgen::{BrokerTarget, Interaction, Mode, RequesterSpec, ResponderSpec, Summary, stats};
use rsbroker_transports::ListenAddr;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load for rsbroker, plain RSocket servers and nats-server, with latency
/// measured from each request's scheduled send time.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sends requests and reports rate and latency percentiles.
    Requester(RequesterArgs),
    /// Registers a service and answers every interaction model.
    Responder(ResponderArgs),
    /// A blocking TCP ping-pong: the round trip any broker is compared with.
    Pingpong(PingpongArgs),
    /// An RSocket responder on quinn's own runtime (tokio): the QUIC peer
    /// our QUIC path is measured against.
    QuinnResponder(QuinnArgs),
}

#[derive(Args, Debug)]
struct QuinnArgs {
    /// Listen here, as quic://host:port
    #[arg(long, value_name = "URL")]
    listen: ListenAddr,
    /// The certificate (PEM)
    #[arg(long, value_name = "FILE")]
    certificate: PathBuf,
    /// Its private key (PEM)
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Items per request-stream
    #[arg(long, default_value_t = 1000)]
    items: u32,
    /// Stop after this long [default: at SIGINT or SIGTERM]
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

fn quinn_responder(args: QuinnArgs) -> Result<bool, String> {
    if args.listen.scheme != rsbroker_transports::Scheme::Quic {
        return Err(format!(
            "{}: the quinn responder listens on quic:// only",
            args.listen
        ));
    }
    let tls = rsbroker_transports::tls::ServerTls {
        certificate: args.certificate.clone(),
        key: args.key.clone(),
        ..Default::default()
    }
    .build()
    .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
    }
    if let Some(d) = args.duration {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            stop.store(true, Ordering::Release);
        });
    }
    loadgen::quinn_peer::run(args.listen.addr, tls, args.items, stop)?;
    Ok(true)
}

#[derive(Args, Debug)]
struct PingpongArgs {
    /// Echo on this address (tcp://host:port) until killed
    #[arg(long, value_name = "URL", conflicts_with = "connect")]
    listen: Option<ListenAddr>,
    /// Send to an echo server here (tcp://host:port) and time each round trip
    #[arg(long, value_name = "URL", required_unless_present = "listen")]
    connect: Option<ListenAddr>,
    /// Round trips
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Bytes each way
    #[arg(long, value_name = "B", default_value_t = 64)]
    payload_size: usize,
    /// Write the percentiles as JSON here
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false, id = "requester_target")]
struct RequesterTarget {
    /// A broker, or any RSocket server (`loadgen responder --listen`):
    /// tcp://host:port, tls://host:port, ws://host:port/path, wss://host:port/path
    #[arg(long, visible_alias = "target", value_name = "URL")]
    broker: Option<ListenAddr>,
    /// A NATS server, as nats://host:port
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
}

#[derive(Args, Debug)]
struct RequesterArgs {
    #[command(flatten)]
    target: RequesterTarget,
    #[command(flatten)]
    tls: TlsArgs,
    /// Route (RSocket routing tag) or subject (NATS)
    #[arg(long, default_value = "echo")]
    route: String,
    /// Interaction model
    #[arg(long, value_enum, default_value = "rr")]
    interaction: Interaction,
    /// Open loop: requests per second over all connections
    #[arg(
        long,
        value_name = "N",
        required_unless_present = "max",
        conflicts_with = "max"
    )]
    rps: Option<f64>,
    /// Closed loop instead: --concurrency requests in flight per connection, to find the ceiling
    #[arg(long)]
    max: bool,
    /// In flight per connection with --max
    #[arg(long, value_name = "K", default_value_t = 1, requires = "max")]
    concurrency: usize,
    /// Measured duration, e.g. 30s
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Sent but not measured, before the measured part; an open loop ramps
    /// up to its rate over the first half of it
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Connections, spread over the threads
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Data bytes per request
    #[arg(long, value_name = "B", default_value_t = 64)]
    payload_size: usize,
    /// REQUEST_N window for streams and channels (2147483647: unbounded)
    #[arg(long, value_name = "W", default_value_t = loadgen::rsocket::UNBOUNDED)]
    request_n: u32,
    /// Items the requester sends on each channel
    #[arg(long, value_name = "K", default_value_t = 16)]
    items: u32,
    /// Extra routing tags, e.g. broadcast=1 or e=<instance>
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Spin instead of sleeping: yield for the last 200 µs before each due
    /// time, and poll for 100 µs before parking when idle. A smaller
    /// schedule lag and fewer wake-ups, for a CPU loadgen has to itself
    #[arg(long)]
    spin: bool,
    /// Also answer the route in this process, on the same threads, with the
    /// responder options given here (e.g. --serve='--items 1000 --instances 16';
    /// --serve alone for the defaults). One event loop per CPU then serves
    /// both sides, instead of two processes taking turns on it
    #[arg(long, value_name = "RESPONDER OPTIONS", num_args = 0..=1, default_missing_value = "")]
    serve: Option<String>,
    /// CPUs to run on, one pinned thread each [default: those this process may use]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// Write the summary as JSON here
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the latency histogram in HdrHistogram's percentile distribution format (µs)
    #[arg(long, value_name = "FILE")]
    hgrm: Option<PathBuf>,
    /// No line every second
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false, id = "responder_target")]
struct ResponderTarget {
    /// Register with this broker: tcp://, tls://, ws:// or wss:// (see --broker of requester)
    #[arg(long, value_name = "URL")]
    broker: Option<ListenAddr>,
    /// Be a plain RSocket server here instead: tcp://, tls://, ws://,
    /// wss:// or quic://host:port (the last three need --certificate and --key)
    #[arg(long, value_name = "URL")]
    listen: Option<ListenAddr>,
    /// Subscribe on this NATS server, as nats://host:port
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
}

#[derive(Args, Debug)]
struct ResponderArgs {
    #[command(flatten)]
    target: ResponderTarget,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    options: ResponderOptions,
    /// With --listen tls://, wss:// or quic://: the certificate (PEM)
    #[arg(long, value_name = "FILE", requires = "key")]
    certificate: Option<PathBuf>,
    /// With --listen tls://, wss:// or quic://: its private key (PEM)
    #[arg(long, value_name = "FILE", requires = "certificate")]
    key: Option<PathBuf>,
    /// Stop after this long [default: at SIGINT or SIGTERM]
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// CPUs to run on, one pinned thread each
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// Write what was served as JSON here
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// What a responder serves; also what `requester --serve` takes.
#[derive(Args, Debug)]
struct ResponderOptions {
    /// Service to register (`[group!]service[:version]`), or NATS subject
    /// [default: echo; with requester --serve: the requester's route]
    #[arg(long)]
    service: Option<String>,
    /// App name; instances are <app>-0, <app>-1, ...
    #[arg(long, default_value = "loadgen")]
    app: String,
    /// Instances (distinct app uuids), e.g. 16 for a broadcast fan-out
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Connections per instance
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// CPU time spent on each request, in microseconds
    #[arg(long, value_name = "D", default_value_t = 0)]
    work_us: u64,
    /// Items sent on each request-stream
    #[arg(long, value_name = "K", default_value_t = 100)]
    items: u32,
    /// NATS: every connection subscribes and receives every message
    /// (publish/subscribe fan-out) instead of sharing them in a queue group
    #[arg(long)]
    fanout: bool,
}

/// Whom a tls:// or wss:// connection trusts.
#[derive(Args, Debug)]
struct TlsArgs {
    /// For tls:// and wss://: trust the CA certificates in this PEM file
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// For tls:// and wss://: accept any certificate (self-signed test
    /// brokers only: anyone on the path can read and change the traffic)
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// Prove an identity with this bearer token (a JWT) at SETUP
    #[arg(long, value_name = "JWT", conflicts_with = "user")]
    token: Option<String>,
    /// Prove an identity with simple authentication at SETUP
    #[arg(long, value_name = "NAME:SECRET")]
    user: Option<String>,
}

impl TlsArgs {
    fn target(&self, url: &ListenAddr) -> Result<BrokerTarget, String> {
        Ok(BrokerTarget {
            url: url.clone(),
            tls: rsbroker_client::trust(url, self.ca.as_deref(), self.insecure)?,
            credentials: rsbroker_client::Credentials::from_flags(
                self.token.as_deref(),
                self.user.as_deref(),
            )?,
        })
    }
}

fn tcp(addr: &ListenAddr) -> Result<SocketAddr, String> {
    if addr.scheme != rsbroker_transports::Scheme::Tcp {
        return Err(format!(
            "{addr}: a plain RSocket server listens on tcp:// only"
        ));
    }
    Ok(addr.addr)
}

fn listen_server(url: &ListenAddr, args: &ResponderArgs) -> Result<loadgen::ListenServer, String> {
    let tls = match (&args.certificate, &args.key) {
        (Some(certificate), Some(key)) => Some(
            rsbroker_transports::tls::ServerTls {
                certificate: certificate.clone(),
                key: key.clone(),
                ..Default::default()
            }
            .build()
            .map_err(|e| e.to_string())?,
        ),
        _ if url.scheme.is_tls() => {
            return Err(format!("{url}: give --certificate and --key"));
        }
        _ => None,
    };
    Ok(loadgen::ListenServer {
        url: url.clone(),
        tls,
    })
}

fn write(path: &PathBuf, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn requester(args: RequesterArgs) -> Result<bool, String> {
    if !args.tags.is_empty() && args.target.nats.is_some() {
        return Err("--tag is for RSocket routing; NATS has subjects only".into());
    }
    let spec = RequesterSpec {
        interaction: args.interaction,
        route: args.route.clone(),
        tags: args.tags.clone(),
        payload_size: args.payload_size,
        connections: args.connections.max(1),
        mode: match args.rps {
            Some(rps) if rps > 0.0 => Mode::Open { rps },
            Some(rps) => return Err(format!("--rps must be more than 0, got {rps}")),
            None => Mode::Closed {
                concurrency: args.concurrency.max(1),
            },
        },
        duration: args.duration,
        warmup: args.warmup,
        request_n: args.request_n.max(1),
        items: args.items.max(1),
        cpus: args.cpus.clone().unwrap_or_else(loadgen::available_cpus),
        live: !args.quiet && std::io::stderr().is_terminal(),
        spin: args.spin,
        serve: match &args.serve {
            Some(options) => Some(serve_spec(&args, options)?),
            None => None,
        },
    };
    let cpu_before = loadgen::cpu_seconds();
    let (target, run) = match (&args.target.broker, &args.target.nats) {
        (Some(b), _) => (
            b.to_string(),
            loadgen::rsocket::run_requester(&spec, args.tls.target(b)?)?,
        ),
        (None, Some(n)) => (n.clone(), loadgen::nats::run_requester(&spec, n)?),
        (None, None) => return Err("give --broker or --nats".into()),
    };
    let summary = Summary::new(&spec, target, &run, loadgen::cpu_seconds() - cpu_before);
    print!("{}", summary.text());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        write(path, &(json + "\n"))?;
    }
    if let Some(path) = &args.hgrm {
        write(path, &stats::hgrm(&run.record.latency, 1000.0))?;
    }
    Ok(summary.passed)
}

/// The responder `--serve` asks for: its options parsed as `loadgen
/// responder` parses them, aimed at the requester's own target.
fn serve_spec(args: &RequesterArgs, options: &str) -> Result<ResponderSpec, String> {
    /// `--serve`'s options, parsed as the responder's.
    #[derive(Parser, Debug)]
    #[command(name = "--serve", no_binary_name = true)]
    struct ServeOptions {
        #[command(flatten)]
        options: ResponderOptions,
    }
    let o = ServeOptions::try_parse_from(options.split_whitespace())
        .map_err(|e| format!("--serve: {}", e.to_string().trim_end()))?
        .options;
    if args.target.broker.is_none() && args.target.nats.is_none() {
        return Err("--serve needs --broker or --nats".into());
    }
    Ok(ResponderSpec {
        broker: args
            .target
            .broker
            .as_ref()
            .map(|b| args.tls.target(b))
            .transpose()?,
        listen: None,
        service: o.service.unwrap_or_else(|| args.route.clone()),
        app: o.app,
        instances: o.instances.max(1),
        connections: o.connections.max(1),
        work: Duration::from_micros(o.work_us),
        items: o.items,
        fanout: o.fanout,
        cpus: Vec::new(),
    })
}

fn responder(args: ResponderArgs) -> Result<bool, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    if let Some(d) = args.duration {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            stop.store(true, Ordering::Release);
        });
    }
    let o = &args.options;
    let spec = ResponderSpec {
        broker: args
            .target
            .broker
            .as_ref()
            .map(|b| args.tls.target(b))
            .transpose()?,
        listen: args
            .target
            .listen
            .as_ref()
            .map(|url| listen_server(url, &args))
            .transpose()?,
        service: o.service.clone().unwrap_or_else(|| "echo".into()),
        app: o.app.clone(),
        instances: o.instances.max(1),
        connections: o.connections.max(1),
        work: Duration::from_micros(o.work_us),
        items: o.items,
        fanout: o.fanout,
        cpus: args.cpus.unwrap_or_else(loadgen::available_cpus),
    };
    let counts = match &args.target.nats {
        Some(url) => loadgen::nats::run_responder(&spec, url, stop)?,
        None => loadgen::rsocket::run_responder(&spec, stop)?,
    };
    println!("loadgen responder: served {}", counts.line());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&counts).map_err(|e| e.to_string())?;
        write(path, &(json + "\n"))?;
    }
    Ok(true)
}

fn pingpong(args: PingpongArgs) -> Result<bool, String> {
    use std::io::{Read, Write};
    let size = args.payload_size.max(1);
    if let Some(listen) = &args.listen {
        let listener = std::net::TcpListener::bind(tcp(listen)?)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        eprintln!("loadgen pingpong: echoing on {listen}");
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; size];
                while s.read_exact(&mut buf).is_ok() {
                    if s.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
        return Ok(true);
    }
    let Some(addr) = &args.connect else {
        return Err("give --listen or --connect".into());
    };
    let mut s = std::net::TcpStream::connect(tcp(addr)?)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = vec![b'p'; size];
    let mut h = stats::histogram();
    for i in 0..args.count + args.count / 10 {
        let t0 = std::time::Instant::now();
        s.write_all(&buf).map_err(|e| e.to_string())?;
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        // The first tenth warms up.
        if i >= args.count / 10 {
            h.saturating_record(t0.elapsed().as_nanos() as u64);
        }
    }
    let p = stats::Percentiles::of(&h);
    println!(
        "loadgen pingpong: {} round trips of {size} B to {addr}: {}",
        h.len(),
        p.line()
    );
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&p).map_err(|e| e.to_string())?;
        write(path, &(json + "\n"))?;
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Requester(a) => requester(a),
        Command::Responder(a) => responder(a),
        Command::Pingpong(a) => pingpong(a),
        Command::QuinnResponder(a) => quinn_responder(a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}
