//! Arbitrary bytes as one frame: parsing never panics, every accessor and
//! metadata parser is safe on whatever parsed, and a decoded frame re-encodes
//! to bytes that decode to the same frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rsocket_proto::OutFrame;
use rsocket_proto::frame::{Frame, FrameView, Header};
use rsocket_proto::metadata::{
    AcceptMimeTypes, Auth, BinaryRouting, CompositeMetadata, RequestMetadata, Route, RoutingTags, parse_mime,
};

fn metadata(md: &[u8]) {
    CompositeMetadata::new(md).for_each(drop);
    RoutingTags::new(md).for_each(drop);
    AcceptMimeTypes::new(md).for_each(drop);
    let _ = (Route::from_tags(md), Route::parse_key(md), Auth::parse(md), BinaryRouting::parse(md), parse_mime(md));
    if let Ok(found) = RequestMetadata::scan(md) {
        if let Ok(Some(route)) = found.route() {
            let _ = route.tag("h");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let _ = Header::parse(&bytes);
    let Ok(view) = FrameView::parse(bytes) else { return };
    let _ = (view.follows(), view.complete(), view.next(), view.request_n(), view.error_code());
    let _ = (view.payload_len(), view.fixed_fields(), view.after_stream_id(), format!("{view:?}"));
    metadata(view.metadata_slice().unwrap_or_default());
    metadata(view.data_slice());
    if let Ok(frame) = Frame::from_view(&view) {
        let encoded = frame.to_bytes();
        assert_eq!(encoded.len(), frame.encoded_len());
        assert_eq!(OutFrame::from_frame(&frame).to_bytes(), encoded);
        let again = Frame::decode(encoded).expect("a re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});
