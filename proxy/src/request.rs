//! What the proxy does to every request before it routes or authorizes it,
//! so that nothing a caller writes can make a policy see one request and
//! the app another:
//!
//! - one authority: a request whose URI has one (absolute form, HTTP/2's
//!   `:authority`) is routed by it, and its `Host` becomes it (RFC 9112
//!   §3.2.2); several `Host` headers are refused;
//! - the path normalized (`path.rs`); the app receives the normalized one;
//! - hop-by-hop headers removed, every `Connection` header read, before the
//!   proxy adds headers of its own, so `Connection: x-client-id` cannot
//!   remove what the proxy sets;
//! - an Upgrade kept only for an allowed protocol: `websocket`, or one a
//!   route allows, never `h2c`; any other Upgrade is ignored (the request
//!   goes on as a plain one, as RFC 9110 lets a server do).

use crate::error::ProxyError;
use crate::path::{normalize, EncodedSlashes};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Version};

/// The Upgrade a request asked for (HTTP/1.1 only), kept aside: the header
/// itself is hop-by-hop and removed with the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade(pub HeaderValue);

impl Upgrade {
    /// `websocket` (any case) always, others when `allowed` lists them, and
    /// only one protocol: a list (`websocket, h2c`) would let the app pick
    /// one the proxy never agreed to, so it is no upgrade at all. Never
    /// `h2c`.
    pub fn allowed(&self, allowed: &[String]) -> bool {
        let Some((name, version)) = self.protocol() else {
            return false;
        };
        if name.eq_ignore_ascii_case("h2c") {
            return false;
        }
        // An allowed `name` allows any version of it; `name/version` that
        // version only.
        let allows = |a: &String| {
            let (a_name, a_version) = a.split_once('/').unwrap_or((a, ""));
            a_name.eq_ignore_ascii_case(name)
                && (a_version.is_empty()
                    || version.is_some_and(|v| v.eq_ignore_ascii_case(a_version)))
        };
        name.eq_ignore_ascii_case("websocket") || allowed.iter().any(allows)
    }

    /// The one protocol asked for: its name and version (`name/version`).
    fn protocol(&self) -> Option<(&str, Option<&str>)> {
        protocol(&self.0)
    }

    /// Whether a 101's `Upgrade` header switches to this protocol (and
    /// nothing else): the same name, and the same version when both name
    /// one (an app answers `websocket` to `websocket/13`).
    pub fn accepted_by(&self, response: Option<&HeaderValue>) -> bool {
        let (Some((asked, asked_v)), Some((got, got_v))) =
            (self.protocol(), response.and_then(protocol))
        else {
            return false;
        };
        asked.eq_ignore_ascii_case(got)
            && match (asked_v, got_v) {
                (Some(a), Some(g)) => a.eq_ignore_ascii_case(g),
                _ => true,
            }
    }
}

/// One protocol in an Upgrade header: `name` or `name/version`; `None`
/// for a list, an empty value or bytes that are not text.
fn protocol(v: &HeaderValue) -> Option<(&str, Option<&str>)> {
    let p = v.to_str().ok()?.trim();
    if p.is_empty() || p.contains(',') {
        return None;
    }
    Some(match p.split_once('/') {
        Some((name, version)) => (name.trim(), Some(version.trim())),
        None => (p, None),
    })
}

/// Where a request comes from, for the authority rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// The local app: it addresses a Service by its authority.
    App,
    /// A peer proxy over the mesh: its HTTP/2 `:authority` is the endpoint
    /// it connected to, and `Host` the authority the app wrote.
    Mesh,
}

/// Cleans a request in place; returns the Upgrade it asked for, if any.
pub fn prepare<B>(
    req: &mut Request<B>,
    slashes: EncodedSlashes,
    from: From,
) -> Result<Option<Upgrade>, ProxyError> {
    // One Host at most, and the URI's authority wins.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err(ProxyError::BadRequest("more than one Host header".into()));
    }
    if from == From::Mesh {
        // Routing already happened on the caller's proxy.
    } else if req.version() < Version::HTTP_2 {
        if let Some(a) = req.uri().authority() {
            match HeaderValue::from_str(a.as_str()) {
                Ok(v) => {
                    req.headers_mut().insert(header::HOST, v);
                }
                Err(_) => return Err(ProxyError::BadRequest("invalid authority".into())),
            }
        }
    } else if let (Some(a), Some(h)) = (req.uri().authority(), req.headers().get(header::HOST)) {
        // HTTP/2: `host` must not contradict `:authority` (RFC 9113 §8.3.1).
        if h.as_bytes() != a.as_str().as_bytes() {
            return Err(ProxyError::BadRequest(
                "host header differs from :authority".into(),
            ));
        }
    }

    normalize_path(req, slashes)?;

    let upgrade = asked_upgrade(req);
    strip_hop_by_hop(req.headers_mut());
    Ok(upgrade)
}

/// Rewrites the URI with the normalized path (query and authority kept).
fn normalize_path<B>(req: &mut Request<B>, slashes: EncodedSlashes) -> Result<(), ProxyError> {
    if req.method() == Method::CONNECT || req.uri().path() == "*" {
        return Ok(());
    }
    let path = req.uri().path();
    let normal = normalize(path, slashes).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    if normal == path {
        return Ok(());
    }
    let pq = match req.uri().query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal.into_owned(),
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(pq).map_err(|e| ProxyError::BadRequest(e.to_string()))?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    Ok(())
}

