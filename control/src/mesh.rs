//! The control plane's state, put together: the config history
//! (`history`), the instance registry (`registry`), the proxies' streams
//! (`proxies`), the snapshots they are sent (`snapshot`) and how pushes go
//! (`push`). `Mesh` is what the gRPC services call; it decides when a
//! snapshot must be rebuilt, and the publisher task rebuilds it.

use crate::admission::{check_instance, Caller, Refused};
use crate::error::MeshError;
use crate::history::{History, Outcome, Retention};
use crate::metrics::{Metrics, StateCollector};
use crate::proxies::{Answer, Proxies, Proxy};
use crate::push::Pushes;
use crate::registry::{check_hello, Registry};
use crate::resources::Change;
use crate::shared::Shared;
use crate::snapshot::{self, Inputs, Published, Snapshots};
use crate::store::{RevisionInfo, Store};
use remora_proto::control::{Instance, ProxyStatus, StatusResponse};
use remora_proto::model::Config;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// How the state behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a registered instance outlives its proxy's stream.
    pub grace: Duration,
    /// Which old config versions the store keeps.
    pub retention: Retention,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            grace: Duration::from_secs(10),
            retention: Retention::default(),
        }
    }
}

pub struct Mesh<S> {
    history: History<S>,
    registry: Arc<Registry>,
    proxies: Arc<Proxies>,
    snapshots: Arc<Snapshots>,
    pushes: Pushes,
    metrics: Arc<Metrics>,
    /// Sent with every snapshot.
    trust_bundle: Mutex<Arc<str>>,
    grace: Duration,
    /// Wakes the pruner of old versions.
    prune: Arc<Notify>,
    /// With etcd: the instances, node bindings and statuses every replica
    /// shares (`share`).
    shared: OnceLock<Arc<Shared>>,
}

/// A proxy's stream: its entry, and its scope's snapshots.
pub struct Subscription {
    pub proxy: Arc<Proxy>,
    pub snapshots: watch::Receiver<Arc<Published>>,
}

