//! The request path. Read top to bottom, one request goes:
//!
//!   route match → header filters → body buffering (only when a retry or a
//!   mirror needs it) → mirror copy → request timeout → tries (per-try
//!   timeout, endpoint pick by P2C, bounded pool) with budgeted retries →
//!   response filters.
//!
//! Failures are `ProxyError`s, turned into a status in one place
//! (`error.rs`).

use crate::body::Body;
use crate::cluster::Cluster;
use crate::cluster::Protocol;
use crate::error::ProxyError;
use crate::metrics::{Metrics, RetryLabels};
use crate::ratelimit::Outcome as RateOutcome;
use crate::route::{authority, Lookup, Rule};
use crate::runtime::Runtime;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

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
}

/// A request body that can be sent more than once, or a stream that can be
/// sent once.
enum Replay {
    Buffered(Bytes),
    Stream(Option<Incoming>),
}

impl Replay {
    fn replayable(&self) -> bool {
        matches!(self, Replay::Buffered(_))
    }

    fn next(&mut self) -> Body {
        match self {
            Replay::Buffered(b) => Body::full(b.clone()),
            Replay::Stream(s) => s.take().map_or(Body::Empty, Body::Incoming),
        }
    }
}

/// The parts of a request needed to send it again.
struct Head {
    /// The version the app spoke (a detected port keeps it upstream).
    version: Version,
    method: Method,
    path: PathAndQuery,
    authority: Option<HeaderValue>,
    headers: HeaderMap,
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
        let grpc = is_grpc(&req);
        // The snapshot this request runs on, to the end, whatever swaps.
        let rt = self.runtime.load_full();
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
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        // Rate limits on this route (and on calls to its Service).
        let limited = rule
            .limits
            .as_ref()
            .map(|l| l.check(req.headers(), Some(peer), None));
        let send = async {
            match self.forward(&rule, &backend.cluster, req).await {
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
        // The version the app behind a detected port gets: the caller's.
        if let Some(v) = req.headers_mut().remove(ORIG_PROTO) {
            if v.as_bytes().starts_with(b"HTTP/1") && app.protocol == Protocol::Detect {
                *req.version_mut() = Version::HTTP_11;
            }
        }
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let client_id = client.as_deref();
        let rt = self.runtime.load();
        // Who may call: the local Service's AuthorizationPolicies.
        if let Some(authz) = &rt.local.authz {
            let decision = authz.check(&req, client_id);
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
        let upgrade = is_upgrade(&req);
        let send = async {
            match self.send_streaming(&app, req, None, upgrade).await {
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

    /// Filters, buffering, mirror, timeout and tries for one routed request.
    async fn forward(
        &self,
        rule: &Rule,
        cluster: &Arc<Cluster>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(h) = &rule.request_headers {
            h.apply(req.headers_mut());
        }
        let upgrade = is_upgrade(&req);
        let retry = rule.retry.as_ref().filter(|r| {
            r.attempts > 0 && !upgrade && (is_idempotent(req.method()) || r.non_idempotent)
        });
        if retry.is_none() && rule.mirror.is_none() {
            // The common case: stream the body straight through, one try.
            let fut = self.send_streaming(cluster, req, rule.per_try_timeout, upgrade);
            return with_timeout(rule.timeout, fut).await;
        }

        // Retries and mirrors need the body more than once: buffer it when
        // it is small and known to end; otherwise stream it, once.
        let (parts, body) = req.into_parts();
        let mut replay = buffer_small(body, self.retry_buffer).await?;
        let head = Head::from_parts(parts);

        if let (Some(m), Replay::Buffered(bytes)) = (&rule.mirror, &replay) {
            if m.percent >= 100 || fastrand::u32(..100) < m.percent {
                self.mirror(&m.cluster, &head, bytes.clone());
            }
        }

        let tries = async {
            let Some(policy) = retry.filter(|_| replay.replayable()) else {
                let req = head.request(replay.next(), cluster);
                return self
                    .try_once(cluster, req, rule.per_try_timeout, &mut None)
                    .await;
            };
            policy.budget.deposit();
            let (mut retries, mut last) = (0, None);
            loop {
                let req = head.request(replay.next(), cluster);
                let result = self
                    .try_once(cluster, req, rule.per_try_timeout, &mut last)
                    .await;
                let retryable = match &result {
                    Ok(resp) => policy.retries_status(resp.status().as_u16()),
                    Err(e) => matches!(
                        e,
                        ProxyError::Connect(..) | ProxyError::Upstream(..) | ProxyError::Timeout
                    ),
                };
                if !retryable || retries >= policy.attempts {
                    return result;
                }
                if !policy.budget.try_withdraw() {
                    self.count_retry(&rule.id, "budget_exhausted");
                    debug!(route = %rule.id, "retry budget exhausted");
                    return result;
                }
                self.count_retry(&rule.id, "attempted");
                tokio::time::sleep(policy.backoff(retries)).await;
                retries += 1;
            }
        };
        with_timeout(rule.timeout, tries).await
    }

    fn count_retry(&self, route: &str, result: &'static str) {
        self.metrics
            .retries
            .get_or_create(&RetryLabels {
                route: route.to_string(),
                result,
            })
            .inc();
    }

    /// Sends a request whose body streams through, once. Upgrades (e.g.
    /// WebSocket) are spliced into a byte tunnel after the 101.
    async fn send_streaming(
        &self,
        cluster: &Arc<Cluster>,
        mut req: Request<Incoming>,
        per_try: Option<Duration>,
        upgrade: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let upgrade_proto = req.headers().get(header::UPGRADE).cloned();
        let (parts, body) = req.into_parts();
        let mut up = Head::from_parts(parts).into_request(Body::Incoming(body), cluster);
        if upgrade {
            // Hop-by-hop headers were stripped; an upgrade needs them back.
            up.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(proto) = upgrade_proto {
                up.headers_mut().insert(header::UPGRADE, proto);
            }
        }
        let mut resp = self.try_once(cluster, up, per_try, &mut None).await?;
        if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, resp.status())
        {
            let upstream = resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
            tokio::spawn(tunnel(client_upgrade, upstream));
        }
        Ok(resp)
    }

    /// One try against one endpoint of a cluster.
    async fn try_once(
        &self,
        cluster: &Cluster,
        mut req: Request<Body>,
        per_try: Option<Duration>,
        last: &mut Option<SocketAddr>,
    ) -> Result<Response<Body>, ProxyError> {
        let ep = cluster
            .pick_avoiding(*last)
            .ok_or_else(|| ProxyError::NoEndpoints(cluster.id.clone()))?;
        *last = Some(ep.addr);
        let Some(_admitted) = cluster.pool.admit() else {
            cluster.overflow.inc();
            return Err(ProxyError::Overflow(cluster.id.clone()));
        };
        set_upstream_uri(&mut req, ep);
        let _inflight = ep.load.start();
        let t0 = Instant::now();
        let h2 = req.version() == Version::HTTP_2;
        let client = match &cluster.pool.upgrade_client {
            // An Upgrade to an mTLS endpoint needs HTTP/1.1 (the mesh's
            // connections are HTTP/2).
            Some(c) if ep.tls() && req.headers().contains_key(header::UPGRADE) => c,
            // A detected port keeps the app's version: h2c for HTTP/2.
            _ if h2 && !ep.tls() && cluster.protocol == Protocol::Detect => {
                cluster.pool.h2c_client()
            }
            _ => &cluster.pool.client,
        };
        if ep.tls() && !h2 && cluster.protocol == Protocol::Detect {
            // The hop is HTTP/2; the peer proxy gives its app HTTP/1.1.
            req.headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        let sent = client.request(req);
        let result = match per_try {
            Some(d) => tokio::time::timeout(d, sent).await,
            None => Ok(sent.await),
        };
        match result {
            Ok(Ok(resp)) => {
                ep.load.observe(t0.elapsed());
                if matches!(resp.status().as_u16(), 502..=504) {
                    self.endpoint_failed(cluster, ep, false);
                } else {
                    ep.load.succeeded();
                }
                let status = resp.status();
                let (mut parts, body) = resp.into_parts();
                if status != StatusCode::SWITCHING_PROTOCOLS {
                    strip_hop_by_hop(&mut parts.headers);
                }
                Ok(Response::from_parts(parts, Body::Incoming(body)))
            }
            Ok(Err(e)) => {
                let connect = e.is_connect();
                self.endpoint_failed(cluster, ep, connect);
                let detail = error_chain(&e);
                if connect {
                    Err(ProxyError::Connect(ep.addr.to_string(), detail))
                } else {
                    Err(ProxyError::Upstream(ep.addr.to_string(), detail))
                }
            }
            Err(_elapsed) => {
                self.endpoint_failed(cluster, ep, false);
                Err(ProxyError::Timeout)
            }
        }
    }

    fn endpoint_failed(&self, cluster: &Cluster, ep: &crate::cluster::Endpoint, refused: bool) {
        if ep.load.failed(&cluster.outlier, refused) {
            cluster.ejections.inc();
            warn!(backend = %cluster.id, endpoint = %ep.addr, refused, "endpoint ejected by outlier detection");
        }
    }

    /// Sends a copy to the mirror backend and forgets it.
    fn mirror(&self, cluster: &Arc<Cluster>, head: &Head, body: Bytes) {
        let req = head.request(Body::full(body), cluster);
        let cluster = cluster.clone();
        let counter = self
            .metrics
            .mirrors
            .get_or_create_owned(&crate::metrics::BackendLabels {
                backend: cluster.id.clone(),
            });
        tokio::spawn(async move {
            counter.inc();
            let Some(ep) = cluster.pick() else { return };
            let Some(_admitted) = cluster.pool.admit() else {
                cluster.overflow.inc();
                return;
            };
            let mut req = req;
            set_upstream_uri(&mut req, ep);
            let sent = cluster.pool.client.request(req);
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(30), sent).await {
                // Drain so the connection goes back to the pool.
                let _ = resp.into_body().collect().await;
            }
        });
    }
}

impl Head {
    fn from_parts(parts: http::request::Parts) -> Head {
        let http::request::Parts {
            method,
            uri,
            version,
            mut headers,
            ..
        } = parts;
        let authority = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        strip_hop_by_hop(&mut headers);
        // Only the proxy says what the app spoke.
        headers.remove(ORIG_PROTO);
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Head {
            version,
            method,
            path,
            authority,
            headers,
        }
    }

    /// A request for `cluster`, in the HTTP version it speaks. The URI gets
    /// its endpoint later, in `set_upstream_uri`.
    fn request(&self, body: Body, cluster: &Cluster) -> Request<Body> {
        Head {
            version: self.version,
            method: self.method.clone(),
            path: self.path.clone(),
            authority: self.authority.clone(),
            headers: self.headers.clone(),
        }
        .into_request(body, cluster)
    }

    /// Like `request`, for a request sent once: moves the headers instead
    /// of copying them.
    fn into_request(self, body: Body, cluster: &Cluster) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.headers_mut() = self.headers;
        *req.uri_mut() = Uri::from(self.path);
        let h2 = match cluster.protocol {
            Protocol::Detect => self.version == Version::HTTP_2,
            p => p.is_h2(),
        };
        if h2 {
            *req.version_mut() = Version::HTTP_2;
        } else {
            *req.version_mut() = Version::HTTP_11;
            // An HTTP/2 caller has no Host header; HTTP/1.1 needs one.
            if let Some(a) = &self.authority {
                req.headers_mut()
                    .entry(header::HOST)
                    .or_insert_with(|| a.clone());
            }
        }
        req
    }
}

fn add_rate_headers(resp: &mut Response<Body>, headers: Option<(HeaderValue, HeaderValue)>) {
    if let Some((policy, state)) = headers {
        resp.headers_mut().insert("ratelimit-policy", policy);
        resp.headers_mut().insert("ratelimit", state);
    }
}

fn set_upstream_uri(req: &mut Request<Body>, ep: &crate::cluster::Endpoint) {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(ep.scheme.clone());
    parts.authority = Some(ep.authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

async fn with_timeout<F>(timeout: Option<Duration>, fut: F) -> Result<Response<Body>, ProxyError>
where
    F: std::future::Future<Output = Result<Response<Body>, ProxyError>>,
{
    match timeout {
        Some(d) => tokio::time::timeout(d, fut)
            .await
            .unwrap_or(Err(ProxyError::Timeout)),
        None => fut.await,
    }
}

/// Collects the body when it is known to end within `limit` bytes.
async fn buffer_small(body: Incoming, limit: usize) -> Result<Replay, ProxyError> {
    use http_body::Body as _;
    if body.is_end_stream() {
        return Ok(Replay::Buffered(Bytes::new()));
    }
    let fits = body.size_hint().upper().is_some_and(|n| n <= limit as u64);
    if !fits {
        return Ok(Replay::Stream(Some(body)));
    }
    let collected = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| ProxyError::ClientBody(e.to_string()))?;
    Ok(Replay::Buffered(collected.to_bytes()))
}

/// Splices the two upgraded connections together.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: Option<hyper::upgrade::OnUpgrade>) {
    let Some(upstream) = upstream else { return };
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let mut c = hyper_util::rt::TokioIo::new(c);
            let mut u = hyper_util::rt::TokioIo::new(u);
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => debug!(error = %e, "upgrade failed"),
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("upgrade"))
        })
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), keeping `te: trailers`,
/// which gRPC needs end to end.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(conn) = h.get(header::CONNECTION).cloned() {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',') {
                if let Ok(n) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    if n != header::TE {
                        h.remove(n);
                    }
                }
            }
        }
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
    ] {
        h.remove(name);
    }
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    h.remove(KEEP_ALIVE);
    h.remove(PROXY_CONNECTION);
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
