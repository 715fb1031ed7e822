//! Route matching. A `RouteTable` maps the host a caller addressed to the
//! Service it names, and each Service port to its match entries, sorted once
//! at compile time in Gateway API precedence so a lookup is a linear scan
//! that stops at the first hit.

pub mod compile;

use crate::cluster::Cluster;
use crate::metrics::RouteMetrics;
use crate::retry::RetryPolicy;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request};
use regex::Regex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub enum PathMatch {
    Exact(String),
    /// Stored without a trailing slash; matches whole path segments.
    Prefix(String),
    Regex(Regex),
}

pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// One `matches[]` entry of a rule: all its conditions must hold.
pub struct Matcher {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

impl Matcher {
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        let path_ok = match &self.path {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                p.is_empty()
                    || (path.starts_with(p.as_str())
                        && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathMatch::Regex(r) => r.is_match(path),
        };
        if !path_ok {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != req.method()) {
            return false;
        }
        let headers_ok = self.headers.iter().all(|(name, want)| {
            req.headers()
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| want.matches(v)))
        });
        if !headers_ok {
            return false;
        }
        self.query.is_empty() || {
            let q = req.uri().query().unwrap_or("");
            self.query.iter().all(|(name, want)| {
                q.split('&').any(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    k == name && want.matches(v)
                })
            })
        }
    }

    /// Gateway API precedence: exact paths, then longer prefixes, then a
    /// method match, then more header matches, then more query matches.
    /// Smaller keys sort first.
    pub fn precedence(&self) -> (u8, usize, u8, usize, usize) {
        let (kind, len) = match &self.path {
            PathMatch::Exact(p) => (0, p.len()),
            PathMatch::Regex(r) => (1, r.as_str().len()),
            PathMatch::Prefix(p) => (2, p.len()),
        };
        (
            kind,
            usize::MAX - len,
            u8::from(self.method.is_none()),
            usize::MAX - self.headers.len(),
            usize::MAX - self.query.len(),
        )
    }
}

/// Header edits from a RequestHeaderModifier or ResponseHeaderModifier.
#[derive(Default)]
pub struct HeaderMod {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderMod {
    pub fn apply(&self, h: &mut HeaderMap) {
        for (k, v) in &self.set {
            h.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            h.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            h.remove(k);
        }
    }
}

pub struct Backend {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    pub metrics: RouteMetrics,
}

pub struct Mirror {
    pub cluster: Arc<Cluster>,
    pub percent: u32,
}

/// What happens to a request once it matched: the compiled rule.
pub struct Rule {
    /// `namespace/route/rule-index` (or the rule's name), for metrics/logs.
    pub id: String,
    pub backends: Vec<Backend>,
    pub total_weight: u64,
    pub request_headers: Option<HeaderMod>,
    pub response_headers: Option<HeaderMod>,
    pub mirror: Option<Mirror>,
    pub timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// Rate limits for requests on this rule (HTTPRoute policies and the
    /// parent Service's outbound policies).
    pub limits: Option<Arc<crate::ratelimit::LimiterSet>>,
    /// Upgrade protocols forwarded besides websocket.
    pub allowed_upgrades: Vec<String>,
}

impl Rule {
    /// Weighted random choice (traffic shifting).
    pub fn pick_backend(&self) -> Option<&Backend> {
        if self.backends.len() == 1 && self.total_weight > 0 {
            return self.backends.first();
        }
        if self.total_weight == 0 {
            return None;
        }
        let mut x = fastrand::u64(..self.total_weight);
        for b in &self.backends {
            if x < b.weight as u64 {
                return Some(b);
            }
            x -= b.weight as u64;
        }
        None
    }
}

pub struct PortRoutes {
    pub port: u16,
    /// The Service port itself: where opaque bytes go, and what its
    /// protocol is.
    pub cluster: Arc<Cluster>,
    pub entries: Vec<(Arc<Matcher>, Arc<Rule>)>,
    /// Used when no route is attached to this port: straight to the Service.
    pub fallback: Option<Arc<Rule>>,
}

pub struct ServiceRoutes {
    pub id: String,
    pub ports: Vec<PortRoutes>,
}

impl ServiceRoutes {
    fn port(&self, port: Option<u16>) -> Option<&PortRoutes> {
        match port {
            Some(p) => self.ports.iter().find(|r| r.port == p),
            None if self.ports.len() == 1 => self.ports.first(),
            None => self.ports.iter().find(|r| r.port == 80),
        }
    }
}

impl PortRoutes {
    /// The rule for a request to this port.
    fn find<B>(&self, req: &Request<B>) -> Lookup<'_> {
        if let Some((_, rule)) = self.entries.iter().find(|(m, _)| m.matches(req)) {
            return Lookup::Found(rule);
        }
        match &self.fallback {
            Some(rule) => Lookup::Found(rule),
            None => Lookup::NoMatch,
        }
    }
}

