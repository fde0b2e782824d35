//! Well-known MIME types: the table of the RSocket extension spec plus the
//! ids alibaba-rsocket-broker clients send (0x2B, 0x50-0x58), so their
//! composite metadata is understood whether an entry names its type by id or
//! by string.

/// A well-known MIME type id (0..=127).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WellKnownMime(u8);

macro_rules! well_known {
    ($($konst:ident = $id:literal => $name:literal,)*) => {
        impl WellKnownMime {
            $(
                #[doc = concat!("`", $name, "`")]
                pub const $konst: Self = Self($id);
            )*

            /// The MIME type string for a known id.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($id => Some($name),)*
                    _ => None,
                }
            }

            /// The id of a known MIME type string.
            pub fn from_name(name: &[u8]) -> Option<Self> {
                match name {
                    $(n if n == $name.as_bytes() => Some(Self($id)),)*
                    _ => None,
                }
            }

            /// Every id in the table, in order.
            pub const ALL: &'static [WellKnownMime] = &[$(Self($id),)*];
        }
    };
}

well_known! {
    APPLICATION_AVRO = 0x00 => "application/avro",
    APPLICATION_CBOR = 0x01 => "application/cbor",
    APPLICATION_GRAPHQL = 0x02 => "application/graphql",
    APPLICATION_GZIP = 0x03 => "application/gzip",
    APPLICATION_JAVASCRIPT = 0x04 => "application/javascript",
    APPLICATION_JSON = 0x05 => "application/json",
    APPLICATION_OCTET_STREAM = 0x06 => "application/octet-stream",
    APPLICATION_PDF = 0x07 => "application/pdf",
    APPLICATION_THRIFT = 0x08 => "application/vnd.apache.thrift.binary",
    APPLICATION_PROTOBUF = 0x09 => "application/vnd.google.protobuf",
    APPLICATION_XML = 0x0A => "application/xml",
    APPLICATION_ZIP = 0x0B => "application/zip",
    AUDIO_AAC = 0x0C => "audio/aac",
    AUDIO_MP3 = 0x0D => "audio/mp3",
    AUDIO_MP4 = 0x0E => "audio/mp4",
    AUDIO_MPEG3 = 0x0F => "audio/mpeg3",
    AUDIO_MPEG = 0x10 => "audio/mpeg",
    AUDIO_OGG = 0x11 => "audio/ogg",
    AUDIO_OPUS = 0x12 => "audio/opus",
    AUDIO_VORBIS = 0x13 => "audio/vorbis",
    IMAGE_BMP = 0x14 => "image/bmp",
    IMAGE_GIF = 0x15 => "image/gif",
    IMAGE_HEIC_SEQUENCE = 0x16 => "image/heic-sequence",
    IMAGE_HEIC = 0x17 => "image/heic",
    IMAGE_HEIF_SEQUENCE = 0x18 => "image/heif-sequence",
    IMAGE_HEIF = 0x19 => "image/heif",
    IMAGE_JPEG = 0x1A => "image/jpeg",
    IMAGE_PNG = 0x1B => "image/png",
    IMAGE_TIFF = 0x1C => "image/tiff",
    MULTIPART_MIXED = 0x1D => "multipart/mixed",
    TEXT_CSS = 0x1E => "text/css",
    TEXT_CSV = 0x1F => "text/csv",
    TEXT_HTML = 0x20 => "text/html",
    TEXT_PLAIN = 0x21 => "text/plain",
    TEXT_XML = 0x22 => "text/xml",
    VIDEO_H264 = 0x23 => "video/H264",
    VIDEO_H265 = 0x24 => "video/H265",
    VIDEO_VP8 = 0x25 => "video/VP8",
    APPLICATION_HESSIAN = 0x26 => "application/x-hessian",
    APPLICATION_JAVA_OBJECT = 0x27 => "application/x-java-object",
    APPLICATION_CLOUDEVENTS_JSON = 0x28 => "application/cloudevents+json",
    APPLICATION_CAPNP = 0x29 => "application/x-capnp",
    APPLICATION_FLATBUFFERS = 0x2A => "application/x-flatbuffers",
    APPLICATION_GRAPHQL_JSON = 0x2B => "application/graphql+json",
    BINARY_ROUTING = 0x50 => "message/x.rsocket.binary-routing.v0",
    APPLICATION = 0x51 => "message/x.rsocket.application+json",
    DATA_CACHE_CONTROL = 0x53 => "message/x.rsocket.rsocket.data.cache-control",
    SERVICE_REGISTRY = 0x54 => "message/x.rsocket.service.registry.v0+json",
    BEARER_TOKEN = 0x55 => "message/x.rsocket.authentication.bearer.v0",
    COMPOSITE_METADATA_JSON = 0x56 => "message/x.rsocket.composite-metadata.v0+json",
    MESSAGE_TAGS = 0x57 => "message/x.rsocket.message.tags",
    MESSAGE_ORIGIN = 0x58 => "message/x.rsocket.message.origin",
    MIME_TYPE = 0x7A => "message/x.rsocket.mime-type.v0",
    ACCEPT_MIME_TYPES = 0x7B => "message/x.rsocket.accept-mime-types.v0",
    AUTHENTICATION = 0x7C => "message/x.rsocket.authentication.v0",
    TRACING_ZIPKIN = 0x7D => "message/x.rsocket.tracing-zipkin.v0",
    ROUTING = 0x7E => "message/x.rsocket.routing.v0",
    COMPOSITE_METADATA = 0x7F => "message/x.rsocket.composite-metadata.v0",
}

