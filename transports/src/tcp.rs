//! RSocket over TCP: frames with a 24-bit length prefix.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use rsocket_proto::OutFrame;

use crate::{FrameIo, ReadBuf, TransportError, WriteQueue};

/// Parts handed to one vectored write.
const MAX_PARTS_PER_WRITE: usize = 64;

/// A TCP connection carrying RSocket frames.
#[derive(Debug)]
pub struct TcpFrames {
    stream: TcpStream,
    read: ReadBuf,
    write: WriteQueue,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

impl TcpFrames {
    /// Wraps an accepted or connected stream; frames over `max_frame` bytes
    /// end the connection.
    pub fn new(stream: TcpStream, max_frame: usize) -> Self {
        // Small frames go out at once; batching happens above, one flush per pass.
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let local = stream.local_addr().ok();
        Self {
            stream,
            read: ReadBuf::new(max_frame),
            write: WriteQueue::default(),
            peer,
            local,
        }
    }

    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr, max_frame: usize) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await.map_err(io_error)?;
        Ok(Self::new(stream, max_frame))
    }

    /// This side's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Bytes its buffers hold beyond their base size: frames queued and
    /// not yet written, and a frame longer than usual on its way in.
    pub fn buffered_bytes(&self) -> usize {
        self.write.len() + self.read.oversize()
    }

    /// The parts queued for writing (for tests that check bodies are shared, not copied).
    pub fn write_queue(&mut self) -> &mut WriteQueue {
        &mut self.write
    }
}

impl FrameIo for TcpFrames {
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
            let spare = self.read.spare();
            match Pin::new(&mut self.stream).poll_read(cx, spare) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(false)),
                Poll::Ready(Ok(n)) => self.read.filled(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
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
        loop {
            // Small frames are already copied into one batch; large bodies
            // are parts of their own, shared with the buffers they arrived
            // in. One sendmsg takes them all, instead of a send per part.
            let mut iov = [IoSlice::new(&[]); MAX_PARTS_PER_WRITE];
            let parts = self.write.slices(&mut iov);
            if parts == 0 {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.stream).poll_write_vectored(cx, &iov[..parts]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(TransportError::Io(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => self.write.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Pin::new(&mut self.stream)
            .poll_close(cx)
            .map_err(TransportError::Io)
    }

    fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }
}

/// The `io::Error` inside a glommio error, keeping its kind.
pub fn io_error<T>(e: glommio::GlommioError<T>) -> io::Error {
    match e {
        glommio::GlommioError::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Binds `addr` for this executor. glommio sets SO_REUSEPORT, so every
/// shard binds the same address and the kernel spreads connections over
/// them; each connection stays on the shard that accepted it.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(io_error)
}
