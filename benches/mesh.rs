//! The cross-shard queue, measured alone: two glommio executors pinned to
//! CPU 0 and CPU 1 joined by the same kind of mesh the broker builds
//! (`MeshBuilder::full` of `Vec<Message>` batches, capacity 1024 batches),
//! carrying the message a forwarded 64-byte PAYLOAD becomes.
//!
//! Reports, for batches of 1, 16 and 64 messages, how many messages per
//! second go from one core to the other, with and without the executors
//! spinning before they park; and the round trip of one message there and
//! back (what an idle shard pays to wake its peer). The peer, in the same
//! run: a crossbeam bounded channel of the same batches between two threads
//! pinned to the same CPUs (blocking receive, so it parks like an idle
//! executor does).
//!
//! `cargo bench -p rsbroker-benches --bench mesh` (add `-- --test` for a
//! quick run that only checks it works).
#![allow(clippy::print_stdout)] // a bench report

use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_benches::payload_frame;
use rsbroker_core::{ConnId, Message, Signal, StreamRef};
use rsocket_proto::FrameView;

const CAPACITY: usize = 1024;

fn message(frame: &FrameView) -> Message {
    Message::ToRequester {
        to: StreamRef {
            conn: ConnId {
                shard: 1,
                slot: 7,
                generation: 1,
            },
            stream: 1,
        },
        signal: Signal::Frame(frame.clone()),
    }
}

fn placement(cpu: usize) -> Placement {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        Placement::Fixed(cpu)
    } else {
        Placement::Unbound
    }
}

/// Sends `total` messages from core 0 to core 1 in batches of `batch`;
/// returns messages per second, timed from the first send to the last
/// receipt.
fn throughput(total: usize, batch: usize, spin: Duration, frame: &FrameView) -> f64 {
    let mesh: MeshBuilder<Vec<Message>, Full> = MeshBuilder::full(2, CAPACITY);
    let frame = frame.clone();
    let sender = {
        let mesh = mesh.clone();
        LocalExecutorBuilder::new(placement(0))
            .io_memory(64 << 10)
            .spin_before_park(spin)
            .spawn(move || async move {
                let (senders, _receivers) = mesh.join().await.expect("mesh");
                let peer = 1 - senders.peer_id();
                let mut sent = 0;
                while sent < total {
                    let n = batch.min(total - sent);
                    let msgs: Vec<Message> = (0..n).map(|_| message(&frame)).collect();
                    senders.send_to(peer, msgs).await.expect("send");
                    sent += n;
                }
            })
            .expect("executor")
    };
    let receiver = LocalExecutorBuilder::new(placement(1))
        .io_memory(64 << 10)
        .spin_before_park(spin)
        .spawn(move || async move {
            let (_senders, receivers) = mesh.join().await.expect("mesh");
            let peer = 1 - receivers.peer_id();
            let mut got = 0;
            let mut start = None;
            while got < total {
                let batch = receivers
                    .recv_from(peer)
                    .await
                    .expect("recv")
                    .expect("open");
                start.get_or_insert_with(Instant::now);
                got += batch.len();
            }
            start.map_or(Duration::ZERO, |s| s.elapsed())
        })
        .expect("executor");
    sender.join().expect("sender");
    let elapsed = receiver.join().expect("receiver");
    // The first batch's arrival starts the clock: count what came after it.
    (total - batch.min(total)) as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// One message to core 1 and one back, `rounds` times; returns the median
/// and the 99th percentile round trip.
fn ping_pong(rounds: usize, spin: Duration, frame: &FrameView) -> (Duration, Duration) {
    let mesh: MeshBuilder<Vec<Message>, Full> = MeshBuilder::full(2, CAPACITY);
    let frame = frame.clone();
    let ponger = {
        let mesh = mesh.clone();
        LocalExecutorBuilder::new(placement(1))
            .io_memory(64 << 10)
            .spin_before_park(spin)
            .spawn(move || async move {
                let (senders, receivers) = mesh.join().await.expect("mesh");
                let peer = 1 - senders.peer_id();
                for _ in 0..rounds {
                    let batch = receivers
                        .recv_from(peer)
                        .await
                        .expect("recv")
                        .expect("open");
                    senders.send_to(peer, batch).await.expect("send");
                }
            })
            .expect("executor")
    };
    let pinger = LocalExecutorBuilder::new(placement(0))
        .io_memory(64 << 10)
        .spin_before_park(spin)
        .spawn(move || async move {
            let (senders, receivers) = mesh.join().await.expect("mesh");
            let peer = 1 - senders.peer_id();
            let mut times = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let t = Instant::now();
                senders
                    .send_to(peer, vec![message(&frame)])
                    .await
                    .expect("send");
                receivers
                    .recv_from(peer)
                    .await
                    .expect("recv")
                    .expect("open");
                times.push(t.elapsed());
            }
            times.sort();
            (times[times.len() / 2], times[times.len() * 99 / 100])
        })
        .expect("executor");
    ponger.join().expect("ponger");
    pinger.join().expect("pinger")
}

