//! Property tests of what the proxy does to a request before it routes or
//! authorizes it (`path::normalize`, `request::prepare`) and of route
//! matching on the result: no input panics, normalization is idempotent and
//! leaves nothing an app could read as another path, and a request routes
//! exactly as its normalized form does.

use http::header::{HeaderName, HeaderValue};
use http::{Request, Version};
use proptest::prelude::*;
use remora_proxy::path::{normalize, EncodedSlashes, PathError};
use remora_proxy::request::{prepare, From};
use remora_proxy::route::Lookup;
use remora_proxy::runtime::{compile, Runtime, Settings, Validated};
use std::borrow::Cow;

/// Cases per property: enough to cover the grammar below, few enough that
/// the whole file runs in a few seconds in a debug build.
const CASES: u32 = 1000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Failures are reported by the shrunk input; no file is written.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Path segments an attacker would use to dress up `/admin`: dot segments
/// plain and encoded, encoded unreserved letters, encoded reserved
/// characters, empty segments (doubled slashes), malformed escapes, a
/// backslash, and ordinary names.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("admin".to_string()),
        1 => Just("Admin".to_string()),
        2 => Just("a".to_string()),
        1 => Just("b".to_string()),
        1 => Just("api".to_string()),
        1 => Just("v1".to_string()),
        1 => Just("x".to_string()),
        2 => Just(String::new()),
        2 => Just(".".to_string()),
        2 => Just("..".to_string()),
        1 => Just("...".to_string()),
        1 => Just("%2e".to_string()),
        1 => Just("%2E%2e".to_string()),
        1 => Just(".%2E".to_string()),
        1 => Just("%61dmin".to_string()),
        1 => Just("adm%69n".to_string()),
        1 => Just("%41dmin".to_string()),
        1 => Just("%7e".to_string()),
        1 => Just("a%20b".to_string()),
        1 => Just("%25".to_string()),
        1 => Just("%252e".to_string()),
        1 => Just("caf%c3%a9".to_string()),
        1 => Just("%2f".to_string()),
        1 => Just("%5C".to_string()),
        1 => Just("%".to_string()),
        1 => Just("%zz".to_string()),
        1 => Just("a\\b".to_string()),
        1 => Just(";x".to_string()),
        2 => "[a-z0-9._~%-]{1,6}",
    ]
}

/// A path built from `segment()`s, with a leading slash (or, rarely, none)
/// and an optional trailing slash.
fn attack_path() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(segment(), 0..7),
        prop::bool::weighted(0.97),
        any::<bool>(),
    )
        .prop_map(|(segs, absolute, trailing)| {
            let mut p = String::new();
            if absolute {
                p.push('/');
            }
            p.push_str(&segs.join("/"));
            if trailing {
                p.push('/');
            }
            p
        })
}

