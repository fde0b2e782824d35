//! Receive buffers shared by the connections of one thread (one shard).
//!
//! A connection holds a receive buffer only while it reads or has a frame
//! in progress; once every byte it read has been cut into frames its buffer
//! goes back here, and the next connection with bytes to read reads into
//! what is left of it. Frames are cut out of the buffer they arrived in and
//! keep its allocation alive until the last of them is dropped; only then
//! is the allocation reused (or freed, past [`FREE_KEPT`]).
//!
//! The pool counts every buffer it handed out until it finds the buffer
//! free again, and allocates none past its limit: a reader that finds it
//! spent waits ([`wait`]) and the shard stops reading, instead of growing
//! without end.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::task::Waker;

use bytes::BytesMut;

/// Whole free buffers kept for reuse; more are freed.
pub const FREE_KEPT: usize = 32;

/// Tails (buffers given back with room left) kept to read into next.
const TAILS_KEPT: usize = 64;

/// Spent buffers looked at for one that is free again, per take.
const RECLAIM_SCAN: usize = 16;

/// A receive buffer: from where the next bytes go to the end of what is
/// initialised, and the initialised size of its allocation from its start.
#[derive(Debug)]
pub(crate) struct Tail {
    pub(crate) buf: BytesMut,
    pub(crate) size: usize,
}

/// What the pool holds and has done, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of buffers alive: held by connections, by frames cut from
    /// them, or kept here.
    pub live_bytes: usize,
    /// The most bytes of buffers the pool allocates.
    pub limit: usize,
    /// Buffers held by connections reading or with a frame in progress.
    pub held: usize,
    /// Buffers kept with room left, to read into next.
    pub tails: usize,
    /// Used-up buffers that frames may still point into.
    pub spent: usize,
    /// Whole free buffers kept for reuse.
    pub free: usize,
    /// Buffers allocated so far.
    pub allocated: u64,
    /// Times a connection could not read because the pool was at its limit.
    pub exhausted: u64,
}

#[derive(Debug)]
struct Pool {
    limit: usize,
    live: usize,
    held: usize,
    tails: Vec<Tail>,
    spent: VecDeque<Tail>,
    free: Vec<Tail>,
    waiting: Vec<Waker>,
    allocated: u64,
    exhausted: u64,
}

/// The default limit of a thread's pool: what a thread that was never
/// configured (a client, a test) may hold.
pub const DEFAULT_LIMIT: usize = 1 << 30;

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            limit: DEFAULT_LIMIT,
            live: 0,
            held: 0,
            tails: Vec::new(),
            spent: VecDeque::new(),
            free: Vec::new(),
            waiting: Vec::new(),
            allocated: 0,
            exhausted: 0,
        })
    };
}

/// Sets the most bytes of receive buffers this thread's connections may
/// hold together (buffers already alive stay).
pub fn configure(limit: usize) {
    POOL.with_borrow_mut(|p| p.limit = limit);
}

/// This thread's pool, as metrics show it.
pub fn stats() -> PoolStats {
    POOL.with_borrow(|p| PoolStats {
        live_bytes: p.live,
        limit: p.limit,
        held: p.held,
        tails: p.tails.len(),
        spent: p.spent.len(),
        free: p.free.len(),
        allocated: p.allocated,
        exhausted: p.exhausted,
    })
}

/// Whether more than half the limit is alive: readers that wait for the
/// rest of a frame then move it out of the pool (see `ReadBuf::park`), so
/// peers that stop mid-frame cannot hold the buffers others read into.
pub(crate) fn pressed() -> bool {
    POOL.with_borrow(|p| p.live > p.limit / 2)
}

/// Wakes `waker` once a buffer goes back to the pool.
pub fn wait(waker: &Waker) {
    POOL.with_borrow_mut(|p| {
        if !p.waiting.iter().any(|w| w.will_wake(waker)) {
            p.waiting.push(waker.clone());
        }
    });
}

