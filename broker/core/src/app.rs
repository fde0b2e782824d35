//! What an app tells the broker about itself: the SETUP composite metadata
//! (app metadata, published services, bearer token) and later CloudEvents
//! over METADATA_PUSH (services exposed or hidden, app status). Formats are
//! those of alibaba-rsocket-broker clients, so existing apps move over.

use std::sync::Arc;

use bytes::Bytes;
use rsocket_proto::frame::Setup;
use rsocket_proto::metadata::{Auth, CompositeMetadata, WellKnownMime};
use serde::Deserialize;

use crate::service::ServiceKey;

/// An app instance as its SETUP described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppInfo {
    /// App name.
    pub name: String,
    /// Instance id: the app's uuid. Connections with the same uuid are one instance.
    pub uuid: Arc<str>,
    /// The address the app reports.
    pub ip: Option<String>,
    /// Relative capacity, for the weighted balancer (at least 1).
    pub power_rating: u32,
    /// The app metadata JSON as sent.
    pub raw: Arc<str>,
    /// The identity its connection proved (set by the broker, not read
    /// from the metadata): an instance's connections must all be it.
    pub identity: Option<Arc<str>>,
}

/// What the broker learned from a SETUP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetupInfo {
    /// The app, when it sent app metadata; `None` for a plain requester.
    pub app: Option<AppInfo>,
    /// Services the app publishes.
    pub services: Vec<ServiceKey>,
    /// A bearer token, if one was sent.
    pub bearer: Option<Bytes>,
    /// Simple authentication (user name, secret), if it was sent.
    pub simple: Option<(Bytes, Bytes)>,
    /// What was wrong with the authentication metadata, if something was:
    /// the SETUP is refused with REJECTED_SETUP.
    pub auth_problem: Option<String>,
}

#[derive(Deserialize)]
struct AppJson {
    name: Option<String>,
    uuid: Option<String>,
    ip: Option<String>,
    #[serde(rename = "powerRating")]
    power_rating: Option<i64>,
}

/// One published service, as `{group, service, version}`.
#[derive(Deserialize)]
struct ServiceJson {
    #[serde(default)]
    group: Option<String>,
    service: String,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize)]
struct RegistryJson {
    #[serde(default)]
    published: Vec<ServiceJson>,
}

fn services(list: Vec<ServiceJson>) -> Vec<ServiceKey> {
    list.into_iter()
        .filter(|s| !s.service.is_empty())
        .map(|s| {
            ServiceKey::new(
                s.group.as_deref().unwrap_or(""),
                &s.service,
                s.version.as_deref().unwrap_or(""),
            )
        })
        .collect()
}

fn app_info(json: &[u8]) -> Result<AppInfo, String> {
    let text = std::str::from_utf8(json).map_err(|_| "app metadata is not UTF-8".to_owned())?;
    let app: AppJson =
        serde_json::from_str(text).map_err(|e| format!("app metadata is not valid JSON: {e}"))?;
    let uuid = app
        .uuid
        .filter(|u| !u.is_empty())
        .ok_or("app metadata has no uuid")?;
    Ok(AppInfo {
        name: app
            .name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "unnamed".to_owned()),
        uuid: uuid.into(),
        ip: app.ip,
        power_rating: app
            .power_rating
            .map_or(1, |p| p.clamp(1, i64::from(u32::MAX)) as u32),
        raw: text.into(),
        identity: None,
    })
}

