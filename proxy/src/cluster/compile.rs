//! The clusters of a config: one per Service port, carrying over from the
//! previous runtime what did not change (the whole cluster when its
//! endpoints are the same; its pool and each kept endpoint's load state
//! when only endpoints changed).

use super::{Cluster, Endpoint, Protocol, Target};
use crate::config::{CompileError, Settings};
use crate::metrics::{BackendLabels, Metrics};
use crate::pool::{ClusterTls, Pool};
use crate::snapshot::{RefKey, Resources};
use crate::tls::MtlsMode;
use remora_proto::model::Service;
use remora_proto::ObjectRef;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Every Service port's cluster, and each Service's ports.
#[derive(Default)]
pub struct Clusters {
    /// By `namespace/name:port`.
    pub by_id: HashMap<String, Arc<Cluster>>,
    /// Each Service's clusters, by port in declaration order.
    pub services: hashbrown::HashMap<ObjectRef, ServiceClusters>,
}

/// One Service's clusters and the resource they were built from.
pub struct ServiceClusters {
    source: Arc<Service>,
    pub ports: Vec<(u16, Arc<Cluster>)>,
}

impl Clusters {
    /// The cluster a backendRef names: its port, or the Service's only
    /// (first) port.
    pub fn resolve(&self, namespace: &str, name: &str, port: u32) -> Result<&Arc<Cluster>, String> {
        let ports = &self
            .services
            .get(&RefKey::new(namespace, name))
            .ok_or_else(|| format!("Service {namespace}/{name} not found"))?
            .ports;
        let found = match port {
            0 => ports.first(),
            p => ports.iter().find(|(port, _)| u32::from(*port) == p),
        };
        found
            .map(|(_, c)| c)
            .ok_or_else(|| format!("Service {namespace}/{name} has no port {port}"))
    }
}

/// Compiles the clusters of `cfg`; `prev` are the running ones. A Service
/// that is the very same resource keeps its clusters without a look at
/// its endpoints.
pub fn clusters(
    cfg: &Resources,
    prev: &Clusters,
    s: &Settings,
    metrics: &Metrics,
) -> Result<Clusters, CompileError> {
    let mut out = Clusters::default();
    out.by_id.reserve(cfg.services.len());
    out.services.reserve(cfg.services.len());
    for svc in &cfg.services {
        let key = RefKey::of(svc.metadata.as_ref());
        let ports = match prev.services.get(&key) {
            Some(p) if Arc::ptr_eq(&p.source, svc) => p.ports.clone(),
            _ => service_clusters(svc, &prev.by_id, s, metrics)?,
        };
        for (_, c) in &ports {
            out.by_id.insert(c.id.clone(), c.clone());
        }
        out.services.insert(
            ObjectRef::of(svc.metadata.as_ref()),
            ServiceClusters {
                source: svc.clone(),
                ports,
            },
        );
    }
    Ok(out)
}

/// One Service's clusters, built again (reusing each cluster whose
/// endpoints did not change).
fn service_clusters(
    svc: &Service,
    prev: &HashMap<String, Arc<Cluster>>,
    s: &Settings,
    metrics: &Metrics,
) -> Result<Vec<(u16, Arc<Cluster>)>, CompileError> {
    let id = ObjectRef::of(svc.metadata.as_ref());
    let empty = Default::default();
    let spec = svc.spec.as_ref().unwrap_or(&empty);
    // With an identity, calls to the Service's meshed endpoints are mTLS,
    // unless the Service turned it off.
    let mode = spec.mtls.as_ref().map(|m| m.mode.as_str()).unwrap_or("");
    let tls = s
        .tls
        .as_ref()
        .filter(|_| MtlsMode::parse(mode) != MtlsMode::Disabled)
        .map(|mesh| ClusterTls {
            mesh: mesh.clone(),
            namespace: id.namespace.clone(),
            service_account: if spec.service_account.is_empty() {
                id.name.clone()
            } else {
                spec.service_account.clone()
            },
            app_port: 0,
        });
    let mut out = Vec::with_capacity(spec.ports.len());
    for p in &spec.ports {
        let protocol = Protocol::parse(&p.protocol).ok_or_else(|| CompileError::Service {
            service: id.clone(),
            what: format!("unknown protocol {:?}", p.protocol),
        })?;
        let cid = format!("{id}:{}", p.port);
        let tls = tls.clone().map(|t| ClusterTls {
            app_port: p.target_port as u16,
            ..t
        });
        let mut targets = Vec::with_capacity(spec.endpoints.len());
        for e in &spec.endpoints {
            let ip: IpAddr = e.address.parse().map_err(|_| CompileError::Service {
                service: id.clone(),
                what: format!("bad address {:?}", e.address),
            })?;
            let port = if e.port != 0 { e.port } else { p.target_port };
            targets.push(Target {
                addr: SocketAddr::new(ip, port as u16),
                tls: e.meshed && tls.is_some(),
            });
        }
        let cluster = build_cluster(&cid, protocol, &targets, tls, prev.get(&cid), s, metrics);
        out.push((p.port as u16, cluster));
    }
    Ok(out)
}

