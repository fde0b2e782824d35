//! Fixtures shared by the benchmarks: frames of the sizes the benches and
//! perf/RESULTS.md talk about.

use bytes::Bytes;
use rsocket_proto::frame::{Frame, Payload, RequestResponse};
use rsocket_proto::metadata::{MimeType, WellKnownMime, put_bearer, put_entry, put_tag};

/// Composite metadata with a routing entry (`route`) and, optionally, a bearer token.
pub fn composite(route: &str, token: Option<&str>) -> Bytes {
    let mut routing = Vec::new();
    put_tag(&mut routing, route).expect("route fits a tag");
    let mut md = Vec::new();
    put_entry(
        &mut md,
        MimeType::WellKnown(WellKnownMime::ROUTING),
        &routing,
    )
    .expect("entry");
    if let Some(token) = token {
        let mut auth = Vec::new();
        put_bearer(&mut auth, token);
        put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::AUTHENTICATION),
            &auth,
        )
        .expect("entry");
    }
    Bytes::from(md)
}

/// A PAYLOAD frame of exactly `len` bytes (at least the 6-byte header).
pub fn payload_frame(len: usize) -> Bytes {
    let data = Bytes::from(vec![0x5A; len.saturating_sub(6)]);
    Frame::from(Payload {
        stream_id: 1,
        follows: false,
        complete: false,
        next: true,
        metadata: None,
        data,
    })
    .to_bytes()
}

/// A REQUEST_RESPONSE frame of exactly 64 bytes whose metadata is composite
/// routing (`svc.method`) metadata.
pub fn request_response_64() -> Bytes {
    let metadata = composite("com.example.Echo.hello", None);
    let overhead = 6 + 3 + metadata.len();
    let data = Bytes::from(vec![b'd'; 64 - overhead]);
    let frame = Frame::from(RequestResponse {
        stream_id: 1,
        follows: false,
        metadata: Some(metadata),
        data,
    })
    .to_bytes();
    assert_eq!(frame.len(), 64);
    frame
}
