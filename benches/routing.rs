//! Criterion bench of a shard's routing decision: route lookup in the
//! shard's route table plus the balancer's pick, for each balancer and for
//! 1, 4 and 16 instances of the service (`Shard::destination`, exactly what
//! the shard runs for every request).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use rsbroker_core::app::AppInfo;
use rsbroker_core::message::Message;
use rsbroker_core::routes::{RouteChange, RouteUpdate};
use rsbroker_core::{
    Balancer, ConnId, Destination, Policies, ServiceKey, ServicePolicy, Shard, ShardConfig,
};
use rsocket_proto::conn::Interaction;
use rsocket_proto::metadata::build::route;

// The broker's allocator, so that allocation costs are the broker's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shard 0 of two, with `instances` instances of `com.example.Echo` whose
/// connections live on shard 1, and the service balanced by `balancer`.
fn shard(instances: u32, balancer: Balancer) -> (Shard, ConnId) {
    let now = Instant::now();
    let mut policies = Policies::default();
    policies.services.insert(
        "com.example.Echo".into(),
        ServicePolicy {
            balancer,
            ..ServicePolicy::default()
        },
    );
    let mut shard = Shard::new(
        ShardConfig {
            policies,
            ..ShardConfig::new(0, 2)
        },
        now,
    );
    let updates = (0..instances).map(|i| {
        Message::Route(RouteUpdate {
            origin: 1,
            revision: u64::from(i) + 1,
            change: RouteChange::Join {
                conn: ConnId {
                    shard: 1,
                    slot: i,
                    generation: 0,
                },
                app: Arc::new(AppInfo {
                    name: "echo".into(),
                    uuid: format!("echo-{i}").into(),
                    ip: None,
                    power_rating: 1 + i % 3,
                    raw: "{}".into(),
                    identity: None,
                }),
                services: vec![ServiceKey::new("", "com.example.Echo", "")],
            },
        })
    });
    shard.handle_messages(now, 1, updates);
    let requester = shard.open(now);
    (shard, requester)
}

fn destination(c: &mut Criterion) {
    let mut g = c.benchmark_group("destination");
    let plain = route(&["com.example.Echo.hello"]).expect("the route fits");
    // The hash tag rides as a second routing tag.
    let hashed = route(&["com.example.Echo.hello", "user=alice"]).expect("the tags fit");
    let balancers = [
        ("round-robin", Balancer::RoundRobin),
        ("random", Balancer::Random),
        ("weighted", Balancer::Weighted),
        ("least-outstanding", Balancer::LeastOutstanding),
        ("hash", Balancer::ConsistentHash { tag: "user".into() }),
    ];
    for (name, balancer) in balancers {
        let metadata = if matches!(balancer, Balancer::ConsistentHash { .. }) {
            hashed.clone()
        } else {
            plain.clone()
        };
        for instances in [1u32, 4, 16] {
            let (shard, requester) = shard(instances, balancer.clone());
            assert!(matches!(
                shard.destination(requester, Interaction::RequestResponse, &metadata),
                Ok(Destination::Instances { .. })
            ));
            g.bench_function(format!("{name}/{instances}"), |b| {
                b.iter(|| {
                    black_box(shard.destination(
                        requester,
                        Interaction::RequestResponse,
                        black_box(&metadata),
                    ))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, destination);
criterion_main!(benches);