impl WellKnownMime {
    /// The id for a 7-bit value (`None` above 127).
    pub fn from_id(id: u8) -> Option<Self> {
        (id <= 0x7F).then_some(Self(id))
    }

    /// The id in the low 7 bits of `byte` (the high bit marks "well known").
    #[inline]
    pub fn from_low_bits(byte: u8) -> Self {
        Self(byte & 0x7F)
    }

    /// The 7-bit id.
    pub fn id(self) -> u8 {
        self.0
    }
}

/// A MIME type as written in metadata: a well-known id or a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MimeType<'a> {
    /// A well-known id (possibly one this table has no name for).
    WellKnown(WellKnownMime),
    /// A MIME type string (US-ASCII).
    Custom(&'a str),
}

impl<'a> MimeType<'a> {
    /// The well-known id this type stands for, whether written as an id or
    /// as the string of a known type.
    #[inline]
    pub fn well_known(&self) -> Option<WellKnownMime> {
        match self {
            Self::WellKnown(id) => Some(*id),
            Self::Custom(s) => WellKnownMime::from_name(s.as_bytes()),
        }
    }

    /// Whether this is `mime`, by id or by string.
    #[inline]
    pub fn is(&self, mime: WellKnownMime) -> bool {
        match self {
            Self::WellKnown(id) => *id == mime,
            Self::Custom(s) => mime.name().is_some_and(|n| n.as_bytes() == s.as_bytes()),
        }
    }

    /// The MIME type string, if known.
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            Self::WellKnown(id) => id.name(),
            Self::Custom(s) => Some(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_ids_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for m in WellKnownMime::ALL {
            assert!(seen.insert(m.id()), "duplicate id {:#x}", m.id());
            let name = m.name().unwrap();
            assert_eq!(WellKnownMime::from_name(name.as_bytes()), Some(*m));
        }
        assert_eq!(WellKnownMime::from_id(0x80), None);
        assert_eq!(WellKnownMime::from_id(0x2F).and_then(|m| m.name()), None);
    }

    #[test]
    fn string_and_id_forms_compare_equal() {
        let by_name = MimeType::Custom("message/x.rsocket.routing.v0");
        assert!(by_name.is(WellKnownMime::ROUTING));
        assert_eq!(by_name.well_known(), Some(WellKnownMime::ROUTING));
        assert!(MimeType::WellKnown(WellKnownMime::APPLICATION).is(WellKnownMime::APPLICATION));
        assert!(!MimeType::Custom("text/plain").is(WellKnownMime::ROUTING));
    }
}
