//! Routing: a request's route read from its metadata, the lookup of the
//! service, the balancer's pick and the `Open` sent to the chosen instance.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rsocket_proto::conn::Interaction;
use rsocket_proto::frame::FrameType;
use rsocket_proto::metadata::{BinaryRouting, RequestMetadata, Route};
use rsocket_proto::{ErrorCode, FrameView};
use smallvec::SmallVec;

use super::Shard;
use super::stats::Count;
use super::streams::Upstream;
use crate::balance::{Candidate, Failover};
use crate::flow::{FRAGMENT_OVERHEAD, StreamCredit};
use crate::ids::{ConnId, StreamRef};
use crate::message::{Message, Signal};
use crate::service::{HEALTH_SERVICE, ServiceKey, with_key};

/// Where a request goes, as [`Shard::destination`] decides.
#[derive(Debug)]
pub enum Destination {
    /// The broker answers it itself (the health check).
    Broker,
    /// Instances of a service.
    Instances {
        /// The service.
        service: ServiceKey,
        /// The chosen instances with the connection to use for each: one,
        /// or every routable instance for a broadcast.
        targets: Targets,
        /// The requester asked to stay on the instance it gets.
        sticky: bool,
        /// What to do when the instance goes away before answering.
        failover: Failover,
    },
}

/// Instances a request goes to, each with the connection to use: one
/// except for a broadcast, so held inline.
pub type Targets = SmallVec<[(Arc<str>, ConnId); 1]>;

/// A request whose routing metadata spans fragments that have not all
/// arrived. Its frames are copies (they may wait long; a copy does not keep
/// a whole receive buffer alive), counted with their overhead in `held`.
#[derive(Debug)]
pub(super) struct PendingRoute {
    pub(super) frames: Vec<FrameView>,
    pub(super) metadata: BytesMut,
    pub(super) held: usize,
}

impl Shard {
    /// Refuses a request on `a`'s stream with `code`.
    pub(super) fn refuse(&mut self, slot: usize, stream: u32, code: ErrorCode, message: String) {
        self.stats.requests_rejected += 1;
        if let Some(c) = self.conns.get_mut(slot) {
            if c.proto.is_stream_open(stream) {
                let _ = c.proto.send_error(stream, code, Bytes::from(message));
            }
            c.upstream.remove(&stream);
            if let Some(p) = c.pending.remove(&stream) {
                c.flow.unrouted = c.flow.unrouted.saturating_sub(p.held);
            }
        }
        self.wake(slot);
    }

    /// Why connection `slot` may not hold one more fragment of `cost`
    /// bytes for a request that already holds `held`, if it may not.
    pub(super) fn unroutable(&self, slot: usize, held: usize, cost: usize) -> Option<String> {
        let limits = &self.config.flow;
        if held + cost > limits.max_unrouted_bytes {
            return Some(format!(
                "the request's fragments before its routing metadata ends exceed {} bytes \
                 (each fragment counts {FRAGMENT_OVERHEAD} bytes more than its length)",
                limits.max_unrouted_bytes
            ));
        }
        let c = self.conns.get(slot)?;
        let total = c.flow.held(c.proto.pending_bytes()) + cost;
        (total > limits.max_connection_memory).then(|| {
            format!(
                "the connection holds {total} bytes, more than its limit of {} \
                 (max_connection_memory)",
                limits.max_connection_memory
            )
        })
    }

    pub(super) fn on_request(
        &mut self,
        slot: usize,
        stream: u32,
        interaction: Interaction,
        frame: FrameView,
        ended: bool,
    ) {
        let metadata = frame.metadata_slice().unwrap_or_default();
        // Only a fragmented request may have its route still to come; a
        // whole one is scanned once, when it is routed.
        let gather = frame.follows()
            && !ended
            && !matches!(RequestMetadata::scan(metadata),
                Ok(f) if f.routing.is_some() || f.binary_routing.is_some());
        if gather {
            // The routing metadata may go on in the next fragments: gather
            // metadata until data (or the end of the message) shows it is complete.
            let cost = frame.len() + FRAGMENT_OVERHEAD;
            if let Some(msg) = self.unroutable(slot, 0, cost) {
                return self.refuse(slot, stream, ErrorCode::REJECTED, msg);
            }
            if let Some(c) = self.conns.get_mut(slot) {
                let pending = PendingRoute {
                    frames: vec![frame.detached()],
                    metadata: BytesMut::from(metadata),
                    held: cost,
                };
                c.pending.insert(stream, pending);
                c.flow.unrouted += cost;
            }
            return self.wake(slot);
        }
        self.route(
            slot,
            stream,
            interaction,
            smallvec::smallvec![frame],
            None,
            ended,
        );
    }

