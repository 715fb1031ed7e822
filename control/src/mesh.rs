//! The control plane's state: the config history (through the store), the
//! registered instances, the connected proxies, and the snapshots they are
//! sent.
//!
//! Fan-out is publish/subscribe. Proxies that need the same view of the mesh
//! share a scope; each scope has one `watch` channel holding its latest
//! snapshot, encoded once and shared by every stream. A watch channel keeps
//! only the latest value, so a slow or stuck proxy never delays the others
//! and, when it catches up, gets the newest version rather than every one in
//! between.

use crate::resources;
use crate::store::{Revision, Store, StoreError};
use bytes::Bytes;
use prost::Message;
use remora_proto::control::{
    ChangeResponse, Instance, ProxyStatus, Registration, Registrations, ResourceChange, Snapshot,
};
use remora_proto::model::{Config, Endpoint, HttpRoute, PolicyTargetRef, Service};
use remora_proto::validate::{normalize, qualify};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tonic::Status;
use tracing::{info, warn};

/// Scope of proxies that get the whole mesh.
const ALL: &str = "*";

pub struct Mesh<S> {
    store: S,
    /// How long a disconnected proxy stays in the status table.
    retention: std::sync::atomic::AtomicU64,
    /// Serializes commits (apply, delete, rollback).
    write: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    /// How long a registered instance outlives its proxy's stream.
    grace: Duration,
    /// Where the registered instances are kept, when they are.
    instances_path: std::sync::OnceLock<std::path::PathBuf>,
    instances_saved: AtomicU64,
}

#[derive(Default)]
struct State {
    history: Vec<Revision>,
    /// Sent with every snapshot.
    trust_bundle_pem: String,
    /// Registered instances by node id.
    instances: BTreeMap<String, (String, Instance)>,
    /// The identity each node id is bound to (the first to register it).
    owners: BTreeMap<String, String>,
    /// Bumped whenever `instances` changes, for the task that saves them.
    instances_gen: u64,
    dirty: Arc<tokio::sync::Notify>,
    proxies: BTreeMap<String, Proxy>,
    next_conn: u64,
    scopes: HashMap<String, watch::Sender<Arc<Snapshot>>>,
}

