//! The app's kubelet probes, answered on the admin port.
//!
//! Under interception the kubelet's probes of the app would reach the
//! inbound listener like any connection from outside the mesh, and a
//! Strict Service refuses their plaintext. `remoractl inject` points them
//! at `/app-health/<container>/<readyz|livez|startupz>` on the admin port
//! (which is not intercepted) instead, and tells the sidecar what each one
//! was in REMORA_APP_PROBES: a JSON object from that path to
//!
//! ```json
//! {"httpGet": {"port": 8080, "path": "/ready", "scheme": "HTTP",
//!              "headers": [{"name": "x-probe", "value": "1"}]},
//!  "timeoutSeconds": 1}
//! ```
//!
//! or `{"tcpSocket": {"port": 8080}}`. The admin server then probes the app
//! as the kubelet would have, at the pod's IP, and answers with the app's
//! status code (HTTP) or 200 / 503 (TCP). The proxy's own connections are
//! not intercepted, so this reaches the app directly.

use crate::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;

/// Every probe path starts with this, so none can shadow /ready or /live.
pub const PATH_PREFIX: &str = "/app-health/";

/// The timeout of an entry that carries no `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `timeoutSeconds` taken.
const MAX_TIMEOUT_SECONDS: u64 = 600;
/// The app's response head may be this big; its body is never read.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The probes of REMORA_APP_PROBES, by the path the kubelet asks for.
#[derive(Clone, Debug, Default)]
pub struct AppProbes {
    by_path: HashMap<String, AppProbe>,
}

/// One probe of the app, and how long it may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppProbe {
    pub check: Check,
    pub timeout: Duration,
}

/// What the kubelet would have done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// GET `path` on the port; 2xx and 3xx pass.
    Http {
        port: u16,
        path: PathAndQuery,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// A connection to the port is accepted.
    Tcp { port: u16 },
}

/// Why REMORA_APP_PROBES cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct AppProbesError(String);

impl AppProbes {
    /// Reads the JSON object of REMORA_APP_PROBES. Unknown fields are
    /// errors, so a typo fails the proxy's start rather than a probe.
    pub fn parse(json: &str) -> Result<AppProbes, AppProbesError> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| AppProbesError(format!("not valid JSON: {e}")))?;
        let Value::Object(entries) = value else {
            return Err(AppProbesError(
                "expected a JSON object from probe path to probe".into(),
            ));
        };
        let mut by_path = HashMap::new();
        for (path, entry) in entries {
            let probe = parse_path(&path)
                .and_then(|()| parse_entry(&entry))
                .map_err(|what| AppProbesError(format!("{path:?}: {what}")))?;
            by_path.insert(path, probe);
        }
        Ok(AppProbes { by_path })
    }

    /// The probe the kubelet reaches at exactly `path`, if one is listed.
    pub fn get(&self, path: &str) -> Option<&AppProbe> {
        self.by_path.get(path)
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// The longest any probe may take (zero without probes): how long an
    /// admin connection may be busy with one.
    pub fn longest_timeout(&self) -> Duration {
        self.by_path
            .values()
            .map(|p| p.timeout)
            .max()
            .unwrap_or_default()
    }
}

fn parse_path(path: &str) -> Result<(), String> {
    let rest = path
        .strip_prefix(PATH_PREFIX)
        .ok_or_else(|| format!("a probe path must start with {PATH_PREFIX}"))?;
    let ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b));
    if !ok {
        return Err("a probe path is /app-health/ and letters, digits, -._~/".into());
    }
    Ok(())
}

fn parse_entry(entry: &Value) -> Result<AppProbe, String> {
    let fields = object(entry, "the probe")?;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut check = None;
    for (k, v) in fields {
        match k.as_str() {
            "httpGet" => check = Some(parse_http(v)?),
            "tcpSocket" => {
                let fields = object(v, "tcpSocket")?;
                only(fields, &["port"], "tcpSocket")?;
                check = Some(Check::Tcp {
                    port: port(fields.get("port"))?,
                });
            }
            "timeoutSeconds" => {
                let secs = v
                    .as_u64()
                    .filter(|s| (1..=MAX_TIMEOUT_SECONDS).contains(s))
                    .ok_or_else(|| {
                        format!("timeoutSeconds: {v} is not 1 to {MAX_TIMEOUT_SECONDS}")
                    })?;
                timeout = Duration::from_secs(secs);
            }
            other => {
                return Err(format!(
                    "unknown field {other:?} (expected httpGet or tcpSocket, and timeoutSeconds)"
                ))
            }
        }
    }
    if fields.contains_key("httpGet") && fields.contains_key("tcpSocket") {
        return Err("both httpGet and tcpSocket: a probe does one".into());
    }
    let check = check.ok_or("neither httpGet nor tcpSocket")?;
    Ok(AppProbe { check, timeout })
}

