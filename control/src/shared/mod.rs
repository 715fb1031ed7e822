//! What control-plane replicas on etcd share besides the config history:
//! registered instances, node id → identity bindings and proxies' status.
//! Any replica can then serve any proxy, and losing one loses nothing.
//!
//! Keys, under the prefix:
//!
//! - `instances/<node>`: the node's `Registration` (protobuf);
//! - `nodes/<node>`: the identity (`namespace/serviceAccount`) the node id
//!   is bound to, made create-only, so two replicas can never bind one node
//!   id to two identities;
//! - `status/<node>`: its `ProxyStatus` (protobuf; a NACK's error cut to
//!   1 KiB), what `remoractl status` lists on every replica.
//!
//! A key belongs to the proxy, not to the replica: while the proxy is
//! connected, the replica it is connected to keeps its keys on the
//! replica's lease (`etcd::lease::keep`, TTL the registration grace). When
//! its stream ends there, the replica hands the keys that are still on its
//! lease to a lease of the grace (the instance) or of the status retention
//! (status, binding): they go then, unless the proxy reconnects, here or
//! elsewhere, and that replica puts them on its own lease. A replica that
//! dies takes nothing with it at once: its lease expires after the grace,
//! by which time its proxies have reconnected elsewhere.
//!
//! Every replica mirrors `instances/` and `nodes/` (`etcd::watch::follow`)
//! into its `Registry`, from which its snapshots are built, so an instance
//! registered through one replica reaches the proxies of all of them.

pub mod ca;
mod writer;

use crate::admission::Refused;
use crate::error::MeshError;
use crate::etcd::watch::{follow, Change};
use crate::etcd::{self, Etcd};
use crate::proxies::Proxy;
use crate::registry::Registry;
use crate::snapshot::Registered;
use prost::Message;
use remora_proto::control::{Instance, ProxyStatus, Registration};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;
pub use writer::Writer;

/// The keys of one mesh under a prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    fn dir(&self, kind: &str) -> Vec<u8> {
        format!("{}{kind}/", self.prefix).into_bytes()
    }

    fn key(&self, kind: &str, node: &str) -> Vec<u8> {
        format!("{}{kind}/{node}", self.prefix).into_bytes()
    }

    pub fn instance(&self, node: &str) -> Vec<u8> {
        self.key("instances", node)
    }

    pub fn node(&self, node: &str) -> Vec<u8> {
        self.key("nodes", node)
    }

    pub fn status(&self, node: &str) -> Vec<u8> {
        self.key("status", node)
    }

    /// The node a key of `kind` is for.
    fn node_of<'a>(&self, kind: &str, key: &'a [u8]) -> Option<&'a str> {
        let dir = self.dir(kind);
        std::str::from_utf8(key.strip_prefix(dir.as_slice())?).ok()
    }
}

/// The longest NACK error kept in a shared status.
const MAX_NACK_ERROR: usize = 1024;

pub struct Shared {
    etcd: Etcd,
    keys: Keys,
    lease: watch::Receiver<i64>,
    writer: Arc<Writer>,
}