/// The Upgrade of an HTTP/1.1 request that asks for one (`Connection:
/// upgrade` in any of its Connection headers, and an `Upgrade` header).
fn asked_upgrade<B>(req: &Request<B>) -> Option<Upgrade> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let upgrade = req.headers().get(header::UPGRADE)?;
    connection_tokens(req.headers())
        .any(|t| t.eq_ignore_ascii_case("upgrade"))
        .then(|| Upgrade(upgrade.clone()))
}

/// Every token of every `Connection` header.
fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), keeping `te: trailers`,
/// which gRPC needs end to end.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(h)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| *n != header::TE)
        .collect();
    for n in named {
        h.remove(n);
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

pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn one_authority_and_one_host() {
        let mut r = req("http://a/x", &[("host", "b")]);
        prepare(&mut r, EncodedSlashes::Reject, From::App).unwrap();
        assert_eq!(r.headers()["host"], "a", "the URI's authority wins");
        let mut r = req("/x", &[("host", "a"), ("host", "b")]);
        assert!(matches!(
            prepare(&mut r, EncodedSlashes::Reject, From::App),
            Err(ProxyError::BadRequest(_))
        ));
        let mut r = req("http://a/x", &[("host", "b")]);
        *r.version_mut() = Version::HTTP_2;
        assert!(prepare(&mut r, EncodedSlashes::Reject, From::App).is_err());
    }

    #[test]
    fn the_path_is_normalized_and_the_query_kept() {
        let mut r = req("/./a//b/../%61dmin?x=%2F..", &[]);
        prepare(&mut r, EncodedSlashes::Reject, From::App).unwrap();
        assert_eq!(r.uri().path_and_query().unwrap(), "/a/admin?x=%2F..");
        let mut r = req("/a%2fb", &[]);
        assert!(prepare(&mut r, EncodedSlashes::Reject, From::App).is_err());
        let mut r = req("http://h/./x", &[]);
        prepare(&mut r, EncodedSlashes::Reject, From::App).unwrap();
        assert_eq!(r.uri().to_string(), "http://h/x");
    }

    #[test]
    fn connection_cannot_remove_what_the_proxy_adds_later() {
        let mut r = req(
            "/",
            &[
                ("connection", "keep-alive"),
                ("connection", "x-client-id, x-forwarded-for"),
                ("x-client-id", "forged"),
                ("x-keep", "yes"),
            ],
        );
        prepare(&mut r, EncodedSlashes::Reject, From::App).unwrap();
        // Every Connection header was read: what they name is gone...
        assert!(r.headers().get("x-client-id").is_none());
        assert!(r.headers().get("connection").is_none());
        assert_eq!(r.headers()["x-keep"], "yes");
        // ...and the proxy's own header, set afterwards, stays.
        r.headers_mut()
            .insert("x-client-id", HeaderValue::from_static("spiffe://real"));
        assert_eq!(r.headers()["x-client-id"], "spiffe://real");
    }

    #[test]
    fn upgrades_websocket_and_allowed_ones_only_never_h2c() {
        let mut r = req(
            "/",
            &[
                ("connection", "keep-alive"),
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
            ],
        );
        let u = prepare(&mut r, EncodedSlashes::Reject, From::App)
            .unwrap()
            .unwrap();
        assert!(u.allowed(&[]));
        assert!(r.headers().get("upgrade").is_none(), "hop-by-hop, removed");
        let h2c = Upgrade(HeaderValue::from_static("h2c"));
        assert!(!h2c.allowed(&["h2c".into()]));
        // A list is no upgrade: the app could pick what the proxy refused.
        assert!(!Upgrade(HeaderValue::from_static("websocket, h2c")).allowed(&[]));
        assert!(!Upgrade(HeaderValue::from_static("h2c, websocket")).allowed(&[]));
        let ws = Upgrade(HeaderValue::from_static("websocket"));
        assert!(ws.accepted_by(Some(&HeaderValue::from_static("WebSocket"))));
        assert!(!ws.accepted_by(Some(&HeaderValue::from_static("h2c"))));
        assert!(!ws.accepted_by(None));
        let other = Upgrade(HeaderValue::from_static("my-proto/2"));
        assert!(!other.allowed(&[]));
        assert!(other.allowed(&["my-proto/2".into()]));
        assert!(
            other.allowed(&["My-Proto".into()]),
            "a name allows any version"
        );
        assert!(!other.allowed(&["my-proto/3".into()]));
        assert!(!Upgrade(HeaderValue::from_static("my-proto")).allowed(&["my-proto/2".into()]));
        // A versioned WebSocket is accepted by a plain 101 answer, and a
        // 101 naming another version is not.
        let ws13 = Upgrade(HeaderValue::from_static("websocket/13"));
        assert!(ws13.allowed(&[]));
        assert!(ws13.accepted_by(Some(&HeaderValue::from_static("websocket"))));
        assert!(ws13.accepted_by(Some(&HeaderValue::from_static("websocket/13"))));
        assert!(!ws13.accepted_by(Some(&HeaderValue::from_static("websocket/12"))));
        assert!(!ws.accepted_by(Some(&HeaderValue::from_static("websocket, h2c"))));
        // Not an upgrade without Connection: upgrade.
        let mut r = req("/", &[("upgrade", "websocket")]);
        assert_eq!(
            prepare(&mut r, EncodedSlashes::Reject, From::App).unwrap(),
            None
        );
    }
}