fn pin(cpu: usize) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    }
}

/// [`throughput`] over a crossbeam bounded channel between pinned threads.
fn crossbeam_throughput(total: usize, batch: usize, frame: &FrameView) -> f64 {
    let (tx, rx) = crossbeam_channel::bounded::<Vec<Message>>(CAPACITY);
    let frame = frame.clone();
    let sender = std::thread::spawn(move || {
        pin(0);
        let mut sent = 0;
        while sent < total {
            let n = batch.min(total - sent);
            let msgs: Vec<Message> = (0..n).map(|_| message(&frame)).collect();
            tx.send(msgs).expect("send");
            sent += n;
        }
    });
    let receiver = std::thread::spawn(move || {
        pin(1);
        let mut got = 0;
        let mut start = None;
        while got < total {
            let batch = rx.recv().expect("recv");
            start.get_or_insert_with(Instant::now);
            got += batch.len();
        }
        start.map_or(Duration::ZERO, |s| s.elapsed())
    });
    sender.join().expect("sender");
    let elapsed = receiver.join().expect("receiver");
    (total - batch.min(total)) as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// [`ping_pong`] over two crossbeam channels between pinned threads.
fn crossbeam_ping_pong(rounds: usize, frame: &FrameView) -> (Duration, Duration) {
    let (to_tx, to_rx) = crossbeam_channel::bounded::<Vec<Message>>(CAPACITY);
    let (back_tx, back_rx) = crossbeam_channel::bounded::<Vec<Message>>(CAPACITY);
    let ponger = std::thread::spawn(move || {
        pin(1);
        for _ in 0..rounds {
            let batch = to_rx.recv().expect("recv");
            back_tx.send(batch).expect("send");
        }
    });
    let frame = frame.clone();
    let pinger = std::thread::spawn(move || {
        pin(0);
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            to_tx.send(vec![message(&frame)]).expect("send");
            back_rx.recv().expect("recv");
            times.push(t.elapsed());
        }
        times
    });
    let mut times = pinger.join().expect("pinger");
    ponger.join().expect("ponger");
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let frame = FrameView::parse(payload_frame(64)).expect("a 64-byte frame");
    let scale = if quick { 1000 } else { 1 };
    println!("cross-shard queue: CPU 0 -> CPU 1, Vec<Message> batches, capacity {CAPACITY}");
    // Best of three everywhere: the other runs lost time to something else
    // on the machine.
    let best = |f: &dyn Fn() -> f64| (0..3).map(|_| f()).fold(0.0, f64::max);
    for batch in [1usize, 16, 64] {
        let total = if batch == 1 { 200_000 } else { 2_000_000 } / scale;
        let mesh = best(&|| throughput(total, batch, Duration::ZERO, &frame));
        let spun = best(&|| throughput(total, batch, Duration::from_micros(100), &frame));
        let peer = best(&|| crossbeam_throughput(total, batch, &frame));
        println!(
            "  batch {batch:>2}: glommio mesh {:>6.2} M/s (spinning 100 us before park: {:>6.2} M/s), crossbeam {:>6.2} M/s; mesh/crossbeam {:.2}",
            mesh / 1e6,
            spun / 1e6,
            peer / 1e6,
            mesh / peer
        );
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (m50, m99) = ping_pong(20_000 / scale, Duration::ZERO, &frame);
    let (s50, s99) = ping_pong(20_000 / scale, Duration::from_micros(100), &frame);
    let (c50, c99) = crossbeam_ping_pong(20_000 / scale, &frame);
    println!("  round trip of one message, p50 / p99:");
    println!(
        "    glommio mesh                  {:>6.1} / {:>6.1} us",
        us(m50),
        us(m99)
    );
    println!(
        "    glommio mesh, spinning 100 us {:>6.1} / {:>6.1} us",
        us(s50),
        us(s99)
    );
    println!(
        "    crossbeam                     {:>6.1} / {:>6.1} us",
        us(c50),
        us(c99)
    );
}
