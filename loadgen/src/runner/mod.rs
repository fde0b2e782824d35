//! One runner for both protocols. It starts a pinned thread per CPU on the
//! protocol's event loop, gives each thread its share of the connections,
//! runs the protocol side's code there, joins the threads and merges what
//! they recorded. The protocol files ([`crate::rsocket`], [`crate::nats`])
//! say only how to connect, send one request and serve one.
//!
//! - [`requester`]: a requester run: every thread connects, then all start
//!   at once; the open and closed loops; the live line.
//! - [`responder`]: a responder run, and the counts a serving thread keeps.

mod requester;
mod responder;

pub(crate) use requester::{Load, RequesterSide, Tally, run_requester};
pub(crate) use responder::{Counts, ResponderSide, run_responder, work};

use std::rc::Rc;

use crate::RequesterSpec;
use crate::event_loop::Thread;

/// What one thread is to do: its share of `spec`, counting what it serves
/// into `counts`.
pub(crate) struct Part<'a, S> {
    /// The whole run.
    pub(crate) spec: &'a S,
    /// This thread's part of the connections.
    pub(crate) share: Share,
    /// What this thread serves.
    pub(crate) counts: &'a Rc<Counts>,
}

impl<'a, S> Part<'a, S> {
    /// Thread `share`'s part of `spec`.
    pub(crate) fn new(spec: &'a S, share: Share, counts: &'a Rc<Counts>) -> Self {
        Self {
            spec,
            share,
            counts,
        }
    }
}

impl Part<'_, RequesterSpec> {
    /// How many connections this thread sends on.
    pub(crate) fn connections(&self) -> usize {
        self.share.of(self.spec.connections).count()
    }
}

/// One thread's part of a set of connections: every `threads`-th, from
/// `index`, so that the threads' parts differ by one at most.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Share {
    /// This thread.
    pub(crate) index: usize,
    /// Threads in all.
    pub(crate) threads: usize,
}

impl Share {
    /// The indices of this thread's part of `total` connections.
    pub(crate) fn of(self, total: usize) -> impl Iterator<Item = usize> {
        (self.index..total).step_by(self.threads.max(1))
    }
}

/// Joins every thread in order, handing what each returned to `merge`.
/// The first error (one a thread returned, or its failure) is the run's;
/// `failed` runs at each, so the threads still running can be told to stop.
fn join_all<T>(
    threads: Vec<Thread<Result<T, String>>>,
    mut merge: impl FnMut(T),
    failed: impl Fn(),
) -> Result<(), String> {
    let mut first_error = None;
    for thread in threads {
        match thread.join().and_then(|result| result) {
            Ok(value) => merge(value),
            Err(e) => {
                failed();
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