/// Reads the app, its services and its token from a SETUP. A SETUP whose
/// metadata is not composite metadata carries none of them: that client is
/// a plain requester.
pub fn parse_setup(setup: &Setup) -> Result<SetupInfo, String> {
    let mut info = SetupInfo::default();
    let Some(metadata) = setup.metadata.as_ref() else {
        return Ok(info);
    };
    let composite = setup.metadata_mime_str().is_some_and(|m| {
        WellKnownMime::from_name(m.as_bytes()) == Some(WellKnownMime::COMPOSITE_METADATA)
    });
    if !composite {
        return Ok(info);
    }
    for entry in CompositeMetadata::new(metadata) {
        let entry = entry.map_err(|e| format!("SETUP composite metadata is malformed: {e}"))?;
        match entry.mime.well_known() {
            Some(WellKnownMime::APPLICATION) => info.app = Some(app_info(entry.content)?),
            Some(WellKnownMime::SERVICE_REGISTRY) => {
                let registry: RegistryJson = serde_json::from_slice(entry.content)
                    .map_err(|e| format!("service registry metadata is not valid JSON: {e}"))?;
                info.services.extend(services(registry.published));
            }
            Some(WellKnownMime::AUTHENTICATION) => match Auth::parse(entry.content) {
                Ok(Auth::Bearer { token }) => info.bearer = Some(metadata.slice_ref(token)),
                Ok(Auth::Simple { username, password }) => {
                    info.simple = Some((metadata.slice_ref(username), metadata.slice_ref(password)))
                }
                Ok(Auth::WellKnown { id, .. }) => {
                    info.auth_problem =
                        Some(format!("authentication type {id:#04x} is not supported"))
                }
                Ok(Auth::Custom { auth_type, .. }) => {
                    info.auth_problem = Some(format!(
                        "authentication type {auth_type:?} is not supported"
                    ))
                }
                Err(e) => {
                    info.auth_problem = Some(format!("authentication metadata is malformed: {e}"))
                }
            },
            Some(WellKnownMime::BEARER_TOKEN) => {
                info.bearer = Some(metadata.slice_ref(entry.content))
            }
            _ => {}
        }
    }
    if !info.services.is_empty() && info.app.is_none() {
        return Err("SETUP publishes services but carries no app metadata".into());
    }
    Ok(info)
}

/// An app's status, as AppStatusEvent numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppStatus {
    /// Connected, not yet serving (0).
    Connected,
    /// Serving requests (1).
    Serving,
    /// Connected but taking no requests (2).
    OutOfService,
    /// Stopping (-1).
    Stopped,
}

impl AppStatus {
    fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Self::Connected,
            1 => Self::Serving,
            2 => Self::OutOfService,
            -1 => Self::Stopped,
            _ => return None,
        })
    }

    /// Whether requests may be routed to the app.
    pub fn routable(self) -> bool {
        self == Self::Serving
    }

    /// The status as text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Serving => "serving",
            Self::OutOfService => "out_of_service",
            Self::Stopped => "stopped",
        }
    }
}

/// A change an app announces over METADATA_PUSH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppEvent {
    /// `com.alibaba.rsocket.events.ServicesExposedEvent`
    ServicesExposed(Vec<ServiceKey>),
    /// `com.alibaba.rsocket.events.ServicesHiddenEvent`
    ServicesHidden(Vec<ServiceKey>),
    /// `com.alibaba.rsocket.events.AppStatusEvent`
    Status(AppStatus),
}

#[derive(Deserialize)]
struct CloudEventJson {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: serde_json::Value,
}

#[derive(Deserialize)]
struct ServicesEventJson {
    #[serde(default, alias = "published")]
    services: Vec<ServiceJson>,
}

#[derive(Deserialize)]
struct StatusEventJson {
    status: i64,
}

