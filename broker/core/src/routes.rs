//! The route table: which app instances serve which services, over which
//! connections. Every shard holds a full copy and applies the same
//! revisioned updates, so lookups are local and take no lock.

use std::collections::BTreeSet;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::app::{AppInfo, AppStatus};
use crate::ids::{ConnId, ShardId};
use crate::service::ServiceKey;

/// A change to the route table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// A connection of `app` came up, publishing `services` (it joins the
    /// instance when one with the app's uuid exists).
    Join {
        /// The connection.
        conn: ConnId,
        /// The app.
        app: Arc<AppInfo>,
        /// Services it publishes.
        services: Vec<ServiceKey>,
    },
    /// A connection went away; an instance with no connection left goes too.
    Leave {
        /// The connection.
        conn: ConnId,
    },
    /// An instance now also serves `services`.
    Expose {
        /// Instance uuid.
        instance: Arc<str>,
        /// Services added.
        services: Vec<ServiceKey>,
    },
    /// An instance no longer serves `services`.
    Hide {
        /// Instance uuid.
        instance: Arc<str>,
        /// Services removed.
        services: Vec<ServiceKey>,
    },
    /// An instance's status changed.
    Status {
        /// Instance uuid.
        instance: Arc<str>,
        /// New status.
        status: AppStatus,
    },
}

/// A route change as it travels between shards: numbered per origin shard,
/// so every replica applies each origin's changes in order, exactly once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteUpdate {
    /// The shard that made the change.
    pub origin: ShardId,
    /// 1 for the origin's first change, then +1.
    pub revision: u64,
    /// The change.
    pub change: RouteChange,
}

/// One app instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// What its SETUP said.
    pub app: Arc<AppInfo>,
    /// Its status.
    pub status: AppStatus,
    /// Its connections, in the order they joined.
    pub conns: Vec<ConnId>,
    /// Services it serves now.
    pub services: BTreeSet<ServiceKey>,
}

/// A replica of the route table.
#[derive(Debug, Default)]
pub struct RouteTable {
    instances: FxHashMap<Arc<str>, Instance>,
    /// Service -> uuids of the instances that publish it (in any status).
    services: FxHashMap<ServiceKey, Vec<Arc<str>>>,
    /// alibaba binary routing id -> service.
    binary: FxHashMap<u32, ServiceKey>,
    conn_instance: FxHashMap<ConnId, Arc<str>>,
    /// Last revision applied, per origin shard.
    applied: Vec<u64>,
}

impl RouteTable {
    /// An empty table for `shards` shards.
    pub fn new(shards: u16) -> Self {
        Self {
            applied: vec![0; usize::from(shards)],
            ..Self::default()
        }
    }

    /// Applies an update. Returns false (and changes nothing) when it is not
    /// the next revision from its origin.
    pub fn apply(&mut self, update: &RouteUpdate) -> bool {
        let Some(last) = self.applied.get_mut(usize::from(update.origin)) else {
            return false;
        };
        if update.revision != *last + 1 {
            return false;
        }
        *last = update.revision;
        match &update.change {
            RouteChange::Join {
                conn,
                app,
                services,
            } => self.join(*conn, app, services),
            RouteChange::Leave { conn } => self.leave(*conn),
            RouteChange::Expose { instance, services } => {
                if let Some(inst) = self.instances.get_mut(instance) {
                    for s in services {
                        if inst.services.insert(s.clone()) {
                            Self::add_service(&mut self.services, &mut self.binary, s, instance);
                        }
                    }
                }
            }
            RouteChange::Hide { instance, services } => {
                if let Some(inst) = self.instances.get_mut(instance) {
                    for s in services {
                        if inst.services.remove(s) {
                            Self::remove_service(&mut self.services, &mut self.binary, s, instance);
                        }
                    }
                }
            }
            RouteChange::Status { instance, status } => {
                if let Some(inst) = self.instances.get_mut(instance) {
                    inst.status = *status;
                }
            }
        }
        true
    }

