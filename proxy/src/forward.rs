//! Sending a routed request upstream, read top to bottom:
//!
//!   request header filter → body buffering (only when a retry or a mirror
//!   needs it) → mirror copy → tries (per-try timeout, endpoint pick by P2C,
//!   bounded pool) with budgeted retries, all under the exchange's timeouts
//!   (`exchange.rs`: the request deadline and the stream idle timeout cover
//!   the bodies too) → an Upgrade's tunnel after its 101.

use crate::body::Body;
use crate::cluster::{Cluster, Protocol};
use crate::error::ProxyError;
use crate::exchange::Exchange;
use crate::proxy::{Proxy, ORIG_PROTO};
use crate::request::{is_idempotent, strip_hop_by_hop, Upgrade};
use crate::route::Rule;
use crate::tunnel::ConnCtx;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

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
pub(crate) struct Head {
    /// The version the app spoke (a detected port keeps it upstream).
    version: Version,
    method: Method,
    path: PathAndQuery,
    authority: Option<HeaderValue>,
    headers: HeaderMap,
}

/// When a timeout that starts now ends.
fn deadline(d: Option<Duration>) -> Option<tokio::time::Instant> {
    d.map(|d| tokio::time::Instant::now() + d)
}

impl Proxy {
    /// Filters, buffering, mirror, timeouts and tries for one routed request.
    pub(crate) async fn forward(
        &self,
        rule: &Rule,
        cluster: &Arc<Cluster>,
        mut req: Request<Incoming>,
        upgrade: Option<Upgrade>,
        exchange: &Exchange,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(h) = &rule.request_headers {
            h.apply(req.headers_mut());
        }
        let retry = rule.retry.as_ref().filter(|r| {
            r.attempts > 0 && upgrade.is_none() && (is_idempotent(req.method()) || r.non_idempotent)
        });
        // An upgrade is one try, never mirrored: a tunnel cannot be copied,
        // and the buffered path would drop the Upgrade.
        if upgrade.is_some() || (retry.is_none() && rule.mirror.is_none()) {
            // The common case: stream the body straight through, one try.
            let ex = exchange.within(deadline(rule.per_try_timeout));
            return self.send_streaming(cluster, req, upgrade, &ex).await;
        }

        // Retries and mirrors need the body more than once: buffer it when
        // it is small and known to end; otherwise stream it, once.
        let (parts, body) = req.into_parts();
        let mut replay = exchange
            .bound(buffer_small(body, self.retry_buffer))
            .await
            .map_err(|_| ProxyError::Timeout)??;
        let head = Head::from_parts(parts);

        if let (Some(m), Replay::Buffered(bytes)) = (&rule.mirror, &replay) {
            if m.percent >= 100 || fastrand::u32(..100) < m.percent {
                self.mirror(&m.cluster, &head, bytes.clone());
            }
        }

        let Some(policy) = retry.filter(|_| replay.replayable()) else {
            let req = head.request(replay.next(), cluster);
            let ex = exchange.within(deadline(rule.per_try_timeout));
            return self.try_once(cluster, req, &ex, &mut None).await;
        };
        policy.budget.deposit();
        let (mut retries, mut last) = (0, None);
        let tries = async {
            loop {
                let req = head.request(replay.next(), cluster);
                let ex = exchange.within(deadline(rule.per_try_timeout));
                let result = self.try_once(cluster, req, &ex, &mut last).await;
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
        // The request deadline covers the backoffs between tries too.
        exchange
            .bound(tries)
            .await
            .map_err(|_| ProxyError::Timeout)?
    }

    /// Sends a request whose body streams through, once. An allowed
    /// Upgrade (e.g. WebSocket) is spliced into a tunnel after the 101.
    pub(crate) async fn send_streaming(
        &self,
        cluster: &Arc<Cluster>,
        mut req: Request<Incoming>,
        upgrade: Option<Upgrade>,
        exchange: &Exchange,
    ) -> Result<Response<Body>, ProxyError> {
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let ctx = req.extensions_mut().remove::<ConnCtx>();
        let (parts, body) = req.into_parts();
        let mut up = Head::from_parts(parts).into_request(Body::Incoming(body), cluster);
        if let Some(Upgrade(proto)) = &upgrade {
            // Hop-by-hop headers were removed; an upgrade needs them back.
            up.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            up.headers_mut().insert(header::UPGRADE, proto.clone());
        }
        let mut resp = self.try_once(cluster, up, exchange, &mut None).await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Only to the protocol that was asked for (and allowed): an app
            // switching to anything else would open a tunnel no policy saw.
            let switched_to = resp.headers().get(header::UPGRADE);
            if !upgrade.as_ref().is_some_and(|u| u.accepted_by(switched_to)) {
                warn!(backend = %cluster.id, asked = ?upgrade.as_ref().map(|u| &u.0), switched_to = ?switched_to,
                    "upstream switched protocols without an allowed Upgrade: refused");
                return Err(ProxyError::Upstream(
                    cluster.id.clone(),
                    "switched to a protocol that was not asked for".into(),
                ));
            }
        }
        if let (Some(client_upgrade), Some(ctx), StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, ctx, resp.status())
        {
            let upstream = resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
            let counters = self.metrics.tcp("upgrade", &cluster.id);
            crate::tunnel::spawn(&ctx, client_upgrade, upstream, counters);
        }
        Ok(resp)
    }

    /// One try against one endpoint of a cluster, under `exchange`'s
    /// timeouts, bodies included.
    async fn try_once(
        &self,
        cluster: &Cluster,
        mut req: Request<Body>,
        exchange: &Exchange,
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
        // A streamed request body counts as activity, and a stalled one
        // times out like a stalled response.
        let req = req.map(|b| match b {
            Body::Incoming(b) => Body::watched(b, exchange),
            other => other,
        });
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
        let mut req = req;
        if ep.tls() && !h2 && cluster.protocol == Protocol::Detect {
            // The hop is HTTP/2; the peer proxy gives its app HTTP/1.1.
            req.headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        match exchange.bound(client.request(req)).await {
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
                Ok(Response::from_parts(parts, Body::watched(body, exchange)))
            }
            Ok(Err(e)) => {
                if let Some(slot) = find::<crate::pool::SlotTimeout>(&e) {
                    cluster.overflow.inc();
                    debug!(backend = %cluster.id, "{slot}");
                    return Err(ProxyError::Overflow(cluster.id.clone()));
                }
                let connect = e.is_connect();
                self.endpoint_failed(cluster, ep, connect);
                if let Some(why) = std::error::Error::source(&e).and_then(crate::body::timed_out) {
                    debug!(backend = %cluster.id, endpoint = %ep.addr, %why, "request body timed out");
                    return Err(ProxyError::Timeout);
                }
                let detail = error_chain(&e);
                if connect {
                    Err(ProxyError::Connect(ep.addr.to_string(), detail))
                } else {
                    Err(ProxyError::Upstream(ep.addr.to_string(), detail))
                }
            }
            Err(why) => {
                self.endpoint_failed(cluster, ep, false);
                debug!(backend = %cluster.id, endpoint = %ep.addr, %why, "no response in time");
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

    /// Sends a copy to the mirror backend and forgets it. Its response is
    /// read and dropped frame by frame, never collected.
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
            let exchange = async {
                let resp = cluster.pool.client.request(req).await.ok()?;
                // Drained so the connection goes back to the pool.
                let mut body = resp.into_body();
                while let Some(Ok(_)) = body.frame().await {}
                Some(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), exchange).await;
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

/// An error of type `T` in `e`'s chain.
fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
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
