//! The request path. Read top to bottom, one request goes:
//!
//!   prepare (one authority, the path normalized, hop-by-hop headers
//!   removed: `request.rs`) → route match → rate limits → `forward.rs`:
//!   header filters, buffering, mirror, tries under the exchange's timeouts
//!   → response filters.
//!
//! Inbound, authorization by the caller's identity comes before the limits,
//! and a proxy with an identity serves nothing until it has its first
//! config and certificate.
//!
//! Failures are `ProxyError`s, turned into a status in one place
//! (`error.rs`).

use crate::body::Body;
use crate::cluster::Cluster;
use crate::cluster::Protocol;
use crate::error::ProxyError;
use crate::exchange::Exchange;
use crate::metrics::{Metrics, RetryLabels};
use crate::ratelimit::Outcome as RateOutcome;
use crate::request::{is_grpc, prepare, From, Upgrade};
use crate::route::{authority, Lookup};
use crate::runtime::Runtime;
use arc_swap::ArcSwap;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// Which way a request flows, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the mesh to the local app.
    Inbound,
    /// From the local app to the mesh.
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Between two proxies every request is HTTP/2. To a port whose protocol
/// is detected, the caller's proxy says with this header that the app spoke
/// HTTP/1.1, so the server's proxy speaks HTTP/1.1 to its app too.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-remora-orig-proto");

pub struct Proxy {
    /// The running config; swapped whole on every accepted change.
    pub runtime: ArcSwap<Runtime>,
    /// Where the inbound side sends requests.
    pub app: crate::app::LocalApp,
    pub metrics: Arc<Metrics>,
    /// Largest request body buffered so it can be retried or mirrored.
    pub retry_buffer: usize,
    pub access_log: bool,
    /// mTLS between proxies, when this proxy has an identity.
    pub tls: Option<Arc<crate::tls::MeshTls>>,
    /// A stream with no byte either way for this long is cut off.
    pub stream_idle: Duration,
}

/// Logs an Upgrade that is not allowed and drops it (the request goes on as
/// a plain one).
fn allowed_upgrade(
    upgrade: Option<Upgrade>,
    allowed: &[String],
    dir: Direction,
) -> Option<Upgrade> {
    let u = upgrade?;
    if u.allowed(allowed) {
        return Some(u);
    }
    debug!(direction = dir.as_str(), protocol = ?u.0, "Upgrade not allowed here: served as a plain request");
    None
}

impl Proxy {
    /// Serves one request from the local app to the mesh. `dst` is where
    /// the app meant to go, for an intercepted connection.
    pub async fn outbound(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: IpAddr,
        dst: Option<SocketAddr>,
    ) -> Response<Body> {
        let start = Instant::now();
        let mut req = req;
        let grpc = is_grpc(&req);
        // The snapshot this request runs on, to the end, whatever swaps.
        let rt = self.runtime.load_full();
        let upgrade = match prepare(&mut req, rt.encoded_slashes, From::App) {
            Ok(u) => u,
            Err(e) => return self.fail(Direction::Outbound, e, grpc),
        };
        let rule = match rt.routes.find_at(&req, dst) {
            Lookup::Found(rule) => rule.clone(),
            Lookup::UnknownHost | Lookup::NoMatch => {
                let host = authority(&req).unwrap_or("").to_string();
                return self.fail(Direction::Outbound, ProxyError::NoRoute(host), grpc);
            }
        };
        let Some(backend) = rule.pick_backend() else {
            return self.fail(
                Direction::Outbound,
                ProxyError::NoBackend(rule.id.clone()),
                grpc,
            );
        };
        let upgrade = allowed_upgrade(upgrade, &rule.allowed_upgrades, Direction::Outbound);
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        // Rate limits on this route (and on calls to its Service).
        let limited = rule
            .limits
            .as_ref()
            .map(|l| l.check(req.headers(), Some(peer), None));
        // The request timeout runs until the whole response is in.
        let deadline = rule.timeout.map(|d| tokio::time::Instant::now() + d);
        let exchange = Exchange::new(self.stream_idle, deadline);
        let send = async {
            match self
                .forward(&rule, &backend.cluster, req, upgrade, &exchange)
                .await
            {
                Ok(mut resp) => {
                    if let Some(h) = &rule.response_headers {
                        h.apply(resp.headers_mut());
                    }
                    resp
                }
                Err(e) => self.fail(Direction::Outbound, e, grpc),
            }
        };
        let resp = self
            .within_limits(Direction::Outbound, limited, grpc, send)
            .await;
        backend
            .metrics
            .record(resp.status().as_u16(), start.elapsed());
        if self.access_log {
            info!(target: "access", direction = "outbound", %method, path, route = %rule.id,
                backend = %backend.cluster.id, status = resp.status().as_u16(),
                micros = start.elapsed().as_micros() as u64);
        }
        resp
    }