fn parse_http(v: &Value) -> Result<Check, String> {
    let fields = object(v, "httpGet")?;
    only(fields, &["port", "path", "scheme", "headers"], "httpGet")?;
    match fields.get("scheme") {
        None => {}
        Some(Value::String(s)) if s == "HTTP" => {}
        Some(other) => return Err(format!("httpGet.scheme: {other} is not \"HTTP\"")),
    }
    let path = match fields.get("path") {
        None => PathAndQuery::from_static("/"),
        Some(Value::String(p)) if p.starts_with('/') => {
            PathAndQuery::try_from(p.as_str()).map_err(|e| format!("httpGet.path {p:?}: {e}"))?
        }
        Some(other) => return Err(format!("httpGet.path: {other} is not a path (/...)")),
    };
    let mut headers = Vec::new();
    if let Some(list) = fields.get("headers") {
        let list = list
            .as_array()
            .ok_or("httpGet.headers: not a list of {name, value}")?;
        for h in list {
            let h = object(h, "httpGet.headers[]")?;
            only(h, &["name", "value"], "httpGet.headers[]")?;
            let text = |k: &str| {
                h.get(k)
                    .and_then(Value::as_str)
                    .ok_or(format!("httpGet.headers[]: {k} is not a string"))
            };
            let (name, value) = (text("name")?, text("value")?);
            let name = HeaderName::try_from(name)
                .map_err(|_| format!("httpGet.headers[]: {name:?} is not a header name"))?;
            let value = HeaderValue::try_from(value)
                .map_err(|_| format!("httpGet.headers[]: {value:?} is not a header value"))?;
            headers.push((name, value));
        }
    }
    Ok(Check::Http {
        port: port(fields.get("port"))?,
        path,
        headers,
    })
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{what}: expected a JSON object"))
}

fn only(fields: &Map<String, Value>, known: &[&str], what: &str) -> Result<(), String> {
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!("{what}: unknown field {k:?}")),
        None => Ok(()),
    }
}

/// A port number; a named port is resolved by `remoractl inject`.
fn port(v: Option<&Value>) -> Result<u16, String> {
    v.and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| match v {
            Some(v) => format!("port: {v} is not a port number (1-65535)"),
            None => "no port".into(),
        })
}

/// How one probe of the app went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The app answered the HTTP probe with this status.
    Answered(StatusCode),
    /// The TCP probe connected.
    Connected,
    /// Refused, reset, or not HTTP.
    Failed(String),
    TimedOut,
}

