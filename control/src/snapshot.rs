//! Snapshots: what each proxy is sent, built from the running config, the
//! registered instances and the trust bundle, scoped, and encoded once.
//!
//! Fan-out is publish/subscribe. Proxies that need the same view of the
//! mesh share a scope: the whole mesh (`*`), or one per Service that lists
//! `calls`. Each scope has one `watch` channel holding its latest snapshot
//! as a ready gRPC message (`Published::frame`); every stream of the scope
//! writes those same bytes. A watch channel keeps only the latest value,
//! so a slow or stuck proxy never delays the others and, when it catches
//! up, gets the newest version rather than every one in between.
//!
//! Building runs on the publisher (`Mesh::publisher`), outside every lock
//! the streams and the registry take.

use crate::history::Current;
use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use remora_proto::control::{Instance, Snapshot};
use remora_proto::model::{Config, Endpoint, HttpRoute, PolicyTargetRef, Service};
use remora_proto::validate::qualify;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{watch, Notify};

/// Scope of proxies that get the whole mesh.
pub const ALL: &str = "*";

/// One scope's snapshot of one version, ready to write.
#[derive(Debug)]
pub struct Published {
    /// `<config version>.<fingerprint of instances and trust bundle>`;
    /// empty before the first publish.
    pub version: Arc<str>,
    /// The gRPC message (length-prefixed `Snapshot`), shared by every
    /// stream of the scope.
    pub frame: Bytes,
    /// When what made this version was committed: the start of its push.
    pub committed_at: Instant,
}

impl Published {
    fn empty() -> Arc<Published> {
        Arc::new(Published {
            version: Arc::from(""),
            frame: Bytes::new(),
            committed_at: Instant::now(),
        })
    }
}

/// A snapshot as a gRPC message: the 5-byte prefix (not compressed,
/// length), then the encoded `Snapshot`.
pub fn frame(snapshot: &Snapshot) -> Bytes {
    let len = snapshot.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    snapshot
        .encode(&mut buf)
        .expect("the buffer holds the encoded length");
    buf.freeze()
}

/// A registered instance: the Service it serves (`namespace/name`) and
/// where.
pub type Registered = (String, Instance);

/// What a snapshot is built from.
pub struct Inputs<'a> {
    pub current: &'a Current,
    /// In node id order.
    pub instances: &'a [Registered],
    pub trust_bundle_pem: &'a str,
}

/// The snapshot version of `inputs`: the config version and a fingerprint
/// of the instances and the trust bundle (so a new bundle alone is a new
/// version, sent to every proxy; the same state is the same version after
/// a restart).
pub fn version(inputs: &Inputs) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    inputs.trust_bundle_pem.hash(&mut h);
    for (service, inst) in inputs.instances {
        (service, &inst.address, inst.port).hash(&mut h);
        let mut labels: Vec<_> = inst.labels.iter().collect();
        labels.sort();
        labels.hash(&mut h);
    }
    format!("{}.{:08x}", inputs.current.version, h.finish() as u32)
}

/// The config with registered instances joined to their Services (as
/// meshed endpoints: callers speak mTLS to a Remora proxy). Borrowed when
/// there are none.
pub fn effective<'a>(cfg: &'a Config, instances: &[Registered]) -> std::borrow::Cow<'a, Config> {
    if instances.is_empty() {
        return std::borrow::Cow::Borrowed(cfg);
    }
    let mut cfg = cfg.clone();
    let index: HashMap<String, usize> = cfg
        .services
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let m = s.metadata.as_ref()?;
            Some((format!("{}/{}", m.namespace, m.name), i))
        })
        .collect();
    for (service, inst) in instances {
        let Some(spec) = index
            .get(service)
            .and_then(|i| cfg.services[*i].spec.as_mut())
        else {
            continue;
        };
        spec.endpoints.push(Endpoint {
            address: inst.address.clone(),
            port: inst.port,
            labels: inst.labels.clone(),
            meshed: true,
        });
    }
    std::borrow::Cow::Owned(cfg)
}