    pub(super) fn on_pending_fragment(&mut self, slot: usize, stream: u32, frame: FrameView) {
        let cost = frame.len() + FRAGMENT_OVERHEAD;
        let held = match self.conns.get(slot).and_then(|c| c.pending.get(&stream)) {
            Some(p) => p.held,
            None => return,
        };
        if let Some(msg) = self.unroutable(slot, held, cost) {
            return self.refuse(slot, stream, ErrorCode::REJECTED, msg);
        }
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let Some(p) = c.pending.get_mut(&stream) else {
            return;
        };
        if let Some(m) = frame.metadata_slice() {
            p.metadata.extend_from_slice(m);
        }
        let complete = !frame.follows() || !frame.data_slice().is_empty() || !frame.has_metadata();
        p.frames.push(frame.detached());
        p.held += cost;
        c.flow.unrouted += cost;
        if !complete {
            return self.wake(slot);
        }
        let Some(p) = c.pending.remove(&stream) else {
            return;
        };
        c.flow.unrouted = c.flow.unrouted.saturating_sub(p.held);
        let interaction = match p.frames.first().map(FrameView::frame_type) {
            Some(FrameType::RequestResponse) => Interaction::RequestResponse,
            Some(FrameType::RequestFnf) => Interaction::FireAndForget,
            Some(FrameType::RequestStream) => Interaction::Stream,
            _ => Interaction::Channel,
        };
        let ended = !c.proto.is_stream_open(stream);
        self.route(
            slot,
            stream,
            interaction,
            SmallVec::from_vec(p.frames),
            Some(&p.metadata),
            ended,
        );
    }

    /// Where a request with `metadata` from `requester` goes now: reads its
    /// route, finds the service and picks the instance (every instance for a
    /// broadcast). Sends nothing. The error says what is missing, naming the
    /// service.
    pub fn destination(
        &self,
        requester: ConnId,
        interaction: Interaction,
        metadata: &[u8],
    ) -> Result<Destination, String> {
        let found = RequestMetadata::scan(metadata)
            .map_err(|e| format!("request metadata is malformed: {e}"))?;
        let (service, uuids, route) = if let Some(tags) = found.routing {
            let route = Route::from_tags(tags)
                .map_err(|e| format!("routing metadata is malformed: {e}"))?;
            if route.service == HEALTH_SERVICE.as_bytes() {
                return Ok(Destination::Broker);
            }
            let group = route.group.unwrap_or_default();
            let version = route.version.unwrap_or_default();
            // The whole key first (a service named with dots and no method),
            // then the key without its method.
            let found = [route.key, route.service]
                .into_iter()
                .find_map(|name| with_key(group, name, version, |k| self.routes.service(k)));
            match found {
                Some((key, uuids)) => (key, uuids, Some(route)),
                None => return Err(format!("no live instance of service {route}")),
            }
        } else if let Some(bin) = found.binary_routing {
            let bin = BinaryRouting::parse(bin)
                .map_err(|e| format!("binary routing metadata is malformed: {e}"))?;
            match self
                .routes
                .service_by_binary_id(bin.service_id)
                .and_then(|key| self.routes.service(key.as_str().as_bytes()))
            {
                Some((key, uuids)) => (key, uuids, None),
                None => {
                    return Err(format!(
                        "no live instance of service {} (binary id {:#010x})",
                        String::from_utf8_lossy(bin.routing_text),
                        bin.service_id
                    ));
                }
            }
        } else {
            return Err("the request has no routing metadata".into());
        };

        let policy = self
            .config
            .policies
            .for_service(service, Self::service_name(service));
        let endpoint = route.and_then(|r| r.endpoint);
        let sticky = route.is_some_and(|r| r.sticky);
        let broadcast =
            route.is_some_and(|r| r.broadcast) && interaction == Interaction::FireAndForget;
        let hash_key = match &policy.balancer {
            crate::balance::Balancer::ConsistentHash { tag } => route.and_then(|r| r.tag(tag)),
            _ => None,
        };
        let mut targets = Targets::new();
        if broadcast {
            targets = self.all_targets(uuids);
        } else if let Some(t) = self.pick(
            service,
            uuids,
            &policy.balancer,
            requester,
            endpoint,
            sticky,
            hash_key,
            &[],
        ) {
            targets.push(t);
        }
        if targets.is_empty() {
            return Err(match endpoint {
                Some(e) => format!(
                    "instance {} does not serve {service}",
                    String::from_utf8_lossy(e)
                ),
                None => format!("no live instance of service {service}"),
            });
        }
        Ok(Destination::Instances {
            service: service.clone(),
            targets,
            sticky,
            failover: policy.failover,
        })
    }

