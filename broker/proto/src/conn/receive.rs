//! Receiving: one frame from the peer, checked against the spec's rules
//! and turned into events, stream state and frames to send back.

use std::time::Instant;

use bytes::Bytes;

use super::lease::LeaseWindow;
use super::stream::{InboundPartial, MessageRole, Stream};
use super::{Connection, Event, Interaction, Role, State};
use crate::error::{DecodeError, ErrorCode, Initiator, StreamError};
use crate::fragment::Reassembly;
use crate::frame::{Cancel, ErrorFrame, Flags, FrameType, FrameView, Header};
use crate::out::OutFrame;

impl Connection {
    /// Handles one received frame (without length prefix).
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) {
        self.now = now;
        if matches!(self.state, State::Closed | State::Disconnected) {
            return;
        }
        self.last_received = now;
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
            State::Established => self.on_frame(view),
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
            if id == 0 || !self.is_peer_stream_id(id) {
                return self.fail(
                    ErrorCode::CONNECTION_ERROR,
                    format!("{frame_type} on invalid stream id {id}"),
                );
            }
            if self.streams.contains_key(&id) {
                return self.ignore();
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
        if self.role == Role::Client
            && !self.setup_confirmed
            && (view.frame_type() == FrameType::Lease
                || view.frame_type().is_request()
                || (view.stream_id() != 0 && self.streams.contains_key(&view.stream_id())))
        {
            // "A client assumes a SETUP is accepted if it receives a response to a request, a LEASE
            // frame, or if it sees a REQUEST type."
            self.setup_confirmed = true;
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
                if self.role == Role::Server || self.setup_confirmed {
                    return self.ignore();
                }
            }
            let error = self.remote_error(&view);
            if code == ErrorCode::CONNECTION_CLOSE {
                // "Sender or Receiver of this frame MUST wait for outstanding streams to terminate
                // before closing the connection."
                self.draining = true;
                self.close_when_idle = true;
                self.close_initiator = Initiator::Remote;
                self.events.push_back(Event::Closing(error.clone()));
                if self.streams.is_empty() {
                    self.close_remote(error);
                }
                return;
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

    pub(super) fn on_request(&mut self, view: FrameView) {
        let id = view.stream_id();
        let frame_type = view.frame_type();
        let Some(interaction) = Interaction::of_request(frame_type) else {
            return self.ignore();
        };
        if id == 0 || !self.is_peer_stream_id(id) {
            return self.fail(
                ErrorCode::CONNECTION_ERROR,
                format!("{frame_type} on stream {id}, which the peer may not open"),
            );
        }
        // "Receiving a Request frame on a Stream ID that is already in use MUST be ignored."
        if self.streams.contains_key(&id) {
            return self.ignore();
        }
        if self.draining {
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
        if self.config.reassemble
            && view.follows()
            && self.reassembly_bytes + view.payload_len() > self.config.max_reassembly_memory
        {
            let msg = "too many fragmented messages in progress on this connection";
            return self.refuse(id, ErrorCode::REJECTED, msg);
        }
        // "A Responder that receives a REQUEST that it can not honor due to LEASE restrictions
        // MUST respond with an ERROR[REJECTED]."
        if self.lease_enabled && !LeaseWindow::take(&mut self.granted_lease, self.now) {
            return self.refuse(
                id,
                ErrorCode::REJECTED,
                "no lease: the request exceeds the lease granted",
            );
        }
        let mut stream = Stream::accepted(interaction, initial_n);
        if view.follows() {
            let reassembly = if self.config.reassemble {
                match Reassembly::start(&view, self.config.max_reassembled_size) {
                    Ok(r) => Some(r),
                    Err(e) => return self.refuse(id, ErrorCode::REJECTED, e.to_string()),
                }
            } else {
                None
            };
            let partial = InboundPartial {
                role: MessageRole::Request,
                complete: view.complete(),
                len: view.payload_len(),
                data_started: !view.data_slice().is_empty(),
                reassembly,
            };
            self.reassembly_bytes += partial.buffered();
            stream.inbound_partial = Some(partial);
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
        let max = self.config.max_reassembled_size;
        // "Receiving a PAYLOAD on an unknown Stream ID (including 0) MUST be ignored."
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.ignore();
        };
        if let Some(partial) = stream.inbound_partial.as_mut() {
            // A follow-up fragment of a message in progress.
            let added = view.payload_len();
            let reassembling = partial.reassembly.is_some();
            if reassembling {
                if partial.len + added > max {
                    let msg =
                        format!("fragmented message exceeds the reassembly limit of {max} bytes");
                    return self.stream_error(id, ErrorCode::REJECTED, msg);
                }
                if self.reassembly_bytes + added > self.config.max_reassembly_memory {
                    let msg = "too many fragmented messages in progress on this connection";
                    return self.stream_error(id, ErrorCode::REJECTED, msg);
                }
            } else if partial.data_started && view.metadata_slice().is_some_and(|m| !m.is_empty()) {
                // "When fragmented, the Metadata MUST be transmitted completely before the Data."
                let msg = "fragment carries metadata after data";
                return self.stream_error(id, ErrorCode::INVALID, msg);
            }
            partial.len += added;
            partial.data_started |= !view.data_slice().is_empty();
            partial.complete |= view.complete();
            if reassembling {
                self.reassembly_bytes += added;
            }
            let whole = match partial.reassembly.as_mut().map(|r| r.push(&view)) {
                Some(Err(e)) => return self.stream_error(id, ErrorCode::INVALID, e.to_string()),
                Some(Ok(whole)) => whole,
                None => None,
            };
            let mut role = None;
            if !view.follows()
                && let Some(p) = stream.inbound_partial.take()
            {
                self.reassembly_bytes -= p.buffered();
                match p.role {
                    MessageRole::Request => stream.request_done(p.complete),
                    MessageRole::Item => stream.item_received(p.complete),
                }
                role = Some(p.role);
            }
            let ended = stream.is_done();
            let interaction = stream.interaction;
            let event = match (whole, role) {
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
                (None, _) if reassembling => None,
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
            return;
        }
        if !stream.inbound_open {
            return self.ignore();
        }
        let next = view.next();
        let complete = view.complete();
        if !next && !complete && stream.interaction != Interaction::RequestResponse {
            // "A PAYLOAD MUST NOT have both (C)omplete and (N)ext empty (false)."
            return self.ignore();
        }
        if next && !stream.recv_credit.take() {
            return self.stream_error(
                id,
                ErrorCode::INVALID,
                "PAYLOAD sent without REQUEST_N credit",
            );
        }
        if view.follows() {
            let reassembly = if self.config.reassemble {
                if self.reassembly_bytes + view.payload_len() > self.config.max_reassembly_memory {
                    let msg = "too many fragmented messages in progress on this connection";
                    return self.stream_error(id, ErrorCode::REJECTED, msg);
                }
                match Reassembly::start(&view, max) {
                    Ok(r) => Some(r),
                    Err(e) => return self.stream_error(id, ErrorCode::REJECTED, e.to_string()),
                }
            } else {
                None
            };
            let partial = InboundPartial {
                role: MessageRole::Item,
                complete,
                len: view.payload_len(),
                data_started: !view.data_slice().is_empty(),
                reassembly,
            };
            self.reassembly_bytes += partial.buffered();
            stream.inbound_partial = Some(partial);
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

    pub(super) fn on_request_n(&mut self, view: FrameView) {
        let id = view.stream_id();
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.ignore();
        };
        if !stream.sends_items() || !stream.outbound_open {
            return self.ignore();
        }
        let n = view.request_n();
        // "Request N: ... Value MUST be > 0."
        if n == 0 {
            return self.stream_error(id, ErrorCode::INVALID, "REQUEST_N with n = 0");
        }
        stream.send_credit.add(n);
        self.events.push_back(Event::RequestN { stream_id: id, n });
    }

    pub(super) fn on_cancel(&mut self, view: FrameView) {
        let id = view.stream_id();
        // "Receiving a CANCEL on an unknown Stream ID (including 0) MUST be ignored."
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.ignore();
        };
        // "If the sender wants to cancel sending a fragmented sequence, it MAY send a CANCEL frame
        // without finishing delivery of the fragments."
        let aborted = stream.inbound_partial.take();
        let aborted_partial = aborted.is_some();
        self.reassembly_bytes -= aborted.map_or(0, |p| p.buffered());
        let ended = if !stream.local_requester || aborted_partial {
            // "Upon receiving a CANCEL, the stream is terminated on the Responder."
            true
        } else if stream.interaction == Interaction::Channel {
            // The channel's responder no longer wants the requester's items.
            stream.outbound_open = false;
            stream.outbound_partial = None;
            stream.is_done()
        } else {
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