/// A cluster for `targets`, reusing the previous one whole when nothing
/// changed, and its pool and per-endpoint state when only endpoints did.
pub fn build_cluster(
    id: &str,
    protocol: Protocol,
    targets: &[Target],
    tls: Option<ClusterTls>,
    prev: Option<&Arc<Cluster>>,
    s: &Settings,
    metrics: &Metrics,
) -> Arc<Cluster> {
    if let Some(p) = prev {
        if p.same_shape(protocol, targets) && p.pool.same_tls(tls.as_ref()) {
            return p.clone();
        }
    }
    let pool = match prev {
        Some(p) if p.protocol == protocol && p.pool.same_tls(tls.as_ref()) => p.pool.clone(),
        _ => Arc::new(Pool::new(s.pool, protocol.is_h2(), tls)),
    };
    let endpoints = targets
        .iter()
        .filter_map(|t| {
            let load = prev.and_then(|p| p.load_of(t.addr)).unwrap_or_default();
            Endpoint::new(*t, load)
        })
        .collect();
    let labels = BackendLabels {
        backend: id.to_string(),
    };
    Arc::new(Cluster {
        id: id.to_string(),
        protocol,
        endpoints,
        pool,
        outlier: s.outlier,
        overflow: metrics.upstream_overflow.get_or_create_owned(&labels),
        ejections: metrics.outlier_ejections.get_or_create_owned(&labels),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoints: &str) -> Resources {
        let yaml = format!(
            "kind: Service\nmetadata: {{name: a}}\nspec:\n  ports: [{{port: 80}}, {{port: 81, protocol: grpc}}]\n  endpoints: [{endpoints}]\n"
        );
        Resources::from_config(
            remora_proto::prepare(remora_proto::parse_yaml(&yaml, "t").unwrap()).unwrap(),
        )
    }

    #[tokio::test]
    async fn one_cluster_per_port_kept_while_unchanged() {
        let (s, m) = (Settings::default(), Metrics::new());
        let one = "{address: 127.0.0.1, port: 1001}";
        let c1 = clusters(&cfg(one), &Clusters::default(), &s, &m).unwrap();
        assert_eq!(c1.by_id.len(), 2);
        assert_eq!(c1.resolve("default", "a", 0).unwrap().id, "default/a:80");
        assert_eq!(
            c1.resolve("default", "a", 81).unwrap().protocol,
            Protocol::Grpc
        );
        assert!(c1.resolve("default", "a", 82).is_err());
        assert!(c1.resolve("default", "b", 80).is_err());
        let c2 = clusters(&cfg(one), &c1, &s, &m).unwrap();
        assert!(Arc::ptr_eq(
            &c1.by_id["default/a:80"],
            &c2.by_id["default/a:80"]
        ));
        let two = "{address: 127.0.0.1, port: 1001}, {address: 127.0.0.1, port: 1002}";
        let c3 = clusters(&cfg(two), &c2, &s, &m).unwrap();
        let (old, new) = (&c2.by_id["default/a:80"], &c3.by_id["default/a:80"]);
        assert!(!Arc::ptr_eq(old, new));
        assert!(Arc::ptr_eq(&old.pool, &new.pool), "the pool carries over");
    }
}