    /// The route's service name alone, for the health check and policies.
    pub(super) fn service_name(key: &ServiceKey) -> &str {
        let s = key.as_str();
        let s = s.split_once('!').map_or(s, |(_, rest)| rest);
        s.split_once(':').map_or(s, |(name, _)| name)
    }

    pub(super) fn route(
        &mut self,
        slot: usize,
        stream: u32,
        interaction: Interaction,
        mut frames: SmallVec<[FrameView; 1]>,
        gathered: Option<&[u8]>,
        ended: bool,
    ) {
        if frames.is_empty() {
            return;
        }
        // The request's first frame, and in `frames` the fragments after it.
        let first = frames.remove(0);
        // The routing metadata: the first frame's, or what the fragments
        // of a request gathered.
        let metadata = gathered.unwrap_or_else(|| first.metadata_slice().unwrap_or_default());
        let requester = match self.conns.get(slot) {
            Some(c) => c.id,
            None => return,
        };
        let (service, targets, sticky, failover) =
            match self.destination(requester, interaction, metadata) {
                Ok(Destination::Instances {
                    service,
                    targets,
                    sticky,
                    failover,
                }) => (service, targets, sticky, failover),
                Ok(Destination::Broker) => {
                    // The health check: the broker is up, so it answers "1".
                    if let Some(c) = self.conns.get_mut(slot)
                        && interaction == Interaction::RequestResponse
                    {
                        let _ = c.proto.send_payload(
                            stream,
                            None,
                            Bytes::from_static(b"1"),
                            true,
                            true,
                        );
                    }
                    return;
                }
                Err(message) => {
                    tracing::debug!(conn = %requester, stream, %message, "request refused");
                    return self.refuse(slot, stream, ErrorCode::REJECTED, message);
                }
            };
        self.stats.requests_routed += 1;
        self.count(&service, interaction, Count::Request);
        let origin = StreamRef {
            conn: requester,
            stream,
        };
        // Kept for a retry on another instance: a whole request-response.
        let keep = !ended
            && matches!(failover, Failover::Retry { .. })
            && interaction == Interaction::RequestResponse
            && frames.is_empty()
            && !first.follows();
        // A stream's items are metered here, where they are written to the
        // requester: the responder is granted what this side can absorb.
        let credit = if !ended && matches!(interaction, Interaction::Stream | Interaction::Channel)
        {
            let limits = self.config.flow;
            self.conns.get_mut(slot).map(|c| {
                let room = c.flow.room(&limits, c.proto.pending_bytes());
                let mut meter = StreamCredit::new(c.flow.serial(), first.request_n());
                let grant = meter.first_grant(&limits, room);
                c.flow.reserved += grant.reserved;
                c.meters.insert(stream, meter);
                grant.n
            })
        } else {
            None
        };
        // The last target takes the request itself, unless a retry keeps it:
        // its buffer moves on instead of being shared once more.
        let mut first = Some(first);
        let last = targets.len().saturating_sub(1);
        for (i, (_, to)) in targets.iter().enumerate() {
            let frame = if i == last && !keep {
                first.take()
            } else {
                first.clone()
            };
            let Some(frame) = frame else {
                break;
            };
            let open = Message::Open {
                origin,
                to: *to,
                frame,
                credit,
            };
            self.send_frame(requester, to.shard, open);
            for f in &frames {
                let fragment = Message::ToResponder {
                    origin,
                    to: *to,
                    signal: Signal::Frame(f.clone()),
                };
                self.send_frame(requester, to.shard, fragment);
            }
            if !ended {
                *self.outstanding.entry(*to).or_default() += 1;
            }
        }
        if ended {
            return;
        }
        let retry = match failover {
            Failover::Retry { attempts } if keep => first.map(|f| (f, attempts)),
            _ => None,
        };
        if let Some(c) = self.conns.get_mut(slot) {
            if sticky && let Some((instance, _)) = targets.first() {
                c.sticky.insert(service.clone(), instance.clone());
            }
            let mut tried = SmallVec::new();
            let mut conns = SmallVec::new();
            for (instance, conn) in targets {
                tried.push(instance);
                conns.push(conn);
            }
            c.upstream.insert(
                stream,
                Upstream {
                    targets: conns,
                    service,
                    interaction,
                    tried,
                    retry,
                },
            );
        }
    }

