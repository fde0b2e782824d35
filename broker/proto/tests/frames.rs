//! One test per frame type: the exact bytes of a typed frame, and the
//! fields read back from them.

use bytes::Bytes;
use rsocket_proto::frame::*;
use rsocket_proto::{DecodeError, ErrorCode};

fn hex(s: &str) -> Bytes {
    let s: String = s.split_whitespace().collect();
    Bytes::from(
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<_>>(),
    )
}

fn check(frame: impl Into<Frame>, wire: &str) -> FrameView {
    let frame = frame.into();
    let wire = hex(wire);
    assert_eq!(frame.to_bytes(), wire);
    assert_eq!(Frame::decode(wire.clone()).unwrap(), frame);
    FrameView::parse(wire).unwrap()
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

#[test]
fn setup() {
    let v = check(
        Setup {
            version: VERSION,
            keepalive_interval: 500,
            max_lifetime: 30_000,
            resume_token: Some(b("tok")),
            lease: true,
            metadata_mime: b("m/x"),
            data_mime: b("d"),
            metadata: Some(b("MD")),
            data: b("DATA"),
        },
        "00000000 05c0 0001 0000 000001f4 00007530 0003 746f6b 03 6d2f78 01 64 000002 4d44 44415441",
    );
    assert_eq!(v.frame_type(), FrameType::Setup);
    assert!(
        v.flags()
            .has(Flags::RESUME_ENABLE | Flags::LEASE | Flags::METADATA)
    );
    assert_eq!(v.metadata_slice(), Some(&b"MD"[..]));
    assert_eq!(v.data_slice(), b"DATA");
}

#[test]
fn lease() {
    let v = check(
        Lease {
            ttl: 1000,
            number_of_requests: 5,
            metadata: Some(b("md")),
        },
        "00000000 0900 000003e8 00000005 6d64",
    );
    assert_eq!(
        v.metadata_slice(),
        Some(&b"md"[..]),
        "LEASE metadata has no length field"
    );
    check(
        Lease {
            ttl: 1,
            number_of_requests: 2,
            metadata: None,
        },
        "00000000 0800 00000001 00000002",
    );
}

#[test]
fn keepalive() {
    let v = check(
        Keepalive {
            respond: true,
            last_received_position: 42,
            data: b("ping"),
        },
        "00000000 0c80 000000000000002a 70696e67",
    );
    assert_eq!(v.data_slice(), b"ping");
}

#[test]
fn request_response() {
    let v = check(
        RequestResponse {
            stream_id: 1,
            follows: true,
            metadata: Some(b("m")),
            data: b("d"),
        },
        "00000001 1180 000001 6d 64",
    );
    assert!(v.follows());
    check(
        RequestResponse {
            stream_id: 3,
            follows: false,
            metadata: None,
            data: b("d"),
        },
        "00000003 1000 64",
    );
}

#[test]
fn into_parts_gives_the_metadata_and_the_data() {
    let v = FrameView::parse(hex("00000001 1180 000002 6d6d 6464")).unwrap();
    assert_eq!(v.into_parts(), (Some(b("mm")), b("dd")));
    let v = FrameView::parse(hex("00000003 1000 64")).unwrap();
    assert_eq!(v.into_parts(), (None, b("d")));
    let v = FrameView::parse(hex("00000003 2960 000001 6d")).unwrap();
    assert_eq!(v.into_parts(), (Some(b("m")), Bytes::new()));
}

#[test]
fn request_fnf() {
    check(
        RequestFnf {
            stream_id: 5,
            follows: false,
            metadata: Some(Bytes::new()),
            data: Bytes::new(),
        },
        "00000005 1500 000000",
    );
}

#[test]
fn request_stream() {
    let v = check(
        RequestStream {
            stream_id: 7,
            follows: false,
            initial_n: 3,
            metadata: None,
            data: b("x"),
        },
        "00000007 1800 00000003 78",
    );
    assert_eq!(v.request_n(), 3);
}

#[test]
fn request_channel() {
    let v = check(
        RequestChannel {
            stream_id: 9,
            follows: false,
            complete: true,
            initial_n: 0x7FFF_FFFF,
            metadata: Some(b("m")),
            data: Bytes::new(),
        },
        "00000009 1d40 7fffffff 000001 6d",
    );
    assert!(v.complete());
    assert_eq!(v.request_n(), MAX_REQUEST_N);
}

#[test]
fn request_n() {
    let v = check(
        RequestN {
            stream_id: 2,
            n: 10,
        },
        "00000002 2000 0000000a",
    );
    assert_eq!(v.request_n(), 10);
}

#[test]
fn cancel() {
    check(Cancel { stream_id: 4 }, "00000004 2400");
}

#[test]
fn payload() {
    let v = check(
        Payload {
            stream_id: 1,
            follows: false,
            complete: true,
            next: true,
            metadata: Some(b("m")),
            data: b("d"),
        },
        "00000001 2960 000001 6d 64",
    );
    assert!(v.next() && v.complete() && !v.follows());
    let v = check(
        Payload {
            stream_id: 1,
            follows: true,
            complete: true,
            next: false,
            metadata: None,
            data: Bytes::new(),
        },
        "00000001 28c0",
    );
    assert!(!v.follows(), "F with C set is ignored");
}

#[test]
fn error() {
    let v = check(
        ErrorFrame {
            stream_id: 0,
            code: ErrorCode::INVALID_SETUP,
            data: b("bad"),
        },
        "00000000 2c00 00000001 626164",
    );
    assert_eq!(v.error_code(), Some(ErrorCode::INVALID_SETUP));
    let Frame::Error(e) = Frame::from_view(&v).unwrap() else {
        panic!()
    };
    assert_eq!(e.message(), "bad");
}

#[test]
fn metadata_push() {
    let v = check(
        MetadataPush {
            metadata: b("meta"),
        },
        "00000000 3100 6d657461",
    );
    assert_eq!(v.metadata_slice(), Some(&b"meta"[..]), "no length field");
}

#[test]
fn resume() {
    check(
        Resume {
            version: VERSION,
            token: b("t"),
            last_received_server_position: 7,
            first_available_client_position: 3,
        },
        "00000000 3400 0001 0000 0001 74 0000000000000007 0000000000000003",
    );
}

#[test]
fn resume_ok() {
    check(
        ResumeOk {
            last_received_client_position: 99,
        },
        "00000000 3800 0000000000000063",
    );
}

#[test]
fn ext() {
    let v = check(
        Ext {
            stream_id: 1,
            ignore: true,
            extended_type: 77,
            metadata: Some(b("m")),
            data: b("d"),
        },
        "00000001 ff00 0000004d 000001 6d 64",
    );
    assert!(v.ignore());
}

#[test]
fn structural_errors_are_reported_not_panicked() {
    assert!(matches!(
        FrameView::parse(hex("0000")),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        FrameView::parse(hex("00000001 1900 0000")),
        Err(DecodeError::Truncated { .. })
    ));
    assert_eq!(
        FrameView::parse(hex("00000001 1100 000009 6d")),
        Err(DecodeError::MetadataLength {
            declared: 9,
            available: 1
        })
    );
    assert_eq!(
        FrameView::parse(hex("00000001 4000")),
        Err(DecodeError::UnknownFrameType { frame_type: 0x10 })
    );
    assert!(matches!(
        FrameView::parse(hex("00000000 0400 0001 0000 00000001 00000001 05 61")),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn reserved_stream_id_bit_is_dropped() {
    let v = FrameView::parse(hex("80000003 2400")).unwrap();
    assert_eq!(v.stream_id(), 3);
}