fn slashes() -> impl Strategy<Value = EncodedSlashes> {
    prop_oneof![
        Just(EncodedSlashes::Reject),
        Just(EncodedSlashes::PassThrough)
    ]
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes every percent-escape once, as an app reading the path would.
fn decode_once(path: &str) -> Vec<u8> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// What a normalized path must be: absolute, no empty segment (but a
/// trailing slash), no dot segment, every escape well-formed, upper-case
/// and of a character that is not unreserved.
fn assert_normal(n: &str, input: &str) -> Result<(), TestCaseError> {
    prop_assert!(n.starts_with('/'), "{input:?} -> {n:?}: not absolute");
    prop_assert!(!n.contains("//"), "{input:?} -> {n:?}: an empty segment");
    prop_assert!(!n.contains('\\'), "{input:?} -> {n:?}: a backslash");
    let inner = n.strip_suffix('/').unwrap_or(n);
    for seg in inner.split('/').skip(1) {
        prop_assert!(
            seg != "." && seg != "..",
            "{input:?} -> {n:?}: a dot segment"
        );
    }
    let b = n.as_bytes();
    for (i, _) in n.match_indices('%') {
        let (h, l) = (b.get(i + 1).copied(), b.get(i + 2).copied());
        let (Some(h), Some(l)) = (h, l) else {
            return Err(TestCaseError::fail(format!(
                "{input:?} -> {n:?}: a cut escape"
            )));
        };
        prop_assert!(
            matches!(h, b'0'..=b'9' | b'A'..=b'F') && matches!(l, b'0'..=b'9' | b'A'..=b'F'),
            "{input:?} -> {n:?}: an escape not in upper-case hex"
        );
        let c = hex(h).unwrap_or(0) << 4 | hex(l).unwrap_or(0);
        prop_assert!(
            !is_unreserved(c),
            "{input:?} -> {n:?}: an encoded unreserved character"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Any string at all: an answer, never a panic; an answer that is a
    /// path is a normal one, and normalizing it again changes nothing.
    #[test]
    fn normalize_never_panics_and_is_idempotent_on_any_string(p in any::<String>(), s in slashes()) {
        if let Ok(n) = normalize(&p, s) {
            assert_normal(&n, &p)?;
            let again = normalize(&n, s);
            prop_assert_eq!(again.as_deref(), Ok(&*n), "not idempotent for {:?}", p);
            // A normal path is recognised as such: not copied.
            prop_assert!(matches!(again, Ok(Cow::Borrowed(_))), "{:?} copied again", n);
        }
    }

    /// The same over paths made of the bypass vocabulary.
    #[test]
    fn normalize_is_idempotent_and_normal_on_bypass_paths(p in attack_path(), s in slashes()) {
        match normalize(&p, s) {
            Ok(n) => {
                assert_normal(&n, &p)?;
                let again = normalize(&n, s);
                prop_assert_eq!(again.as_deref(), Ok(&*n));
            }
            Err(e) => {
                // Refused only for a reason the path really has.
                let lower = p.to_ascii_lowercase();
                let why = match e {
                    PathError::NotAbsolute => !p.starts_with('/'),
                    PathError::Backslash => p.contains('\\'),
                    PathError::EncodedSlash => {
                        s == EncodedSlashes::Reject && (lower.contains("%2f") || lower.contains("%5c"))
                    }
                    PathError::BadEscape => p.match_indices('%').any(|(i, _)| {
                        let b = p.as_bytes();
                        !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                    }),
                };
                prop_assert!(why, "{p:?} refused with {e:?}");
            }
        }
    }

    /// What the app decodes is what the policy saw: decoding the
    /// normalized path once (Reject mode) makes no slash and no dot
    /// segment, so an app cannot read a different path out of it.
    #[test]
    fn decoding_a_normalized_path_once_changes_no_segment(p in attack_path()) {
        if let Ok(n) = normalize(&p, EncodedSlashes::Reject) {
            let decoded = decode_once(&n);
            prop_assert_eq!(
                decoded.iter().filter(|b| **b == b'/').count(),
                n.matches('/').count(),
                "{:?} -> {:?}: decoding made a slash", p, n
            );
            prop_assert!(!decoded.contains(&b'\\'), "{p:?} -> {n:?}: decoding made a backslash");
            let inner = decoded.strip_suffix(b"/").unwrap_or(&decoded);
            for seg in inner.split(|b| *b == b'/').skip(1) {
                prop_assert!(seg != b"." && seg != b"..", "{p:?} -> {n:?}: a dot segment once decoded");
            }
        }
    }

    /// A path that names /admin in disguise normalizes to /admin exactly
    /// when its plain form does: the dressing never changes the answer.
    #[test]
    fn disguises_normalize_like_the_plain_path(
        prefix in prop::collection::vec(prop_oneof![Just("x/.."), Just("."), Just(""), Just("%2e"), Just("a/b/../..")], 0..4),
        name in prop_oneof![Just("admin"), Just("%61dmin"), Just("%61%64%6d%69%6e"), Just("ADMIN")],
        rest in prop_oneof![Just(""), Just("/"), Just("/users"), Just("//users"), Just("/./users")],
    ) {
        let mut p = String::from("/");
        for part in &prefix {
            p.push_str(part);
            p.push('/');
        }
        p.push_str(name);
        p.push_str(rest);
        let n = normalize(&p, EncodedSlashes::Reject).unwrap();
        let plain = if name == "ADMIN" { "/ADMIN" } else { "/admin" };
        let want = match rest {
            "" => plain.to_string(),
            "/" => format!("{plain}/"),
            _ => format!("{plain}/users"),
        };
        prop_assert_eq!(n, want, "{}", p);
    }
}

/// api: a route with exact, prefix and regex matches, some overlapping,
/// compiled by the proxy's own `compile`. Also a Service `other` without a
/// route (its fallback rule).
const ROUTES: &str = "\
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80}]
  endpoints: [{address: 127.0.0.1, port: 1001}]
---
kind: Service
metadata: {name: other}
spec:
  ports: [{port: 80}]
  endpoints: [{address: 127.0.0.1, port: 1002}]
---
kind: HTTPRoute
metadata: {name: api}
spec:
  parentRefs: [{name: api}]
  rules:
  - name: admin-exact
    matches: [{path: {type: Exact, value: /admin}}]
  - name: admin-tree
    matches: [{path: {type: PathPrefix, value: /admin/}}]
  - name: api-v1
    matches: [{path: {type: PathPrefix, value: /api/v1}}, {path: {type: Exact, value: /a/b}}]
  - name: regex
    matches: [{path: {type: RegularExpression, value: '/x/[^/]+/admin'}}]
  - name: dotfiles
    matches: [{path: {type: PathPrefix, value: /.well-known}}]
  - name: root
    matches: [{path: {type: Exact, value: /}}]
  - name: rest
    matches: [{path: {type: PathPrefix, value: /a}}]
";

/// The compiled route table (inside a runtime: clusters start timers).
fn runtime() -> (tokio::runtime::Runtime, Runtime) {
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = Validated::prepare(remora_proto::parse_yaml(ROUTES, "routes").unwrap()).unwrap();
    let rt = {
        let _in = tokio_rt.enter();
        compile(
            cfg,
            "1".into(),
            &Runtime::empty(),
            &Settings::default(),
            &remora_proxy::metrics::Metrics::new(),
        )
        .unwrap()
    };
    (tokio_rt, rt)
}

/// Which rule a request for `path` (already prepared) lands on.
fn rule_of(rt: &Runtime, req: &Request<()>) -> String {
    match rt.routes.find(req) {
        Lookup::Found(rule) => rule.id.clone(),
        Lookup::UnknownHost => "unknown-host".into(),
        Lookup::NoMatch => "no-match".into(),
    }
}

fn get(host: &str, path: &str) -> Option<Request<()>> {
    Request::get(path).header("host", host).body(()).ok()
}

#[test]
fn the_route_table_is_what_the_property_below_assumes() {
    let (_t, rt) = runtime();
    let rule = |p: &str| rule_of(&rt, &get("api", p).unwrap());
    assert_eq!(rule("/admin"), "default/api/admin-exact");
    assert_eq!(rule("/admin/x"), "default/api/admin-tree");
    assert_eq!(rule("/api/v1/q"), "default/api/api-v1");
    assert_eq!(rule("/x/y/admin"), "default/api/regex");
    assert_eq!(rule("/a/c"), "default/api/rest");
    assert_eq!(rule("/zzz"), "no-match");
}

proptest! {
    #![proptest_config(config())]

    /// The proxy routes a prepared request, whose path is the normalized
    /// one: it lands on the rule the normalized path lands on, and on the
    /// one the twice-normalized path lands on. A request never matches a
    /// route its normalized form does not, and is refused exactly when its
    /// path cannot be normalized.
    #[test]
    fn a_request_routes_as_its_normalized_path_does(
        p in attack_path(),
        query in prop_oneof![Just(""), Just("?q=/admin"), Just("?a=%2F..")],
        absolute in any::<bool>(),
    ) {
        thread_local! {
            static RT: (tokio::runtime::Runtime, Runtime) = runtime();
        }
        // Absolute form only for a path that starts with "/" (else the
        // path would run into the authority).
        let absolute = absolute && p.starts_with('/');
        let uri = if absolute { format!("http://api{p}{query}") } else { format!("{p}{query}") };
        let Some(mut req) = get(if absolute { "other" } else { "api" }, &uri) else {
            // Not a URI at all (the client could not have sent it).
            return Ok(());
        };
        // The path as the URI parser read it (an absolute URI's empty path is "/").
        let original = req.uri().path().to_string();
        let prepared = prepare(&mut req, EncodedSlashes::Reject, From::App);
        let normal = normalize(&original, EncodedSlashes::Reject);
        prop_assert_eq!(prepared.is_ok(), normal.is_ok(), "{:?}: {:?} vs {:?}", uri, prepared.err().map(|e| e.to_string()), normal);
        let Ok(n) = normal else { return Ok(()) };
        prop_assert_eq!(req.uri().path(), &*n);
        prop_assert_eq!(req.uri().query().unwrap_or(""), query.trim_start_matches('?'));
        RT.with(|(_, rt)| {
            let seen = rule_of(rt, &req);
            let once = rule_of(rt, &get("api", &n).unwrap());
            let nn = normalize(&n, EncodedSlashes::Reject).unwrap();
            let twice = rule_of(rt, &get("api", &nn).unwrap());
            prop_assert_eq!(&seen, &once, "{:?} routed apart from {:?}", uri, n);
            prop_assert_eq!(&once, &twice, "{:?} and {:?}", n, nn);
            // Anything that is /admin in disguise meets an admin rule.
            if n == "/admin" {
                prop_assert_eq!(seen.as_str(), "default/api/admin-exact");
            } else if n.starts_with("/admin/") {
                prop_assert_eq!(seen.as_str(), "default/api/admin-tree");
            }
            Ok(())
        })?;
    }
}

/// Header names: the ones `prepare` reads or removes, a few it must keep,
/// and arbitrary tokens.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("host".to_string()),
        Just("connection".to_string()),
        Just("upgrade".to_string()),
        Just("te".to_string()),
        Just("keep-alive".to_string()),
        Just("transfer-encoding".to_string()),
        Just("proxy-connection".to_string()),
        Just("x-client-id".to_string()),
        Just("x-keep".to_string()),
        "[a-z][a-z0-9-]{0,10}",
        "[!-~]{1,8}",
    ]
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"upgrade".to_vec()),
        Just(b"Upgrade, x-client-id".to_vec()),
        Just(b"keep-alive, , te, host".to_vec()),
        Just(b"websocket".to_vec()),
        Just(b"h2c".to_vec()),
        Just(b"websocket, h2c".to_vec()),
        Just(b"trailers".to_vec()),
        Just(b"api".to_vec()),
        Just(b"api:80".to_vec()),
        prop::collection::vec(any::<u8>(), 0..24),
    ]
}