impl<S: Store> Mesh<S> {
    /// Loads the current config and starts the publisher and the pruner.
    pub async fn open(store: S, options: Options) -> Result<Arc<Mesh<S>>, MeshError> {
        let history = History::open(store, options.retention).await?;
        let proxies = Arc::new(Proxies::default());
        let snapshots = Arc::new(Snapshots::default());
        let metrics = Arc::new(Metrics::new(Some(Box::new(StateCollector {
            proxies: proxies.clone(),
            snapshots: snapshots.clone(),
        }))));
        metrics.config_version.set(history.current().version as i64);
        let mesh = Arc::new(Mesh {
            history,
            registry: Arc::default(),
            proxies,
            snapshots,
            pushes: Pushes::new(metrics.clone()),
            metrics,
            trust_bundle: Mutex::new(Arc::from("")),
            grace: options.grace,
            prune: Arc::default(),
            shared: OnceLock::new(),
        });
        spawn_publisher(&mesh);
        spawn_pruner(&mesh);
        spawn_follower(&mesh);
        mesh.prune.notify_one();
        Ok(mesh)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The trust bundle every snapshot carries (set before serving).
    pub fn set_trust_bundle(&self, pem: &str) {
        *self.trust_bundle.lock().unwrap_or_else(|p| p.into_inner()) = Arc::from(pem);
        self.snapshots.request(Instant::now());
    }

    /// How long a proxy whose stream ended stays in the status table.
    pub fn set_status_retention(&self, d: Duration) {
        self.proxies.set_retention(d);
        if let Some(sh) = self.shared.get() {
            sh.writer().set_retention(d);
        }
    }

    /// Shares instances, node bindings and proxies' status with the other
    /// replicas through etcd (under `prefix`), instead of keeping them in
    /// this process (call before serving, once).
    pub fn share(&self, etcd: crate::etcd::Etcd, prefix: &str) {
        let snapshots = self.snapshots.clone();
        let shared = Shared::start(etcd, prefix, self.registry.clone(), self.grace, move || {
            snapshots.request(Instant::now())
        });
        let _ = self.shared.set(shared);
    }

    /// Builds and sends the snapshots of what changed since `since`.
    fn publish(&self, since: Instant) {
        let current = self.history.current();
        let instances = self.registry.instances();
        let bundle = self
            .trust_bundle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let inputs = Inputs {
            current: &current,
            instances: &instances,
            trust_bundle_pem: &bundle,
        };
        // The push starts before any stream sees the version: an ACK
        // cannot come before it.
        self.snapshots.publish_then(&inputs, since, |version| {
            self.pushes.start(version.clone(), since.elapsed())
        });
    }

    // ---------------------------------------------------------- registry

    /// Restores the instances registered before a restart (kept in `path`)
    /// and keeps that file current. Restored instances count as
    /// disconnected: each stays for the grace period and goes unless its
    /// proxy reconnects, so a control-plane restart or upgrade never sends
    /// proxies a mesh without the endpoints whose proxies have not
    /// reconnected yet.
    pub fn persist_instances(self: &Arc<Self>, path: std::path::PathBuf) -> usize {
        let restored = self.registry.restore(path);
        let n = restored.len();
        if n > 0 {
            info!(instances = n, grace = ?self.grace, "restored the registered instances; each goes unless its proxy reconnects");
            self.snapshots.request(Instant::now());
            let mesh = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(mesh.grace).await;
                let proxies = &mesh.proxies;
                let expired = mesh.registry.remove_if(&restored, |node| {
                    !proxies.get(node).is_some_and(|p| p.connected())
                });
                if expired > 0 {
                    info!(
                        expired,
                        "restored instances whose proxies did not reconnect expired"
                    );
                    mesh.snapshots.request(Instant::now());
                }
            });
        }
        // The saver: writes the instances soon after they change; changes
        // that come together (10k proxies reconnecting) share a write.
        let registry = self.registry.clone();
        tokio::spawn(async move {
            loop {
                registry.changed().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let r = registry.clone();
                let _ = tokio::task::spawn_blocking(move || r.save()).await;
            }
        });
        n
    }

    /// Writes the registered instances now (also on shutdown).
    pub fn save_instances(&self) {
        self.registry.save();
    }

    // ---------------------------------------------------------- discovery

    /// Checks a proxy's Hello against who it is (`caller`: its verified
    /// identity; `None` on a control plane without authentication, where
    /// only the shape is checked), and binds the node id to the caller.
    pub async fn admit(
        &self,
        caller: Option<&Caller>,
        node: &str,
        service: &str,
        instance: Option<&Instance>,
    ) -> Result<(), MeshError> {
        let current = self.history.current();
        let Some(shared) = self.shared.get() else {
            return Ok(self
                .registry
                .admit(&current.config, caller, node, service, instance)?);
        };
        check_hello(&current.config, caller, node, service, instance)?;
        let Some(caller) = caller else {
            return Ok(());
        };
        let who = caller.to_string();
        match self.registry.owner(node) {
            Some(owner) if owner != who => Err(Refused::Denied(format!(
                "node {node} belongs to {owner}: another identity cannot take it over"
            ))
            .into()),
            Some(_) => Ok(()),
            None => shared.bind(node, &who).await,
        }
    }

    /// A proxy's stream opened: records it, registers the instance its
    /// Hello names, and subscribes it to its scope. `identity` is the
    /// caller's (empty without authentication).
    pub fn connect(
        &self,
        node: &str,
        service: &str,
        last_version: &str,
        instance: Option<Instance>,
        identity: &str,
    ) -> Subscription {
        self.forget_gone(false);
        let proxy = self.proxies.connect(node, service, last_version);
        match self.shared.get() {
            Some(sh) => sh.writer().connected(&proxy, identity, instance),
            None => {
                if self.registry.connected(node, service, instance) {
                    self.snapshots.request(Instant::now());
                }
            }
        }
        let scope = snapshot::scope_of(&self.history.current(), service);
        self.metrics.streams.inc();
        Subscription {
            proxy,
            snapshots: self.snapshots.subscribe(&scope),
        }
    }

    /// The proxy answered a snapshot: ACK, or NACK with `error`.
    pub fn answered(&self, proxy: &Proxy, version: &str, error: &str) {
        match proxy.answered(version, error) {
            Answer::Pushed(latency) => {
                self.metrics.acks.inc();
                self.pushes.acked(version, latency);
            }
            Answer::Ack => {
                self.metrics.acks.inc();
            }
            Answer::Nack => {
                self.metrics.nacks.inc();
                warn!(node = %proxy.node, version, error, "proxy rejected a snapshot (NACK)");
            }
        }
        if let Some(sh) = self.shared.get() {
            sh.writer().touched(proxy);
        }
    }

    /// The proxy can serve now: registers its instance (checked like
    /// config) under the Service its Hello named.
    pub fn register(&self, proxy: &Proxy, instance: Instance) -> Result<(), MeshError> {
        if !self.is_current(proxy) {
            return Ok(());
        }
        if let Some(sh) = self.shared.get() {
            check_instance(&instance).map_err(MeshError::Invalid)?;
            if proxy.service.is_empty() {
                return Err(MeshError::Invalid(
                    "Register without a Service in the Hello".into(),
                ));
            }
            sh.writer().registered(proxy, &instance);
            return Ok(());
        }
        if self
            .registry
            .register(&proxy.node, &proxy.service, instance)?
        {
            self.snapshots.request(Instant::now());
        }
        Ok(())
    }

    /// The proxy says its instance is going away.
    pub fn deregister(&self, proxy: &Proxy) {
        if let (Some(sh), true) = (self.shared.get(), self.is_current(proxy)) {
            info!(node = %proxy.node, "instance deregistered");
            sh.writer().deregistered(proxy);
            return;
        }
        if self.is_current(proxy) && self.registry.remove(&proxy.node) {
            info!(node = %proxy.node, "instance deregistered");
            self.snapshots.request(Instant::now());
        }
    }

    /// The proxy's stream ended. Its instance stays registered for the grace
    /// period (a restart or a network blip should not drop its endpoint),
    /// then goes unless the proxy came back.
    pub fn disconnected(self: &Arc<Self>, proxy: &Arc<Proxy>) {
        self.proxies.disconnected(proxy);
        self.metrics.streams.dec();
        if !self.is_current(proxy) {
            return;
        }
        if let Some(sh) = self.shared.get() {
            // Its keys go to leases of the grace and the retention: they
            // expire in etcd, for every replica, unless it comes back.
            sh.writer().disconnected(proxy);
            return;
        }
        let (mesh, proxy) = (self.clone(), proxy.clone());
        tokio::spawn(async move {
            tokio::time::sleep(mesh.grace).await;
            let back = mesh
                .proxies
                .get(&proxy.node)
                .is_some_and(|p| p.conn != proxy.conn || p.connected());
            if !back && mesh.registry.remove(&proxy.node) {
                info!(
                    node = %proxy.node,
                    "instance expired after its stream was gone for the grace period"
                );
                mesh.snapshots.request(Instant::now());
            }
        });
    }

    /// Whether `proxy` is still its node's latest stream.
    fn is_current(&self, proxy: &Proxy) -> bool {
        self.proxies
            .get(&proxy.node)
            .is_some_and(|p| p.conn == proxy.conn)
    }

    /// Forgets proxies gone past the status retention, and then the node
    /// bindings of nodes with neither a proxy nor an instance left.
    fn forget_gone(&self, now: bool) {
        // Shared bindings go with their leases.
        if self.proxies.prune(now) && self.shared.get().is_none() {
            let proxies = &self.proxies;
            self.registry.forget_owners(|node| proxies.contains(node));
        }
    }

    // ---------------------------------------------------------- admin

    /// A change went in: publish it, and prune what the retention no
    /// longer keeps.
    fn committed(&self, o: Outcome) -> Outcome {
        if o.changed {
            self.metrics.commits.inc();
            self.metrics.config_version.set(o.version as i64);
            let at = self
                .history
                .current()
                .committed_at
                .unwrap_or_else(Instant::now);
            self.snapshots.request(at);
            self.prune.notify_one();
        }
        o
    }

    pub async fn apply(&self, add: Config, author: &str) -> Result<Outcome, MeshError> {
        let o = self.history.apply(add, author).await?;
        Ok(self.committed(o))
    }

    pub fn diff(&self, add: Config) -> Result<Vec<Change>, MeshError> {
        self.history.diff(add)
    }

    pub async fn delete(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        author: &str,
    ) -> Result<Outcome, MeshError> {
        let o = self.history.delete(kind, ns, name, author).await?;
        Ok(self.committed(o))
    }

    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Result<(u64, Config), MeshError> {
        self.history.get(kind, ns, name)
    }

    pub async fn history(&self) -> Result<Vec<RevisionInfo>, MeshError> {
        self.history.list().await
    }

    pub async fn rollback(&self, version: u64, author: &str) -> Result<Outcome, MeshError> {
        let o = self.history.rollback(version, author).await?;
        Ok(self.committed(o))
    }

    /// The running config version, the snapshot version being pushed, every
    /// proxy, and how the latest push is going. With etcd, every proxy of
    /// every replica: this replica's own from memory, the others' as etcd
    /// has them (only its own while etcd is unavailable).
    pub async fn status(&self) -> StatusResponse {
        self.forget_gone(true);
        let mut proxies: Vec<ProxyStatus> = self
            .proxies
            .list()
            .iter()
            .map(|p| p.status(self.registry.address(&p.node)))
            .collect();
        if let Some(sh) = self.shared.get() {
            match sh.statuses().await {
                Ok(all) => proxies = merge_statuses(all, proxies),
                Err(e) => {
                    warn!(error = %e, "remoractl status: listing only this replica's proxies")
                }
            }
        }
        StatusResponse {
            config_version: self.history.current().version,
            snapshot_version: self.snapshots.version().to_string(),
            proxies,
            last_push: Some(self.pushes.summary()),
        }
    }
}