/// Reads a CloudEvent from METADATA_PUSH metadata: the JSON itself, or
/// composite metadata holding an `application/cloudevents+json` entry.
/// `Ok(None)` for events the broker does not act on.
pub fn parse_app_event(metadata: &[u8]) -> Result<Option<AppEvent>, String> {
    let json = if metadata.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        metadata
    } else {
        match CompositeMetadata::new(metadata).find(WellKnownMime::APPLICATION_CLOUDEVENTS_JSON) {
            Ok(Some(json)) => json,
            Ok(None) => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "METADATA_PUSH composite metadata is malformed: {e}"
                ));
            }
        }
    };
    let event: CloudEventJson =
        serde_json::from_slice(json).map_err(|e| format!("CloudEvent is not valid JSON: {e}"))?;
    let short = event.kind.rsplit('.').next().unwrap_or_default();
    let bad = |e: serde_json::Error| format!("{} data is malformed: {e}", event.kind);
    Ok(match short {
        "ServicesExposedEvent" => {
            let data: ServicesEventJson = serde_json::from_value(event.data).map_err(bad)?;
            Some(AppEvent::ServicesExposed(services(data.services)))
        }
        "ServicesHiddenEvent" => {
            let data: ServicesEventJson = serde_json::from_value(event.data).map_err(bad)?;
            Some(AppEvent::ServicesHidden(services(data.services)))
        }
        "AppStatusEvent" => {
            let data: StatusEventJson = serde_json::from_value(event.data).map_err(bad)?;
            let status = AppStatus::from_code(data.status)
                .ok_or_else(|| format!("unknown app status {}", data.status))?;
            Some(AppEvent::Status(status))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsocket_proto::frame::VERSION;
    use rsocket_proto::metadata::{MimeType, put_bearer, put_entry};

    fn setup(metadata: Vec<u8>) -> Setup {
        Setup {
            version: VERSION,
            keepalive_interval: 1000,
            max_lifetime: 10_000,
            resume_token: None,
            lease: false,
            metadata_mime: Bytes::from_static(b"message/x.rsocket.composite-metadata.v0"),
            data_mime: Bytes::from_static(b"application/json"),
            metadata: Some(Bytes::from(metadata)),
            data: Bytes::new(),
        }
    }

    #[test]
    fn reads_app_services_and_token() {
        let mut md = Vec::new();
        put_entry(
            &mut md,
            MimeType::Custom("message/x.rsocket.application+json"),
            br#"{"name":"echo-app","uuid":"u-1","ip":"10.0.0.1","powerRating":4}"#,
        )
        .unwrap();
        put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::SERVICE_REGISTRY),
            br#"{"published":[{"group":"g","service":"com.example.Echo","version":"1.0"},{"service":"Other"}]}"#,
        )
        .unwrap();
        let mut auth = Vec::new();
        put_bearer(&mut auth, "jwt");
        put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::AUTHENTICATION),
            &auth,
        )
        .unwrap();
        let info = parse_setup(&setup(md)).unwrap();
        let app = info.app.unwrap();
        assert_eq!(
            (
                app.name.as_str(),
                &*app.uuid,
                app.ip.as_deref(),
                app.power_rating
            ),
            ("echo-app", "u-1", Some("10.0.0.1"), 4)
        );
        assert_eq!(
            info.services,
            [
                ServiceKey::new("g", "com.example.Echo", "1.0"),
                ServiceKey::new("", "Other", "")
            ]
        );
        assert_eq!(info.bearer.as_deref(), Some(&b"jwt"[..]));
    }

    #[test]
    fn plain_requester_and_bad_metadata() {
        let mut s = setup(Vec::new());
        s.metadata = None;
        assert_eq!(parse_setup(&s).unwrap(), SetupInfo::default());
        let mut md = Vec::new();
        put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::APPLICATION),
            b"{not json",
        )
        .unwrap();
        assert!(
            parse_setup(&setup(md))
                .unwrap_err()
                .contains("not valid JSON")
        );
        let mut md = Vec::new();
        put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::APPLICATION),
            br#"{"name":"x"}"#,
        )
        .unwrap();
        assert!(parse_setup(&setup(md)).unwrap_err().contains("uuid"));
        let mut md = Vec::new();
        put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::SERVICE_REGISTRY),
            br#"{"published":[{"service":"s"}]}"#,
        )
        .unwrap();
        assert!(
            parse_setup(&setup(md))
                .unwrap_err()
                .contains("no app metadata")
        );
    }

    #[test]
    fn only_serving_apps_are_routable_and_statuses_read_as_text() {
        let all = [
            AppStatus::Connected,
            AppStatus::Serving,
            AppStatus::OutOfService,
            AppStatus::Stopped,
        ];
        assert_eq!(all.map(AppStatus::routable), [false, true, false, false]);
        assert_eq!(
            all.map(AppStatus::as_str),
            ["connected", "serving", "out_of_service", "stopped"]
        );
    }

    #[test]
    fn a_bearer_token_entry_is_read_as_the_token() {
        let mut md = Vec::new();
        put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::BEARER_TOKEN),
            b"raw-token",
        )
        .unwrap();
        let info = parse_setup(&setup(md)).unwrap();
        assert_eq!(info.bearer.as_deref(), Some(&b"raw-token"[..]));
    }

    #[test]
    fn simple_authentication_is_read_and_bad_authentication_named() {
        let auth_entry = |content: &[u8]| {
            let mut md = Vec::new();
            put_entry(
                &mut md,
                MimeType::WellKnown(WellKnownMime::AUTHENTICATION),
                content,
            )
            .unwrap();
            parse_setup(&setup(md)).unwrap()
        };
        let mut simple = Vec::new();
        rsocket_proto::metadata::put_simple(&mut simple, "billing", "s3cret").unwrap();
        let info = auth_entry(&simple);
        let (user, secret) = info.simple.unwrap();
        assert_eq!((&user[..], &secret[..]), (&b"billing"[..], &b"s3cret"[..]));
        assert_eq!(info.auth_problem, None);
        for (content, problem) in [
            (&b""[..], "malformed"),
            (&b"\x80\x00"[..], "malformed"),
            (&b"\x85token"[..], "0x05 is not supported"),
            (&b"\x02kerberos"[..], "\"ker\" is not supported"),
        ] {
            let info = auth_entry(content);
            let got = info.auth_problem.unwrap_or_default();
            assert!(got.contains(problem), "{content:?}: {got}");
            assert_eq!((info.bearer, info.simple), (None, None));
        }
    }

    #[test]
    fn cloud_events() {
        let exposed = br#"{"specversion":"1.0","id":"1","source":"app://u-1","type":"com.alibaba.rsocket.events.ServicesExposedEvent","data":{"appId":"u-1","services":[{"group":"","service":"S2","version":""}]}}"#;
        assert_eq!(
            parse_app_event(exposed).unwrap(),
            Some(AppEvent::ServicesExposed(vec![ServiceKey::new(
                "", "S2", ""
            )]))
        );
        let status = br#"{"type":"com.alibaba.rsocket.events.AppStatusEvent","data":{"id":"u-1","status":2}}"#;
        assert_eq!(
            parse_app_event(status).unwrap(),
            Some(AppEvent::Status(AppStatus::OutOfService))
        );
        let mut composite = Vec::new();
        put_entry(
            &mut composite,
            MimeType::WellKnown(WellKnownMime::APPLICATION_CLOUDEVENTS_JSON),
            status,
        )
        .unwrap();
        assert_eq!(
            parse_app_event(&composite).unwrap(),
            Some(AppEvent::Status(AppStatus::OutOfService))
        );
        assert_eq!(
            parse_app_event(br#"{"type":"x.OtherEvent","data":{}}"#).unwrap(),
            None
        );
        let hidden = br#"{"type":"com.alibaba.rsocket.events.ServicesHiddenEvent","data":{"services":[{"service":"S2"}]}}"#;
        assert_eq!(
            parse_app_event(hidden).unwrap(),
            Some(AppEvent::ServicesHidden(vec![ServiceKey::new(
                "", "S2", ""
            )]))
        );
        for (code, status) in [
            (0, AppStatus::Connected),
            (1, AppStatus::Serving),
            (2, AppStatus::OutOfService),
            (-1, AppStatus::Stopped),
        ] {
            let event = format!(r#"{{"type":"a.AppStatusEvent","data":{{"status":{code}}}}}"#);
            assert_eq!(
                parse_app_event(event.as_bytes()).unwrap(),
                Some(AppEvent::Status(status)),
                "status {code}"
            );
        }
        assert!(parse_app_event(b"{").is_err());
        assert!(parse_app_event(br#"{"type":"a.AppStatusEvent","data":{"status":9}}"#).is_err());
    }
}
