//! Sans-IO broker logic of one shard. No socket, thread or clock: the
//! server drives each [`Shard`] with received frames, messages from other
//! shards and the time, and takes frames to write and messages to send.
//!
//! # Layout
//!
//! - [`shard`]: one shard: connections, stream maps, routing, balancing,
//!   failover, backpressure bookkeeping; a module each (see its `# Layout`).
//! - [`routes`]: the route table every shard holds a copy of, and the
//!   revisioned updates that keep the copies equal.
//! - [`flow`]: per-stream credit, pauses and memory limits: how one slow
//!   or hostile peer is kept from holding up the others.
//! - [`balance`]: per-service policies and the balancers.
//! - [`message`]: what shards send each other.
//! - [`app`]: app metadata and published services from SETUP, CloudEvents
//!   from METADATA_PUSH.
//! - [`trust`]: authentication at SETUP (JWT, simple, mutual TLS) and
//!   what each identity may publish and call.
//! - [`service`]: service keys (`group!service:version`).
//! - [`ids`]: connection and stream identifiers.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod app;
pub mod balance;
pub mod flow;
pub mod ids;
pub mod message;
pub mod routes;
pub mod service;
pub mod shard;
pub mod trust;

pub use balance::{Balancer, Failover, Policies, ServicePolicy};
pub use flow::FlowLimits;
pub use ids::{ConnId, ShardId, StreamRef};
pub use message::{Message, Signal};
pub use service::ServiceKey;
pub use shard::{Destination, Peer, ServiceCounters, Shard, ShardConfig, ShardStats};