    fn add_service(
        services: &mut FxHashMap<ServiceKey, Vec<Arc<str>>>,
        binary: &mut FxHashMap<u32, ServiceKey>,
        service: &ServiceKey,
        instance: &Arc<str>,
    ) {
        let list = services.entry(service.clone()).or_default();
        if !list.contains(instance) {
            list.push(instance.clone());
        }
        binary
            .entry(service.binary_id())
            .or_insert_with(|| service.clone());
    }

    fn remove_service(
        services: &mut FxHashMap<ServiceKey, Vec<Arc<str>>>,
        binary: &mut FxHashMap<u32, ServiceKey>,
        service: &ServiceKey,
        instance: &Arc<str>,
    ) {
        if let Some(list) = services.get_mut(service) {
            list.retain(|i| i != instance);
            if list.is_empty() {
                services.remove(service);
                binary.remove(&service.binary_id());
            }
        }
    }

    fn join(&mut self, conn: ConnId, app: &Arc<AppInfo>, services: &[ServiceKey]) {
        let uuid = app.uuid.clone();
        let inst = self
            .instances
            .entry(uuid.clone())
            .or_insert_with(|| Instance {
                app: app.clone(),
                status: AppStatus::Serving,
                conns: Vec::new(),
                services: BTreeSet::new(),
            });
        if !inst.conns.contains(&conn) {
            inst.conns.push(conn);
        }
        for s in services {
            if inst.services.insert(s.clone()) {
                Self::add_service(&mut self.services, &mut self.binary, s, &uuid);
            }
        }
        self.conn_instance.insert(conn, uuid);
    }

    fn leave(&mut self, conn: ConnId) {
        let Some(uuid) = self.conn_instance.remove(&conn) else {
            return;
        };
        let Some(inst) = self.instances.get_mut(&uuid) else {
            return;
        };
        inst.conns.retain(|c| *c != conn);
        if inst.conns.is_empty()
            && let Some(inst) = self.instances.remove(&uuid)
        {
            for s in &inst.services {
                Self::remove_service(&mut self.services, &mut self.binary, s, &uuid);
            }
        }
    }

    /// The service registered under `key`, with the uuids of its instances.
    pub fn service(&self, key: &[u8]) -> Option<(&ServiceKey, &[Arc<str>])> {
        self.services
            .get_key_value(key)
            .map(|(k, v)| (k, v.as_slice()))
    }

    /// The service with alibaba binary routing id `id`.
    pub fn service_by_binary_id(&self, id: u32) -> Option<&ServiceKey> {
        self.binary.get(&id)
    }

    /// An instance by uuid.
    pub fn instance(&self, uuid: &str) -> Option<&Instance> {
        self.instances.get(uuid)
    }

    /// The instance a connection belongs to.
    pub fn instance_of(&self, conn: ConnId) -> Option<&Arc<str>> {
        self.conn_instance.get(&conn)
    }

    /// All instances.
    pub fn instances(&self) -> impl Iterator<Item = (&Arc<str>, &Instance)> {
        self.instances.iter()
    }

