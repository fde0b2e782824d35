//! Receiving: one frame from the peer, checked against the spec's rules
//! and turned into events, stream state and frames to send back.

use std::time::Instant;

use bytes::Bytes;

use super::stream::{Continued, InboundPartial, MessageRole, Stream};
use super::{Connection, Event, Interaction, Role, State};
use crate::error::{DecodeError, ErrorCode, StreamError};
use crate::frame::{Cancel, ErrorFrame, Flags, FrameType, FrameView, Header};
use crate::out::OutFrame;

impl Connection {
    /// Handles one received frame (without length prefix).
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) {
        self.now = now;
        if matches!(self.state, State::Closed | State::Disconnected) {
            return;
        }
        self.lifetime.last_received = now;
        self.stats.frames_received += 1;
        let header = match Header::parse(&frame) {
            Ok(h) => h,
            Err(e) => {
                let code = self.protocol_error_code();
                return self.fail(code, format!("malformed frame: {e}"));
            }
        };
        if header.stream_id != 0
            && header.known_type().is_some_and(FrameType::is_resumable)
            && let Some(r) = self.resume.as_mut()
        {
            r.received(frame.len());
        }
        let view = match FrameView::parse(frame) {
            Ok(v) => v,
            Err(e) => return self.on_malformed(header, e),
        };
        match self.state {
            State::AwaitingSetup => self.on_first_frame(view),
            State::AwaitingResumeOk => self.on_resume_reply(view),
            State::Established | State::SetupSent => self.on_frame(view),
            State::ResumeOffered => self.ignore(),
            State::Disconnected | State::Closed => {}
        }
    }

    pub(super) fn ignore(&mut self) {
        self.stats.frames_ignored += 1;
    }

    pub(super) fn protocol_error_code(&self) -> ErrorCode {
        if self.state == State::AwaitingSetup {
            ErrorCode::INVALID_SETUP
        } else {
            ErrorCode::CONNECTION_ERROR
        }
    }

    pub(super) fn is_peer_stream_id(&self, id: u32) -> bool {
        // "a client MUST generate odd Stream IDs and a server MUST generate even Stream IDs."
        match self.role {
            Role::Server => id % 2 == 1,
            Role::Client => id.is_multiple_of(2),
        }
    }

    pub(super) fn on_malformed(&mut self, header: Header, err: DecodeError) {
        let Some(frame_type) = header.known_type() else {
            // "An implementation MAY send an ERROR[CONNECTION_ERROR] frame and close the underlying
            // transport connection on reception of a frame that it does not understand with this bit not set."
            if header.flags.has(Flags::IGNORE) && self.state != State::AwaitingSetup {
                return self.ignore();
            }
            let code = self.protocol_error_code();
            return self.fail(
                code,
                format!(
                    "unknown frame type {:#04x} without the Ignore flag",
                    header.frame_type
                ),
            );
        };
        if self.state == State::AwaitingSetup {
            return self.fail(
                ErrorCode::INVALID_SETUP,
                format!("malformed {frame_type}: {err}"),
            );
        }
        if self.state == State::ResumeOffered {
            return self.ignore();
        }
        let id = header.stream_id;
        if frame_type.is_request() {
            if !self.admits_request(frame_type, id) {
                return;
            }
            let error = ErrorFrame {
                stream_id: id,
                code: ErrorCode::INVALID,
                data: Bytes::from(format!("malformed {frame_type}: {err}")),
            };
            return self.push_stream_frame(OutFrame::from_owned(error));
        }
        let stream_frame = matches!(
            frame_type,
            FrameType::Payload
                | FrameType::RequestN
                | FrameType::Error
                | FrameType::Cancel
                | FrameType::Ext
        );
        // The well-formed frame would be ignored here, so the malformed one is too:
        // stream frames on stream 0, EXT with Ignore, a second SETUP, a
        // RESUME_OK nobody asked for.
        let ignorable = (stream_frame && frame_type != FrameType::Error && id == 0)
            || (frame_type == FrameType::Ext && header.flags.has(Flags::IGNORE))
            || matches!(frame_type, FrameType::Setup | FrameType::ResumeOk);
        if ignorable {
            return self.ignore();
        }
        if stream_frame && id != 0 {
            if self.streams.contains_key(&id) {
                return self.stream_error(
                    id,
                    ErrorCode::INVALID,
                    format!("malformed {frame_type}: {err}"),
                );
            }
            return self.ignore();
        }
        self.fail(
            ErrorCode::CONNECTION_ERROR,
            format!("malformed {frame_type}: {err}"),
        )
    }

    pub(super) fn on_frame(&mut self, view: FrameView) {
        if self.state == State::SetupSent
            && (view.frame_type() == FrameType::Lease
                || view.frame_type().is_request()
                || (view.stream_id() != 0 && self.streams.contains_key(&view.stream_id())))
        {
            // "A client assumes a SETUP is accepted if it receives a response to a request, a LEASE
            // frame, or if it sees a REQUEST type."
            self.state = State::Established;
        }
        match view.frame_type() {
            // "A server MUST ignore a SETUP frame after it has accepted a previous SETUP."
            // "A client MUST ignore a SETUP frame."
            FrameType::Setup | FrameType::ResumeOk => self.ignore(),
            FrameType::Resume => {
                if self.role == Role::Server {
                    // "A Server that receives a RESUME frame after a SETUP frame, SHOULD send an ERROR[CONNECTION_ERROR]."
                    self.fail(
                        ErrorCode::CONNECTION_ERROR,
                        "RESUME received on an established connection",
                    );
                } else {
                    self.ignore();
                }
            }
            FrameType::Lease => self.on_lease(view),
            FrameType::Keepalive => self.on_keepalive(view),
            FrameType::MetadataPush => {
                // "Receiving a METADATA_PUSH with a non-0 Stream ID MUST be ignored."
                if view.stream_id() != 0 {
                    return self.ignore();
                }
                self.events
                    .push_back(Event::MetadataPush(view.metadata().unwrap_or_default()));
            }
            FrameType::Error => self.on_error(view),
            FrameType::RequestResponse
            | FrameType::RequestFnf
            | FrameType::RequestStream
            | FrameType::RequestChannel => self.on_request(view),
            FrameType::RequestN => self.on_request_n(view),
            FrameType::Cancel => self.on_cancel(view),
            FrameType::Payload => self.on_payload(view),
            FrameType::Ext => {
                if view.ignore() {
                    return self.ignore();
                }
                let ext_type = crate::frame::Ext::from_view(&view).extended_type;
                self.fail(
                    ErrorCode::CONNECTION_ERROR,
                    format!("EXT frame of extended type {ext_type} is not supported and lacks the Ignore flag"),
                );
            }
        }
    }

    pub(super) fn on_error(&mut self, view: FrameView) {
        let id = view.stream_id();
        let code = view.error_code().unwrap_or(ErrorCode::CONNECTION_ERROR);
        if id == 0 {
            if code.is_setup_rejection() {
                // "A server MUST ignore an ERROR[INVALID_SETUP|UNSUPPORTED_SETUP|REJECTED_SETUP|REJECTED_RESUME] frame."
                // "A client MUST ignore an ERROR[...] frame after it has completed connection establishment."
                if self.state != State::SetupSent {
                    return self.ignore();
                }
            }
            let error = self.remote_error(&view);
            if code == ErrorCode::CONNECTION_CLOSE {
                return self.on_close_requested(error);
            }
            return self.close_remote(error);
        }
        // "Receiving an ERROR on an unknown Stream ID MUST be ignored."
        if self.remove_stream(id).is_none() {
            return self.ignore();
        }
        self.events.push_back(Event::Error {
            stream_id: id,
            code,
            data: view.data(),
        });
        self.after_stream_end();
    }

    /// The stream id checks of a request, well-formed or not: a stream the
    /// peer may not open ends the connection, and one in use means the
    /// request is ignored. Whether the request is handled further.
    fn admits_request(&mut self, frame_type: FrameType, id: u32) -> bool {
        if id == 0 || !self.is_peer_stream_id(id) {
            self.fail(
                ErrorCode::CONNECTION_ERROR,
                format!("{frame_type} on stream {id}, which the peer may not open"),
            );
            return false;
        }
        // "Receiving a Request frame on a Stream ID that is already in use MUST be ignored."
        if self.streams.contains_key(&id) {
            self.ignore();
            return false;
        }
        true
    }

    pub(super) fn on_request(&mut self, view: FrameView) {
        let id = view.stream_id();
        let frame_type = view.frame_type();
        let Some(interaction) = Interaction::of_request(frame_type) else {
            return self.ignore();
        };
        if !self.admits_request(frame_type, id) {
            return;
        }
        if self.refuses_new_streams() {
            return self.refuse(id, ErrorCode::REJECTED, "the connection is closing");
        }
        if self.inbound_streams >= self.config.max_inbound_streams {
            let msg = format!(
                "too many concurrent streams (limit {})",
                self.config.max_inbound_streams
            );
            return self.refuse(id, ErrorCode::REJECTED, msg);
        }
        let initial_n = view.request_n();
        if matches!(interaction, Interaction::Stream | Interaction::Channel) && initial_n == 0 {
            return self.refuse(id, ErrorCode::INVALID, "initial request n must be > 0");
        }
        let partial = if view.follows() {
            let limits = self.reassembly_limits();
            match InboundPartial::start(MessageRole::Request, &view, view.complete(), limits) {
                Ok(p) => Some(p),
                Err((code, msg)) => return self.refuse(id, code, msg),
            }
        } else {
            None
        };
        // "A Responder that receives a REQUEST that it can not honor due to LEASE restrictions
        // MUST respond with an ERROR[REJECTED]."
        if !self.leases.admit(self.now) {
            return self.refuse(
                id,
                ErrorCode::REJECTED,
                "no lease: the request exceeds the lease granted",
            );
        }
        let mut stream = Stream::accepted(interaction, initial_n);
        if let Some(partial) = partial {
            self.reassembly_bytes += partial.buffered();
            stream.begin_inbound(partial);
            self.streams.insert(id, stream);
            self.inbound_streams += 1;
            if !self.config.reassemble {
                self.events.push_back(Event::Request {
                    stream_id: id,
                    interaction,
                    frame: view,
                    ended: false,
                });
            }
            return;
        }
        stream.request_done(view.complete());
        let ended = stream.is_done();
        if !ended {
            self.streams.insert(id, stream);
            self.inbound_streams += 1;
        }
        self.events.push_back(Event::Request {
            stream_id: id,
            interaction,
            frame: view,
            ended,
        });
    }

    pub(super) fn on_payload(&mut self, view: FrameView) {
        let id = view.stream_id();
        let limits = self.reassembly_limits();
        // "Receiving a PAYLOAD on an unknown Stream ID (including 0) MUST be ignored."
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.ignore();
        };
        if stream.is_receiving_fragments() {
            return self.on_fragment(id, view);
        }
        let complete = view.complete();
        match stream.peer_item(view.next(), complete) {
            Ok(true) => {}
            Ok(false) => return self.ignore(),
            Err((code, msg)) => return self.stream_error(id, code, msg),
        }
        if view.follows() {
            let partial = match InboundPartial::start(MessageRole::Item, &view, complete, limits) {
                Ok(p) => p,
                Err((code, msg)) => return self.stream_error(id, code, msg),
            };
            self.reassembly_bytes += partial.buffered();
            stream.begin_inbound(partial);
            if !self.config.reassemble {
                self.events.push_back(Event::Payload {
                    stream_id: id,
                    frame: view,
                    ended: false,
                });
            }
            return;
        }
        stream.item_received(complete);
        let ended = stream.is_done();
        self.events.push_back(Event::Payload {
            stream_id: id,
            frame: view,
            ended,
        });
        if ended {
            self.end_stream(id);
        }
    }

    /// A follow-up fragment of a message in progress on stream `id`.
    fn on_fragment(&mut self, id: u32, view: FrameView) {
        let limits = self.reassembly_limits();
        let taken = self.with_stream(id, |s| {
            let continued = s.continue_inbound(&view, limits);
            (continued, s.is_done(), s.interaction)
        });
        let Some((continued, ended, interaction)) = taken else {
            return self.ignore();
        };
        let Continued { whole, finished } = match continued {
            Ok(c) => c,
            Err((code, msg)) => return self.stream_error(id, code, msg),
        };
        let event = match (whole, finished) {
            (Some(frame), Some(MessageRole::Request)) => Some(Event::Request {
                stream_id: id,
                interaction,
                frame,
                ended,
            }),
            (Some(frame), _) => Some(Event::Payload {
                stream_id: id,
                frame,
                ended,
            }),
            (None, _) if limits.is_some() => None,
            (None, _) => Some(Event::Fragment {
                stream_id: id,
                frame: view,
                ended,
            }),
        };
        self.events.extend(event);
        if ended {
            self.end_stream(id);
        }
    }

    pub(super) fn on_request_n(&mut self, view: FrameView) {
        let id = view.stream_id();
        let n = view.request_n();
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.ignore();
        };
        match stream.peer_request_n(n) {
            Ok(true) => self.events.push_back(Event::RequestN { stream_id: id, n }),
            Ok(false) => self.ignore(),
            Err((code, msg)) => self.stream_error(id, code, msg),
        }
    }

    pub(super) fn on_cancel(&mut self, view: FrameView) {
        let id = view.stream_id();
        // "Receiving a CANCEL on an unknown Stream ID (including 0) MUST be ignored."
        let Some(Some(ended)) = self.with_stream(id, Stream::peer_cancel) else {
            return self.ignore();
        };
        self.events.push_back(Event::Cancel {
            stream_id: id,
            ended,
        });
        if ended {
            self.end_stream(id);
        }
    }

    /// Refuses a request before any stream exists for it.
    pub(super) fn refuse(&mut self, id: u32, code: ErrorCode, message: impl Into<String>) {
        self.requests_refused += 1;
        let error = ErrorFrame {
            stream_id: id,
            code,
            data: Bytes::from(message.into()),
        };
        self.push_stream_frame(OutFrame::from_owned(error));
    }

    /// Ends a stream on which the peer broke a rule, and tells the peer:
    /// ERROR where this side responds, CANCEL where it requested.
    pub(super) fn stream_error(&mut self, id: u32, code: ErrorCode, message: impl Into<String>) {
        let Some(stream) = self.remove_stream(id) else {
            return;
        };
        let message = message.into();
        let frame = if stream.local_requester {
            OutFrame::from_owned(Cancel { stream_id: id })
        } else {
            OutFrame::from_owned(ErrorFrame {
                stream_id: id,
                code,
                data: Bytes::from(message.clone()),
            })
        };
        self.push_stream_frame(frame);
        self.events.push_back(Event::StreamError {
            stream_id: id,
            error: StreamError::local(code, message),
        });
        self.after_stream_end();
    }
}
