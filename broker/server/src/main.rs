//! `rsbroker`: the RSocket broker binary. Reads the config (file, then
//! flags), checks the host, starts the shards and the admin server, tells
//! systemd where it stands, and turns signals into drain (SIGTERM, SIGINT),
//! stop (a second one) and reload (SIGHUP).

// --dump-config and --check-config answer on stdout.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use rsbroker::config::{self, BrokerConfig, ConfigError, LogFormat, Size, parse_policy};
use rsbroker::logging::{self, LogHandle};
use rsbroker::{Controller, checks, start};
use rsbroker_transports::ListenAddr;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An RSocket broker: apps connect once, register their services, and call
/// each other by service name.
///
/// Settings come from the config file (default /etc/rsbroker/rsbroker.toml,
/// read if it exists), then from these flags.
#[derive(Parser, Debug)]
#[command(name = "rsbroker", version, about)]
struct Cli {
    /// Config file (TOML)
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,

    /// Check the config and this host (io_uring, locked memory), print OK
    /// or every error with its location, and exit 0 or 1
    #[arg(long)]
    check_config: bool,

    /// Print the effective config (file and flags) as TOML and exit
    #[arg(long)]
    dump_config: bool,

    /// Read a secret from stdin and print it salted and hashed, for a
    /// user's `secret` in the credentials file (auth.credentials)
    #[arg(long)]
    hash_secret: bool,

    #[command(flatten)]
    overrides: Overrides,
}

/// Flags that override the config file.
#[derive(clap::Args, Debug, Default, Clone)]
struct Overrides {
    /// Where to listen, repeatable [file: server.listen; default: tcp://0.0.0.0:9999]
    #[arg(long = "listen", value_name = "URL")]
    listen: Vec<ListenAddr>,

    /// Shards, one executor pinned per core; 0 = one per core [server.shards]
    #[arg(long, value_name = "N")]
    shards: Option<usize>,

    /// CPUs to pin shards to, e.g. 0,2,4 [server.cores]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cores: Option<Vec<usize>>,

    /// Admin HTTP address [admin.listen; default: 127.0.0.1:9998]
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,

    /// Do not run the admin HTTP server [admin.enabled = false]
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,

    /// Balancer and failover of a service, repeatable: SERVICE=BALANCER[,retry=N]
    /// with BALANCER one of round-robin, random, weighted, least-outstanding, hash:TAG [services]
    #[arg(long = "policy", value_name = "SERVICE=POLICY", value_parser = parse_policy)]
    policies: Vec<(String, rsbroker_core::ServicePolicy)>,

    /// Log filter, e.g. info or rsbroker_core=debug,info [log.level]
    #[arg(long = "log", value_name = "FILTER")]
    log: Option<String>,

    /// Log format: auto, text, json or journald [log.format]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,

    /// Most connections at once [limits.max_connections]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Largest frame accepted, e.g. "1 MiB" [limits.max_frame_size]
    #[arg(long, value_name = "SIZE")]
    max_frame_size: Option<Size>,

    /// Unsent bytes per connection before its feeders pause [limits.max_pending_bytes]
    #[arg(long, value_name = "SIZE")]
    max_pending_bytes: Option<Size>,

    /// Streams a connection may have open [limits.max_streams_per_connection]
    #[arg(long, value_name = "N")]
    max_streams_per_connection: Option<usize>,

    /// How long in-flight streams may finish after SIGTERM, e.g. 30s [shutdown.drain_timeout]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
}

impl Overrides {
    fn apply(&self, c: &mut BrokerConfig) {
        if !self.listen.is_empty() {
            c.server.listen = self.listen.clone();
        }
        if let Some(n) = self.shards {
            c.server.shards = n;
        }
        if let Some(cores) = &self.cores {
            c.server.cores = cores.clone();
        }
        if let Some(a) = self.admin {
            c.admin.listen = a;
            c.admin.enabled = true;
        }
        if self.no_admin {
            c.admin.enabled = false;
        }
        for (service, policy) in &self.policies {
            c.set_policy(service, policy);
        }
        if let Some(l) = &self.log {
            c.log.level = l.clone();
        }
        if let Some(f) = self.log_format {
            c.log.format = f;
        }
        if let Some(n) = self.max_connections {
            c.limits.max_connections = n;
        }
        if let Some(s) = self.max_frame_size {
            c.limits.max_frame_size = s;
        }
        if let Some(s) = self.max_pending_bytes {
            c.limits.max_pending_bytes = s;
        }
        if let Some(n) = self.max_streams_per_connection {
            c.limits.max_streams_per_connection = n;
        }
        if let Some(d) = self.drain_timeout {
            c.shutdown.drain_timeout = d;
        }
    }
}

/// The file to read: `--config`, or the default path when it exists.
fn config_path(cli: &Cli) -> Option<PathBuf> {
    cli.config.clone().or_else(|| {
        let default = Path::new(config::DEFAULT_PATH);
        default.exists().then(|| default.to_owned())
    })
}

/// The file (if any), then the flags, then the checks that span both.
fn load(path: Option<&Path>, overrides: &Overrides) -> Result<BrokerConfig, Vec<ConfigError>> {
    let mut c = match path {
        Some(p) => config::load_file(p)?,
        None => BrokerConfig::default(),
    };
    overrides.apply(&mut c);
    let problems: Vec<ConfigError> = c
        .problems()
        .into_iter()
        .map(|(key, message)| ConfigError {
            file: None,
            location: None,
            key: Some(key),
            message,
        })
        .collect();
    if problems.is_empty() {
        Ok(c)
    } else {
        Err(problems)
    }
}

