//! Logs: human-readable text on stderr (coloured on a terminal), one JSON
//! object per line, or the systemd journal with structured fields. The
//! filter can be replaced while running (SIGHUP).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// Changes the log filter of the running process.
#[derive(Clone, Debug)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    /// Replaces the filter (`info`, `rsbroker_core=debug,info`, ...).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(level).map_err(|e| format!("{level:?}: {e}"))?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }
}

/// The format `auto` stands for here: the journal when systemd connected
/// stderr to it (JOURNAL_STREAM names stderr's device and inode), else text.
pub fn resolve(format: LogFormat) -> LogFormat {
    match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    }
}

fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2")
        .is_ok_and(|m| dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()))
}

/// Installs the global subscriber.
pub fn init(config: &LogConfig) -> Result<LogHandle, String> {
    let filter = EnvFilter::try_new(&config.level)
        .map_err(|e| format!("log.level {:?}: {e}", config.level))?;
    let (filter, handle) = reload::Layer::new(filter);
    let format = resolve(config.format);
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let journald = if format == LogFormat::Journald {
        // Fields keep their names (APP, INSTANCE, REASON, ...) instead of F_APP.
        Some(
            tracing_journald::layer()
                .map_err(|e| format!("cannot log to the journal: {e}"))?
                .with_field_prefix(None),
        )
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(journald)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(LogHandle { filter: handle })
}
