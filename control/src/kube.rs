//! Bootstrap credentials in Kubernetes: the pod's projected service-account
//! token (audience `remora`), checked with the TokenReview API
//! (`authentication.k8s.io/v1`). The API server says whose token it is;
//! the control plane issues a certificate only for that namespace and
//! service account. A renewal (authenticated by the current certificate)
//! is granted while the service account still exists.
//!
//! The control plane calls the API server as its own service account
//! (`--kube-token-file`, re-read at each call, so the kubelet's rotation of
//! it applies), over TLS verified against the cluster CA (`--kube-ca-file`).
//! RBAC it needs: `create` on `tokenreviews` (authentication.k8s.io) and
//! `get` on `serviceaccounts`. Every call is bounded: 5 s, a 64 KiB answer,
//! 32 calls in flight.

use crate::review::{ReviewError, TokenReviewer, Workload};
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::debug;

/// The longest one call to the API server may take, connecting included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read from the API server.
const MAX_BODY: usize = 64 << 10;
/// The longest token sent for review (projected tokens are about 1 KiB).
const MAX_TOKEN: usize = 16 << 10;
/// Calls in flight at once: a mesh-wide restart queues here instead of
/// opening a connection per pod to the API server.
const MAX_IN_FLIGHT: usize = 32;
/// How much API-supplied text an error message quotes.
const MAX_QUOTE: usize = 300;
/// How long an idle connection to the API server is kept for reuse.
const IDLE: Duration = Duration::from_secs(60);

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const SA_PREFIX: &str = "system:serviceaccount:";

/// Where the API server is and how the control plane authenticates to it
/// (in-cluster defaults: its own service-account token and the cluster CA).
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// `https://host:port` of the API server.
    pub api: String,
    /// The cluster CA (PEM) that verifies the API server.
    pub ca_file: PathBuf,
    /// The control plane's own service-account token (read at each use).
    pub token_file: PathBuf,
    /// The audience proxies' tokens must be for.
    pub audience: String,
}

/// Reviews tokens with the Kubernetes API server (see the module docs).
pub struct KubernetesReviewer {
    cfg: KubeConfig,
    /// `cfg.api` without a trailing slash; API paths are appended to it.
    base: String,
    client: Client<ApiConnector, Full<Bytes>>,
    in_flight: Semaphore,
}

impl KubernetesReviewer {
    /// Checks at start what can be checked without calling the API: the
    /// URL's shape, the CA file, that the token file holds a token. Errors
    /// name the flag to fix.
    pub fn new(cfg: KubeConfig) -> Result<KubernetesReviewer, String> {
        let base = api_base(&cfg.api)?;
        let roots = read_roots(&cfg.ca_file)?;
        read_own_token(&cfg.token_file)?;
        if cfg.audience.trim().is_empty() {
            return Err("--token-audience is empty".into());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to the Kubernetes API: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = ApiConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE)
            .build(connector);
        Ok(KubernetesReviewer {
            cfg,
            base,
            client,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// One call as the control plane's own service account, within 5 s,
    /// its answer (at most 64 KiB) judged by `judge`. Unavailable errors
    /// name the URL.
    async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<String>,
        judge: impl FnOnce(StatusCode, &[u8]) -> Result<(), ReviewError>,
    ) -> Result<(), ReviewError> {
        let url = format!("{}{path}", self.base);
        let attempt = async {
            let _permit = self.in_flight.acquire().await.map_err(|e| e.to_string())?;
            let own = read_own_token_async(&self.cfg.token_file).await?;
            let mut auth = HeaderValue::try_from(format!("Bearer {own}")).map_err(|_| {
                format!(
                    "--kube-token-file {}: the token is not a valid header value",
                    self.cfg.token_file.display()
                )
            })?;
            auth.set_sensitive(true);
            let mut req = Request::builder()
                .method(method.clone())
                .uri(&url)
                .header(AUTHORIZATION, auth)
                .header(ACCEPT, "application/json")
                .header(USER_AGENT, "remora-control");
            if json.is_some() {
                req = req.header(CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(json.unwrap_or_default())))
                .map_err(|e| e.to_string())?;
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    format!("cannot connect: {}", causes(&e, false))
                } else {
                    format!("request failed: {}", causes(&e, true))
                }
            })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        format!("{status}, with an answer larger than {MAX_BODY} bytes")
                    } else {
                        format!("{status}, and reading the answer failed: {e}")
                    }
                })?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let answered = match tokio::time::timeout(TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}s", TIMEOUT.as_secs())),
        };
        debug!(%method, %url, status = ?answered.as_ref().map(|(s, _)| *s), "Kubernetes API call");
        let at_url =
            |what: String| ReviewError::Unavailable(format!("Kubernetes API {url}: {what}"));
        let (status, body) = answered.map_err(at_url)?;
        judge(status, &body).map_err(|e| match e {
            ReviewError::Unavailable(what) => at_url(what),
            denied => denied,
        })
    }
}

