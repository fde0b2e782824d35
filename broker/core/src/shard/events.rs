//! What a connection's state machine reports: SETUP and registration,
//! METADATA_PUSH events, requests, stream frames and the close.

use std::sync::Arc;

use bytes::Bytes;
use rsocket_proto::ErrorCode;
use rsocket_proto::conn::Event;

use super::Shard;
use crate::app::{AppEvent, parse_app_event, parse_setup};
use crate::message::Signal;
use crate::routes::RouteChange;

impl Shard {
    pub(super) fn drain_events(&mut self, slot: usize) {
        loop {
            let Some(event) = self.conns.get_mut(slot).and_then(|c| c.proto.poll_event()) else {
                break;
            };
            self.on_event(slot, event);
        }
    }

    pub(super) fn on_event(&mut self, slot: usize, event: Event) {
        match event {
            Event::Setup(setup) => self.on_setup(slot, &setup),
            Event::Request {
                stream_id,
                interaction,
                frame,
                ended,
            } => self.on_request(slot, stream_id, interaction, frame, ended),
            Event::Fragment {
                stream_id, frame, ..
            }
            | Event::Payload {
                stream_id, frame, ..
            } => self.on_stream_signal(slot, stream_id, Signal::Frame(frame)),
            Event::RequestN { stream_id, n } => {
                self.on_stream_signal(slot, stream_id, Signal::RequestN(n))
            }
            Event::Cancel { stream_id, .. } => {
                self.on_stream_signal(slot, stream_id, Signal::Cancel)
            }
            Event::Error {
                stream_id,
                code,
                data,
            } => self.on_stream_signal(slot, stream_id, Signal::Error { code, data }),
            Event::StreamError { stream_id, error } => {
                // The peer broke the protocol on this stream, and was told;
                // the other side of the stream is ended too.
                let data = Bytes::from(format!(
                    "the other side broke the protocol: {}",
                    error.message
                ));
                self.on_stream_signal(
                    slot,
                    stream_id,
                    Signal::Error {
                        code: ErrorCode::CANCELED,
                        data,
                    },
                );
            }
            Event::MetadataPush(metadata) => self.on_metadata_push(slot, &metadata),
            Event::Closed(e) => {
                self.note_close_reason(slot, &e);
                self.release(slot, "its connection closed");
            }
            Event::Closing(e) => self.note_close_reason(slot, &e),
            Event::ResumeRequested(_) => {
                if let Some(c) = self.conns.get_mut(slot) {
                    c.proto
                        .reject_resume("resume is not supported by this broker");
                }
            }
            Event::Resumed | Event::Lease(_) => {}
        }
    }

    pub(super) fn note_close_reason(&mut self, slot: usize, e: &rsocket_proto::ConnectionError) {
        if let Some(c) = self.conns.get_mut(slot)
            && c.close_reason.is_none()
        {
            let by = match e.initiator {
                rsocket_proto::Initiator::Local => "sent",
                rsocket_proto::Initiator::Remote => "received",
            };
            c.close_reason = Some(format!("{by} ERROR {}: {}", e.code, e.message));
        }
    }

    pub(super) fn on_setup(&mut self, slot: usize, setup: &rsocket_proto::frame::Setup) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if setup.lease {
            c.proto.reject_setup(
                ErrorCode::UNSUPPORTED_SETUP,
                "LEASE is not supported by this broker",
            );
            return;
        }
        let info = match parse_setup(setup) {
            Ok(info) => info,
            Err(e) => {
                c.proto.reject_setup(ErrorCode::INVALID_SETUP, e);
                return;
            }
        };
        if !self.admit(slot, &info) {
            return;
        }
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let identity = c.identity.as_ref().map(|i| i.name.clone());
        let Some(mut app) = info.app else {
            tracing::info!(conn = %c.id, identity = identity.as_deref().unwrap_or_default(), "connection set up (a requester: no app metadata)");
            return;
        };
        app.identity = identity;
        c.app_name = Some(app.name.clone());
        c.instance = Some(app.uuid.clone());
        let conn = c.id;
        tracing::info!(conn = %conn, app = %app.name, instance = %app.uuid, identity = app.identity.as_deref().unwrap_or_default(), services = info.services.len(), "connection set up");
        self.broadcast(RouteChange::Join {
            conn,
            app: Arc::new(app),
            services: info.services,
        });
    }

    pub(super) fn on_metadata_push(&mut self, slot: usize, metadata: &[u8]) {
        let Some(c) = self.conns.get(slot) else {
            return;
        };
        let Some(instance) = c.instance.clone() else {
            return;
        };
        let conn = c.id;
        let event = match parse_app_event(metadata) {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(conn = %conn, error = %e, "ignored METADATA_PUSH");
                return;
            }
        };
        let change = match event {
            AppEvent::ServicesExposed(services) => {
                let services = self.publishable(slot, services);
                if services.is_empty() {
                    return;
                }
                RouteChange::Expose { instance, services }
            }
            AppEvent::ServicesHidden(services) => RouteChange::Hide { instance, services },
            AppEvent::Status(status) => RouteChange::Status { instance, status },
        };
        self.broadcast(change);
    }
}