    /// All services and their instances.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &[Arc<str>])> {
        self.services.iter().map(|(k, v)| (k, v.as_slice()))
    }

    /// Last revision applied from each origin shard.
    pub fn revisions(&self) -> &[u64] {
        &self.applied
    }

    /// A canonical dump of the table, for comparing replicas.
    pub fn snapshot(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .instances
            .iter()
            .map(|(uuid, i)| {
                let mut conns = i.conns.clone();
                conns.sort();
                format!("{uuid} {:?} {conns:?} {:?}", i.status, i.services)
            })
            .collect();
        out.sort();
        let mut services: Vec<String> = self
            .services
            .iter()
            .map(|(k, v)| {
                let mut v: Vec<&str> = v.iter().map(|s| &**s).collect();
                v.sort_unstable();
                format!("{k} -> {v:?}")
            })
            .collect();
        services.sort();
        out.extend(services);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(uuid: &str) -> Arc<AppInfo> {
        Arc::new(AppInfo {
            name: "a".into(),
            uuid: uuid.into(),
            ip: None,
            power_rating: 1,
            raw: "{}".into(),
            identity: None,
        })
    }

    fn conn(shard: u16, slot: u32) -> ConnId {
        ConnId {
            shard,
            slot,
            generation: 1,
        }
    }

    fn up(origin: u16, revision: u64, change: RouteChange) -> RouteUpdate {
        RouteUpdate {
            origin,
            revision,
            change,
        }
    }

    #[test]
    fn join_leave_and_revisions() {
        let svc = ServiceKey::new("", "echo", "");
        let mut t = RouteTable::new(2);
        assert!(t.apply(&up(
            0,
            1,
            RouteChange::Join {
                conn: conn(0, 1),
                app: app("u1"),
                services: vec![svc.clone()]
            }
        )));
        assert!(
            !t.apply(&up(0, 1, RouteChange::Leave { conn: conn(0, 1) })),
            "replayed revision"
        );
        assert!(
            !t.apply(&up(1, 2, RouteChange::Leave { conn: conn(0, 1) })),
            "gap in revisions"
        );
        assert!(t.apply(&up(
            1,
            1,
            RouteChange::Join {
                conn: conn(1, 1),
                app: app("u1"),
                services: vec![]
            }
        )));
        assert_eq!(t.instance("u1").unwrap().conns, [conn(0, 1), conn(1, 1)]);
        assert_eq!(t.service(b"echo").unwrap().1.len(), 1);
        assert_eq!(t.service_by_binary_id(svc.binary_id()), Some(&svc));
        assert!(t.apply(&up(0, 2, RouteChange::Leave { conn: conn(0, 1) })));
        assert!(
            t.service(b"echo").is_some(),
            "the instance still has a connection"
        );
        assert_eq!(t.instance_of(conn(1, 1)).map(|u| &**u), Some("u1"));
        assert_eq!(t.instance_of(conn(0, 1)), None, "that connection left");
        assert_eq!(t.instances().map(|(u, _)| &**u).collect::<Vec<_>>(), ["u1"]);
        assert_eq!(
            t.services()
                .map(|(k, v)| (k.as_str(), v.len()))
                .collect::<Vec<_>>(),
            [("echo", 1)]
        );
        assert_eq!(t.revisions(), [2, 1], "last revision from each shard");
        let snapshot = t.snapshot();
        assert_eq!(
            snapshot.len(),
            2,
            "the instance and the service: {snapshot:?}"
        );
        assert!(snapshot[0].starts_with("u1 "), "{snapshot:?}");
        assert_eq!(snapshot[1], r#"echo -> ["u1"]"#);
        assert!(t.apply(&up(1, 2, RouteChange::Leave { conn: conn(1, 1) })));
        assert!(t.service(b"echo").is_none() && t.instance("u1").is_none());
        assert!(t.snapshot().is_empty());
        assert!(t.service_by_binary_id(svc.binary_id()).is_none());
    }

    #[test]
    fn expose_hide_status() {
        let (a, b) = (ServiceKey::new("", "a", ""), ServiceKey::new("", "b", ""));
        let mut t = RouteTable::new(1);
        t.apply(&up(
            0,
            1,
            RouteChange::Join {
                conn: conn(0, 1),
                app: app("u1"),
                services: vec![a.clone()],
            },
        ));
        t.apply(&up(
            0,
            2,
            RouteChange::Expose {
                instance: "u1".into(),
                services: vec![b.clone()],
            },
        ));
        t.apply(&up(
            0,
            3,
            RouteChange::Hide {
                instance: "u1".into(),
                services: vec![a.clone()],
            },
        ));
        assert!(t.service(b"a").is_none() && t.service(b"b").is_some());
        t.apply(&up(
            0,
            4,
            RouteChange::Status {
                instance: "u1".into(),
                status: AppStatus::OutOfService,
            },
        ));
        assert_eq!(t.instance("u1").unwrap().status, AppStatus::OutOfService);
    }
}