    /// One connection of every routable instance in `uuids` (for broadcast).
    pub(super) fn all_targets(&self, uuids: &[Arc<str>]) -> Targets {
        // Sized once: growing from the inline one would reallocate at 2, 4, 8, ...
        let mut targets = Targets::with_capacity(uuids.len());
        for u in uuids {
            if let Some(inst) = self.routes.instance(u)
                && inst.status.routable()
                && let Some(c) = self.connection_of(inst)
            {
                targets.push((u.clone(), c));
            }
        }
        targets
    }

    /// The connection of an instance to use from this shard: one on this shard if it has one.
    pub(super) fn connection_of(&self, inst: &crate::routes::Instance) -> Option<ConnId> {
        inst.conns
            .iter()
            .find(|c| c.shard == self.id)
            .or_else(|| inst.conns.first())
            .copied()
    }

    /// The instance of `service` (among `uuids`, its instances) the
    /// balancer picks for `requester`, with the connection to use.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pick(
        &self,
        service: &ServiceKey,
        uuids: &[Arc<str>],
        balancer: &crate::balance::Balancer,
        requester: ConnId,
        endpoint: Option<&[u8]>,
        sticky: bool,
        hash_key: Option<&[u8]>,
        exclude: &[Arc<str>],
    ) -> Option<(Arc<str>, ConnId)> {
        // Candidates borrow from the route table and live on the stack: no
        // allocation or reference count per request for up to 8 instances.
        let mut candidates: SmallVec<[Candidate<'_>; 8]> = SmallVec::new();
        let mut chosen: SmallVec<[(&Arc<str>, ConnId); 8]> = SmallVec::new();
        for uuid in uuids {
            if exclude.contains(uuid) {
                continue;
            }
            if endpoint.is_some_and(|e| e != uuid.as_bytes()) {
                continue;
            }
            let Some(inst) = self.routes.instance(uuid) else {
                continue;
            };
            if !inst.status.routable() {
                continue;
            }
            let Some(conn) = self.connection_of(inst) else {
                continue;
            };
            let outstanding = inst
                .conns
                .iter()
                .map(|c| self.outstanding.get(c).copied().unwrap_or(0))
                .sum();
            candidates.push(Candidate {
                uuid,
                weight: inst.app.power_rating.max(1),
                outstanding,
                local: conn.shard == self.id,
            });
            chosen.push((uuid, conn));
        }
        if candidates.is_empty() {
            return None;
        }
        if sticky
            && let Some(stuck) = self
                .conns
                .get(requester.slot as usize)
                .filter(|c| c.id == requester)
                .and_then(|c| c.sticky.get(service))
            && let Some(&(uuid, conn)) = chosen.iter().find(|(u, _)| *u == stuck)
        {
            return Some((uuid.clone(), conn));
        }
        let i = {
            let (state, rng) = &mut *self.picker.borrow_mut();
            state.pick(service, balancer, &candidates, hash_key, rng)
        };
        let &(uuid, conn) = chosen.get(i)?;
        Some((uuid.clone(), conn))
    }
}