/// A buffer with at least `room` bytes to read into; when a new one is
/// needed it has `size` bytes (at least `room`). `bounded: false` allocates
/// past the limit (for callers that hold the bytes already and cannot
/// wait). `None`: the pool is at its limit.
pub(crate) fn take(room: usize, size: usize, bounded: bool) -> Option<Tail> {
    POOL.with_borrow_mut(|p| {
        let t = p.take(room, size.max(room), bounded);
        if t.is_some() {
            p.held += 1;
        } else {
            p.exhausted += 1;
        }
        t
    })
}

/// Gives back a buffer taken with [`take`]: one with at least `room`
/// bytes left is read into next, others wait for their frames to go.
pub(crate) fn give(tail: Tail, room: usize) {
    put_back(tail, room, true);
}

/// Gives back part of a held buffer (the rest stays held).
pub(crate) fn give_part(tail: Tail, room: usize) {
    put_back(tail, room, false);
}

fn put_back(tail: Tail, room: usize, whole: bool) {
    POOL.with_borrow_mut(|p| {
        if whole {
            p.held = p.held.saturating_sub(1);
        }
        p.put(tail, room);
        for w in p.waiting.drain(..) {
            w.wake();
        }
    });
}

impl Pool {
    fn take(&mut self, room: usize, size: usize, bounded: bool) -> Option<Tail> {
        while let Some(t) = self.tails.pop() {
            if t.buf.len() >= room {
                return Some(t);
            }
            self.spend(t);
        }
        if let Some(i) = self.free.iter().position(|t| t.size >= size) {
            return Some(self.free.swap_remove(i));
        }
        for _ in 0..RECLAIM_SCAN.min(self.spent.len()) {
            let Some(mut t) = self.spent.pop_front() else {
                break;
            };
            if !t.buf.try_reclaim(t.size) {
                self.spent.push_back(t);
                continue;
            }
            if t.size >= size && restore(&mut t) {
                return Some(t);
            }
            self.release(t);
        }
        if bounded && self.live.saturating_add(size) > self.limit {
            return None;
        }
        self.live += size;
        self.allocated += 1;
        Some(Tail {
            buf: BytesMut::zeroed(size),
            size,
        })
    }

    fn put(&mut self, tail: Tail, room: usize) {
        if tail.buf.len() >= room {
            if self.tails.len() >= TAILS_KEPT {
                let old = self.tails.remove(0);
                self.spend(old);
            }
            self.tails.push(tail);
        } else {
            self.spend(tail);
        }
    }

    fn spend(&mut self, mut t: Tail) {
        t.buf.clear();
        self.spent.push_back(t);
    }

    /// A buffer found free: kept whole for reuse, or freed.
    fn release(&mut self, mut t: Tail) {
        if self.free.len() < FREE_KEPT && restore(&mut t) {
            self.free.push(t);
        } else {
            self.live = self.live.saturating_sub(t.size);
        }
    }
}

