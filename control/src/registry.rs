//! The instance registry: the endpoints proxies registered for the Services
//! they front, and the identity each node id is bound to. Kept in
//! `<data-dir>/instances.pb` (a `Registrations` message; temp file, fsync,
//! rename) soon after it changes, so a control-plane restart neither drops
//! endpoints whose proxies have not reconnected yet nor forgets who owns
//! which node id.

use crate::admission::{check_instance, check_service, Caller, Refused};
use crate::snapshot::Registered;
use prost::Message;
use remora_proto::control::{Instance, Registration, Registrations};
use remora_proto::model::Config;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, OnceLock};
use tokio::sync::Notify;
use tracing::{info, warn};

#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
    /// Where the registry is kept, when it is.
    path: OnceLock<PathBuf>,
    /// The generation last written.
    saved: AtomicU64,
    /// Wakes the saver.
    dirty: Notify,
}

#[derive(Default)]
struct State {
    /// node id → (Service, instance).
    instances: BTreeMap<String, Registered>,
    /// The identity each node id is bound to (the first to register it).
    owners: BTreeMap<String, String>,
    /// Bumped whenever `instances` or `owners` change.
    generation: u64,
}

impl State {
    /// Records a change: true, for `changed |= ...`.
    fn changed(&mut self) -> bool {
        self.generation += 1;
        true
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a proxy's Hello against who it is (`caller`: its verified
    /// identity; `None` on a control plane without authentication, where
    /// only the shape is checked), and binds the node id to the caller.
    pub fn admit(
        &self,
        cfg: &Config,
        caller: Option<&Caller>,
        node: &str,
        service: &str,
        instance: Option<&Instance>,
    ) -> Result<(), Refused> {
        check_hello(cfg, caller, node, service, instance)?;
        let Some(caller) = caller else {
            return Ok(());
        };
        let who = caller.to_string();
        let mut st = self.lock();
        match st.owners.get(node) {
            Some(owner) if *owner != who => Err(Refused::Denied(format!(
                "node {node} belongs to {owner}: another identity cannot take it over"
            ))),
            Some(_) => Ok(()),
            None => {
                st.owners.insert(node.to_string(), who);
                st.changed();
                self.dirty.notify_one();
                Ok(())
            }
        }
    }

    /// The identity `node` is bound to, if any.
    pub fn owner(&self, node: &str) -> Option<String> {
        self.lock().owners.get(node).cloned()
    }

    /// The registered instance of `node`, if any.
    pub fn instance(&self, node: &str) -> Option<Registered> {
        self.lock().instances.get(node).cloned()
    }

    /// Mirrors a shared store: every instance at once (true if they
    /// changed).
    pub fn replace_instances(&self, all: BTreeMap<String, Registered>) -> bool {
        let mut st = self.lock();
        st.instances != all && {
            st.instances = all;
            st.changed()
        }
    }

    /// Mirrors a shared store: one node's instance set or gone (true if it
    /// changed).
    pub fn set_instance(&self, node: &str, entry: Option<Registered>) -> bool {
        let mut st = self.lock();
        let changed = match entry {
            Some(e) => st.instances.insert(node.to_string(), e.clone()) != Some(e),
            None => st.instances.remove(node).is_some(),
        };
        changed && st.changed()
    }

    /// Mirrors a shared store: every node binding at once.
    pub fn replace_owners(&self, all: BTreeMap<String, String>) {
        self.lock().owners = all;
    }

    /// Mirrors a shared store: one node's binding set or gone.
    pub fn set_owner(&self, node: &str, owner: Option<String>) {
        let mut st = self.lock();
        match owner {
            Some(o) => st.owners.insert(node.to_string(), o),
            None => st.owners.remove(node),
        };
    }

    /// A proxy connected with a Hello for `service`: registers the
    /// instance it names. A Hello without one keeps what the node
    /// registered before (a proxy reconnecting after a control-plane
    /// restart registers again once it can serve; its endpoint must not
    /// blink meanwhile), unless it now fronts another Service. True if the
    /// instances changed.
    pub fn connected(&self, node: &str, service: &str, instance: Option<Instance>) -> bool {
        let mut st = self.lock();
        let changed = match instance {
            Some(i) if !service.is_empty() => {
                let entry = (service.to_string(), i);
                st.instances.insert(node.to_string(), entry.clone()) != Some(entry) && st.changed()
            }
            _ => match st.instances.get(node) {
                Some((s, _)) if s != service => {
                    st.instances.remove(node);
                    st.changed()
                }
                _ => false,
            },
        };
        if changed {
            self.dirty.notify_one();
        }
        changed
    }

    /// The proxy can serve now: registers its instance (checked like
    /// config) under its Service. True if the instances changed.
    pub fn register(&self, node: &str, service: &str, instance: Instance) -> Result<bool, Refused> {
        check_instance(&instance).map_err(Refused::Invalid)?;
        if service.is_empty() {
            return Err(Refused::Invalid(
                "Register without a Service in the Hello".into(),
            ));
        }
        let mut st = self.lock();
        let entry = (service.to_string(), instance);
        let changed =
            st.instances.insert(node.to_string(), entry.clone()) != Some(entry) && st.changed();
        if changed {
            info!(node, "instance registered");
            self.dirty.notify_one();
        }
        Ok(changed)
    }

    /// Removes the node's instance; true if it had one.
    pub fn remove(&self, node: &str) -> bool {
        let mut st = self.lock();
        let changed = st.instances.remove(node).is_some() && st.changed();
        if changed {
            self.dirty.notify_one();
        }
        changed
    }

    /// Removes the instances of `nodes` for which `gone` holds; how many.
    pub fn remove_if(&self, nodes: &[String], gone: impl Fn(&str) -> bool) -> usize {
        let mut st = self.lock();
        let before = st.instances.len();
        for n in nodes {
            if gone(n) {
                st.instances.remove(n);
            }
        }
        let removed = before - st.instances.len();
        if removed > 0 {
            st.changed();
            self.dirty.notify_one();
        }
        removed
    }

    /// Forgets the bindings of nodes that have neither an instance nor
    /// `keep(node)` (a proxy in the status table).
    pub fn forget_owners(&self, keep: impl Fn(&str) -> bool) {
        let mut st = self.lock();
        let before = st.owners.len();
        let State {
            owners, instances, ..
        } = &mut *st;
        owners.retain(|node, _| keep(node) || instances.contains_key(node));
        if st.owners.len() != before {
            st.changed();
            self.dirty.notify_one();
        }
    }

    /// Every registered instance, in node id order.
    pub fn instances(&self) -> Vec<Registered> {
        self.lock().instances.values().cloned().collect()
    }

    /// `ip:port` of the node's instance, or empty.
    pub fn address(&self, node: &str) -> String {
        self.lock()
            .instances
            .get(node)
            .map(|(_, i)| format!("{}:{}", i.address, i.port))
            .unwrap_or_default()
    }

    /// Restores what `path` holds and keeps it current from now on
    /// (`save`, `saver`); returns the restored nodes.
    pub fn restore(&self, path: PathBuf) -> Vec<String> {
        let restored = match std::fs::read(&path) {
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
                    // What was read is what is on disk.
                    self.saved.store(st.generation, Relaxed);
                    nodes
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "registered instances unreadable; starting without them");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        let _ = self.path.set(path);
        restored
    }

    /// Waits until something changed since the last save.
    pub async fn changed(&self) {
        self.dirty.notified().await
    }

    /// Writes the registry now, if it changed since the last write.
    pub fn save(&self) {
        let Some(path) = self.path.get() else {
            return;
        };
        let (generation, bytes) = {
            let st = self.lock();
            if st.generation == self.saved.load(Relaxed) {
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
            (st.generation, regs.encode_to_vec())
        };
        match crate::store::write_atomic(&tmp_path(path), path, &bytes) {
            Ok(()) => self.saved.store(generation, Relaxed),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "could not save the registered instances")
            }
        }
    }
}

