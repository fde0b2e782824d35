//! Settings of a connection, and what a client sends in its SETUP.

use std::time::Duration;

use bytes::Bytes;

use crate::frame::MAX_U24;

/// Which end of the transport this side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opened the connection; sends SETUP; odd stream ids.
    Client,
    /// Accepted the connection; even stream ids.
    Server,
}

/// Settings of one connection: those of both roles here, those of one
/// role in [`ClientSettings`] and [`ServerSettings`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest frame this side sends; longer messages are fragmented.
    /// 0 means "only where a frame would not fit the 24-bit length".
    pub fragment_size: usize,
    /// Cap on one incoming fragmented message (metadata + data) when
    /// reassembling. Forwarded fragments are not buffered, so pass-through
    /// mode does not cap them.
    pub max_reassembled_size: usize,
    /// Cap on the bytes held by all incoming messages being reassembled at
    /// once; the message that would pass it ends its stream with REJECTED.
    pub max_reassembly_memory: usize,
    /// Deliver whole messages (reassembled) instead of each fragment.
    pub reassemble: bool,
    /// Most streams the peer may have open at once; requests beyond it get ERROR[REJECTED].
    pub max_inbound_streams: usize,
    /// Bytes of sent frames kept for resumption; 0 disables resume (a server
    /// then refuses SETUP with the R flag and every RESUME).
    pub resume_buffer: usize,
    /// What a client announces in SETUP, and its keepalive.
    pub client: ClientSettings,
    /// What a server accepts from a client.
    pub server: ServerSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fragment_size: 0,
            max_reassembled_size: MAX_U24,
            max_reassembly_memory: 64 << 20,
            reassemble: false,
            max_inbound_streams: 65_536,
            resume_buffer: 0,
            client: ClientSettings::default(),
            server: ServerSettings::default(),
        }
    }
}

/// Settings of the client role: what its SETUP announces.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Interval between its KEEPALIVE frames.
    pub keepalive_interval: Duration,
    /// How long the server may stay silent before it is considered dead.
    pub max_lifetime: Duration,
    /// Ask for LEASE semantics (the L flag).
    pub lease: bool,
    /// The resume token to offer in SETUP (resume needs
    /// [`Config::resume_buffer`] > 0 too).
    pub resume_token: Option<Bytes>,
    /// Metadata MIME type announced in SETUP.
    pub metadata_mime: Bytes,
    /// Data MIME type announced in SETUP.
    pub data_mime: Bytes,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(20),
            max_lifetime: Duration::from_secs(90),
            lease: false,
            resume_token: None,
            metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
            data_mime: Bytes::from_static(b"application/octet-stream"),
        }
    }
}

/// Settings of the server role: what it accepts from a client.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// How long a new connection may take to send SETUP or RESUME.
    pub setup_timeout: Duration,
    /// The max lifetime a client asks for in SETUP is clamped to
    /// `peer_lifetime.0 ..= peer_lifetime.1` (a client asking for hours of
    /// silence cannot pin a dead connection that long).
    pub peer_lifetime: (Duration, Duration),
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            setup_timeout: Duration::from_secs(30),
            peer_lifetime: (Duration::ZERO, Duration::MAX),
        }
    }
}

/// The metadata and data a client sends in its SETUP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetupPayload {
    /// Setup metadata.
    pub metadata: Option<Bytes>,
    /// Setup data.
    pub data: Bytes,
}