impl Outcome {
    /// What the kubelet is answered: the app's status (2xx and 3xx pass,
    /// others fail, as the kubelet judges them), 200 for a connection, 503
    /// for anything that went wrong.
    pub fn status(&self) -> StatusCode {
        match self {
            Outcome::Answered(s) if !s.is_informational() => *s,
            Outcome::Connected => StatusCode::OK,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `result` label of remora_app_probes_total.
    pub fn result(&self) -> &'static str {
        match self {
            Outcome::Answered(s) if s.is_success() || s.is_redirection() => "pass",
            Outcome::Connected => "pass",
            Outcome::Answered(_) => "fail",
            Outcome::Failed(_) => "error",
            Outcome::TimedOut => "timeout",
        }
    }
}

impl AppProbe {
    /// Probes the app at `ip` within the probe's timeout. `incoming` is the
    /// kubelet's request: its User-Agent and Accept are passed on unless the
    /// probe sets its own.
    pub async fn run(&self, ip: IpAddr, incoming: &HeaderMap) -> Outcome {
        let attempt = async {
            match &self.check {
                Check::Tcp { port } => match TcpStream::connect((ip, *port)).await {
                    Ok(_) => Outcome::Connected,
                    Err(e) => Outcome::Failed(format!("connect: {e}")),
                },
                Check::Http {
                    port,
                    path,
                    headers,
                } => {
                    let addr = SocketAddr::new(ip, *port);
                    http_get(addr, request(addr, path, headers, incoming)).await
                }
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Outcome::TimedOut)
    }
}

/// The GET the kubelet would send: the probe's headers, then Host,
/// User-Agent and Accept as the kubelet sets them when the probe does not.
/// One request per connection, as the kubelet does.
fn request(
    addr: SocketAddr,
    path: &PathAndQuery,
    headers: &[(HeaderName, HeaderValue)],
    incoming: &HeaderMap,
) -> Request<Body> {
    let mut req = Request::new(Body::Empty);
    *req.uri_mut() = Uri::from(path.clone());
    let h = req.headers_mut();
    for (name, value) in headers {
        h.append(name, value.clone());
    }
    if !h.contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::try_from(addr.to_string()) {
            h.insert(header::HOST, host);
        }
    }
    for name in [header::USER_AGENT, header::ACCEPT] {
        if let (false, Some(v)) = (h.contains_key(&name), incoming.get(&name)) {
            h.insert(name, v.clone());
        }
    }
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    req
}

/// Sends `req` on a new connection to `addr` and returns the status of the
/// answer; the body is never read, and the connection closes on return.
async fn http_get(addr: SocketAddr, req: Request<Body>) -> Outcome {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("connect: {e}")),
    };
    let _ = stream.set_nodelay(true);
    let handshake = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_RESPONSE_HEAD)
        .handshake::<_, Body>(TokioIo::new(stream))
        .await;
    let (mut sender, conn) = match handshake {
        Ok(pair) => pair,
        Err(e) => return Outcome::Failed(format!("http: {e}")),
    };
    let exchange = sender.send_request(req);
    tokio::pin!(conn, exchange);
    // The connection is driven here, beside the request: nothing outlives
    // this call. An app that answers and closes at once ends the
    // connection first; its answer is then ready.
    let answer = tokio::select! {
        biased;
        r = &mut exchange => r,
        _ = &mut conn => exchange.await,
    };
    match answer {
        Ok(resp) => Outcome::Answered(resp.status()),
        Err(e) => Outcome::Failed(format!("http: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(json: &str, path: &str) -> AppProbe {
        AppProbes::parse(json)
            .unwrap_or_else(|e| panic!("{json}: {e}"))
            .get(path)
            .cloned()
            .unwrap_or_else(|| panic!("{path} not in {json}"))
    }

    fn error(json: &str) -> String {
        match AppProbes::parse(json) {
            Ok(p) => panic!("{json} was taken: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn http_and_tcp_entries_are_read_with_their_fields() {
        let json = r#"{
            "/app-health/app/readyz": {"httpGet": {"port": 8080, "path": "/ready?full=1",
                "scheme": "HTTP", "headers": [{"name": "X-Probe", "value": "kubelet"}]},
                "timeoutSeconds": 3},
            "/app-health/app/livez": {"tcpSocket": {"port": 9000}}
        }"#;
        let probes = AppProbes::parse(json).unwrap();
        assert_eq!(probes.len(), 2);
        assert_eq!(
            probes.get("/app-health/app/readyz"),
            Some(&AppProbe {
                check: Check::Http {
                    port: 8080,
                    path: PathAndQuery::from_static("/ready?full=1"),
                    headers: vec![(
                        HeaderName::from_static("x-probe"),
                        HeaderValue::from_static("kubelet")
                    )],
                },
                timeout: Duration::from_secs(3),
            })
        );
        assert_eq!(
            probes.get("/app-health/app/livez"),
            Some(&AppProbe {
                check: Check::Tcp { port: 9000 },
                timeout: DEFAULT_TIMEOUT,
            })
        );
        assert_eq!(probes.longest_timeout(), DEFAULT_TIMEOUT);
        assert_eq!(AppProbes::default().longest_timeout(), Duration::ZERO);
    }

    #[test]
    fn http_defaults_to_the_root_path_and_no_headers() {
        let p = one(
            r#"{"/app-health/a/startupz": {"httpGet": {"port": 80}}}"#,
            "/app-health/a/startupz",
        );
        assert_eq!(
            p.check,
            Check::Http {
                port: 80,
                path: PathAndQuery::from_static("/"),
                headers: vec![],
            }
        );
    }

    #[test]
    fn only_the_listed_paths_match_exactly() {
        let probes =
            AppProbes::parse(r#"{"/app-health/app/readyz": {"tcpSocket": {"port": 8080}}}"#)
                .unwrap();
        assert!(probes.get("/app-health/app/readyz").is_some());
        for other in [
            "/app-health/app/livez",
            "/app-health/app/readyz/",
            "/app-health/app",
            "/app-health/",
            "/app-health/other/readyz",
            "/APP-HEALTH/app/readyz",
            "/ready",
        ] {
            assert!(probes.get(other).is_none(), "{other}");
        }
        assert!(AppProbes::default().get("/app-health/app/readyz").is_none());
        assert!(AppProbes::parse("{}").unwrap().is_empty());
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        for (json, reason) in [
            ("", "not valid JSON"),
            ("[]", "expected a JSON object"),
            (
                r#"{"/ready": {"tcpSocket": {"port": 1}}}"#,
                "must start with /app-health/",
            ),
            (
                r#"{"/app-health/": {"tcpSocket": {"port": 1}}}"#,
                "letters, digits",
            ),
            (
                r#"{"/app-health/a b": {"tcpSocket": {"port": 1}}}"#,
                "letters, digits",
            ),
            (r#"{"/app-health/a": {}}"#, "neither httpGet nor tcpSocket"),
            (r#"{"/app-health/a": 1}"#, "expected a JSON object"),
            (
                r#"{"/app-health/a": {"tcpSocket": {"port": 1}, "httpGet": {"port": 1}}}"#,
                "both httpGet and tcpSocket",
            ),
            (
                r#"{"/app-health/a": {"exec": {}}}"#,
                "unknown field \"exec\"",
            ),
            (
                r#"{"/app-health/a": {"tcpSocket": {"port": 0}}}"#,
                "not a port number",
            ),
            (
                r#"{"/app-health/a": {"tcpSocket": {"port": 70000}}}"#,
                "not a port number",
            ),
            (
                r#"{"/app-health/a": {"tcpSocket": {"port": "http"}}}"#,
                "not a port number",
            ),
            (r#"{"/app-health/a": {"tcpSocket": {}}}"#, "no port"),
            (
                r#"{"/app-health/a": {"tcpSocket": {"port": 1, "host": "x"}}}"#,
                "unknown field \"host\"",
            ),
            (
                r#"{"/app-health/a": {"httpGet": {"port": 1, "scheme": "HTTPS"}}}"#,
                "is not \"HTTP\"",
            ),
            (
                r#"{"/app-health/a": {"httpGet": {"port": 1, "path": "x"}}}"#,
                "not a path",
            ),
            (
                r#"{"/app-health/a": {"httpGet": {"port": 1, "path": "/a b"}}}"#,
                "httpGet.path",
            ),
            (
                r#"{"/app-health/a": {"httpGet": {"port": 1, "headers": [{"name": "a b", "value": "v"}]}}}"#,
                "not a header name",
            ),
            (
                r#"{"/app-health/a": {"httpGet": {"port": 1, "headers": [{"name": "a", "value": "x\ny"}]}}}"#,
                "not a header value",
            ),
            (
                r#"{"/app-health/a": {"httpGet": {"port": 1, "headers": {"a": "b"}}}}"#,
                "not a list",
            ),
            (
                r#"{"/app-health/a": {"tcpSocket": {"port": 1}, "timeoutSeconds": 0}}"#,
                "timeoutSeconds",
            ),
            (
                r#"{"/app-health/a": {"tcpSocket": {"port": 1}, "timeoutSeconds": 1.5}}"#,
                "timeoutSeconds",
            ),
        ] {
            let e = error(json);
            assert!(e.contains(reason), "{json}: {e}");
        }
        // The error names the entry.
        assert!(error(r#"{"/app-health/x/livez": {}}"#).starts_with("\"/app-health/x/livez\": "));
    }

    #[test]
    fn outcomes_answer_as_the_kubelet_judges() {
        for (outcome, status, result) in [
            (Outcome::Answered(StatusCode::OK), 200, "pass"),
            (Outcome::Answered(StatusCode::NO_CONTENT), 204, "pass"),
            (Outcome::Answered(StatusCode::FOUND), 302, "pass"),
            (Outcome::Answered(StatusCode::NOT_FOUND), 404, "fail"),
            (
                Outcome::Answered(StatusCode::INTERNAL_SERVER_ERROR),
                500,
                "fail",
            ),
            (Outcome::Answered(StatusCode::CONTINUE), 503, "fail"),
            (Outcome::Connected, 200, "pass"),
            (Outcome::Failed("refused".into()), 503, "error"),
            (Outcome::TimedOut, 503, "timeout"),
        ] {
            assert_eq!(outcome.status().as_u16(), status, "{outcome:?}");
            assert_eq!(outcome.result(), result, "{outcome:?}");
        }
    }

    #[test]
    fn the_request_is_the_kubelets() {
        let addr: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let mut incoming = HeaderMap::new();
        incoming.insert(
            header::USER_AGENT,
            HeaderValue::from_static("kube-probe/1.33"),
        );
        incoming.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        incoming.insert("x-other", HeaderValue::from_static("not passed on"));
        let path = PathAndQuery::from_static("/ready?x=1");
        let req = request(addr, &path, &[], &incoming);
        assert_eq!(req.uri(), "/ready?x=1");
        assert_eq!(req.headers()["host"], "10.1.2.3:8080");
        assert_eq!(req.headers()["user-agent"], "kube-probe/1.33");
        assert_eq!(req.headers()["accept"], "*/*");
        assert_eq!(req.headers()["connection"], "close");
        assert!(!req.headers().contains_key("x-other"));

        // The probe's own headers win, and may repeat.
        let own = [
            (header::HOST, HeaderValue::from_static("app.example")),
            (header::USER_AGENT, HeaderValue::from_static("mine")),
            (
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("1"),
            ),
            (
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("2"),
            ),
        ];
        let req = request(addr, &path, &own, &incoming);
        assert_eq!(req.headers()["host"], "app.example");
        assert_eq!(req.headers()["user-agent"], "mine");
        let xa: Vec<_> = req.headers().get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
    }

    async fn probe_of(check: Check, timeout: Duration) -> Outcome {
        AppProbe { check, timeout }
            .run(IpAddr::from([127, 0, 0, 1]), &HeaderMap::new())
            .await
    }

    #[tokio::test]
    async fn tcp_probe_connects_or_fails() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let check = Check::Tcp { port };
        assert_eq!(
            probe_of(check.clone(), DEFAULT_TIMEOUT).await,
            Outcome::Connected
        );
        drop(l);
        assert!(matches!(
            probe_of(check, DEFAULT_TIMEOUT).await,
            Outcome::Failed(_)
        ));
    }

    #[tokio::test]
    async fn http_probe_reads_only_the_status_line_and_headers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // An app that answers 418 with a body that never ends.
        let app = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = vec![0; 4096];
            let n = s.read(&mut head).await.unwrap();
            let head = String::from_utf8_lossy(&head[..n]).to_string();
            s.write_all(
                b"HTTP/1.1 418 I'm a teapot\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            )
            .await
            .unwrap();
            // Hold the connection open until the prober closes it.
            let _ = s.read(&mut [0; 16]).await;
            head
        });
        let check = Check::Http {
            port,
            path: PathAndQuery::from_static("/healthz"),
            headers: vec![],
        };
        let outcome = probe_of(check, DEFAULT_TIMEOUT).await;
        assert_eq!(outcome, Outcome::Answered(StatusCode::IM_A_TEAPOT));
        let head = app.await.unwrap();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "{head}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_app_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let check = Check::Http {
            port,
            path: PathAndQuery::from_static("/"),
            headers: vec![],
        };
        // Accepted by the kernel (backlog), never answered.
        let outcome = probe_of(check, Duration::from_secs(2)).await;
        assert_eq!(outcome, Outcome::TimedOut);
        drop(l);
    }
}