/// The scope of a proxy of `service`.
pub fn scope_of(current: &Current, service: &str) -> String {
    if current.calling.contains(service) {
        service.to_string()
    } else {
        ALL.to_string()
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
        // Routes of the Services it calls, and of its own Service (route-level
        // AuthorizationPolicies are enforced by its inbound side).
        let wanted = |p: &remora_proto::model::ParentRef| {
            let parent = format!("{}/{}", p.namespace, p.name);
            called.contains(&parent) || parent == service
        };
        let Some(spec) = r.spec.as_ref() else {
            continue;
        };
        if !spec.parent_refs.iter().any(wanted) {
            continue;
        }
        let mut r = r.clone();
        let spec = r.spec.as_mut().expect("checked above");
        spec.parent_refs.retain(wanted);
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

/// The scopes' channels and what was published last.
pub struct Snapshots {
    scopes: Mutex<HashMap<String, watch::Sender<Arc<Published>>>>,
    latest: Mutex<Latest>,
    /// Wakes the publisher.
    wake: Notify,
    /// The earliest change not yet published.
    pending: Mutex<Option<Instant>>,
}

/// The version published last, since when, and each scope's snapshot size.
#[derive(Default)]
struct Latest {
    version: Arc<str>,
    committed_at: Option<Instant>,
    sizes: Vec<(String, usize)>,
}

impl Default for Snapshots {
    fn default() -> Snapshots {
        Snapshots {
            scopes: Mutex::default(),
            latest: Mutex::default(),
            wake: Notify::new(),
            pending: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Snapshots {
    /// The scope's channel (made, empty, on first use: the publisher fills
    /// it).
    pub fn subscribe(&self, scope: &str) -> watch::Receiver<Arc<Published>> {
        let mut scopes = lock(&self.scopes);
        if let Some(tx) = scopes.get(scope) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Published::empty());
        scopes.insert(scope.to_string(), tx);
        drop(scopes);
        self.request(Instant::now());
        rx
    }

    /// Asks the publisher for a new build: something changed at `at`.
    pub fn request(&self, at: Instant) {
        let mut p = lock(&self.pending);
        *p = Some(p.map_or(at, |t| t.min(at)));
        drop(p);
        self.wake.notify_one();
    }

    /// Waits for a request; returns when its earliest change happened.
    pub async fn requested(&self) -> Instant {
        loop {
            if let Some(at) = lock(&self.pending).take() {
                return at;
            }
            self.wake.notified().await;
        }
    }

    /// The version published last (empty before the first).
    pub fn version(&self) -> Arc<str> {
        lock(&self.latest).version.clone()
    }

    /// Each scope's snapshot size, bytes.
    pub fn sizes(&self) -> Vec<(String, usize)> {
        lock(&self.latest).sizes.clone()
    }

    /// Builds and sends the snapshot of every scope not yet on `inputs`'
    /// version (every scope when the version is new); drops the scopes
    /// nobody listens to. `committed_at`: when the change that makes a new
    /// version happened. Returns the version if it is new.
    pub fn publish(&self, inputs: &Inputs, committed_at: Instant) -> Option<Arc<str>> {
        self.publish_then(inputs, committed_at, |_| ())
    }

    /// `publish`, calling `is_new` with a new version before any stream
    /// can see it (so its push is timed from its first ACK on).
    pub fn publish_then(
        &self,
        inputs: &Inputs,
        committed_at: Instant,
        is_new_version: impl FnOnce(&Arc<str>),
    ) -> Option<Arc<str>> {
        let version: Arc<str> = Arc::from(version(inputs));
        // Build outside the lock: connects only wait for the list.
        let todo: Vec<(String, watch::Sender<Arc<Published>>)> = lock(&self.scopes)
            .iter()
            .filter(|(_, tx)| tx.borrow().version != version)
            .map(|(s, tx)| (s.clone(), tx.clone()))
            .collect();
        let (is_new, committed_at) = {
            let latest = lock(&self.latest);
            match latest.committed_at {
                // A scope made since keeps the version's own start: a
                // proxy's first snapshot on connect is not a push.
                Some(at) if *latest.version == *version => (false, at),
                _ => (true, committed_at),
            }
        };
        if todo.is_empty() && !is_new {
            return None;
        }
        let cfg = effective(&inputs.current.config, inputs.instances);
        let build = |cfg: &Config| {
            let snapshot = Snapshot {
                version: version.to_string(),
                config_version: inputs.current.version,
                config: Bytes::from(cfg.encode_to_vec()),
                trust_bundle_pem: inputs.trust_bundle_pem.to_string(),
            };
            Arc::new(Published {
                version: version.clone(),
                frame: frame(&snapshot),
                committed_at,
            })
        };
        if is_new {
            is_new_version(&version);
            // The version being pushed, before any stream has it.
            let mut latest = lock(&self.latest);
            latest.version = version.clone();
            latest.committed_at = Some(committed_at);
        }
        let mut whole: Option<Arc<Published>> = None;
        let mut sizes = Vec::with_capacity(todo.len());
        for (scope, tx) in &todo {
            // A Service that no longer lists `calls` gets the whole mesh
            // until its proxies reconnect to `*`.
            let published = if inputs.current.calling.contains(scope) {
                build(&scope_config(&cfg, scope))
            } else {
                whole.get_or_insert_with(|| build(&cfg)).clone()
            };
            sizes.push((scope.clone(), published.frame.len()));
            tx.send_replace(published);
        }
        lock(&self.scopes).retain(|scope, tx| scope == ALL || tx.receiver_count() > 0);
        let mut latest = lock(&self.latest);
        if is_new {
            latest.sizes = sizes;
        } else {
            for (scope, size) in sizes {
                latest.sizes.retain(|(s, _)| *s != scope);
                latest.sizes.push((scope, size));
            }
        }
        let live = lock(&self.scopes);
        latest.sizes.retain(|(s, _)| live.contains_key(s));
        latest.sizes.sort();
        latest.version = version.clone();
        latest.committed_at = Some(committed_at);
        is_new.then_some(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        remora_proto::prepare(remora_proto::parse_yaml(yaml, "t").unwrap()).unwrap()
    }

    fn current(version: u64, yaml: &str) -> Current {
        let config = cfg(yaml);
        let calling = config
            .services
            .iter()
            .filter(|s| !s.spec.as_ref().unwrap().calls.is_empty())
            .map(|s| format!("default/{}", s.metadata.as_ref().unwrap().name))
            .collect();
        Current {
            version,
            config,
            committed_at: None,
            calling,
        }
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

    const MESH: &str =
        "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}], calls: [api]}\n---\n\
                        kind: Service\nmetadata: {name: api}\nspec: {ports: [{port: 80}]}\n---\n\
                        kind: Service\nmetadata: {name: other}\nspec: {ports: [{port: 80}]}\n";

    fn decode(p: &Published) -> (Snapshot, Config) {
        assert_eq!(p.frame[0], 0, "not compressed");
        let len = u32::from_be_bytes(p.frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 5, p.frame.len());
        let s = Snapshot::decode(&p.frame[5..]).unwrap();
        let c = Config::decode(s.config.clone()).unwrap();
        (s, c)
    }

    #[test]
    fn each_scope_is_encoded_once_and_shared() {
        let snaps = Snapshots::default();
        let cur = current(3, MESH);
        assert_eq!(scope_of(&cur, "default/web"), "default/web");
        assert_eq!(scope_of(&cur, "default/api"), ALL);
        let all_a = snaps.subscribe(ALL);
        let all_b = snaps.subscribe(ALL);
        let web = snaps.subscribe("default/web");
        let inst = vec![(
            "default/api".to_string(),
            Instance {
                address: "10.0.0.1".into(),
                port: 4143,
                ..Default::default()
            },
        )];
        let inputs = Inputs {
            current: &cur,
            instances: &inst,
            trust_bundle_pem: "PEM",
        };
        let v = snaps
            .publish(&inputs, Instant::now())
            .expect("a new version");
        assert!(v.starts_with("3."), "{v}");
        // The same bytes for every stream of a scope.
        let (a, b) = (all_a.borrow().clone(), all_b.borrow().clone());
        assert!(Arc::ptr_eq(&a, &b));
        let (snap, whole) = decode(&a);
        assert_eq!((snap.version.as_str(), snap.config_version), (&*v, 3));
        assert_eq!(snap.trust_bundle_pem, "PEM");
        assert_eq!(whole.services.len(), 3);
        let api = whole
            .services
            .iter()
            .find(|s| s.metadata.as_ref().unwrap().name == "api")
            .unwrap();
        assert!(api.spec.as_ref().unwrap().endpoints[0].meshed);
        let (_, scoped) = decode(&web.borrow());
        assert_eq!(scoped.services.len(), 2, "web and what it calls");
        // Nothing changed: nothing is built or sent.
        assert_eq!(snaps.publish(&inputs, Instant::now()), None);
        let sizes: Vec<String> = snaps.sizes().into_iter().map(|(s, _)| s).collect();
        assert_eq!(sizes, ["*", "default/web"]);
        // A scope made later gets the same version, timed from its commit.
        let late = snaps.subscribe("default/late");
        assert_eq!(snaps.publish(&inputs, Instant::now()), None);
        assert_eq!(late.borrow().committed_at, a.committed_at);
        drop(late);
        // Once nobody listens, a scope goes.
        drop(web);
        let newer = current(4, MESH);
        let inputs = Inputs {
            current: &newer,
            ..inputs
        };
        snaps.publish(&inputs, Instant::now()).unwrap();
        let sizes: Vec<String> = snaps.sizes().into_iter().map(|(s, _)| s).collect();
        assert_eq!(sizes, ["*"]);
    }

    #[test]
    fn a_service_that_stops_calling_gets_the_whole_mesh() {
        let snaps = Snapshots::default();
        let web = snaps.subscribe("default/web");
        let all = snaps.subscribe(ALL);
        let before = current(1, MESH);
        let inputs = Inputs {
            current: &before,
            instances: &[],
            trust_bundle_pem: "",
        };
        snaps.publish(&inputs, Instant::now());
        assert_eq!(decode(&web.borrow()).1.services.len(), 2);
        let after = current(2, &MESH.replace(", calls: [api]", ""));
        let inputs = Inputs {
            current: &after,
            ..inputs
        };
        snaps.publish(&inputs, Instant::now());
        assert!(Arc::ptr_eq(&web.borrow(), &all.borrow()));
    }
}