/// Every replica's proxies (`shared`, from etcd) with this replica's own
/// (`local`, fresher) over them, except where a node is connected elsewhere
/// and only remembered here; by node id.
fn merge_statuses(shared: Vec<ProxyStatus>, local: Vec<ProxyStatus>) -> Vec<ProxyStatus> {
    let mut all: std::collections::BTreeMap<String, ProxyStatus> =
        shared.into_iter().map(|p| (p.node_id.clone(), p)).collect();
    for p in local {
        let elsewhere = all
            .get(&p.node_id)
            .is_some_and(|s| s.connected && !p.connected);
        if !elsewhere {
            all.insert(p.node_id.clone(), p);
        }
    }
    all.into_values().collect()
}

/// Rebuilds the snapshots whenever something they are made of changed;
/// changes that come while it builds share the next build.
fn spawn_publisher<S: Store>(mesh: &Arc<Mesh<S>>) {
    let weak: Weak<Mesh<S>> = Arc::downgrade(mesh);
    let snapshots = mesh.snapshots.clone();
    tokio::spawn(async move {
        loop {
            let since = snapshots.requested().await;
            let Some(mesh) = weak.upgrade() else { return };
            // A big mesh takes milliseconds to build: off the async threads.
            let _ = tokio::task::spawn_blocking(move || mesh.publish(since)).await;
        }
    });
}