fn shards_of(c: &BrokerConfig) -> usize {
    match (c.server.shards, c.server.cores.len()) {
        (0, 0) => config::available_cpus().len().max(1),
        (0, n) => n,
        (n, _) => n,
    }
}

fn notify(states: &[NotifyState<'_>]) {
    // Not under systemd (no NOTIFY_SOCKET) is fine; a broken socket is only logged.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.hash_secret {
        let mut secret = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut secret) {
            eprintln!("rsbroker: cannot read the secret from stdin: {e}");
            return ExitCode::FAILURE;
        }
        let secret = secret.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            eprintln!("rsbroker: the secret on stdin is empty");
            return ExitCode::FAILURE;
        }
        return match rsbroker::trust::hash_secret(secret.as_bytes()) {
            Ok(stored) => {
                println!("{stored}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rsbroker: no randomness for the salt: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let path = config_path(&cli);
    let config = match load(path.as_deref(), &cli.overrides) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("rsbroker: {e}");
            }
            if cli.check_config {
                eprintln!("{} error(s)", errors.len());
            }
            return ExitCode::FAILURE;
        }
    };
    if cli.dump_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if cli.check_config {
        return match checks::run(shards_of(&config), config.server.io_memory.0) {
            Ok(warnings) => {
                for w in config.warnings().into_iter().chain(warnings) {
                    eprintln!("rsbroker: warning: {w}");
                }
                println!("OK");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rsbroker: {e}");
                ExitCode::FAILURE
            }
        };
    }

    let log = match logging::init(&config.log) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("rsbroker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let journal = logging::resolve(config.log.format) == LogFormat::Journald;
    if let Some(p) = &path {
        tracing::info!(config = %p.display(), "configuration read");
    }
    match checks::run(shards_of(&config), config.server.io_memory.0) {
        Ok(warnings) => {
            for w in config.warnings().into_iter().chain(warnings) {
                tracing::warn!("{w}");
            }
        }
        Err(e) => {
            fatal(&e, journal);
            return ExitCode::FAILURE;
        }
    }

    let broker = match start(config) {
        Ok(b) => b,
        Err(e) => {
            fatal(&e, journal);
            return ExitCode::FAILURE;
        }
    };
    let status = format!(
        "{} shards, listening on {}",
        broker.shards(),
        broker
            .addrs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);

    let controller = broker.controller();
    spawn_watchdog(controller.clone());
    if let Err(e) = spawn_signals(controller, path, Arc::new(cli.overrides), log) {
        tracing::warn!(error = %e, "cannot handle signals");
    }

    match broker.join() {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            fatal(&e, journal);
            ExitCode::FAILURE
        }
    }
}

/// Logs why the broker cannot go on; when logs go to the journal, says it
/// on stderr too, for whoever started it by hand.
fn fatal(e: &dyn std::fmt::Display, journal: bool) {
    tracing::error!("{e}");
    if journal {
        eprintln!("rsbroker: {e}");
    }
}

/// Sends WATCHDOG=1 while every shard's heartbeat is fresh, when systemd
/// asked for it (WatchdogSec=).
fn spawn_watchdog(controller: Controller) {
    let Some(timeout) = rsbroker::watchdog::systemd_timeout() else {
        return;
    };
    let interval = (timeout / 2).max(Duration::from_millis(100));
    let stuck_after = (timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(5));
    if let Err(e) = rsbroker::watchdog::spawn(controller, interval, stuck_after, || {
        notify(&[NotifyState::Watchdog]);
    }) {
        tracing::warn!(error = %e, "cannot start the watchdog");
    }
}

fn spawn_signals(
    controller: Controller,
    path: Option<PathBuf>,
    overrides: Arc<Overrides>,
    log: LogHandle,
) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    // POST /api/reload: the same reload as SIGHUP, through the loop below.
    controller.on_reload_request(|| {
        let _ = signal_hook::low_level::raise(SIGHUP);
    });
    std::thread::Builder::new()
        .name("rsbroker-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => reload(&controller, path.as_deref(), &overrides, &log),
                    _ if controller.is_stopping() => {
                        tracing::info!(signal, "stopping now");
                        controller.stop();
                    }
                    _ => {
                        notify(&[NotifyState::Stopping]);
                        let timeout = controller.settings().shutdown.drain_timeout;
                        tracing::info!(
                            signal,
                            drain_timeout = ?timeout,
                            "draining; a second signal stops at once"
                        );
                        controller.drain();
                    }
                }
            }
        })?;
    Ok(())
}

/// SIGHUP: reads the config again; a bad one is reported and the running
/// one kept.
fn reload(controller: &Controller, path: Option<&Path>, overrides: &Overrides, log: &LogHandle) {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
    match load(path, overrides) {
        Err(errors) => {
            for e in &errors {
                tracing::error!("{e}");
            }
            tracing::error!(
                errors = errors.len(),
                "reload failed: the configuration in force is kept"
            );
        }
        Ok(new) => {
            let level = new.log.level.clone();
            let needs_restart = controller.reload(new);
            if let Err(e) = log.set_level(&level) {
                tracing::error!(error = %e, "log level not changed");
            }
            if needs_restart.is_empty() {
                tracing::info!("configuration reloaded");
            } else {
                tracing::warn!(
                    ?needs_restart,
                    "configuration reloaded; these sections changed and need a restart"
                );
            }
        }
    }
    notify(&[NotifyState::Ready]);
}
