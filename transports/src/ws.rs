//! RSocket over WebSocket: one RSocket frame per binary message, no length
//! prefix (the framing the RSocket spec gives message transports).
//!
//! tungstenite parses and formats the WebSocket frame headers and derives
//! the upgrade's accept key; the frames themselves are cut out of our own
//! receive buffer and unmasked in place, so a message's bytes are the
//! bytes the broker forwards. Runs over any [`ByteStream`]: TCP for
//! `ws://`, TLS for `wss://`.

use std::io::{self, Cursor};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use rsocket_proto::codec::Message;
use rsocket_proto::{DecodeError, OutFrame};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::stream::{ByteStream, poll_write_queue};
use crate::{FrameIo, TransportError, WireBytes, WriteQueue};

/// Longest HTTP upgrade request or response accepted.
pub const MAX_UPGRADE: usize = 8 * 1024;
/// Smallest free room a read is given.
const MIN_READ: usize = 16 * 1024;
/// Receive buffers are at least this large.
const BUF_SIZE: usize = 128 * 1024;
/// The longest WebSocket frame header.
const MAX_HEADER: usize = 14;

/// WebSocket close codes the broker sends (RFC 6455, 7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// A protocol error (an unmasked client frame, reserved bits or opcodes).
    pub const PROTOCOL: u16 = 1002;
    /// Data of a type the endpoint does not accept (a text message).
    pub const UNSUPPORTED: u16 = 1003;
    /// A message larger than the endpoint accepts.
    pub const TOO_BIG: u16 = 1009;
}

/// Which side of the connection this is: clients mask what they send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Accepted the upgrade.
    Server,
    /// Asked for it.
    Client,
}

/// A WebSocket connection carrying RSocket frames.
pub struct WsFrames<S> {
    stream: S,
    role: Role,
    max_frame: usize,
    /// From the start of the message in progress to the end of the buffer;
    /// all of it initialised.
    buf: BytesMut,
    filled: usize,
    /// Bytes the message in progress still needs.
    need: usize,
    /// A message split over continuation frames, joined here.
    partial: Option<BytesMut>,
    write: WriteQueue,
    /// The close code this side sends when it closes.
    close_code: u16,
    close_sent: bool,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    passed: WireBytes,
    mask_seed: u64,
}

impl<S> std::fmt::Debug for WsFrames<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsFrames")
            .field("role", &self.role)
            .field("peer", &self.peer)
            .finish()
    }
}

fn protocol_error(what: impl Into<String>) -> TransportError {
    TransportError::Io(io::Error::new(io::ErrorKind::InvalidData, what.into()))
}

/// XORs `data` with the 4-byte `mask`, starting at mask byte 0.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        if let Ok(bytes) = <[u8; 4]>::try_from(&*c) {
            c.copy_from_slice(&(u32::from_ne_bytes(bytes) ^ word).to_ne_bytes());
        }
    }
    for (b, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *b ^= m;
    }
}

impl<S: ByteStream> WsFrames<S> {
    fn new(stream: S, role: Role, max_frame: usize, leftover: &[u8]) -> Self {
        let peer = stream.peer_addr();
        let local = stream.local_addr();
        let mut buf = BytesMut::zeroed(BUF_SIZE.max(leftover.len() + MIN_READ));
        if let Some(dst) = buf.get_mut(..leftover.len()) {
            dst.copy_from_slice(leftover);
        }
        use std::hash::{BuildHasher, Hasher};
        let mask_seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            | 1;
        Self {
            stream,
            role,
            max_frame: max_frame.clamp(
                rsocket_proto::frame::HEADER_LEN,
                rsocket_proto::frame::MAX_U24,
            ),
            buf,
            filled: leftover.len(),
            need: 0,
            partial: None,
            write: WriteQueue::default(),
            close_code: close_code::NORMAL,
            close_sent: false,
            peer,
            local,
            passed: WireBytes::default(),
            mask_seed,
        }
    }

