//! The rsbroker server: shards on glommio executors, one per core.
//!
//! # Layout
//!
//! - [`config`]: the settings and how policies are written.
//! - `runtime`: the executors, listeners, connection drivers, the timer and
//!   the cross-shard mesh; [`start`] returns a [`BrokerHandle`].
//! - `notify`: a one-task wake-up flag.

pub mod config;
mod notify;
mod runtime;

pub use config::BrokerConfig;
pub use runtime::{BrokerHandle, ConnectionSnapshot, ShardSnapshot, start};