/// Host (as a caller writes it) to the routes of the Service it names, and
/// address (a Service's virtual IP or an endpoint's, with the port) to the
/// Service port it belongs to.
#[derive(Default)]
pub struct RouteTable {
    pub hosts: HashMap<Arc<str>, Arc<ServiceRoutes>>,
    /// For intercepted connections: where the app meant to go.
    pub destinations: HashMap<SocketAddr, (Arc<ServiceRoutes>, usize)>,
}

pub enum Lookup<'a> {
    Found(&'a Arc<Rule>),
    UnknownHost,
    NoMatch,
}

impl RouteTable {
    /// The Service port an intercepted connection to `addr` is for.
    pub fn destination(&self, addr: &SocketAddr) -> Option<&PortRoutes> {
        let (svc, i) = self.destinations.get(addr)?;
        svc.ports.get(*i)
    }

    /// The rule for a request: by the Service its Host names, else (an
    /// intercepted connection) by the address the app connected to.
    /// A Host without a port means the Service port the app connected to.
    pub fn find_at<B>(&self, req: &Request<B>, dst: Option<SocketAddr>) -> Lookup<'_> {
        let Some(dst) = dst.and_then(|d| self.destination(&d)) else {
            return self.find(req);
        };
        match self.find_with_port(req, Some(dst.port)) {
            Lookup::UnknownHost => dst.find(req),
            found => found,
        }
    }

    pub fn find<B>(&self, req: &Request<B>) -> Lookup<'_> {
        self.find_with_port(req, None)
    }

    /// `port`: the port to assume when the authority names none.
    fn find_with_port<B>(&self, req: &Request<B>, default_port: Option<u16>) -> Lookup<'_> {
        let Some(authority) = authority(req) else {
            return Lookup::UnknownHost;
        };
        let (host, port) = split_host_port(authority);
        let svc = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(host.to_ascii_lowercase().as_str())
        } else {
            self.hosts.get(host)
        };
        let Some(svc) = svc else {
            return Lookup::UnknownHost;
        };
        match svc.port(port.or(default_port)) {
            Some(port) => port.find(req),
            None => Lookup::UnknownHost,
        }
    }
}

/// The authority a request addresses: the URI's (HTTP/2, absolute-form) or
/// the Host header.
pub fn authority<B>(req: &Request<B>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str());
    }
    req.headers().get(http::header::HOST)?.to_str().ok()
}

fn split_host_port(a: &str) -> (&str, Option<u16>) {
    // Strip userinfo, if any.
    let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
    match a.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || a.starts_with('[') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (a, None),
        },
        _ => (a, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str) -> Request<()> {
        Request::builder().uri(uri).body(()).unwrap()
    }

    fn m(path: PathMatch) -> Matcher {
        Matcher {
            path,
            method: None,
            headers: vec![],
            query: vec![],
        }
    }

    #[test]
    fn prefix_matches_whole_segments() {
        let p = m(PathMatch::Prefix("/foo".into()));
        assert!(p.matches(&req("/foo")));
        assert!(p.matches(&req("/foo/bar")));
        assert!(!p.matches(&req("/foobar")));
        assert!(m(PathMatch::Prefix(String::new())).matches(&req("/anything")));
    }

    #[test]
    fn query_and_header_matches() {
        let mut q = m(PathMatch::Prefix(String::new()));
        q.query.push(("v".into(), ValueMatch::Exact("2".into())));
        assert!(q.matches(&req("/x?a=1&v=2")));
        assert!(!q.matches(&req("/x?v=3")));
        q.headers.push((
            HeaderName::from_static("x-user"),
            ValueMatch::Regex(Regex::new("^beta-.*$").unwrap()),
        ));
        let mut r = req("/x?v=2");
        assert!(!q.matches(&r));
        r.headers_mut()
            .insert("x-user", HeaderValue::from_static("beta-1"));
        assert!(q.matches(&r));
    }

    #[test]
    fn precedence_orders_exact_then_longest_prefix() {
        let exact = m(PathMatch::Exact("/a".into()));
        let long = m(PathMatch::Prefix("/a/b".into()));
        let short = m(PathMatch::Prefix("/a".into()));
        let mut short_get = m(PathMatch::Prefix("/a".into()));
        short_get.method = Some(Method::GET);
        assert!(exact.precedence() < long.precedence());
        assert!(long.precedence() < short_get.precedence());
        assert!(short_get.precedence() < short.precedence());
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("shop:8080"), ("shop", Some(8080)));
        assert_eq!(split_host_port("shop"), ("shop", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
    }
}