/// Headers a client may send; `prepare` must never leave one that a
/// `Connection` header named, nor a hop-by-hop header (`te: trailers`
/// aside).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

proptest! {
    #![proptest_config(config())]

    /// `prepare` on arbitrary URIs and headers, HTTP/1.1 and HTTP/2, from
    /// the app and from the mesh: never a panic; when it accepts, the path
    /// is normal, there is one Host at most, no hop-by-hop header is left
    /// and nothing a Connection header named survives.
    #[test]
    fn prepare_never_panics_and_strips_hop_by_hop(
        uri in prop_oneof![attack_path(), "[ -~]{0,40}", "http://[a-z:.0-9@]{0,12}/[ -~]{0,20}", any::<String>()],
        headers in prop::collection::vec((header_name(), header_value()), 0..8),
        h2 in any::<bool>(),
        mesh in any::<bool>(),
        s in slashes(),
    ) {
        let Ok(mut req) = Request::get(uri.as_str()).body(()) else {
            // Not a URI hyper could have handed over.
            return Ok(());
        };
        // Headers hyper could have parsed (others are dropped, not the case).
        for (k, v) in &headers {
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
                req.headers_mut().append(k, v);
            }
        }
        if h2 {
            *req.version_mut() = Version::HTTP_2;
        }
        let named: Vec<String> = req
            .headers()
            .get_all("connection")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty() && t != "te")
            .collect();
        let from = if mesh { From::Mesh } else { From::App };
        let Ok(upgrade) = prepare(&mut req, s, from) else { return Ok(()) };
        prop_assert!(req.headers().get_all("host").iter().count() <= 1);
        let path = req.uri().path();
        if path != "*" {
            assert_normal(path, &uri)?;
        }
        for h in HOP_BY_HOP {
            prop_assert!(req.headers().get(*h).is_none(), "{h} left in {:?}", req.headers());
        }
        for n in &named {
            prop_assert!(req.headers().get(n.as_str()).is_none(), "Connection named {n}, still in {:?}", req.headers());
        }
        if let Some(te) = req.headers().get("te") {
            prop_assert_eq!(te, "trailers");
        }
        if let Some(u) = upgrade {
            // Only HTTP/1.1 asks for an Upgrade, and h2c first is never
            // allowed, whatever a rule says.
            prop_assert!(!h2);
            let first = u.0.to_str().unwrap_or("").split(',').next().unwrap_or("").trim().to_string();
            if first.split('/').next().unwrap_or("").eq_ignore_ascii_case("h2c") {
                prop_assert!(!u.allowed(&[first.clone(), "h2c".into()]));
            }
        }
    }
}

#[test]
fn an_allowed_upgrade_never_names_h2c() {
    use remora_proxy::request::Upgrade;
    for value in [
        "websocket, h2c",
        "websocket,h2c",
        "WebSocket, H2C",
        "my-proto/1, h2c",
    ] {
        let u = Upgrade(HeaderValue::from_static(value));
        assert!(
            !u.allowed(&["my-proto/1".into()]),
            "{value:?} is allowed, h2c and all"
        );
    }
}
