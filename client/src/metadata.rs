//! Building metadata: composite routing metadata for requests, and the
//! SETUP metadata that registers an app and its services (the format
//! alibaba-rsocket-broker clients use).

use bytes::Bytes;
use rsocket_proto::metadata::build;
use rsocket_proto::metadata::{MimeType, WellKnownMime, put_bearer, put_entry, put_simple};

use crate::{AppConfig, Credentials};

/// Composite metadata with one routing entry: `tags[0]` is the route
/// (`[group!]service[.method][:version]`), further tags refine it
/// (`e=<instance>`, `sticky=1`, `broadcast=1`, ...). Tags over 255 bytes are
/// left out; tags that add up to more than an entry holds (16 MiB) give
/// empty metadata.
pub fn route(tags: &[&str]) -> Bytes {
    if let Ok(md) = build::route(tags) {
        return md;
    }
    let fits: Vec<&str> = tags.iter().copied().filter(|t| t.len() <= 255).collect();
    build::route(&fits).unwrap_or_default()
}

/// SETUP metadata registering `app` and the `(group, service, version)`
/// it publishes; `None` for a plain requester.
pub fn setup(app: Option<&AppConfig>, services: &[(String, String, String)]) -> Option<Bytes> {
    setup_with(app, services, &Credentials::None)
}

/// [`setup`] with `credentials` (authentication metadata, when there are
/// any, so a plain requester with credentials has SETUP metadata too).
pub fn setup_with(
    app: Option<&AppConfig>,
    services: &[(String, String, String)],
    credentials: &Credentials,
) -> Option<Bytes> {
    let mut md = Vec::new();
    let mut auth = Vec::new();
    match credentials {
        Credentials::None => {}
        Credentials::Bearer(token) => put_bearer(&mut auth, token),
        Credentials::Simple(user, secret) => {
            let _ = put_simple(&mut auth, user, secret);
        }
    }
    if !auth.is_empty() {
        let _ = put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::AUTHENTICATION),
            &auth,
        );
    }
    let Some(app) = app else {
        return (!md.is_empty()).then(|| Bytes::from(md));
    };
    let app_json = serde_json::json!({
        "name": app.name,
        "uuid": app.uuid,
        "powerRating": app.power_rating,
    });
    let _ = put_entry(
        &mut md,
        MimeType::WellKnown(WellKnownMime::APPLICATION),
        app_json.to_string().as_bytes(),
    );
    if !services.is_empty() {
        let published: Vec<serde_json::Value> = services
            .iter()
            .map(|(group, service, version)| serde_json::json!({"group": group, "service": service, "version": version}))
            .collect();
        let registry = serde_json::json!({ "published": published });
        let _ = put_entry(
            &mut md,
            MimeType::WellKnown(WellKnownMime::SERVICE_REGISTRY),
            registry.to_string().as_bytes(),
        );
    }
    Some(Bytes::from(md))
}

/// METADATA_PUSH content announcing a status change of this app
/// (1 serving, 2 out of service, -1 stopped).
pub fn app_status_event(status: i32) -> Bytes {
    let event = serde_json::json!({
        "specversion": "1.0",
        "id": format!("status-{status}"),
        "source": "rsbroker-client",
        "type": "com.alibaba.rsocket.events.AppStatusEvent",
        "data": { "status": status },
    });
    Bytes::from(event.to_string())
}

/// METADATA_PUSH content exposing (`hidden` false) or hiding services.
pub fn services_event(services: &[&str], hidden: bool) -> Bytes {
    let list: Vec<serde_json::Value> = services
        .iter()
        .map(|s| serde_json::json!({"group": "", "service": s, "version": ""}))
        .collect();
    let kind = if hidden {
        "ServicesHiddenEvent"
    } else {
        "ServicesExposedEvent"
    };
    let event = serde_json::json!({
        "specversion": "1.0",
        "id": "services",
        "source": "rsbroker-client",
        "type": format!("com.alibaba.rsocket.events.{kind}"),
        "data": { "services": list },
    });
    Bytes::from(event.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_leaves_out_tags_over_255_bytes() {
        let long = "x".repeat(256);
        assert_eq!(route(&["svc", &long, "e=1"]), route(&["svc", "e=1"]));
        assert_eq!(
            route(&["svc", "e=1"]),
            &[0xFE, 0, 0, 8, 3, b's', b'v', b'c', 3, b'e', b'=', b'1'][..]
        );
    }
}