/// With a shared store: takes in each version another replica commits and
/// publishes it to this replica's proxies. The store reports the newest
/// version (after a broken watch or a compaction too), so versions come in
/// order and none is missed; one that cannot be read yet (etcd away) is
/// read again until it can.
fn spawn_follower<S: Store>(mesh: &Arc<Mesh<S>>) {
    let Some(mut latest) = mesh.history.store().follow() else {
        return;
    };
    let weak: Weak<Mesh<S>> = Arc::downgrade(mesh);
    tokio::spawn(async move {
        let mut retry = crate::etcd::watch::Backoff::default();
        loop {
            let newest = *latest.borrow_and_update();
            let Some(mesh) = weak.upgrade() else { return };
            if newest > mesh.history.current().version {
                match mesh.history.catch_up().await {
                    Ok(Some(version)) => {
                        retry.reset();
                        mesh.metrics.config_version.set(version as i64);
                        mesh.snapshots.request(Instant::now());
                    }
                    Ok(None) => retry.reset(),
                    Err(e) => {
                        if retry.attempts() == 0 {
                            warn!(version = newest, error = %e, "cannot read a version another replica committed; retrying");
                        }
                        drop(mesh);
                        retry.wait().await;
                        continue;
                    }
                }
            }
            drop(mesh);
            if latest.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Prunes old versions after each commit, off the commit's path.
fn spawn_pruner<S: Store>(mesh: &Arc<Mesh<S>>) {
    let weak: Weak<Mesh<S>> = Arc::downgrade(mesh);
    let wake = mesh.prune.clone();
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            let Some(mesh) = weak.upgrade() else { return };
            if let Err(e) = mesh.history.prune().await {
                warn!(error = %e, "could not prune old config versions");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    async fn mesh(name: &str) -> (Arc<Mesh<FileStore>>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("remora-mesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = FileStore::open(&dir).unwrap();
        (Mesh::open(store, Options::default()).await.unwrap(), dir)
    }

    /// Waits for the publisher to send a snapshot of config `version`.
    async fn next_of(rx: &mut watch::Receiver<Arc<Published>>, version: u64) -> Arc<Published> {
        let want = format!("{version}.");
        rx.wait_for(|p| p.version.starts_with(&want))
            .await
            .unwrap()
            .clone()
    }

    const API: &str = "kind: Service\nmetadata: {name: api}\nspec: {ports: [{port: 80}]}\n";

    #[tokio::test]
    async fn a_commit_is_pushed_and_each_proxy_ack_times_it_once() {
        let (mesh, dir) = mesh("push").await;
        mesh.apply(remora_proto::parse_yaml(API, "t").unwrap(), "t")
            .await
            .unwrap();
        let mut subs: Vec<Subscription> = (0..3)
            .map(|i| mesh.connect(&format!("p{i}"), "", "", None, ""))
            .collect();
        for s in &mut subs {
            let p = next_of(&mut s.snapshots, 1).await;
            s.proxy.sent(&p.version, p.committed_at);
            mesh.answered(&s.proxy, &p.version, "");
        }
        // What they got on connect is not a push.
        assert_eq!(mesh.status().await.last_push.unwrap().acks, 0);
        let two = API.replace("port: 80", "port: 81");
        mesh.apply(remora_proto::parse_yaml(&two, "t").unwrap(), "t")
            .await
            .unwrap();
        for s in &mut subs {
            let p = next_of(&mut s.snapshots, 2).await;
            s.proxy.sent(&p.version, p.committed_at);
            mesh.answered(&s.proxy, &p.version, "");
            mesh.answered(&s.proxy, &p.version, "");
        }
        let status = mesh.status().await;
        let push = status.last_push.unwrap();
        assert_eq!(push.snapshot_version, status.snapshot_version);
        assert_eq!(push.acks, 3, "one per proxy");
        assert!(status
            .proxies
            .iter()
            .all(|p| p.acked_version == status.snapshot_version));
        let text = mesh.metrics().render();
        assert!(
            text.contains("remora_control_push_seconds_count 3"),
            "{text}"
        );
        assert!(text.contains("remora_control_streams 3"), "{text}");
        mesh.disconnected(&subs[0].proxy);
        let text = mesh.metrics().render();
        assert!(text.contains("remora_control_streams 2"), "{text}");
        assert!(
            text.contains(&format!(
                "remora_control_proxies{{service=\"\",version=\"{}\"}} 2",
                status.snapshot_version
            )),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn registered_instances_join_their_service_in_everyones_snapshot() {
        let (mesh, dir) = mesh("instances").await;
        mesh.apply(remora_proto::parse_yaml(API, "t").unwrap(), "t")
            .await
            .unwrap();
        let mut caller = mesh.connect("web-1", "", "", None, "");
        let first = next_of(&mut caller.snapshots, 1).await;
        let api = mesh.connect("api-1", "default/api", "", None, "");
        let inst = Instance {
            address: "10.0.0.7".into(),
            port: 4143,
            ..Default::default()
        };
        mesh.register(&api.proxy, inst).unwrap();
        caller
            .snapshots
            .wait_for(|p| p.version != first.version)
            .await
            .unwrap();
        let status = mesh.status().await;
        let a = status
            .proxies
            .iter()
            .find(|p| p.node_id == "api-1")
            .unwrap();
        assert_eq!(a.instance, "10.0.0.7:4143");
        // A stale stream of the node cannot touch what the new one did.
        let again = mesh.connect("api-1", "default/api", "", None, "");
        mesh.deregister(&api.proxy);
        assert_eq!(mesh.registry.address("api-1"), "10.0.0.7:4143");
        mesh.deregister(&again.proxy);
        assert_eq!(mesh.registry.address("api-1"), "");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
