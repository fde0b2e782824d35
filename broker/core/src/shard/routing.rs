//! Routing: a request's route read from its metadata, the lookup of the
//! service, the balancer's pick and the `Open` sent to the chosen instance.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rsocket_proto::conn::Interaction;
use rsocket_proto::metadata::{BinaryRouting, RequestMetadata, Route};
use rsocket_proto::{ErrorCode, FrameView};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use super::Shard;
use super::stats::Count;
use super::streams::Upstream;
use crate::balance::{Balancer, Candidate, Failover};
use crate::flow::{FRAGMENT_OVERHEAD, StreamCredit};
use crate::ids::{ConnId, StreamRef};
use crate::message::{Message, Signal};
use crate::service::{HEALTH_SERVICE, ServiceKey, with_key};

/// Requests this shard has outstanding per responder connection: the
/// least-outstanding balancer's input. A request counts from its `Open`
/// until its requester stream ends, fails over or its requester goes.
#[derive(Debug, Default)]
pub(super) struct Outstanding(FxHashMap<ConnId, u32>);

impl Outstanding {
    /// A request went to `to`.
    #[inline]
    pub(super) fn started(&mut self, to: ConnId) {
        *self.0.entry(to).or_default() += 1;
    }

    /// A request that went to `to` is over.
    #[inline]
    pub(super) fn ended(&mut self, to: ConnId) {
        if let Some(n) = self.0.get_mut(&to) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.0.remove(&to);
            }
        }
    }

    /// Requests outstanding on `to`.
    fn on(&self, to: &ConnId) -> u32 {
        self.0.get(to).copied().unwrap_or(0)
    }

    /// Forgets every request (the shard is shutting down).
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

/// One pick of an instance, as [`Shard::pick`] takes it.
#[derive(Clone, Copy, Debug)]
pub(super) struct PickRequest<'a> {
    /// The service and its instances.
    pub(super) service: &'a ServiceKey,
    pub(super) uuids: &'a [Arc<str>],
    pub(super) balancer: &'a Balancer,
    /// Whose request it is (for its sticky choice).
    pub(super) requester: ConnId,
    /// `e=<instance>`: only this instance may take it.
    pub(super) endpoint: Option<&'a [u8]>,
    /// Keep the requester on the instance it had for this service.
    pub(super) sticky: bool,
    /// The consistent-hash balancer's key.
    pub(super) hash_key: Option<&'a [u8]>,
    /// Instances already tried (failover).
    pub(super) exclude: &'a [Arc<str>],
}

/// A routed request on its way to its targets, as [`Shard::open_at`] takes it.
struct Opening<'a> {
    origin: StreamRef,
    /// The request's first frame.
    first: FrameView,
    /// The fragments after it that have arrived.
    fragments: &'a [FrameView],
    /// The credit the responder is granted, for a metered stream.
    credit: Option<u32>,
    /// A retry may need the first frame again.
    keep: bool,
    /// The requester's stream is over already (fire-and-forget).
    ended: bool,
}