/// Makes a reclaimed buffer (no frame points into it, and it starts at its
/// allocation's start) cover its whole initialised size again.
fn restore(t: &mut Tail) -> bool {
    if t.buf.capacity() < t.size {
        return false;
    }
    // SAFETY: the caller reclaimed `t.buf` (`try_reclaim` succeeded), so it
    // is the only handle to its allocation, starts at the allocation's
    // start and has at least `t.size` bytes of capacity (checked above).
    // The first `t.size` bytes of that allocation were initialised when it
    // was created with `BytesMut::zeroed(t.size)`, and since then they have
    // only been written by reads; nothing de-initialises memory, so they
    // are initialised.
    #[allow(unsafe_code)]
    unsafe {
        t.buf.set_len(t.size);
    }
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    // Each test runs on a thread of its own, so on a pool of its own.

    const ROOM: usize = 68 * 1024;
    const SIZE: usize = 128 * 1024;

    fn ptr(t: &Tail) -> usize {
        t.buf.as_ptr() as usize
    }

    #[test]
    fn pool_allocates_nothing_past_its_limit_and_counts_the_refusals() {
        configure(SIZE + SIZE / 2);
        assert!(!pressed());
        let a = take(ROOM, SIZE, true).unwrap();
        assert!(take(ROOM, SIZE, true).is_none(), "past the limit");
        assert!(take(ROOM, SIZE, true).is_none());
        let s = stats();
        assert_eq!(
            (s.live_bytes, s.limit, s.held, s.allocated, s.exhausted),
            (SIZE, SIZE + SIZE / 2, 1, 1, 2)
        );
        // Bytes already read may always be taken in.
        let b = take(ROOM, SIZE, false).unwrap();
        assert!(pressed());
        assert_eq!(stats().live_bytes, 2 * SIZE);
        assert_eq!(stats().held, 2);
        give(a, ROOM);
        give(b, ROOM);
        assert_eq!(stats().held, 0);
    }

    #[test]
    fn pool_is_pressed_past_half_its_limit() {
        configure(2 * SIZE + 2);
        let a = take(ROOM, SIZE, true).unwrap();
        assert!(!pressed(), "under half");
        let b = take(1, 1, true).unwrap();
        assert_eq!(stats().live_bytes, SIZE + 1);
        assert!(!pressed(), "exactly half");
        let c = take(1, 1, true).unwrap();
        assert!(pressed(), "past half");
        for t in [a, b, c] {
            give(t, ROOM);
        }
    }

    #[test]
    fn pool_gives_a_returned_buffer_to_the_next_reader() {
        let a = take(ROOM, SIZE, true).unwrap();
        let at = ptr(&a);
        give(a, ROOM);
        assert_eq!((stats().tails, stats().held), (1, 0));
        let b = take(ROOM, SIZE, true).unwrap();
        assert_eq!(ptr(&b), at, "the same buffer");
        assert_eq!(stats().allocated, 1);
        assert_eq!(stats().tails, 0);
    }

    #[test]
    fn pool_reuses_a_spent_buffer_only_once_its_frames_are_gone() {
        let mut a = take(ROOM, SIZE, true).unwrap();
        let at = ptr(&a);
        // A frame cut from the start, and the rest too short to read into.
        let frame = a.buf.split_to(SIZE - ROOM + 1).freeze();
        give(a, ROOM);
        assert_eq!((stats().tails, stats().spent), (0, 1));
        let b = take(ROOM, SIZE, true).unwrap();
        assert_ne!(ptr(&b), at, "the frame still points into it");
        assert_eq!(stats().allocated, 2);
        drop(frame);
        let c = take(ROOM, SIZE, true).unwrap();
        assert_eq!(ptr(&c), at, "reclaimed whole once the frame went");
        assert_eq!(c.buf.len(), SIZE, "its whole size to read into");
        assert_eq!(stats().allocated, 2);
        drop(b);
    }

    #[test]
    fn pool_keeps_a_bounded_number_of_tails_and_free_buffers() {
        let taken: Vec<Tail> = (0..TAILS_KEPT + 3)
            .map(|_| take(ROOM, SIZE, false).unwrap())
            .collect();
        for t in taken {
            give(t, ROOM);
        }
        let s = stats();
        assert_eq!((s.tails, s.spent), (TAILS_KEPT, 3));
        // Whole ones found free are kept up to FREE_KEPT, the others freed.
        POOL.with_borrow_mut(|p| {
            for t in std::mem::take(&mut p.spent) {
                p.release(t);
            }
            for t in std::mem::take(&mut p.tails) {
                p.release(t);
            }
        });
        let s = stats();
        assert_eq!(s.free, FREE_KEPT);
        assert_eq!(s.live_bytes, FREE_KEPT * SIZE);
        let again = take(ROOM, SIZE, true).unwrap();
        assert_eq!(stats().allocated, (TAILS_KEPT + 3) as u64, "a free one");
        assert_eq!(stats().free, FREE_KEPT - 1);
        drop(again);
    }

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn pool_wakes_its_waiters_once_a_buffer_comes_back() {
        configure(SIZE);
        let a = take(ROOM, SIZE, true).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        wait(&waker);
        wait(&waker);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        give(a, ROOM);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken once");
        let b = take(ROOM, SIZE, true).unwrap();
        let part = Tail {
            buf: BytesMut::new(),
            size: 0,
        };
        wait(&waker);
        give_part(part, ROOM);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!(stats().held, 1, "a part given back leaves the rest held");
        give(b, ROOM);
    }
}