    /// Serves one request from the mesh to the local app (`app`: the port
    /// the connection was for). `client` is the caller's SPIFFE ID when it
    /// came over mTLS.
    pub async fn inbound(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: IpAddr,
        client: Option<Arc<str>>,
        app: Arc<Cluster>,
    ) -> Response<Body> {
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let rt = self.runtime.load_full();
        // Fails closed: a proxy with an identity serves the mesh only once
        // it has its first config (its policies) and certificate.
        if let Some(tls) = &self.tls {
            if rt.version.is_empty() || tls.store().current().is_none() {
                return self.fail(Direction::Inbound, ProxyError::NotReady, grpc);
            }
        }
        let upgrade = match prepare(&mut req, rt.encoded_slashes, From::Mesh) {
            Ok(u) => u,
            Err(e) => return self.fail(Direction::Inbound, e, grpc),
        };
        // The local route rule the (normalized) request hits: its route's
        // policies and its own allowed Upgrades apply.
        let rule = rt.local.rule_for(&req);
        let allowed = rule.map_or(&[][..], |r| r.upgrades.as_slice());
        let upgrade = allowed_upgrade(upgrade, allowed, Direction::Inbound);
        // The version the app behind a detected port gets: the caller's.
        if let Some(v) = req.headers_mut().remove(ORIG_PROTO) {
            if v.as_bytes().starts_with(b"HTTP/1") && app.protocol == Protocol::Detect {
                *req.version_mut() = Version::HTTP_11;
            }
        }
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let client_id = client.as_deref();
        // Who may call: the local Service's AuthorizationPolicies.
        if let Some(authz) = &rt.local.authz {
            let decision = authz.check(rule.map(|r| &r.route), client_id);
            let count = |target: &str, result| {
                self.metrics
                    .authz_decisions
                    .get_or_create(&crate::metrics::AuthzLabels {
                        target: target.to_string(),
                        result,
                    })
                    .inc();
            };
            match decision {
                Ok(targets) => targets.into_iter().for_each(|t| count(t, "allowed")),
                Err(denied) => {
                    count(&denied.target, "denied");
                    info!(direction = "inbound", client = %client_id.unwrap_or("-"), %peer,
                        %method, path, policy_target = %denied.target, "request denied by authorization policy");
                    return self.fail(
                        Direction::Inbound,
                        ProxyError::Forbidden(denied.target),
                        grpc,
                    );
                }
            }
        }
        // The verified identity for the app; never a caller's own copy.
        if let Some(h) = &rt.local.identity_header {
            req.headers_mut().remove(h);
            if let Some(v) = client_id.and_then(|c| HeaderValue::from_str(c).ok()) {
                req.headers_mut().insert(h.clone(), v);
            }
        }
        // Limits that protect the local app from all its callers.
        let outcome = (!rt.inbound_limits.is_empty()).then(|| {
            rt.inbound_limits
                .check(req.headers(), Some(peer), client_id)
        });
        drop(rt);
        let exchange = Exchange::new(self.stream_idle, None);
        let send = async {
            match self.send_streaming(&app, req, upgrade, &exchange).await {
                Ok(resp) => resp,
                Err(e) => self.fail(Direction::Inbound, e, grpc),
            }
        };
        let resp = self
            .within_limits(Direction::Inbound, outcome, grpc, send)
            .await;
        self.app
            .route_metrics
            .record(resp.status().as_u16(), start.elapsed());
        if self.access_log {
            info!(target: "access", direction = "inbound", %method, path,
                status = resp.status().as_u16(), micros = start.elapsed().as_micros() as u64);
        }
        resp
    }

    /// Sends the request unless a rate limit refused it; either way the
    /// response carries the RateLimit headers of the limits that applied.
    async fn within_limits(
        &self,
        dir: Direction,
        outcome: Option<RateOutcome>,
        grpc: bool,
        send: impl std::future::Future<Output = Response<Body>>,
    ) -> Response<Body> {
        match outcome {
            Some(RateOutcome {
                limited: Some(wait),
                headers,
            }) => self.rate_limited(dir, wait, headers, grpc),
            other => {
                let mut resp = send.await;
                add_rate_headers(&mut resp, other.and_then(|o| o.headers));
                resp
            }
        }
    }

    /// 429 (gRPC: RESOURCE_EXHAUSTED) with Retry-After and the RateLimit
    /// headers.
    fn rate_limited(
        &self,
        dir: Direction,
        wait: Duration,
        headers: Option<(HeaderValue, HeaderValue)>,
        grpc: bool,
    ) -> Response<Body> {
        let mut resp = self.fail(dir, ProxyError::RateLimited, grpc);
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        add_rate_headers(&mut resp, headers);
        resp
    }

    fn fail(&self, dir: Direction, e: ProxyError, grpc: bool) -> Response<Body> {
        self.metrics.error(dir.as_str(), e.reason());
        debug!(direction = dir.as_str(), error = %e, "request failed");
        e.into_response(grpc)
    }

    pub(crate) fn count_retry(&self, route: &str, result: &'static str) {
        self.metrics
            .retries
            .get_or_create(&RetryLabels {
                route: route.to_string(),
                result,
            })
            .inc();
    }
}

fn add_rate_headers(resp: &mut Response<Body>, headers: Option<(HeaderValue, HeaderValue)>) {
    if let Some((policy, state)) = headers {
        resp.headers_mut().insert("ratelimit-policy", policy);
        resp.headers_mut().insert("ratelimit", state);
    }
}