    /// This side's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The byte stream under the WebSocket.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift64: masks need only be unpredictable to scripts in a
        // browser, which this client is not.
        let mut x = self.mask_seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.mask_seed = x;
        (x as u32).to_ne_bytes()
    }

    /// Queues a WebSocket frame with `payload` (a control frame, or a
    /// copy to be masked).
    fn queue_control(&mut self, opcode: OpCode, payload: &[u8]) {
        let mask = (self.role == Role::Client).then(|| self.next_mask());
        let header = FrameHeader {
            opcode,
            mask,
            ..FrameHeader::default()
        };
        let mut head = Vec::with_capacity(MAX_HEADER + payload.len());
        if header.format(payload.len() as u64, &mut head).is_err() {
            return;
        }
        let start = head.len();
        head.extend_from_slice(payload);
        if let (Some(m), Some(body)) = (mask, head.get_mut(start..)) {
            unmask(body, m);
        }
        self.write.push_header(&head);
    }

    /// Queues a Close frame with `code`, once.
    fn queue_close(&mut self, code: u16) {
        if !self.close_sent {
            self.close_sent = true;
            self.queue_control(OpCode::Control(Control::Close), &code.to_be_bytes());
        }
    }

    /// Refuses the connection's input with `code`: the Close frame goes
    /// out now if the socket takes it (the read side ends with an error).
    fn refuse(&mut self, cx: &mut Context<'_>, code: u16, why: &str) -> TransportError {
        self.close_code = code;
        self.queue_close(code);
        let _ = self.poll_flush(cx);
        protocol_error(why.to_owned())
    }

    /// Room to read into, moving the message in progress to a new buffer
    /// when it would not fit in what is left.
    fn make_room(&mut self) {
        let want = self.need.max(MIN_READ);
        if self.buf.len() - self.filled < want {
            let size = (self.filled + want).max(BUF_SIZE);
            let mut fresh = BytesMut::zeroed(size);
            if let (Some(dst), Some(src)) =
                (fresh.get_mut(..self.filled), self.buf.get(..self.filled))
            {
                dst.copy_from_slice(src);
            }
            self.buf = fresh;
        }
    }

    /// Cuts the messages buffered; `Ok(false)` when the peer sent Close.
    fn cut(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Bytes>,
    ) -> Result<bool, TransportError> {
        loop {
            let parsed = {
                let mut cursor = Cursor::new(self.buf.get(..self.filled).unwrap_or_default());
                FrameHeader::parse(&mut cursor)
                    .map(|found| found.map(|(h, len)| (h, len, cursor.position() as usize)))
            };
            let parsed = match parsed {
                Ok(p) => p,
                Err(e) => {
                    return Err(self.refuse(cx, close_code::PROTOCOL, &format!("WebSocket: {e}")));
                }
            };
            let Some((header, len, head)) = parsed else {
                self.need = MAX_HEADER.saturating_sub(self.filled);
                return Ok(true);
            };
            let joined = self.partial.as_ref().map_or(0, BytesMut::len) as u64;
            if len.saturating_add(joined) > self.max_frame as u64 {
                self.close_code = close_code::TOO_BIG;
                return Err(TransportError::Decode(DecodeError::FrameTooLarge {
                    len: usize::try_from(len.saturating_add(joined)).unwrap_or(usize::MAX),
                    max: self.max_frame,
                }));
            }
            let total = head + len as usize;
            if self.filled < total {
                self.need = total - self.filled;
                return Ok(true);
            }
            self.need = 0;
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(self.refuse(cx, close_code::PROTOCOL, "WebSocket: reserved bits set"));
            }
            if self.role == Role::Server && header.mask.is_none() {
                return Err(self.refuse(
                    cx,
                    close_code::PROTOCOL,
                    "WebSocket: a client frame was not masked",
                ));
            }
            let mut payload = self.buf.split_to(total);
            self.filled -= total;
            payload.advance(head);
            if let Some(mask) = header.mask {
                unmask(&mut payload, mask);
            }
            match header.opcode {
                OpCode::Data(Data::Binary) if header.is_final && self.partial.is_none() => {
                    frames.push(self.frame(payload.freeze())?);
                }
                OpCode::Data(Data::Binary) if self.partial.is_none() => {
                    self.partial = Some(payload);
                }
                OpCode::Data(Data::Continue) if self.partial.is_some() => {
                    if let Some(p) = self.partial.as_mut() {
                        p.extend_from_slice(&payload);
                    }
                    if header.is_final
                        && let Some(p) = self.partial.take()
                    {
                        frames.push(self.frame(p.freeze())?);
                    }
                }
                OpCode::Data(Data::Text) => {
                    return Err(self.refuse(
                        cx,
                        close_code::UNSUPPORTED,
                        "WebSocket: a text message (RSocket frames travel in binary messages)",
                    ));
                }
                OpCode::Control(Control::Ping) => {
                    self.queue_control(OpCode::Control(Control::Pong), &payload);
                }
                OpCode::Control(Control::Pong) => {}
                OpCode::Control(Control::Close) => {
                    // Answered with the same code; the stream ends here.
                    let code = payload
                        .get(..2)
                        .and_then(|c| <[u8; 2]>::try_from(c).ok())
                        .map_or(close_code::NORMAL, u16::from_be_bytes);
                    self.queue_close(code);
                    let _ = self.poll_flush(cx);
                    return Ok(false);
                }
                _ => {
                    return Err(self.refuse(
                        cx,
                        close_code::PROTOCOL,
                        "WebSocket: unexpected opcode or continuation",
                    ));
                }
            }
        }
    }

    fn frame(&mut self, message: Bytes) -> Result<Bytes, TransportError> {
        Message::new(self.max_frame)
            .decode(message)
            .map_err(TransportError::Decode)
    }
}

