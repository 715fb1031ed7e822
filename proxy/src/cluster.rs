//! A cluster is one backend Service port: its endpoints with their load
//! state, the connection pool, and the protocol spoken to it.

pub mod compile;

use crate::balance::{pick_p2c, EndpointLoad, OutlierConfig};
use crate::pool::Pool;
use prometheus_client::metrics::counter::Counter;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 to the upstream.
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC: h2c, and errors answered as grpc-status.
    Grpc,
    /// Opaque bytes.
    Tcp,
    /// Not declared: each connection is detected (HTTP or opaque bytes),
    /// and HTTP goes upstream in the version the caller spoke.
    Detect,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s {
            "" => Protocol::Detect,
            "http" => Protocol::Http1,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "tcp" => Protocol::Tcp,
            _ => return None,
        })
    }

    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
            Protocol::Detect => "auto",
        }
    }
}

/// Where a backend's endpoint is, and whether it is spoken to over mTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: bool,
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// `ip:port`, pre-parsed for building upstream URIs.
    pub authority: http::uri::Authority,
    /// https for an mTLS endpoint (the pool's connector keys on it).
    pub scheme: http::uri::Scheme,
    pub load: Arc<EndpointLoad>,
}

impl Endpoint {
    pub fn new(t: Target, load: Arc<EndpointLoad>) -> Option<Endpoint> {
        let authority = t.addr.to_string().parse().ok()?;
        let scheme = if t.tls {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        Some(Endpoint {
            addr: t.addr,
            authority,
            scheme,
            load,
        })
    }

    pub fn tls(&self) -> bool {
        self.scheme == http::uri::Scheme::HTTPS
    }
}

pub struct Cluster {
    /// `namespace/name:port`, or `inbound` for the local app.
    pub id: String,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
    pub pool: Arc<Pool>,
    pub outlier: OutlierConfig,
    pub overflow: Counter,
    pub ejections: Counter,
}

impl Cluster {
    /// Picks an endpoint by P2C over peak EWMA, skipping ejected ones.
    pub fn pick(&self) -> Option<&Endpoint> {
        pick_p2c(&self.endpoints, |e| &e.load).map(|i| &self.endpoints[i])
    }

    /// Like `pick`, but a retry does not go back to the endpoint that just
    /// failed when there is another one.
    pub fn pick_avoiding(&self, avoid: Option<SocketAddr>) -> Option<&Endpoint> {
        let ep = self.pick()?;
        match avoid {
            Some(a) if ep.addr == a && self.endpoints.len() > 1 => {
                let now = crate::balance::now_ms();
                let others = self.endpoints.iter().filter(|e| e.addr != a);
                let healthy = others.clone().filter(|e| e.load.available(now));
                healthy
                    .min_by(|x, y| x.load.cost(now).total_cmp(&y.load.cost(now)))
                    .or_else(|| others.min_by(|x, y| x.load.cost(now).total_cmp(&y.load.cost(now))))
            }
            _ => Some(ep),
        }
    }

    /// Same protocol and the same endpoints, in order.
    pub fn same_shape(&self, protocol: Protocol, targets: &[Target]) -> bool {
        self.protocol == protocol
            && self.endpoints.len() == targets.len()
            && self
                .endpoints
                .iter()
                .zip(targets)
                .all(|(e, t)| e.addr == t.addr && e.tls() == t.tls)
    }

    /// The load state of an address, if this cluster has it (kept across
    /// config swaps).
    pub fn load_of(&self, addr: SocketAddr) -> Option<Arc<EndpointLoad>> {
        self.endpoints
            .iter()
            .find(|e| e.addr == addr)
            .map(|e| e.load.clone())
    }
}