/// The service a request names, found in the route table.
struct Found<'a, 'm> {
    service: &'a ServiceKey,
    /// Its instances.
    uuids: &'a [Arc<str>],
    /// The parsed route (none for binary routing).
    route: Option<Route<'m>>,
}

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
    /// Items the requester asked for with REQUEST_N before the route was
    /// complete, added to its initial demand once routed.
    pub(super) requested: u32,
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
                    requested: 0,
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
        let interaction = p
            .frames
            .first()
            .and_then(|f| Interaction::of_request(f.frame_type()))
            .unwrap_or(Interaction::Channel);
        let ended = !c.proto.is_stream_open(stream);
        self.route(
            slot,
            stream,
            interaction,
            SmallVec::from_vec(p.frames),
            Some(&p.metadata),
            ended,
        );
        if p.requested > 0
            && let Some(m) = self
                .conns
                .get_mut(slot)
                .and_then(|c| c.meters.get_mut(&stream))
        {
            m.ask(p.requested);
            self.top_up(slot, stream);
        }
    }

    /// Where a request with `metadata` from `requester` goes now: reads its
    /// route, finds the service and picks the instance (every instance for a
    /// broadcast). Sends nothing. The error says what is missing, naming the
    /// service.
    #[inline]
    pub fn destination(
        &self,
        requester: ConnId,
        interaction: Interaction,
        metadata: &[u8],
    ) -> Result<Destination, String> {
        let Some(Found {
            service,
            uuids,
            route,
        }) = self.lookup(metadata)?
        else {
            return Ok(Destination::Broker);
        };
        let policy = self.config.policies.for_service(service);
        let endpoint = route.and_then(|r| r.endpoint);
        let sticky = route.is_some_and(|r| r.sticky);
        let broadcast =
            route.is_some_and(|r| r.broadcast) && interaction == Interaction::FireAndForget;
        let hash_key = match &policy.balancer {
            Balancer::ConsistentHash { tag } => route.and_then(|r| r.tag(tag)),
            _ => None,
        };
        let mut targets = Targets::new();
        if broadcast {
            targets = self.all_targets(uuids);
        } else if let Some(t) = self.pick(PickRequest {
            service,
            uuids,
            balancer: &policy.balancer,
            requester,
            endpoint,
            sticky,
            hash_key,
            exclude: &[],
        }) {
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

    /// The service a request's metadata names, its instances and the
    /// parsed route (none for binary routing); `None` for the broker's own
    /// health check.
    #[inline]
    fn lookup<'m>(&self, metadata: &'m [u8]) -> Result<Option<Found<'_, 'm>>, String> {
        let found = RequestMetadata::scan(metadata)
            .map_err(|e| format!("request metadata is malformed: {e}"))?;
        if let Some(tags) = found.routing {
            let route = Route::from_tags(tags)
                .map_err(|e| format!("routing metadata is malformed: {e}"))?;
            if route.service == HEALTH_SERVICE.as_bytes() {
                return Ok(None);
            }
            let group = route.group.unwrap_or_default();
            let version = route.version.unwrap_or_default();
            // The whole key first (a service named with dots and no method),
            // then the key without its method.
            let found = [route.key, route.service]
                .into_iter()
                .find_map(|name| with_key(group, name, version, |k| self.routes.service(k)));
            return match found {
                Some((service, uuids)) => Ok(Some(Found {
                    service,
                    uuids,
                    route: Some(route),
                })),
                None => Err(format!("no live instance of service {route}")),
            };
        }
        let Some(bin) = found.binary_routing else {
            return Err("the request has no routing metadata".into());
        };
        let bin = BinaryRouting::parse(bin)
            .map_err(|e| format!("binary routing metadata is malformed: {e}"))?;
        match self
            .routes
            .service_by_binary_id(bin.service_id)
            .and_then(|key| self.routes.service(key.as_str().as_bytes()))
        {
            Some((service, uuids)) => Ok(Some(Found {
                service,
                uuids,
                route: None,
            })),
            None => Err(format!(
                "no live instance of service {} (binary id {:#010x})",
                String::from_utf8_lossy(bin.routing_text),
                bin.service_id
            )),
        }
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
                    return self.answer_health_check(slot, stream, interaction);
                }
                Err(message) => {
                    tracing::debug!(conn = %requester, stream, %message, "request refused");
                    return self.refuse(slot, stream, ErrorCode::REJECTED, message);
                }
            };
        // One branch when the connection may call everything, unlimited.
        if self.conns.get(slot).is_none_or(|c| c.checks_requests)
            && let Some(message) = self.check_request(slot, &service, !ended)
        {
            tracing::debug!(conn = %requester, stream, %message, "request refused");
            return self.refuse(slot, stream, ErrorCode::REJECTED, message);
        }
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
            self.meter(slot, stream, first.request_n())
        } else {
            None
        };
        let open = Opening {
            origin,
            first,
            fragments: &frames,
            credit,
            keep,
            ended,
        };
        let kept = self.open_at(&targets, open);
        if ended {
            return;
        }
        let retry = match failover {
            Failover::Retry { attempts } if keep => kept.map(|f| (f, attempts)),
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

    /// The health check: the broker is up, so it answers "1".
    #[cold]
    fn answer_health_check(&mut self, slot: usize, stream: u32, interaction: Interaction) {
        if let Some(c) = self.conns.get_mut(slot)
            && interaction == Interaction::RequestResponse
        {
            let _ = c
                .proto
                .send_payload(stream, None, Bytes::from_static(b"1"), true, true);
        }
    }

    /// Starts metering requester stream `stream` of connection `slot`,
    /// which asked for `requested` items: the credit to grant its responder.
    fn meter(&mut self, slot: usize, stream: u32, requested: u32) -> Option<u32> {
        let limits = self.config.flow;
        let c = self.conns.get_mut(slot)?;
        let room = c.flow.room(&limits, c.proto.pending_bytes());
        let mut meter = StreamCredit::new(c.flow.serial(), requested);
        let grant = meter.first_grant(&limits, room);
        c.flow.reserved += grant.reserved;
        c.meters.insert(stream, meter);
        Some(grant.n)
    }

    /// Sends the request to every target: an `Open`, then its fragments.
    /// Returns the first frame when a retry keeps it.
    fn open_at(&mut self, targets: &Targets, open: Opening<'_>) -> Option<FrameView> {
        let Opening {
            origin,
            first,
            fragments,
            credit,
            keep,
            ended,
        } = open;
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
            self.send_frame(origin.conn, to.shard, open);
            for f in fragments {
                let fragment = Message::ToResponder {
                    origin,
                    to: *to,
                    signal: Signal::Frame(f.clone()),
                };
                self.send_frame(origin.conn, to.shard, fragment);
            }
            if !ended {
                self.outstanding.started(*to);
            }
        }
        first
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

    /// The instance of the service (among its instances) the balancer
    /// picks for the requester, with the connection to use.
    pub(super) fn pick(&self, request: PickRequest<'_>) -> Option<(Arc<str>, ConnId)> {
        let PickRequest {
            service,
            uuids,
            balancer,
            requester,
            endpoint,
            sticky,
            hash_key,
            exclude,
        } = request;
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
            let outstanding = inst.conns.iter().map(|c| self.outstanding.on(c)).sum();
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
