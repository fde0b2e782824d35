//! A plain TCP RSocket peer that writes whatever frames (or bytes) a case
//! wants and reads what the broker answers, with timeouts: the attacker.
#![allow(unreachable_pub, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rsbroker_client::AppConfig;
use rsbroker_client::metadata::route;
use rsocket_proto::codec::{ReadBuf, put_prefixed};
use rsocket_proto::frame::{Frame, RequestResponse, RequestStream, Setup, VERSION};
use rsocket_proto::{ErrorCode, FrameType, FrameView, OutFrame};

/// What reading brought.
#[derive(Debug)]
pub enum Next {
    Frame(FrameView),
    /// The broker closed the connection.
    Closed,
    /// Nothing within the time given.
    Quiet,
}

pub struct Raw {
    pub s: TcpStream,
    buf: ReadBuf,
    /// Frames cut and not yet returned.
    ready: std::collections::VecDeque<Bytes>,
    eof: bool,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).expect("connect");
        let _ = s.set_nodelay(true);
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        Self {
            s,
            buf: ReadBuf::new(rsocket_proto::frame::MAX_U24),
            ready: std::collections::VecDeque::new(),
            eof: false,
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.s.local_addr().expect("local address")
    }

    pub fn send(&mut self, frame: impl Into<Frame>) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        put_prefixed(&mut out, &OutFrame::from_owned(frame.into())).expect("frame fits");
        self.s.write_all(&out)
    }

    /// Frames back to back in one write.
    pub fn send_all(&mut self, frames: impl IntoIterator<Item = Frame>) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        for f in frames {
            put_prefixed(&mut out, &OutFrame::from_owned(f)).expect("frame fits");
        }
        self.s.write_all(&out)
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }

    /// SETUP of a plain requester.
    pub fn setup(&mut self, keepalive_ms: u32, lifetime_ms: u32) {
        self.send(setup_frame(keepalive_ms, lifetime_ms, None))
            .expect("SETUP sent");
    }

    /// SETUP registering app `uuid` as serving `service`.
    pub fn setup_app(&mut self, uuid: &str, service: &str, keepalive_ms: u32, lifetime_ms: u32) {
        let app = AppConfig {
            name: uuid.into(),
            uuid: uuid.into(),
            power_rating: 1,
        };
        let md = rsbroker_client::metadata::setup(
            Some(&app),
            &[(String::new(), service.into(), String::new())],
        );
        self.send(setup_frame(keepalive_ms, lifetime_ms, md))
            .expect("SETUP sent");
    }

    /// The next frame, or what happened instead, within `within`.
    pub fn next(&mut self, within: Duration) -> Next {
        let deadline = Instant::now() + within;
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Next::Frame(
                    FrameView::parse(frame).expect("the broker sends valid frames"),
                );
            }
            if self.eof {
                return Next::Closed;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Next::Quiet;
            };
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 64 << 10];
            match self.s.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    let mut frames = Vec::new();
                    if let Err(e) = self.buf.feed(&chunk[..n], &mut frames) {
                        panic!("the broker sent bytes that are not frames: {e}");
                    }
                    self.ready.extend(frames);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.eof = true,
            }
        }
    }

    /// Reads until a frame `want` accepts (skipping the others); panics on
    /// close or silence.
    pub fn until(
        &mut self,
        within: Duration,
        what: &str,
        mut want: impl FnMut(&FrameView) -> bool,
    ) -> FrameView {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Frame(f) if want(&f) => return f,
                Next::Frame(_) => {}
                other => panic!("waiting for {what}: {other:?}"),
            }
        }
    }

    /// Reads until an ERROR with `code` on `stream`.
    pub fn expect_error(&mut self, within: Duration, stream: u32, code: ErrorCode) -> String {
        let f = self.until(within, &format!("ERROR {code} on stream {stream}"), |f| {
            f.frame_type() == FrameType::Error && f.stream_id() == stream
        });
        assert_eq!(
            f.error_code(),
            Some(code),
            "stream {stream}: {}",
            String::from_utf8_lossy(f.data_slice())
        );
        String::from_utf8_lossy(f.data_slice()).into_owned()
    }

    /// Whether the broker closes the connection within `within` (what it
    /// sends meanwhile is read and dropped).
    pub fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Closed => return true,
                Next::Quiet => return false,
                Next::Frame(_) => {}
            }
        }
    }
}

pub fn setup_frame(keepalive_ms: u32, lifetime_ms: u32, metadata: Option<Bytes>) -> Frame {
    Frame::Setup(Setup {
        version: VERSION,
        keepalive_interval: keepalive_ms,
        max_lifetime: lifetime_ms,
        resume_token: None,
        lease: false,
        metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
        data_mime: Bytes::from_static(b"application/octet-stream"),
        metadata,
        data: Bytes::new(),
    })
}

pub fn rr(stream_id: u32, service: &str, data: &str) -> Frame {
    Frame::RequestResponse(RequestResponse {
        stream_id,
        follows: false,
        metadata: Some(route(&[service])),
        data: Bytes::from(data.to_owned()),
    })
}

pub fn stream(stream_id: u32, service: &str, initial_n: u32) -> Frame {
    Frame::RequestStream(RequestStream {
        stream_id,
        follows: false,
        initial_n,
        metadata: Some(route(&[service])),
        data: Bytes::new(),
    })
}
