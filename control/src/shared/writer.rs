//! Writes this replica's proxies' keys to etcd: what each node should look
//! like there (connected here, or just gone from here) is kept per node,
//! and a task writes the nodes that changed, the latest state of each, up
//! to `BATCH` nodes per transaction. A failed write is retried until etcd
//! takes it, and a new replica lease rewrites every connected node, so
//! after an outage etcd converges on what the replica holds.

use super::{registration_value, status_value, Keys};
use crate::etcd::lease::Leases;
use crate::etcd::watch::Backoff;
use crate::etcd::{self, Etcd};
use crate::proxies::Proxy;
use crate::registry::Registry;
use remora_proto::control::Instance;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// Nodes per transaction: each writes at most three keys, and etcd takes
/// 128 operations per transaction by default.
const BATCH: usize = 40;

pub struct Writer {
    etcd: Etcd,
    keys: Keys,
    lease: watch::Receiver<i64>,
    leases: Leases,
    registry: Arc<Registry>,
    grace: Duration,
    /// How long a gone proxy's status stays, seconds.
    retention: AtomicU64,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Nodes connected to this replica: their keys on its lease.
    here: HashMap<String, Here>,
    /// Nodes whose stream here ended, until their keys are handed over.
    gone: HashMap<String, Arc<Proxy>>,
    dirty: BTreeSet<String>,
}

struct Here {
    proxy: Arc<Proxy>,
    identity: String,
    instance: InstanceKey,
}

/// What to do with a node's instance key.
enum InstanceKey {
    /// Put this registration (on the replica's lease).
    Put(Vec<u8>),
    Delete,
    Untouched,
}

