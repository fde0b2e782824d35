//! Fixtures shared by the benchmarks: frames of the sizes the benches and
//! perf/RESULTS.md talk about. Metadata comes from
//! `rsocket_proto::metadata::build`, as clients write it.

use bytes::Bytes;
use rsocket_proto::frame::{Frame, Payload, RequestResponse};
use rsocket_proto::metadata::build::route;

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
    let metadata = route(&["com.example.Echo.hello"]).expect("the route fits a tag");
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
