//! The rsbroker server: shards on glommio executors, one per core, with
//! the config, admin HTTP server and start-up checks around them.
//!
//! # Layout
//!
//! - [`config`]: the settings, the TOML file, and how errors are located.
//! - `control`: what the shards share with the rest of the process: phase,
//!   settings, heartbeats, snapshots.
//! - `runtime`: the executors, listeners, connection drivers, the timer and
//!   the cross-shard mesh; [`start`] returns a [`BrokerHandle`].
//! - [`trust`]: `[auth]`, and the key and credentials files it names.
//! - `admin`: the admin HTTP server (metrics, health, status page).
//! - [`checks`]: io_uring and locked memory, checked before start.
//! - [`logging`]: text, JSON or journald output with a reloadable filter.
//! - [`watchdog`]: systemd watchdog pings, withheld while a shard is stuck.
//! - `notify`: a one-task wake-up flag.

mod admin;
pub mod checks;
pub mod config;
mod control;
pub mod logging;
mod notify;
mod runtime;
pub mod trust;
pub mod watchdog;

pub use config::BrokerConfig;
pub use control::{ConnectionSnapshot, InstanceView, IoStats, Phase, ShardSnapshot};
pub use runtime::{BrokerHandle, Controller, start};