#[tonic::async_trait]
impl TokenReviewer for KubernetesReviewer {
    async fn review(&self, token: &str, claimed: Workload<'_>) -> Result<(), ReviewError> {
        if token.is_empty() {
            return Err(ReviewError::Denied(
                "no bootstrap token (the pod's projected service-account token)".into(),
            ));
        }
        if token.len() > MAX_TOKEN {
            return Err(ReviewError::Denied(format!(
                "the bootstrap token is longer than {MAX_TOKEN} bytes"
            )));
        }
        let body = review_request(token, &self.cfg.audience);
        self.call(Method::POST, TOKEN_REVIEWS, Some(body), |status, answer| {
            if !status.is_success() {
                let permission = "create tokenreviews (authentication.k8s.io)";
                let why = refused(status, answer, permission, &self.cfg.token_file);
                return Err(ReviewError::Unavailable(why));
            }
            judge(answer, claimed, &self.cfg.audience)
        })
        .await
    }

    async fn still_granted(&self, workload: Workload<'_>) -> Result<(), ReviewError> {
        // DNS labels only, so the names are safe in a path as they are.
        for (field, v) in [
            ("namespace", workload.namespace),
            ("service_account", workload.service_account),
        ] {
            crate::ca::check_label(field, v).map_err(|e| ReviewError::Denied(e.to_string()))?;
        }
        let path = format!(
            "/api/v1/namespaces/{}/serviceaccounts/{}",
            workload.namespace, workload.service_account
        );
        self.call(Method::GET, &path, None, |status, answer| {
            granted(status, answer, workload, &self.cfg.token_file)
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "Kubernetes service-account token"
    }
}

// ------------------------------------------------------------ the JSON

/// The TokenReview the control plane creates: the proxy's token, for our
/// audience.
fn review_request(token: &str, audience: &str) -> String {
    serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    })
    .to_string()
}

/// The part of a TokenReview answer that matters here.
#[derive(Deserialize)]
struct TokenReview {
    status: Option<ReviewStatus>,
}

#[derive(Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    user: Option<UserInfo>,
    /// The audiences the token is valid for, of those asked for (absent
    /// when the authenticator does not say).
    audiences: Option<Vec<String>>,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct UserInfo {
    #[serde(default)]
    username: String,
}

/// A `Status` the API server answers errors with.
#[derive(Deserialize)]
struct ApiStatus {
    #[serde(default)]
    message: String,
}

/// What a successful TokenReview answer means for `claimed`: Ok only for a
/// token of exactly that service account, for our audience. An answer that
/// is not a TokenReview is Unavailable (without the URL: the caller adds it).
fn judge(answer: &[u8], claimed: Workload<'_>, audience: &str) -> Result<(), ReviewError> {
    let review: TokenReview = serde_json::from_slice(answer)
        .map_err(|e| ReviewError::Unavailable(format!("the answer is not a TokenReview: {e}")))?;
    let Some(status) = review.status else {
        return Err(ReviewError::Unavailable(
            "the TokenReview answer has no status".into(),
        ));
    };
    if !status.authenticated {
        let mut m = "the Kubernetes API did not authenticate the token".to_string();
        if !status.error.is_empty() {
            m = format!("{m}: {}", quote(&status.error));
        }
        return Err(ReviewError::Denied(m));
    }
    if let Some(auds) = &status.audiences {
        if !auds.iter().any(|a| a == audience) {
            let auds: Vec<String> = auds.iter().take(10).map(|a| quote(a)).collect();
            return Err(ReviewError::Denied(format!(
                "the token is for audiences {auds:?}, not {audience:?}"
            )));
        }
    }
    let username = status.user.map(|u| u.username).unwrap_or_default();
    match service_account_of(&username) {
        Some((ns, sa)) if ns == claimed.namespace && sa == claimed.service_account => Ok(()),
        Some((ns, sa)) => Err(ReviewError::Denied(format!(
            "this token is for {}/{}, not {claimed}",
            quote(ns),
            quote(sa)
        ))),
        None => Err(ReviewError::Denied(format!(
            "the token belongs to {:?}, which is not a service account",
            quote(&username)
        ))),
    }
}

