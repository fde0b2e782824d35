//! Byte streams frames travel on (TCP, TLS over TCP), and RSocket's
//! length-prefixed framing over any of them.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rsocket_proto::OutFrame;
use rsocket_proto::codec::pool;

use crate::{FrameIo, ReadBuf, TransportError, WireBytes, WriteQueue};

/// How soon a read that found the receive buffers all in use tries again.
const POOL_RETRY: std::time::Duration = std::time::Duration::from_millis(1);

/// Parts handed to one vectored write.
const MAX_PARTS_PER_WRITE: usize = 64;

/// A connected byte stream.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin {
    /// The peer's address.
    fn peer_addr(&self) -> Option<SocketAddr>;

    /// This side's address.
    fn local_addr(&self) -> Option<SocketAddr>;

    /// Bytes on the wire, for streams that change what passes through them
    /// (TLS); `None` when the bytes read and written are the wire's.
    fn wire_bytes(&self) -> Option<WireBytes> {
        None
    }
}

impl ByteStream for TcpStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        TcpStream::peer_addr(self).ok()
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        TcpStream::local_addr(self).ok()
    }
}

/// Writes what `write` holds to `stream` until it is empty or the stream
/// is full, counting the bytes in `passed`; then flushes the stream. Small
/// frames are already copied into one batch; large bodies are parts of
/// their own, shared with the buffers they arrived in: one sendmsg takes
/// them all, instead of a send per part.
pub(crate) fn poll_write_queue<S: AsyncWrite + Unpin>(
    stream: &mut S,
    write: &mut WriteQueue,
    passed: &mut WireBytes,
    cx: &mut Context<'_>,
) -> Poll<Result<(), TransportError>> {
    loop {
        let mut iov = [IoSlice::new(&[]); MAX_PARTS_PER_WRITE];
        let parts = write.slices(&mut iov);
        if parts == 0 {
            return Pin::new(&mut *stream)
                .poll_flush(cx)
                .map_err(TransportError::Io);
        }
        let iov = iov.get(..parts).unwrap_or(&iov);
        match Pin::new(&mut *stream).poll_write_vectored(cx, iov) {
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err(TransportError::Io(io::ErrorKind::WriteZero.into())));
            }
            Poll::Ready(Ok(n)) => {
                passed.add_written(n);
                write.advance(n);
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// What the first bytes of a connection are, when they are another
/// protocol: read as a length prefix they would announce a frame of
/// megabytes and the connection would wait for it. A SETUP's prefix starts
/// 0x00 for any SETUP under 64 KiB.
pub(crate) fn other_protocol(first: &[u8]) -> Option<&'static str> {
    match first {
        [0x16, 0x03, ..] => Some("a TLS handshake"),
        [b'G', b'E', b'T', b' ', ..]
        | [b'P', b'O', b'S', b'T', ..]
        | [b'H', b'E', b'A', b'D', ..]
        | [b'P', b'U', b'T', b' ', ..] => Some("an HTTP request"),
        _ => None,
    }
}

/// RSocket frames with the 24-bit length prefix over a byte stream.
#[derive(Debug)]
pub struct Prefixed<S> {
    stream: S,
    read: ReadBuf,
    write: WriteQueue,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    /// Bytes through the stream (the wire's, unless the stream says otherwise).
    passed: WireBytes,
    /// Wakes a read that found the shard's receive buffers all in use.
    retry: Option<glommio::timer::Timer>,
}

impl Prefixed<TcpStream> {
    pub(crate) fn tcp(stream: TcpStream, max_frame: usize) -> Self {
        // Small frames go out at once; batching happens above, one flush per pass.
        let _ = stream.set_nodelay(true);
        Self::over(stream, max_frame)
    }
}

impl<S: ByteStream> Prefixed<S> {
    /// Frames over `stream`; frames over `max_frame` bytes end the connection.
    pub fn over(stream: S, max_frame: usize) -> Self {
        let peer = stream.peer_addr();
        let local = stream.local_addr();
        Self {
            stream,
            read: ReadBuf::new(max_frame),
            write: WriteQueue::default(),
            peer,
            local,
            passed: WireBytes::default(),
            retry: None,
        }
    }

    /// This side's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The byte stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The parts queued for writing (for tests that check bodies are shared, not copied).
    pub fn write_queue(&mut self) -> &mut WriteQueue {
        &mut self.write
    }
}

impl<S: ByteStream> FrameIo for Prefixed<S> {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Bytes>,
    ) -> Poll<Result<bool, TransportError>> {
        let mut got = false;
        loop {
            while let Some(frame) = self.read.next_frame().map_err(TransportError::Decode)? {
                frames.push(frame);
                got = true;
            }
            if got {
                return Poll::Ready(Ok(true));
            }
            let Some(spare) = self.read.spare() else {
                // The shard's receive buffers are all in use: read again
                // once one comes back, or after a moment (the frames that
                // hold them go as other connections write them out).
                pool::wait(cx.waker());
                let retry = self
                    .retry
                    .get_or_insert_with(|| glommio::timer::Timer::new(POOL_RETRY));
                if Pin::new(retry).poll(cx).is_ready() {
                    self.retry = None;
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            };
            match Pin::new(&mut self.stream).poll_read(cx, spare) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(false)),
                Poll::Ready(Ok(n)) => {
                    if self.passed.read == 0
                        && let Some(what) = other_protocol(spare.get(..n).unwrap_or_default())
                    {
                        return Poll::Ready(Err(TransportError::Io(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{what} on a port for length-prefixed RSocket frames"),
                        ))));
                    }
                    self.passed.add_read(n);
                    self.read.filled(n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {
                    self.read.park();
                    return Poll::Pending;
                }
            }
        }
    }

    fn queue(&mut self, frame: &OutFrame) -> Result<(), TransportError> {
        self.write
            .push_prefixed(frame)
            .map_err(TransportError::TooLong)
    }

    fn queued_bytes(&self) -> usize {
        self.write.len()
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        poll_write_queue(&mut self.stream, &mut self.write, &mut self.passed, cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Pin::new(&mut self.stream)
            .poll_close(cx)
            .map_err(TransportError::Io)
    }

    fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn wire_bytes(&self) -> WireBytes {
        self.stream.wire_bytes().unwrap_or(self.passed)
    }

    fn buffered_bytes(&self) -> usize {
        self.write.len() + self.read.frame_bytes()
    }
}
