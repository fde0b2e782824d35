//! A connection whose socket never runs dry must not starve the other tasks
//! on its thread: the driver reads a few times, then yields.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_client::{Client, ClientConfig};
use rsbroker_transports::{FrameIo, TransportError, WireBytes};
use rsocket_proto::frame::Keepalive;
use rsocket_proto::{Frame, OutFrame};

/// A peer that always has another frame ready (a KEEPALIVE that needs no
/// answer), up to `limit` frames, and takes every write at once.
struct Firehose {
    frame: Bytes,
    sent: Rc<Cell<u64>>,
    limit: u64,
}

impl FrameIo for Firehose {
    fn poll_read(
        &mut self,
        _cx: &mut Context<'_>,
        frames: &mut Vec<Bytes>,
    ) -> Poll<Result<bool, TransportError>> {
        if self.sent.get() >= self.limit {
            // Never woken again: a test that gets here has failed already.
            return Poll::Pending;
        }
        self.sent.set(self.sent.get() + 1);
        frames.push(self.frame.clone());
        Poll::Ready(Ok(true))
    }

    fn queue(&mut self, _frame: &OutFrame) -> Result<(), TransportError> {
        Ok(())
    }

    fn queued_bytes(&self) -> usize {
        0
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Poll::Ready(Ok(()))
    }

    fn peer(&self) -> Option<SocketAddr> {
        None
    }

    fn wire_bytes(&self) -> WireBytes {
        WireBytes::default()
    }
}

#[test]
fn a_busy_connection_lets_other_tasks_run() {
    let seen_at = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(|| async {
            let mut buf = BytesMut::new();
            Frame::Keepalive(Keepalive {
                respond: false,
                last_received_position: 0,
                data: Bytes::new(),
            })
            .encode(&mut buf);
            let sent = Rc::new(Cell::new(0u64));
            let limit = 1_000_000;
            let client = Client::builder(ClientConfig::default()).start(Firehose {
                frame: buf.freeze(),
                sent: sent.clone(),
                limit,
            });
            // Another task on the same thread: how many frames had the
            // busy connection read by the time it first ran?
            let other = glommio::spawn_local({
                let sent = sent.clone();
                async move { sent.get() }
            });
            let seen_at = other.await;
            client.abort();
            seen_at
        })
        .unwrap()
        .join()
        .unwrap();
    // Without a bound the driver read all 1 000 000 frames first.
    assert!(
        seen_at < 1_000,
        "the other task ran only after {seen_at} frames"
    );
}