/// What a Hello may say, whoever keeps the bindings: a node id of 1 to 253
/// characters, an instance checked like config, and (with a caller) a
/// Service of the caller's own identity.
pub fn check_hello(
    cfg: &Config,
    caller: Option<&Caller>,
    node: &str,
    service: &str,
    instance: Option<&Instance>,
) -> Result<(), Refused> {
    if node.is_empty() || node.len() > 253 {
        return Err(Refused::Invalid(
            "Hello.node_id must be 1 to 253 characters".into(),
        ));
    }
    if let Some(i) = instance {
        check_instance(i).map_err(Refused::Invalid)?;
    }
    if let (Some(caller), false) = (caller, service.is_empty()) {
        check_service(cfg, service, caller).map_err(Refused::Denied)?;
    }
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension("tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(address: &str) -> Instance {
        Instance {
            address: address.into(),
            port: 4143,
            ..Default::default()
        }
    }

    fn shop() -> Config {
        remora_proto::prepare(
            remora_proto::parse_yaml(
                "kind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\n\
                 kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}\n",
                "t",
            )
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_node_id_belongs_to_the_identity_that_first_registered_it() {
        let reg = Registry::default();
        let cfg = shop();
        let who = |sa: &str| Caller {
            namespace: "shop".into(),
            service_account: sa.into(),
        };
        let (api, web, i) = (who("api"), who("web"), inst("10.0.0.5"));
        assert!(reg
            .admit(&cfg, Some(&api), "api-1", "shop/api", Some(&i))
            .is_ok());
        // Again (a reconnect): fine.
        assert!(reg
            .admit(&cfg, Some(&api), "api-1", "shop/api", Some(&i))
            .is_ok());
        // web may not register under api, nor take api-1 over.
        let e = reg
            .admit(&cfg, Some(&web), "web-1", "shop/api", Some(&i))
            .unwrap_err();
        assert!(matches!(e, Refused::Denied(_)), "{e}");
        let e = reg
            .admit(&cfg, Some(&web), "api-1", "shop/web", None)
            .unwrap_err();
        assert!(e.to_string().contains("belongs to shop/api"), "{e}");
        assert!(reg
            .admit(&cfg, Some(&web), "web-1", "shop/web", None)
            .is_ok());
        // A bad instance is refused whoever sends it.
        let e = reg
            .admit(&cfg, None, "x", "shop/api", Some(&inst("nowhere")))
            .unwrap_err();
        assert!(matches!(e, Refused::Invalid(_)), "{e}");
        // Bindings of nodes with neither a proxy nor an instance go.
        reg.forget_owners(|n| n == "web-1");
        let e = reg.admit(&cfg, Some(&web), "api-1", "shop/web", None);
        assert!(e.is_ok(), "api-1 was forgotten");
    }

    #[test]
    fn instances_change_only_when_what_they_say_changes() {
        let reg = Registry::default();
        assert!(reg.register("a", "shop/api", inst("10.0.0.1")).unwrap());
        assert!(!reg.register("a", "shop/api", inst("10.0.0.1")).unwrap());
        // A reconnect without an instance keeps it; fronting another
        // Service drops it.
        assert!(!reg.connected("a", "shop/api", None));
        assert_eq!(reg.address("a"), "10.0.0.1:4143");
        assert!(reg.connected("a", "shop/web", None));
        assert_eq!(reg.address("a"), "");
        assert!(reg.register("b", "", inst("10.0.0.2")).is_err());
        reg.register("b", "shop/api", inst("10.0.0.2")).unwrap();
        reg.register("c", "shop/api", inst("10.0.0.3")).unwrap();
        let nodes = ["b".to_string(), "c".to_string()];
        assert_eq!(reg.remove_if(&nodes, |n| n == "b"), 1);
        assert_eq!(reg.instances().len(), 1);
        assert!(reg.remove("c"));
        assert!(!reg.remove("c"));
    }

    #[test]
    fn the_registry_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("remora-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("instances.pb");
        let reg = Registry::default();
        assert!(reg.restore(path.clone()).is_empty());
        let cfg = shop();
        let api = Caller {
            namespace: "shop".into(),
            service_account: "api".into(),
        };
        reg.admit(&cfg, Some(&api), "api-1", "shop/api", None)
            .unwrap();
        reg.register("api-1", "shop/api", inst("10.0.0.5")).unwrap();
        reg.save();
        let again = Registry::default();
        assert_eq!(again.restore(path), ["api-1"]);
        assert_eq!(again.address("api-1"), "10.0.0.5:4143");
        let web = Caller {
            namespace: "shop".into(),
            service_account: "web".into(),
        };
        assert!(again
            .admit(&cfg, Some(&web), "api-1", "shop/web", None)
            .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