/// `(namespace, name)` of a `system:serviceaccount:<ns>:<sa>` username.
fn service_account_of(username: &str) -> Option<(&str, &str)> {
    let (ns, sa) = username.strip_prefix(SA_PREFIX)?.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
}

/// What a service-account lookup means: it exists (granted), it is gone
/// (revoked), or the API could not say.
fn granted(
    status: StatusCode,
    answer: &[u8],
    workload: Workload<'_>,
    token_file: &Path,
) -> Result<(), ReviewError> {
    if status.is_success() {
        Ok(())
    } else if status == StatusCode::NOT_FOUND {
        Err(ReviewError::Denied(format!(
            "service account {workload} no longer exists: its identity was revoked"
        )))
    } else {
        Err(ReviewError::Unavailable(refused(
            status,
            answer,
            "get serviceaccounts",
            token_file,
        )))
    }
}

/// Why the API server refused a call, and what to fix: 401 is the control
/// plane's own credentials, 403 its RBAC (`permission`).
fn refused(status: StatusCode, answer: &[u8], permission: &str, token_file: &Path) -> String {
    let why = match status {
        StatusCode::UNAUTHORIZED => format!(
            "the API server does not accept the control plane's own credentials (its service-account token, --kube-token-file {})",
            token_file.display()
        ),
        StatusCode::FORBIDDEN => format!(
            "the control plane's service account may not {permission}: grant it with RBAC (deploy/kubernetes/control-plane.yaml)"
        ),
        _ => "the API server failed the call".into(),
    };
    let said = match serde_json::from_slice::<ApiStatus>(answer) {
        Ok(s) if !s.message.is_empty() => quote(&s.message),
        _ => quote(&String::from_utf8_lossy(answer)),
    };
    if said.trim().is_empty() {
        format!("{status}: {why}")
    } else {
        format!("{status}: {why} (the API says: {said})")
    }
}

/// API-supplied text fit for an error message: control characters
/// replaced, at most `MAX_QUOTE` characters.
fn quote(s: &str) -> String {
    let mut q: String = s
        .chars()
        .take(MAX_QUOTE)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().nth(MAX_QUOTE).is_some() {
        q.push('…');
    }
    q
}

/// An error and its sources, `a: b: c` (the first one left out when it
/// says nothing, as hyper's "client error (Connect)" does).
fn causes(e: &(dyn std::error::Error + 'static), first: bool) -> String {
    let mut parts = vec![];
    if first {
        parts.push(e.to_string());
    }
    let mut next = e.source();
    while let Some(s) = next {
        parts.push(s.to_string());
        next = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
}

// ------------------------------------------------------------ configuration

/// `https://host[:port][/prefix]` without a trailing slash.
fn api_base(api: &str) -> Result<String, String> {
    let bad = |why: &str| format!("--kube-api {api:?}: {why}");
    let uri: Uri = api.parse().map_err(|e| bad(&format!("not a URL ({e})")))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad(
            "must be https://host:port (the API server is reached over TLS only)",
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("no host"));
    };
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(bad("must be https://host:port"));
    }
    if uri.query().is_some() {
        return Err(bad("must be https://host:port, without a query"));
    }
    let path = uri.path().trim_end_matches('/');
    Ok(format!("https://{authority}{path}"))
}

/// The cluster CA's certificates, from PEM.
fn read_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let at = || format!("--kube-ca-file {}", path.display());
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", at()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("{}: {e}", at()))?;
        roots
            .add(c)
            .map_err(|e| format!("{}: a certificate does not parse: {e}", at()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no PEM certificate in it", at()));
    }
    Ok(roots)
}