impl Shared {
    /// Starts sharing under `prefix`: the replica's lease (TTL `grace`),
    /// the mirror of instances and bindings into `registry` (calling
    /// `changed` when the instances change), and the writer of this
    /// replica's proxies' keys.
    pub fn start(
        etcd: Etcd,
        prefix: &str,
        registry: Arc<Registry>,
        grace: Duration,
        changed: impl Fn() + Send + Sync + 'static,
    ) -> Arc<Shared> {
        let keys = Keys::new(prefix);
        let lease = etcd::lease::keep(etcd.clone(), grace.max(Duration::from_secs(2)));
        let writer = Writer::start(
            etcd.clone(),
            keys.clone(),
            lease.clone(),
            registry.clone(),
            grace,
        );
        mirror_instances(&etcd, &keys, registry.clone(), changed);
        mirror_nodes(&etcd, &keys, registry);
        Arc::new(Shared {
            etcd,
            keys,
            lease,
            writer,
        })
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Binds `node` to `who` unless it is bound already: create-only, so
    /// of two replicas binding one node id at once, one wins and the other
    /// sees its binding.
    pub async fn bind(&self, node: &str, who: &str) -> Result<(), MeshError> {
        let lease = *self.lease.borrow();
        if lease == 0 {
            return Err(MeshError::Store(crate::store::StoreError::Unavailable(
                "no lease from etcd yet".into(),
            )));
        }
        let key = self.keys.node(node);
        let r = self
            .etcd
            .txn(
                vec![etcd::absent(key.clone())],
                vec![etcd::put(key.clone(), who, lease)],
                vec![etcd::get(key)],
            )
            .await
            .map_err(|e| MeshError::Store(e.into()))?;
        if r.succeeded {
            return Ok(());
        }
        let owner = etcd::range_result(&r, 0)
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default();
        if owner == who {
            Ok(())
        } else {
            Err(Refused::Denied(format!(
                "node {node} belongs to {owner}: another identity cannot take it over"
            ))
            .into())
        }
    }

    /// Every proxy's status as etcd holds it.
    pub async fn statuses(&self) -> Result<Vec<ProxyStatus>, MeshError> {
        let (kvs, _) = self
            .etcd
            .prefix(&self.keys.dir("status"))
            .await
            .map_err(|e| MeshError::Store(e.into()))?;
        Ok(kvs
            .iter()
            .filter_map(|kv| ProxyStatus::decode(kv.value.as_slice()).ok())
            .collect())
    }
}

/// A proxy's status as it is shared.
pub fn status_value(proxy: &Proxy, instance: String) -> Vec<u8> {
    let mut s = proxy.status(instance);
    if s.nack_error.len() > MAX_NACK_ERROR {
        let mut cut = MAX_NACK_ERROR;
        while !s.nack_error.is_char_boundary(cut) {
            cut -= 1;
        }
        s.nack_error.truncate(cut);
    }
    s.encode_to_vec()
}

/// A registration as it is shared.
pub fn registration_value(
    node: &str,
    service: &str,
    instance: &Instance,
    identity: &str,
) -> Vec<u8> {
    Registration {
        node_id: node.to_string(),
        service: service.to_string(),
        instance: Some(instance.clone()),
        identity: identity.to_string(),
    }
    .encode_to_vec()
}

fn registered(value: &[u8]) -> Option<Registered> {
    let r = Registration::decode(value).ok()?;
    Some((r.service, r.instance?))
}

/// Keeps the registry's instances equal to `instances/`.
fn mirror_instances(
    etcd: &Etcd,
    keys: &Keys,
    registry: Arc<Registry>,
    changed: impl Fn() + Send + 'static,
) {
    let dir = keys.dir("instances");
    let mut changes = follow(etcd.clone(), dir.clone(), etcd::prefix_end(&dir));
    let keys = keys.clone();
    tokio::spawn(async move {
        while let Some(batch) = changes.recv().await {
            let mut any = false;
            for c in batch {
                any |= match c {
                    Change::Reset(kvs) => {
                        let all: BTreeMap<String, Registered> = kvs
                            .iter()
                            .filter_map(|kv| {
                                let node = keys.node_of("instances", &kv.key)?;
                                Some((node.to_string(), registered(&kv.value)?))
                            })
                            .collect();
                        registry.replace_instances(all)
                    }
                    Change::Put(kv) => match keys.node_of("instances", &kv.key) {
                        Some(node) => match registered(&kv.value) {
                            Some(r) => registry.set_instance(node, Some(r)),
                            None => {
                                warn!(node, "unreadable registration in etcd; ignored");
                                false
                            }
                        },
                        None => false,
                    },
                    Change::Delete(key) => match keys.node_of("instances", &key) {
                        Some(node) => registry.set_instance(node, None),
                        None => false,
                    },
                };
            }
            if any {
                changed();
            }
        }
    });
}

/// Keeps the registry's node bindings equal to `nodes/`.
fn mirror_nodes(etcd: &Etcd, keys: &Keys, registry: Arc<Registry>) {
    let dir = keys.dir("nodes");
    let mut changes = follow(etcd.clone(), dir.clone(), etcd::prefix_end(&dir));
    let keys = keys.clone();
    tokio::spawn(async move {
        while let Some(batch) = changes.recv().await {
            for c in batch {
                match c {
                    Change::Reset(kvs) => registry.replace_owners(
                        kvs.iter()
                            .filter_map(|kv| {
                                let node = keys.node_of("nodes", &kv.key)?;
                                let who = String::from_utf8(kv.value.clone()).ok()?;
                                Some((node.to_string(), who))
                            })
                            .collect(),
                    ),
                    Change::Put(kv) => {
                        if let (Some(node), Ok(who)) = (
                            keys.node_of("nodes", &kv.key),
                            String::from_utf8(kv.value.clone()),
                        ) {
                            registry.set_owner(node, Some(who));
                        }
                    }
                    Change::Delete(key) => {
                        if let Some(node) = keys.node_of("nodes", &key) {
                            registry.set_owner(node, None);
                        }
                    }
                }
            }
        }
    });
}