impl<S: ByteStream> FrameIo for WsFrames<S> {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Bytes>,
    ) -> Poll<Result<bool, TransportError>> {
        loop {
            let before = frames.len();
            let open = self.cut(cx, frames)?;
            if frames.len() > before {
                return Poll::Ready(Ok(true));
            }
            if !open {
                return Poll::Ready(Ok(false));
            }
            self.make_room();
            let spare = self.buf.get_mut(self.filled..).unwrap_or_default();
            match Pin::new(&mut self.stream).poll_read(cx, spare) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(false)),
                Poll::Ready(Ok(n)) => {
                    self.passed.add_read(n);
                    self.filled += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn queue(&mut self, frame: &OutFrame) -> Result<(), TransportError> {
        if self.close_sent {
            return Ok(());
        }
        // Clients mask what they send (RFC 6455, 5.3), so their frames are
        // copied; a server's large parts are written from their buffers.
        let mask = (self.role == Role::Client).then(|| self.next_mask());
        let header = FrameHeader {
            opcode: OpCode::Data(Data::Binary),
            mask,
            ..FrameHeader::default()
        };
        let mut head = [0u8; MAX_HEADER];
        let mut w = Cursor::new(&mut head[..]);
        header
            .format(frame.len() as u64, &mut w)
            .map_err(|e| protocol_error(format!("WebSocket: {e}")))?;
        let n = w.position() as usize;
        self.write.push_header(head.get(..n).unwrap_or_default());
        match mask {
            None => self.write.push_bare(frame),
            Some(m) => self
                .write
                .push_copy_with(frame, |payload| unmask(payload, m)),
        }
        Ok(())
    }

    fn queued_bytes(&self) -> usize {
        self.write.len()
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        poll_write_queue(&mut self.stream, &mut self.write, &mut self.passed, cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let code = self.close_code;
        self.queue_close(code);
        match self.poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
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
        self.write.len()
            + self.buf.len().saturating_sub(BUF_SIZE)
            + self.partial.as_ref().map_or(0, BytesMut::len)
    }
}

/// Why an upgrade was refused.
#[derive(Debug)]
pub struct UpgradeError {
    /// What was wrong, for the log.
    pub reason: String,
    /// The HTTP status sent back (0: none, the connection just closed).
    pub status: u16,
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.status == 0 {
            f.write_str(&self.reason)
        } else {
            write!(f, "{} (answered HTTP {})", self.reason, self.status)
        }
    }
}

impl std::error::Error for UpgradeError {}

/// Reads an HTTP head (up to the blank line), at most [`MAX_UPGRADE`] bytes.
/// Returns it and the bytes read after it.
async fn read_head<S: ByteStream>(stream: &mut S) -> Result<(Vec<u8>, Vec<u8>), UpgradeError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| UpgradeError {
            reason: format!("reading the HTTP upgrade failed: {e}"),
            status: 0,
        })?;
        if n == 0 {
            return Err(UpgradeError {
                reason: "the peer closed the connection before the WebSocket upgrade".into(),
                status: 0,
            });
        }
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(at) = head
            .get(from..)
            .and_then(|tail| tail.windows(4).position(|w| w == b"\r\n\r\n"))
        {
            let end = from + at + 4;
            let rest = head.split_off(end);
            return Ok((head, rest));
        }
        // Bytes that cannot begin an HTTP message are refused at once,
        // not after the handshake timeout.
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let valid = if head.starts_with(b"HTTP/") {
            httparse::Response::new(&mut headers).parse(&head).is_ok()
        } else {
            httparse::Request::new(&mut headers).parse(&head).is_ok()
        };
        if !valid {
            return Err(UpgradeError {
                reason: "not an HTTP request".into(),
                status: 400,
            });
        }
        if head.len() > MAX_UPGRADE {
            return Err(UpgradeError {
                reason: format!("the HTTP upgrade request is longer than {MAX_UPGRADE} bytes"),
                status: 431,
            });
        }
    }
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Accepts the WebSocket upgrade on `path` (the request's query is
/// ignored). A request that is not an upgrade to `path` is answered with
/// its HTTP error status and refused.
pub async fn accept<S: ByteStream>(
    mut stream: S,
    path: &str,
    max_frame: usize,
) -> Result<WsFrames<S>, UpgradeError> {
    let answer = match read_head(&mut stream).await {
        Ok((head, rest)) => check_upgrade(&head, path).map(|response| (response, rest)),
        Err(e) => Err(e),
    };
    match answer {
        Ok((response, rest)) => {
            stream
                .write_all(response.as_bytes())
                .await
                .map_err(|e| UpgradeError {
                    reason: format!("answering the upgrade failed: {e}"),
                    status: 0,
                })?;
            let _ = stream.flush().await;
            Ok(WsFrames::new(stream, Role::Server, max_frame, &rest))
        }
        Err(e) => {
            if e.status != 0 {
                let reason = match e.status {
                    400 => "Bad Request",
                    404 => "Not Found",
                    405 => "Method Not Allowed",
                    426 => "Upgrade Required",
                    431 => "Request Header Fields Too Large",
                    _ => "Error",
                };
                let body = format!("{}\n", e.reason);
                let response = format!(
                    "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Sec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n{body}",
                    e.status,
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.flush().await;
                let _ = stream.close().await;
            }
            Err(e)
        }
    }
}

/// The 101 response to `head`, or why it is refused.
fn check_upgrade(head: &[u8], path: &str) -> Result<String, UpgradeError> {
    let bad = |status: u16, reason: &str| UpgradeError {
        reason: reason.to_owned(),
        status,
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad(400, "not an HTTP request")),
    }
    if req.method != Some("GET") {
        return Err(bad(405, "a WebSocket upgrade is a GET"));
    }
    let target = req.path.unwrap_or_default();
    let asked = target.split('?').next().unwrap_or_default();
    if asked != path {
        return Err(UpgradeError {
            reason: format!("no WebSocket endpoint at {asked:?} (it is at {path:?})"),
            status: 404,
        });
    }
    let h = req.headers;
    if !has_token(header(h, "upgrade"), "websocket")
        || !has_token(header(h, "connection"), "upgrade")
    {
        return Err(bad(426, "not a WebSocket upgrade"));
    }
    if header(h, "sec-websocket-version") != Some("13") {
        return Err(bad(426, "only WebSocket version 13 is spoken"));
    }
    let Some(key) = header(h, "sec-websocket-key") else {
        return Err(bad(400, "no Sec-WebSocket-Key"));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let protocol = if has_token(header(h, "sec-websocket-protocol"), "rsocket") {
        "Sec-WebSocket-Protocol: rsocket\r\n"
    } else {
        ""
    };
    Ok(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    ))
}

/// Asks for the WebSocket upgrade of `path` at `host` over `stream`.
pub async fn connect<S: ByteStream>(
    mut stream: S,
    host: &str,
    path: &str,
    max_frame: usize,
) -> io::Result<WsFrames<S>> {
    let key = tungstenite::handshake::client::generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let (head, rest) = read_head(&mut stream)
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let refused = |why: String| io::Error::new(io::ErrorKind::ConnectionRefused, why);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(refused("the WebSocket upgrade got no HTTP response".into())),
    }
    if response.code != Some(101) {
        return Err(refused(format!(
            "the WebSocket upgrade of {path} was refused: HTTP {}",
            response.code.unwrap_or(0)
        )));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if header(response.headers, "sec-websocket-accept") != Some(expected.as_str()) {
        return Err(refused(
            "the WebSocket upgrade's accept key is wrong".into(),
        ));
    }
    Ok(WsFrames::new(stream, Role::Client, max_frame, &rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmask_is_its_own_inverse_at_any_length() {
        for len in 0..20 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut d = data.clone();
            unmask(&mut d, [1, 2, 3, 4]);
            if len > 0 {
                assert_ne!(d, data);
            }
            assert_eq!(d.first().copied(), data.first().map(|b| b ^ 1));
            unmask(&mut d, [1, 2, 3, 4]);
            assert_eq!(d, data);
        }
    }

    #[test]
    fn upgrade_checks() {
        let ok = b"GET /rsocket?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let r = check_upgrade(ok, "/rsocket").unwrap();
        // RFC 6455's own example key and answer.
        assert!(
            r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{r}"
        );
        assert_eq!(check_upgrade(ok, "/other").unwrap_err().status, 404);
        assert_eq!(
            check_upgrade(b"garbage\r\n\r\n", "/rsocket")
                .unwrap_err()
                .status,
            400
        );
        let post = b"POST /rsocket HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(check_upgrade(post, "/rsocket").unwrap_err().status, 405);
        let plain = b"GET /rsocket HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(check_upgrade(plain, "/rsocket").unwrap_err().status, 426);
    }
}