/// The control plane's own token, without surrounding whitespace.
fn read_own_token(path: &Path) -> Result<String, String> {
    let at = || format!("--kube-token-file {}", path.display());
    let token = std::fs::read_to_string(path).map_err(|e| {
        format!("{}: {e} (the control plane's own service-account token: is it mounted? automountServiceAccountToken)", at())
    })?;
    own_token(token, path)
}

async fn read_own_token_async(path: &Path) -> Result<String, String> {
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("--kube-token-file {}: {e}", path.display()))?;
    own_token(token, path)
}

fn own_token(text: String, path: &Path) -> Result<String, String> {
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("--kube-token-file {}: empty", path.display()));
    }
    Ok(token.to_string())
}

// ------------------------------------------------------------ connections

/// Opens TLS connections to the API server, verified against the cluster
/// CA; hyper's client pools them.
#[derive(Clone)]
struct ApiConnector {
    tls: tokio_rustls::TlsConnector,
}

impl tower_service::Service<Uri> for ApiConnector {
    type Response = TokioIo<ApiStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<ApiStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri}: no host")))?;
            // An IPv6 address comes bracketed.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name =
                ServerName::try_from(host.clone()).map_err(|e| invalid(format!("{host}: {e}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tls.connect(name, tcp).await.map_err(|e| {
                let m = format!("TLS: {e} (the API server is verified against --kube-ca-file)");
                io::Error::new(e.kind(), m)
            })?;
            Ok(TokioIo::new(ApiStream(stream)))
        })
    }
}

/// A TLS connection to the API server (a type of ours, so hyper's
/// `Connection` can be implemented for it).
struct ApiStream(tokio_rustls::client::TlsStream<TcpStream>);

