//! `rsbroker`: the RSocket broker binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use rsbroker::config::parse_policy;
use rsbroker::{BrokerConfig, start};
use rsbroker_transports::ListenAddr;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An RSocket broker: apps connect once, register their services, and call
/// each other by service name.
#[derive(Parser, Debug)]
#[command(name = "rsbroker", version, about)]
struct Cli {
    /// Where to listen, repeatable [default: tcp://0.0.0.0:9999]
    #[arg(long = "listen", value_name = "URL")]
    listen: Vec<ListenAddr>,

    /// Shards (one executor pinned per core); 0 = one per available core
    #[arg(long, default_value_t = 0, value_name = "N")]
    shards: usize,

    /// Balancer and failover of a service, repeatable: SERVICE=BALANCER[,retry=N]
    /// with BALANCER one of round-robin, random, weighted, least-outstanding, hash:TAG
    #[arg(long = "policy", value_name = "SERVICE=POLICY", value_parser = parse_policy)]
    policies: Vec<(String, rsbroker_core::ServicePolicy)>,

    /// Log filter, e.g. info or rsbroker=debug
    #[arg(long, default_value = "info", value_name = "FILTER")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(&cli.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("rsbroker: invalid --log filter {:?}: {e}", cli.log);
            return ExitCode::from(2);
        }
    };
    // Logs go to stderr; colours only when a person is watching.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let mut config = BrokerConfig::default();
    if !cli.listen.is_empty() {
        config.listen = cli.listen;
    }
    config.shards = cli.shards;
    config.policies.services.extend(cli.policies);

    let broker = match start(config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("rsbroker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = broker.stop_flag();
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]);
    match signals {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    tracing::info!(signal, "stopping");
                    stop.store(true, std::sync::atomic::Ordering::Release);
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGINT/SIGTERM"),
    }
    match broker.join() {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rsbroker: {e}");
            ExitCode::FAILURE
        }
    }
}