struct Proxy {
    status: ProxyStatus,
    conn: u64,
    /// When its stream ended (it leaves the status table after the
    /// retention period).
    gone_since: Option<std::time::Instant>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl State {
    fn current(&self) -> (u64, Config) {
        self.history
            .last()
            .map(|r| (r.version, r.config.clone()))
            .unwrap_or_default()
    }

    /// The config with registered instances joined to their Services, and
    /// a fingerprint of those instances and of the trust bundle (so a new
    /// bundle alone makes a new snapshot version, sent to every proxy).
    fn effective(&self) -> (Config, u64) {
        let (_, mut cfg) = self.current();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.trust_bundle_pem.hash(&mut h);
        for (service, inst) in self.instances.values() {
            (service, &inst.address, inst.port).hash(&mut h);
            let mut labels: Vec<_> = inst.labels.iter().collect();
            labels.sort();
            labels.hash(&mut h);
            let target = cfg.services.iter_mut().find(|s| {
                s.metadata
                    .as_ref()
                    .is_some_and(|m| format!("{}/{}", m.namespace, m.name) == *service)
            });
            if let Some(spec) = target.and_then(|s| s.spec.as_mut()) {
                // A registered instance is a Remora proxy: callers speak mTLS to it.
                spec.endpoints.push(Endpoint {
                    address: inst.address.clone(),
                    port: inst.port,
                    labels: inst.labels.clone(),
                    meshed: true,
                });
            }
        }
        (cfg, h.finish())
    }

    fn version(&self) -> u64 {
        self.history.last().map_or(0, |r| r.version)
    }

    /// Forgets proxies gone for longer than `retention_secs`, and the node
    /// bindings of nodes that have neither a proxy nor an instance left.
    fn prune(&mut self, retention_secs: u64) {
        let retention = Duration::from_secs(retention_secs);
        let before = self.proxies.len();
        self.proxies
            .retain(|_, p| p.gone_since.is_none_or(|t| t.elapsed() < retention));
        if self.proxies.len() != before {
            let (proxies, instances) = (&self.proxies, &self.instances);
            self.owners
                .retain(|node, _| proxies.contains_key(node) || instances.contains_key(node));
        }
    }

    fn scope_of(&self, service: &str) -> String {
        let Some(rev) = self.history.last() else {
            return ALL.to_string();
        };
        let calls = rev.config.services.iter().any(|s| {
            s.metadata
                .as_ref()
                .is_some_and(|m| format!("{}/{}", m.namespace, m.name) == service)
                && s.spec.as_ref().is_some_and(|sp| !sp.calls.is_empty())
        });
        if calls {
            service.to_string()
        } else {
            ALL.to_string()
        }
    }

    fn instances_changed(&mut self) {
        self.instances_gen += 1;
        self.dirty.notify_one();
        self.publish();
    }

    /// Recomputes every scope's snapshot and publishes the ones that
    /// changed. Each is encoded once, whatever the number of subscribers.
    fn publish(&mut self) {
        let version = self.version();
        let (cfg, fp) = self.effective();
        let snapshot_version = format!("{version}.{:08x}", fp as u32);
        for (scope, tx) in &self.scopes {
            if tx.borrow().version == snapshot_version {
                continue;
            }
            let scoped = if scope == ALL {
                cfg.clone()
            } else {
                scope_config(&cfg, scope)
            };
            tx.send_replace(Arc::new(Snapshot {
                version: snapshot_version.clone(),
                config_version: version,
                config: Bytes::from(scoped.encode_to_vec()),
                trust_bundle_pem: self.trust_bundle_pem.clone(),
            }));
        }
    }

    fn scope(&mut self, scope: &str) -> watch::Receiver<Arc<Snapshot>> {
        if let Some(tx) = self.scopes.get(scope) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        self.scopes.insert(scope.to_string(), tx);
        self.publish();
        rx
    }
}

/// What a proxy of `service` needs: the Services it calls, the routes
/// attached to them (their parentRefs cut to those), and every Service
/// those routes send to.
pub fn scope_config(cfg: &Config, service: &str) -> Config {
    let id = |m: Option<&remora_proto::model::Metadata>| {
        m.map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default()
    };
    let me = cfg
        .services
        .iter()
        .find(|s| id(s.metadata.as_ref()) == service);
    let ns = service.split('/').next().unwrap_or("");
    let called: BTreeSet<String> = me
        .and_then(|s| s.spec.as_ref())
        .map(|sp| sp.calls.iter().map(|c| qualify(ns, c)).collect())
        .unwrap_or_default();
    let mut needed = called.clone();
    // Its own Service too: its replica count divides mesh-wide limits, and
    // inbound policies target it.
    needed.insert(service.to_string());
    let mut routes: Vec<HttpRoute> = Vec::new();
    for r in &cfg.http_routes {
        let mut r = r.clone();
        let Some(spec) = r.spec.as_mut() else {
            continue;
        };
        // Routes of the Services it calls, and of its own Service (route-level
        // AuthorizationPolicies are enforced by its inbound side).
        spec.parent_refs.retain(|p| {
            let parent = format!("{}/{}", p.namespace, p.name);
            called.contains(&parent) || parent == service
        });
        if spec.parent_refs.is_empty() {
            continue;
        }
        for rule in &spec.rules {
            for b in &rule.backend_refs {
                needed.insert(format!("{}/{}", b.namespace, b.name));
            }
            for f in &rule.filters {
                if let Some(b) = f
                    .request_mirror
                    .as_ref()
                    .and_then(|m| m.backend_ref.as_ref())
                {
                    needed.insert(format!("{}/{}", b.namespace, b.name));
                }
            }
        }
        routes.push(r);
    }
    let services: Vec<Service> = cfg
        .services
        .iter()
        .filter(|s| needed.contains(&id(s.metadata.as_ref())))
        .map(|s| {
            // `calls` names Services this proxy may not have; it is the
            // caller's business, not the callee's.
            let mut s = s.clone();
            if let Some(sp) = s.spec.as_mut() {
                sp.calls.clear();
            }
            s
        })
        .collect();
    let route_ids: BTreeSet<String> = routes.iter().map(|r| id(r.metadata.as_ref())).collect();
    // A policy goes with its target: a route this proxy has, or a Service
    // (any it needs for rate limits; its own for authorization, which only
    // the target's proxies enforce).
    let wanted = |t: Option<&PolicyTargetRef>, service_ok: &dyn Fn(&str) -> bool| {
        let t = t.cloned().unwrap_or_default();
        let target = format!("{}/{}", t.namespace, t.name);
        match t.kind.as_str() {
            "HTTPRoute" => route_ids.contains(&target),
            _ => service_ok(&target),
        }
    };
    let rate_limit_policies = cfg
        .rate_limit_policies
        .iter()
        .filter(|p| {
            let t = p.spec.as_ref().and_then(|s| s.target_ref.as_ref());
            wanted(t, &|s| needed.contains(s))
        })
        .cloned()
        .collect();
    let authorization_policies = cfg
        .authorization_policies
        .iter()
        .filter(|p| {
            let t = p.spec.as_ref().and_then(|s| s.target_ref.as_ref());
            wanted(t, &|s| s == service)
        })
        .cloned()
        .collect();
    Config {
        services,
        http_routes: routes,
        rate_limit_policies,
        authorization_policies,
        // Mesh-wide settings reach every proxy.
        mesh_configs: cfg.mesh_configs.clone(),
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn store_err(e: StoreError) -> Status {
    Status::unavailable(format!("store: {e}"))
}

impl<S: Store> Mesh<S> {
    /// Loads the history from the store.
    pub async fn open(store: S, grace: Duration) -> Result<Arc<Mesh<S>>, StoreError> {
        let history = store.load().await?;
        if let Some(last) = history.last() {
            info!(
                version = last.version,
                revisions = history.len(),
                "history loaded"
            );
        }
        Ok(Arc::new(Mesh {
            store,
            retention: AtomicU64::new(3600),
            write: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                history,
                ..Default::default()
            }),
            grace,
            instances_path: Default::default(),
            instances_saved: AtomicU64::new(0),
        }))
    }

    /// The trust bundle every snapshot carries (set before serving).
    pub fn set_trust_bundle(&self, pem: &str) {
        let mut st = self.lock();
        st.trust_bundle_pem = pem.to_string();
        st.publish();
    }

    /// Restores the instances registered before a restart (kept in `path`)
    /// and keeps that file current. Restored instances count as
    /// disconnected: each stays for the grace period and goes unless its
    /// proxy reconnects, so a control-plane restart or upgrade never sends
    /// proxies a mesh without the endpoints whose proxies have not
    /// reconnected yet.
    pub fn persist_instances(self: &Arc<Self>, path: std::path::PathBuf) -> usize {
        let restored: Vec<String> = match std::fs::read(&path) {
            Ok(bytes) => match Registrations::decode(bytes.as_slice()) {
                Ok(r) => {
                    let mut st = self.lock();
                    let mut nodes = Vec::new();
                    for reg in r.registrations {
                        if let Some(i) = reg.instance {
                            if !reg.identity.is_empty() {
                                st.owners.insert(reg.node_id.clone(), reg.identity);
                            }
                            st.instances.insert(reg.node_id.clone(), (reg.service, i));
                            nodes.push(reg.node_id);
                        }
                    }
                    st.publish();
                    nodes
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "registered instances unreadable; starting without them");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        let n = restored.len();
        if n > 0 {
            info!(instances = n, grace = ?self.grace, "restored the registered instances; each goes unless its proxy reconnects");
            let mesh = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(mesh.grace).await;
                let mut st = mesh.lock();
                let before = st.instances.len();
                for node in restored {
                    let back = st.proxies.get(&node).is_some_and(|p| p.status.connected);
                    if !back {
                        st.instances.remove(&node);
                    }
                }
                if st.instances.len() != before {
                    info!(
                        expired = before - st.instances.len(),
                        "restored instances whose proxies did not reconnect expired"
                    );
                    st.instances_changed();
                }
            });
        }
        let _ = self.instances_path.set(path);
        // The saver: writes the instances soon after they change; changes
        // that come together (10k proxies reconnecting) share a write.
        let mesh = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(m) = mesh.upgrade() else { return };
                let notified = m.lock().dirty.clone();
                drop(m);
                notified.notified().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Some(m) = mesh.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || m.save_instances()).await;
            }
        });
        n
    }

    /// Writes the registered instances now (also on shutdown).
    pub fn save_instances(&self) {
        let Some(path) = self.instances_path.get() else {
            return;
        };
        let (generation, bytes) = {
            let st = self.lock();
            if st.instances_gen == self.instances_saved.load(Relaxed) {
                return;
            }
            let regs = Registrations {
                registrations: st
                    .instances
                    .iter()
                    .map(|(node, (service, i))| Registration {
                        node_id: node.clone(),
                        service: service.clone(),
                        instance: Some(i.clone()),
                        identity: st.owners.get(node).cloned().unwrap_or_default(),
                    })
                    .collect(),
            };
            (st.instances_gen, regs.encode_to_vec())
        };
        match crate::store::write_atomic(&path.with_extension("tmp"), path, &bytes) {
            Ok(()) => self.instances_saved.store(generation, Relaxed),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "could not save the registered instances")
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current(&self) -> (u64, Config) {
        self.lock().current()
    }

    // ---------------------------------------------------------- discovery

    /// How long a proxy whose stream ended stays in the status table.
    pub fn set_status_retention(&self, d: Duration) {
        self.retention.store(d.as_secs().max(1), Relaxed);
    }

    /// Checks a proxy's Hello against who it is (`caller`: its verified
    /// identity; `None` on a control plane without authentication, where
    /// only the shape is checked), and binds the node id to the caller.
    pub fn admit(
        &self,
        caller: Option<&crate::admission::Caller>,
        node: &str,
        service: &str,
        instance: Option<&Instance>,
    ) -> Result<(), crate::admission::Refused> {
        use crate::admission::{check_instance, check_service, Refused};
        if node.is_empty() || node.len() > 253 {
            return Err(Refused::Invalid(
                "Hello.node_id must be 1 to 253 characters".into(),
            ));
        }
        if let Some(i) = instance {
            check_instance(i).map_err(Refused::Invalid)?;
        }
        let Some(caller) = caller else {
            return Ok(());
        };
        let mut st = self.lock();
        if !service.is_empty() {
            let (_, cfg) = st.current();
            check_service(&cfg, service, caller).map_err(Refused::Denied)?;
        }
        let who = caller.to_string();
        match st.owners.get(node) {
            Some(owner) if *owner != who => Err(Refused::Denied(format!(
                "node {node} belongs to {owner}: another identity cannot take it over"
            ))),
            Some(_) => Ok(()),
            None => {
                st.owners.insert(node.to_string(), who);
                Ok(())
            }
        }
    }

    /// A proxy connected: records it, registers its instance, and returns
    /// its scope's snapshots and a connection id.
    pub fn connect(
        &self,
        node: &str,
        service: &str,
        last_version: &str,
        instance: Option<Instance>,
    ) -> (watch::Receiver<Arc<Snapshot>>, u64) {
        let mut st = self.lock();
        st.next_conn += 1;
        let conn = st.next_conn;
        let kept = st.instances.get(node).filter(|(s, _)| s == service);
        let inst = instance
            .as_ref()
            .or(kept.map(|(_, i)| i))
            .map(|i| format!("{}:{}", i.address, i.port))
            .unwrap_or_default();
        st.prune(self.retention.load(Relaxed));
        let prev = st.proxies.remove(node);
        let mut status = prev.map(|p| p.status).unwrap_or_default();
        status.node_id = node.to_string();
        status.service = service.to_string();
        status.connected = true;
        status.connected_since_unix = now_unix();
        status.instance = inst;
        if !last_version.is_empty() {
            // It runs this version already (kept on disk, or from before a
            // control-plane restart): as good as an ACK.
            status.acked_version = last_version.to_string();
        }
        st.proxies.insert(
            node.to_string(),
            Proxy {
                status,
                conn,
                gone_since: None,
            },
        );
        // A Hello without an instance keeps what the node registered before
        // (a proxy reconnecting after a control-plane restart registers
        // again once it can serve; its endpoint must not blink meanwhile),
        // unless it now fronts another Service.
        let changed = match instance {
            Some(i) if !service.is_empty() => {
                let entry = (service.to_string(), i);
                st.instances.insert(node.to_string(), entry.clone()) != Some(entry)
            }
            _ => match st.instances.get(node) {
                Some((s, _)) if s != service => st.instances.remove(node).is_some(),
                _ => false,
            },
        };
        let scope = st.scope_of(service);
        let rx = st.scope(&scope);
        // Only a new or moved instance changes what anyone should see.
        if changed {
            st.instances_changed();
        }
        (rx, conn)
    }

    pub fn sent(&self, node: &str, version: &str) {
        if let Some(p) = self.lock().proxies.get_mut(node) {
            p.status.sent_version = version.to_string();
        }
    }

    pub fn ack(&self, node: &str, version: &str, error: &str) {
        let mut st = self.lock();
        let Some(p) = st.proxies.get_mut(node) else {
            return;
        };
        if error.is_empty() {
            p.status.acked_version = version.to_string();
            p.status.nacked_version.clear();
            p.status.nack_error.clear();
        } else {
            warn!(node, version, error, "proxy rejected a snapshot (NACK)");
            p.status.nacked_version = version.to_string();
            p.status.nack_error = error.to_string();
        }
    }

    /// The proxy can serve now: registers its instance (checked like
    /// config) under the Service its Hello named.
    pub fn register(
        &self,
        node: &str,
        conn: u64,
        instance: Instance,
    ) -> Result<(), crate::admission::Refused> {
        crate::admission::check_instance(&instance).map_err(crate::admission::Refused::Invalid)?;
        let mut st = self.lock();
        let Some(p) = st.proxies.get_mut(node).filter(|p| p.conn == conn) else {
            return Ok(());
        };
        let service = p.status.service.clone();
        if service.is_empty() {
            return Err(crate::admission::Refused::Invalid(
                "Register without a Service in the Hello".into(),
            ));
        }
        p.status.instance = format!("{}:{}", instance.address, instance.port);
        let entry = (service, instance);
        if st.instances.insert(node.to_string(), entry.clone()) != Some(entry) {
            info!(node, "instance registered");
            st.instances_changed();
        }
        Ok(())
    }

    /// The proxy says its instance is going away.
    pub fn deregister(&self, node: &str) {
        let mut st = self.lock();
        if st.instances.remove(node).is_some() {
            info!(node, "instance deregistered");
            st.instances_changed();
        }
    }

    /// The proxy's stream ended. Its instance stays registered for the grace
    /// period (a restart or a network blip should not drop its endpoint),
    /// then goes unless the proxy came back.
    pub fn disconnected(self: &Arc<Self>, node: &str, conn: u64) {
        {
            let mut st = self.lock();
            match st.proxies.get_mut(node) {
                Some(p) if p.conn == conn => {
                    p.status.connected = false;
                    p.gone_since = Some(std::time::Instant::now());
                }
                _ => return,
            }
        }
        let (mesh, node) = (self.clone(), node.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(mesh.grace).await;
            let mut st = mesh.lock();
            let gone = st
                .proxies
                .get(&node)
                .is_some_and(|p| p.conn == conn && !p.status.connected);
            if gone && st.instances.remove(&node).is_some() {
                info!(
                    node,
                    "instance expired after its stream was gone for the grace period"
                );
                st.instances_changed();
            }
        });
    }

    // ---------------------------------------------------------- admin

    async fn commit(
        &self,
        next: Config,
        author: &str,
        summary: String,
    ) -> Result<ChangeResponse, Status> {
        let version = self.lock().current().0 + 1;
        let rev = Revision {
            version,
            unix_time: now_unix(),
            author: if author.is_empty() {
                "unknown".into()
            } else {
                author.to_string()
            },
            summary: summary.clone(),
            config: next,
        };
        self.store.commit(&rev).await.map_err(store_err)?;
        info!(version, author = %rev.author, summary, "config committed");
        let mut st = self.lock();
        st.history.push(rev);
        st.publish();
        Ok(ChangeResponse {
            version,
            changed: true,
            summary,
        })
    }

    /// Validates `next` and commits it if it differs from the running
    /// config. All or nothing.
    async fn change(&self, next: Config, author: &str) -> Result<ChangeResponse, Status> {
        let next = remora_proto::prepare(next).map_err(invalid)?;
        let next = resources::join(resources::split(&next));
        let (version, current) = self.current();
        let changes = resources::diff(&current, &next);
        if changes.iter().all(|c| c.action == "unchanged") {
            return Ok(ChangeResponse {
                version,
                changed: false,
                summary: "no changes".into(),
            });
        }
        self.commit(next, author, resources::summary(&changes))
            .await
    }

    pub async fn apply(&self, mut add: Config, author: &str) -> Result<ChangeResponse, Status> {
        let _w = self.write.lock().await;
        normalize(&mut add);
        let (_, current) = self.current();
        self.change(resources::upsert(&current, &add), author).await
    }

    pub fn diff(&self, mut add: Config) -> Result<Vec<ResourceChange>, Status> {
        normalize(&mut add);
        let (_, current) = self.current();
        let next = remora_proto::prepare(resources::upsert(&current, &add)).map_err(invalid)?;
        Ok(
            resources::diff(&current, &resources::join(resources::split(&next)))
                .into_iter()
                .map(|c| ResourceChange {
                    kind: c.key.0.to_string(),
                    namespace: c.key.1.clone(),
                    name: c.key.2.clone(),
                    action: c.action.to_string(),
                    before: c.before.map(|r| r.yaml()).unwrap_or_default(),
                    after: c.after.map(|r| r.yaml()).unwrap_or_default(),
                })
                .collect(),
        )
    }

    pub async fn delete(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        author: &str,
    ) -> Result<ChangeResponse, Status> {
        let kind = resources::kind_name(kind)
            .ok_or_else(|| invalid(format!("unknown kind {kind:?} (Service or HTTPRoute)")))?;
        let ns = if ns.is_empty() {
            remora_proto::DEFAULT_NAMESPACE
        } else {
            ns
        };
        let _w = self.write.lock().await;
        let (_, current) = self.current();
        let mut set = resources::split(&current);
        let key = (kind, ns.to_string(), name.to_string());
        if set.remove(&key).is_none() {
            return Err(Status::not_found(format!(
                "{} not found",
                resources::describe(&key)
            )));
        }
        self.change(resources::join(set), author).await
    }

    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Result<(u64, Config), Status> {
        let kind = match kind {
            "" => None,
            k => Some(
                resources::kind_name(k)
                    .ok_or_else(|| invalid(format!("unknown kind {k:?} (Service or HTTPRoute)")))?,
            ),
        };
        let (version, current) = self.current();
        let set: BTreeMap<_, _> = resources::split(&current)
            .into_iter()
            .filter(|(k, _)| {
                kind.is_none_or(|x| k.0 == x)
                    && (ns.is_empty() || k.1 == ns)
                    && (name.is_empty() || k.2 == name)
            })
            .collect();
        if set.is_empty() && !name.is_empty() {
            let what = format!(
                "{} {}/{}",
                kind.unwrap_or("resource"),
                if ns.is_empty() { "*" } else { ns },
                name
            );
            return Err(Status::not_found(format!("{what} not found")));
        }
        Ok((version, resources::join(set)))
    }

    pub fn history(&self) -> Vec<Revision> {
        self.lock()
            .history
            .iter()
            .map(|r| Revision {
                config: Config::default(),
                ..r.clone()
            })
            .collect()
    }

    pub async fn rollback(&self, version: u64, author: &str) -> Result<ChangeResponse, Status> {
        let _w = self.write.lock().await;
        let target = self
            .lock()
            .history
            .iter()
            .find(|r| r.version == version)
            .map(|r| r.config.clone())
            .ok_or_else(|| Status::not_found(format!("version {version} not found")))?;
        let (_, current) = self.current();
        let changes = resources::diff(&current, &target);
        if changes.iter().all(|c| c.action == "unchanged") {
            return Ok(ChangeResponse {
                version: self.current().0,
                changed: false,
                summary: "no changes".into(),
            });
        }
        let summary = format!(
            "rollback to version {version}: {}",
            resources::summary(&changes)
        );
        self.commit(target, author, summary).await
    }

    pub fn status(&self) -> (u64, String, Vec<ProxyStatus>) {
        let mut st = self.lock();
        st.prune(self.retention.load(Relaxed));
        let version = st.current().0;
        let (_, fp) = st.effective();
        let snapshot = format!("{version}.{:08x}", fp as u32);
        (
            version,
            snapshot,
            st.proxies.values().map(|p| p.status.clone()).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        remora_proto::prepare(remora_proto::parse_yaml(yaml, "t").unwrap()).unwrap()
    }

    #[test]
    fn scope_keeps_only_what_a_service_calls() {
        let c = cfg(r#"
kind: Service
metadata: {name: front}
spec: {ports: [{port: 80}], calls: [cart]}
---
kind: Service
metadata: {name: cart}
spec: {ports: [{port: 80}]}
---
kind: Service
metadata: {name: cart-v2}
spec: {ports: [{port: 80}]}
---
kind: Service
metadata: {name: billing}
spec: {ports: [{port: 80}]}
---
kind: HTTPRoute
metadata: {name: cart}
spec:
  parentRefs: [{name: cart}, {name: billing}]
  rules: [{backendRefs: [{name: cart-v2}]}]
---
kind: HTTPRoute
metadata: {name: billing}
spec:
  parentRefs: [{name: billing}]
  rules: [{backendRefs: [{name: billing}]}]
"#);
        let s = scope_config(&c, "default/front");
        let names: Vec<_> = s
            .services
            .iter()
            .map(|s| s.metadata.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(names, ["front", "cart", "cart-v2"]);
        assert_eq!(s.http_routes.len(), 1);
        assert_eq!(s.http_routes[0].spec.as_ref().unwrap().parent_refs.len(), 1);
        // What the proxy receives is itself a valid config.
        remora_proto::prepare(s).unwrap();
    }

    #[test]
    fn authorization_policies_go_to_their_targets_proxies_only() {
        let c = cfg(r#"
kind: Service
metadata: {name: front}
spec: {ports: [{port: 80}], calls: [cart]}
---
kind: Service
metadata: {name: cart}
spec: {ports: [{port: 80}], calls: [billing]}
---
kind: Service
metadata: {name: billing}
spec: {ports: [{port: 80}]}
---
kind: HTTPRoute
metadata: {name: cart-admin}
spec:
  parentRefs: [{name: cart}]
  rules: [{backendRefs: [{name: cart}]}]
---
kind: AuthorizationPolicy
metadata: {name: cart-callers}
spec:
  targetRef: {name: cart}
  from: [{namespace: default}]
---
kind: AuthorizationPolicy
metadata: {name: cart-admin}
spec:
  targetRef: {kind: HTTPRoute, name: cart-admin}
  from: [{namespace: ops}]
"#);
        let names = |s: &Config| -> Vec<String> {
            s.authorization_policies
                .iter()
                .map(|p| p.metadata.as_ref().unwrap().name.clone())
                .collect()
        };
        // cart's proxies enforce both, and have the route the second targets.
        let cart = scope_config(&c, "default/cart");
        assert_eq!(names(&cart), ["cart-callers", "cart-admin"]);
        assert!(cart
            .http_routes
            .iter()
            .any(|r| r.metadata.as_ref().unwrap().name == "cart-admin"));
        remora_proto::prepare(cart).unwrap();
        // A Service-level policy stays with its target, not its callers.
        let front = scope_config(&c, "default/front");
        assert!(!names(&front).contains(&"cart-callers".to_string()));
        remora_proto::prepare(front).unwrap();
    }

    #[tokio::test]
    async fn a_node_id_belongs_to_the_identity_that_first_registered_it() {
        use crate::admission::{Caller, Refused};
        let dir = std::env::temp_dir().join(format!("remora-mesh-admit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = crate::store::FileStore::open(&dir).unwrap();
        let mesh = Mesh::open(store, Duration::from_secs(10)).await.unwrap();
        let yaml = "kind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\n\
                    kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}\n";
        mesh.apply(remora_proto::parse_yaml(yaml, "t").unwrap(), "t")
            .await
            .unwrap();
        let who = |sa: &str| Caller {
            namespace: "shop".into(),
            service_account: sa.into(),
        };
        let inst = Instance {
            address: "10.0.0.5".into(),
            port: 4143,
            ..Default::default()
        };
        let (api, web) = (who("api"), who("web"));
        assert!(mesh
            .admit(Some(&api), "api-1", "shop/api", Some(&inst))
            .is_ok());
        // Again (a reconnect): fine.
        assert!(mesh
            .admit(Some(&api), "api-1", "shop/api", Some(&inst))
            .is_ok());
        // web may not register under api, nor take api-1 over.
        let e = mesh
            .admit(Some(&web), "web-1", "shop/api", Some(&inst))
            .unwrap_err();
        assert!(matches!(e, Refused::Denied(_)), "{e}");
        let e = mesh
            .admit(Some(&web), "api-1", "shop/web", None)
            .unwrap_err();
        assert!(e.to_string().contains("belongs to shop/api"), "{e}");
        assert!(mesh.admit(Some(&web), "web-1", "shop/web", None).is_ok());
        // A bad instance is refused whoever sends it.
        let bad = Instance {
            address: "nowhere".into(),
            port: 4143,
            ..Default::default()
        };
        let e = mesh.admit(None, "x", "shop/api", Some(&bad)).unwrap_err();
        assert!(matches!(e, Refused::Invalid(_)), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
