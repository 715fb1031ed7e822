//! The local app: where the inbound side sends what it accepted.
//!
//! With interception a workload may serve several ports, and the caller
//! says which one it meant: the original destination of a redirected
//! connection, or the port in a peer proxy's transport header. That port
//! on the address the connection arrived at is the app. `--app-addr`
//! (setups without interception) pins every connection to one address;
//! a connection that names no port goes to the default address.

use crate::cluster::compile::build_cluster;
use crate::cluster::{Cluster, Protocol, Target};
use crate::config::Settings;
use crate::metrics::{Metrics, RouteMetrics};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Clusters kept for app ports; past this, a connection gets a cluster of
/// its own (no pooling) rather than growing the map without bound.
const MAX_CACHED: usize = 64;

pub struct LocalApp {
    /// `--app-addr`: every connection goes here.
    pinned: Option<SocketAddr>,
    /// Where a connection that names no port goes.
    default: SocketAddr,
    /// `--app-protocol`: what the pinned or default address speaks when
    /// the local Service does not declare it.
    protocol: Protocol,
    clusters: Mutex<HashMap<(SocketAddr, Protocol), Arc<Cluster>>>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// Request metrics of the inbound side.
    pub route_metrics: RouteMetrics,
}

/// Where one inbound connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppTarget {
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

impl LocalApp {
    pub fn new(
        pinned: Option<SocketAddr>,
        default: SocketAddr,
        protocol: Protocol,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> LocalApp {
        let app = LocalApp {
            pinned,
            default,
            protocol,
            clusters: Mutex::new(HashMap::new()),
            route_metrics: metrics.route("inbound", "inbound", "inbound"),
            settings,
            metrics,
        };
        // The usual target from the start, so its metric series exist
        // before the first connection.
        let first = app.target(None, default.ip(), None);
        if first.protocol != Protocol::Tcp {
            app.cluster(first);
        }
        app
    }

    /// The target of a connection that meant `port` (if it said) and
    /// arrived at `ip`; `declared` is the local Service's protocol for that
    /// port, if it declares one.
    pub fn target(&self, port: Option<u16>, ip: IpAddr, declared: Option<Protocol>) -> AppTarget {
        let (addr, fallback) = match (self.pinned, port) {
            (Some(a), _) => (a, self.protocol),
            (None, Some(p)) => (SocketAddr::new(ip, p), Protocol::Detect),
            (None, None) => (self.default, self.protocol),
        };
        AppTarget {
            addr,
            protocol: declared.unwrap_or(fallback),
        }
    }

    /// The cluster (pool and load state) for an HTTP target.
    pub fn cluster(&self, t: AppTarget) -> Arc<Cluster> {
        let key = (t.addr, t.protocol);
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return c.clone();
        }
        let c = build_cluster(
            "inbound",
            t.protocol,
            &[Target {
                addr: t.addr,
                tls: false,
            }],
            None,
            None,
            &self.settings,
            &self.metrics,
        );
        if map.len() < MAX_CACHED {
            map.insert(key, c.clone());
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(pinned: Option<&str>) -> LocalApp {
        LocalApp::new(
            pinned.map(|p| p.parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap(),
            Protocol::Http1,
            Settings::default(),
            Metrics::new(),
        )
    }

    #[test]
    fn the_port_the_caller_meant_on_the_address_it_arrived_at() {
        let pod: IpAddr = "10.1.0.5".parse().unwrap();
        let a = app(None);
        let t = a.target(Some(9000), pod, None);
        assert_eq!(t.addr, "10.1.0.5:9000".parse().unwrap());
        assert_eq!(t.protocol, Protocol::Detect, "undeclared: detected");
        let t = a.target(Some(9000), pod, Some(Protocol::Tcp));
        assert_eq!(t.protocol, Protocol::Tcp);
        // No port said: the default app address and --app-protocol.
        let t = a.target(None, pod, None);
        assert_eq!(
            (t.addr, t.protocol),
            ("127.0.0.1:8080".parse().unwrap(), Protocol::Http1)
        );
        // --app-addr pins everything.
        let t = app(Some("127.0.0.1:7000")).target(Some(9000), pod, Some(Protocol::Grpc));
        assert_eq!(
            (t.addr, t.protocol),
            ("127.0.0.1:7000".parse().unwrap(), Protocol::Grpc)
        );
    }

    #[tokio::test]
    async fn clusters_are_shared_per_target() {
        let a = app(None);
        let t = a.target(Some(9000), "10.1.0.5".parse().unwrap(), None);
        assert!(Arc::ptr_eq(&a.cluster(t), &a.cluster(t)));
    }
}