impl Connection for ApiStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for ApiStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ApiStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const API: Workload<'static> = Workload {
        namespace: "shop",
        service_account: "api",
    };
    const WEB: Workload<'static> = Workload {
        namespace: "shop",
        service_account: "web",
    };

    /// A TokenReview answer as kube-apiserver writes it.
    fn answer(status: serde_json::Value) -> Vec<u8> {
        serde_json::json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": {"token": "t", "audiences": ["remora"]},
            "status": status,
        })
        .to_string()
        .into_bytes()
    }

    fn authenticated(username: &str) -> Vec<u8> {
        answer(serde_json::json!({
            "authenticated": true,
            "user": {
                "username": username,
                "uid": "0c5a1f2e-8f0b-4f43-9d0e-4a2b7d1c9e11",
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "extra": {"authentication.kubernetes.io/pod-name": ["api-7d4b9-x2x"]},
            },
            "audiences": ["remora"],
        }))
    }

    fn denied(r: Result<(), ReviewError>) -> String {
        match r {
            Err(ReviewError::Denied(m)) => m,
            other => panic!("expected Denied, got {other:?}"),
        }
    }

    fn unavailable(r: Result<(), ReviewError>) -> String {
        match r {
            Err(ReviewError::Unavailable(m)) => m,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn a_review_grants_exactly_the_service_account_it_authenticated() {
        let a = authenticated("system:serviceaccount:shop:api");
        assert!(judge(&a, API, "remora").is_ok());
        assert_eq!(
            denied(judge(&a, WEB, "remora")),
            "this token is for shop/api, not shop/web"
        );
        let other_ns = authenticated("system:serviceaccount:billing:api");
        assert_eq!(
            denied(judge(&other_ns, API, "remora")),
            "this token is for billing/api, not shop/api"
        );
    }

    #[test]
    fn a_user_that_is_not_a_service_account_is_denied() {
        for user in [
            "system:node:worker-1",
            "alice@example.com",
            "system:serviceaccount:shop",
            "system:serviceaccount::api",
            "system:serviceaccount:shop:",
            "system:serviceaccount:shop:api:extra",
            "system:serviceaccounts:shop:api",
            "",
        ] {
            let m = denied(judge(&authenticated(user), API, "remora"));
            assert!(m.contains("not a service account"), "{user}: {m}");
        }
        // No user at all.
        let m = denied(judge(
            &answer(serde_json::json!({"authenticated": true})),
            API,
            "remora",
        ));
        assert!(m.contains("not a service account"), "{m}");
        assert_eq!(
            service_account_of("system:serviceaccount:a:b"),
            Some(("a", "b"))
        );
    }

    #[test]
    fn an_unauthenticated_token_is_denied_with_the_api_error_bounded() {
        let a = answer(serde_json::json!({
            "user": {},
            "error": "[invalid bearer token, service account token has been invalidated]",
        }));
        assert_eq!(
            denied(judge(&a, API, "remora")),
            "the Kubernetes API did not authenticate the token: [invalid bearer token, service account token has been invalidated]"
        );
        let m = denied(judge(&answer(serde_json::json!({})), API, "remora"));
        assert_eq!(m, "the Kubernetes API did not authenticate the token");
        // A huge or multi-line error is cut down to one bounded line.
        let long = format!("line1\nline2{}", "x".repeat(10_000));
        let m = denied(judge(
            &answer(serde_json::json!({"error": long})),
            API,
            "remora",
        ));
        assert!(
            m.len() < 400 && !m.contains('\n') && m.ends_with('…'),
            "{m}"
        );
        // Authenticated false wins over a username.
        let a = answer(serde_json::json!({
            "authenticated": false,
            "user": {"username": "system:serviceaccount:shop:api"},
        }));
        assert!(matches!(
            judge(&a, API, "remora"),
            Err(ReviewError::Denied(_))
        ));
    }

    #[test]
    fn returned_audiences_must_include_ours() {
        let with = |auds: serde_json::Value| {
            answer(serde_json::json!({
                "authenticated": true,
                "user": {"username": "system:serviceaccount:shop:api"},
                "audiences": auds,
            }))
        };
        assert!(judge(&with(serde_json::json!(["remora"])), API, "remora").is_ok());
        assert!(judge(&with(serde_json::json!(["x", "remora"])), API, "remora").is_ok());
        // Not said: the API server checked the audience asked for.
        assert!(judge(&with(serde_json::Value::Null), API, "remora").is_ok());
        let m = denied(judge(
            &with(serde_json::json!(["https://kubernetes.default.svc"])),
            API,
            "remora",
        ));
        assert!(m.contains("not \"remora\""), "{m}");
        assert!(matches!(
            judge(&with(serde_json::json!([])), API, "remora"),
            Err(ReviewError::Denied(_))
        ));
    }

    #[test]
    fn an_answer_that_is_not_a_token_review_is_unavailable() {
        let m = unavailable(judge(b"<html>gateway</html>", API, "remora"));
        assert!(m.contains("not a TokenReview"), "{m}");
        let m = unavailable(judge(b"{\"kind\":\"TokenReview\"}", API, "remora"));
        assert!(m.contains("no status"), "{m}");
        let m = unavailable(judge(
            b"{\"status\":{\"authenticated\":\"yes\"}}",
            API,
            "remora",
        ));
        assert!(m.contains("not a TokenReview"), "{m}");
    }

    #[test]
    fn the_request_is_a_token_review_for_our_audience() {
        let body: serde_json::Value =
            serde_json::from_str(&review_request("tok\"en", "remora")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": "tok\"en", "audiences": ["remora"]},
            })
        );
    }

    #[test]
    fn api_refusals_say_what_to_fix() {
        let f = Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token");
        let unauthorized = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;
        let m = refused(
            StatusCode::UNAUTHORIZED,
            unauthorized,
            "create tokenreviews",
            f,
        );
        assert!(m.starts_with("401 Unauthorized: "), "{m}");
        assert!(
            m.contains("own credentials") && m.contains("--kube-token-file /var/run"),
            "{m}"
        );
        assert!(m.ends_with("(the API says: Unauthorized)"), "{m}");

        let forbidden = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:remora-system:remora-control\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope","reason":"Forbidden","details":{"group":"authentication.k8s.io","kind":"tokenreviews"},"code":403}"#;
        let m = refused(
            StatusCode::FORBIDDEN,
            forbidden,
            "create tokenreviews (authentication.k8s.io)",
            f,
        );
        assert!(m.starts_with("403 Forbidden: "), "{m}");
        assert!(
            m.contains("may not create tokenreviews (authentication.k8s.io)"),
            "{m}"
        );
        assert!(m.contains("cannot create resource"), "{m}");

        let m = refused(StatusCode::BAD_GATEWAY, b"upstream\nconnect error", "x", f);
        assert_eq!(m, "502 Bad Gateway: the API server failed the call (the API says: upstream connect error)");
        let m = refused(StatusCode::INTERNAL_SERVER_ERROR, b"", "x", f);
        assert_eq!(
            m,
            "500 Internal Server Error: the API server failed the call"
        );
    }

    #[test]
    fn a_service_account_is_granted_while_it_exists() {
        let f = Path::new("token");
        assert!(granted(StatusCode::OK, b"{}", API, f).is_ok());
        let not_found = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"serviceaccounts \"api\" not found","reason":"NotFound","details":{"name":"api","kind":"serviceaccounts"},"code":404}"#;
        assert_eq!(
            denied(granted(StatusCode::NOT_FOUND, not_found, API, f)),
            "service account shop/api no longer exists: its identity was revoked"
        );
        let m = unavailable(granted(StatusCode::FORBIDDEN, b"{}", API, f));
        assert!(m.contains("may not get serviceaccounts"), "{m}");
        let m = unavailable(granted(StatusCode::SERVICE_UNAVAILABLE, b"", API, f));
        assert!(m.starts_with("503"), "{m}");
    }

    #[test]
    fn the_api_url_must_be_https_host_port() {
        assert_eq!(
            api_base("https://10.96.0.1:443").unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            api_base("https://[fd00::1]:6443/").unwrap(),
            "https://[fd00::1]:6443"
        );
        assert_eq!(
            api_base("https://k8s.example/prefix/").unwrap(),
            "https://k8s.example/prefix"
        );
        for bad in [
            "http://10.96.0.1:443",
            "10.96.0.1:443",
            "https://",
            "https://user@host:443",
            "https://host:443/?x=1",
            "not a url",
        ] {
            let e = api_base(bad).unwrap_err();
            assert!(e.starts_with("--kube-api "), "{bad}: {e}");
        }
    }

    #[test]
    fn new_checks_the_ca_and_token_files_naming_the_flag() {
        let dir = std::env::temp_dir().join(format!("remora-kube-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let (ca_file, token_file) = (dir.join("ca.crt"), dir.join("token"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&token_file, "own-token\n").unwrap();
        let cfg = KubeConfig {
            api: "https://127.0.0.1:6443".into(),
            ca_file: ca_file.clone(),
            token_file: token_file.clone(),
            audience: "remora".into(),
        };
        let err = |cfg: KubeConfig| KubernetesReviewer::new(cfg).err().unwrap();
        assert!(KubernetesReviewer::new(cfg.clone()).is_ok());
        assert!(err(KubeConfig {
            api: "http://127.0.0.1:6443".into(),
            ..cfg.clone()
        })
        .starts_with("--kube-api"));

        let e = err(KubeConfig {
            ca_file: dir.join("missing"),
            ..cfg.clone()
        });
        assert!(
            e.starts_with("--kube-ca-file ") && e.contains("missing"),
            "{e}"
        );
        std::fs::write(dir.join("empty.crt"), "not pem\n").unwrap();
        let e = err(KubeConfig {
            ca_file: dir.join("empty.crt"),
            ..cfg.clone()
        });
        assert!(
            e.contains("--kube-ca-file") && e.contains("no PEM certificate"),
            "{e}"
        );
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.join("bad.crt"), garbage).unwrap();
        let e = err(KubeConfig {
            ca_file: dir.join("bad.crt"),
            ..cfg.clone()
        });
        assert!(e.starts_with("--kube-ca-file"), "{e}");

        let e = err(KubeConfig {
            token_file: dir.join("missing"),
            ..cfg.clone()
        });
        assert!(
            e.starts_with("--kube-token-file") && e.contains("automountServiceAccountToken"),
            "{e}"
        );
        std::fs::write(dir.join("blank"), " \n").unwrap();
        let e = err(KubeConfig {
            token_file: dir.join("blank"),
            ..cfg.clone()
        });
        assert!(
            e.starts_with("--kube-token-file") && e.ends_with("empty"),
            "{e}"
        );
        let e = err(KubeConfig {
            audience: "".into(),
            ..cfg
        });
        assert!(e.contains("--token-audience"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn quotes_are_bounded_single_lines() {
        assert_eq!(quote("a\tb\nc"), "a b c");
        let q = quote(&"é".repeat(1000));
        assert_eq!(q.chars().count(), MAX_QUOTE + 1);
        assert_eq!(quote(&"x".repeat(MAX_QUOTE)), "x".repeat(MAX_QUOTE));
    }
}