impl Writer {
    pub(super) fn start(
        etcd: Etcd,
        keys: Keys,
        lease: watch::Receiver<i64>,
        registry: Arc<Registry>,
        grace: Duration,
    ) -> Arc<Writer> {
        let w = Arc::new(Writer {
            leases: Leases::new(etcd.clone()),
            etcd,
            keys,
            lease,
            registry,
            grace,
            retention: AtomicU64::new(3600),
            state: Mutex::default(),
            wake: Notify::new(),
        });
        tokio::spawn(w.clone().run());
        tokio::spawn(w.clone().follow_lease());
        w
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_retention(&self, d: Duration) {
        self.retention.store(d.as_secs().max(1), Relaxed);
    }

    fn mark(&self, st: &mut State, node: &str) {
        st.dirty.insert(node.to_string());
        self.wake.notify_one();
    }

    /// A proxy's stream opened here. Its instance: the one its Hello names,
    /// else the one it registered before (through any replica), now on
    /// this replica's lease; none if it fronts another Service now.
    pub fn connected(&self, proxy: &Arc<Proxy>, identity: &str, instance: Option<Instance>) {
        let node = proxy.node.as_str();
        let instance = match (instance, proxy.service.is_empty()) {
            (Some(i), false) => {
                InstanceKey::Put(registration_value(node, &proxy.service, &i, identity))
            }
            _ => match self.registry.instance(node) {
                Some((s, i)) if s == proxy.service => {
                    InstanceKey::Put(registration_value(node, &s, &i, identity))
                }
                Some(_) => InstanceKey::Delete,
                None => InstanceKey::Untouched,
            },
        };
        let mut st = self.lock();
        st.gone.remove(node);
        st.here.insert(
            node.to_string(),
            Here {
                proxy: proxy.clone(),
                identity: identity.to_string(),
                instance,
            },
        );
        self.mark(&mut st, node);
    }

    /// The entry of `proxy`'s stream, if it is still its node's here.
    fn with_here(&self, proxy: &Proxy, f: impl FnOnce(&mut Here)) {
        let mut st = self.lock();
        let Some(h) = st.here.get_mut(&proxy.node) else {
            return;
        };
        if h.proxy.conn != proxy.conn {
            return;
        }
        f(h);
        self.mark(&mut st, &proxy.node);
    }

    /// The proxy registered its instance (checked already).
    pub fn registered(&self, proxy: &Proxy, instance: &Instance) {
        self.with_here(proxy, |h| {
            h.instance = InstanceKey::Put(registration_value(
                &proxy.node,
                &proxy.service,
                instance,
                &h.identity,
            ))
        });
    }

    /// The proxy deregistered its instance.
    pub fn deregistered(&self, proxy: &Proxy) {
        self.with_here(proxy, |h| h.instance = InstanceKey::Delete);
    }

    /// The proxy's status changed (an ACK or NACK).
    pub fn touched(&self, proxy: &Proxy) {
        self.with_here(proxy, |_| {});
    }

    /// The proxy's stream here ended: its keys go to the grace and
    /// retention leases (unless another replica has them by then).
    pub fn disconnected(&self, proxy: &Arc<Proxy>) {
        let mut st = self.lock();
        let ours = st
            .here
            .get(&proxy.node)
            .is_some_and(|h| h.proxy.conn == proxy.conn);
        if ours {
            st.here.remove(&proxy.node);
            st.gone.insert(proxy.node.clone(), proxy.clone());
            self.mark(&mut st, &proxy.node);
        }
    }

    /// Rewrites every connected node whenever the replica's lease changes
    /// (the first grant, or a new lease after the old one was lost).
    async fn follow_lease(self: Arc<Self>) {
        let mut lease = self.lease.clone();
        while lease.changed().await.is_ok() {
            if *lease.borrow_and_update() == 0 {
                continue;
            }
            let mut st = self.lock();
            let nodes: Vec<String> = st.here.keys().cloned().collect();
            let n = nodes.len();
            st.dirty.extend(nodes);
            drop(st);
            if n > 0 {
                info!(
                    proxies = n,
                    "putting this replica's proxies on its new etcd lease"
                );
            }
            self.wake.notify_one();
        }
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        let mut lease = self.lease.clone();
        loop {
            self.wake.notified().await;
            loop {
                let l = *lease.borrow_and_update();
                if l == 0 {
                    if lease.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                let batch: Vec<String> = {
                    let mut st = self.lock();
                    let b: Vec<String> = st.dirty.iter().take(BATCH).cloned().collect();
                    for n in &b {
                        st.dirty.remove(n);
                    }
                    b
                };
                if batch.is_empty() {
                    break;
                }
                match self.write(&batch, l).await {
                    Ok(()) => {
                        if backoff.attempts() > 0 {
                            info!("etcd takes this replica's proxies' keys again");
                        }
                        backoff.reset();
                    }
                    Err(e) => {
                        if backoff.attempts() == 0 {
                            warn!(error = %e, "cannot write this replica's proxies to etcd; retrying");
                        }
                        self.lock().dirty.extend(batch);
                        backoff.wait().await;
                    }
                }
            }
        }
    }

    /// Writes the latest state of `nodes` in one transaction.
    async fn write(&self, nodes: &[String], lease: i64) -> Result<(), etcd::EtcdError> {
        let any_gone = {
            let st = self.lock();
            nodes.iter().any(|n| st.gone.contains_key(n))
        };
        let (grace, keep) = if any_gone {
            let retention = Duration::from_secs(self.retention.load(Relaxed));
            (
                self.leases.lease(self.grace).await?,
                self.leases.lease(retention.max(self.grace)).await?,
            )
        } else {
            (0, 0)
        };
        let mut ops = Vec::new();
        let mut handed = Vec::new();
        {
            let st = self.lock();
            for node in nodes {
                let k = &self.keys;
                if let Some(h) = st.here.get(node) {
                    match &h.instance {
                        InstanceKey::Put(v) => {
                            ops.push(etcd::put(k.instance(node), v.clone(), lease))
                        }
                        InstanceKey::Delete => ops.push(etcd::delete(k.instance(node), vec![])),
                        InstanceKey::Untouched => {}
                    }
                    if !h.identity.is_empty() {
                        ops.push(etcd::nested(
                            vec![etcd::value_is(k.node(node), h.identity.clone())],
                            vec![etcd::put(k.node(node), h.identity.clone(), lease)],
                        ));
                    }
                    let status = status_value(&h.proxy, self.registry.address(node));
                    ops.push(etcd::put(k.status(node), status, lease));
                } else if let Some(p) = st.gone.get(node) {
                    // Only what is still on this replica's lease: a proxy
                    // that reconnected elsewhere keeps what it has there.
                    ops.push(etcd::nested(
                        vec![etcd::lease_is(k.instance(node), lease)],
                        vec![etcd::relet(k.instance(node), grace)],
                    ));
                    let status = status_value(p, self.registry.address(node));
                    ops.push(etcd::nested(
                        vec![etcd::lease_is(k.status(node), lease)],
                        vec![etcd::put(k.status(node), status, keep)],
                    ));
                    ops.push(etcd::nested(
                        vec![etcd::lease_is(k.node(node), lease)],
                        vec![etcd::relet(k.node(node), keep)],
                    ));
                    handed.push((node.clone(), p.conn));
                }
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.etcd.txn(vec![], ops, vec![]).await?;
        let mut st = self.lock();
        for (node, conn) in handed {
            if st.gone.get(&node).is_some_and(|p| p.conn == conn) {
                st.gone.remove(&node);
            }
        }
        Ok(())
    }
}
