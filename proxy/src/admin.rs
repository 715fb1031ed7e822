//! The admin server: /live, /ready, /metrics, /config, /shutdown, and the
//! app's kubelet probes under /app-health/ (`app_probes`). It runs on its
//! own thread and runtime so a saturated data plane never starves health
//! checks or metric scrapes.
//!
//! Probes and metrics are open to whoever reaches the port (the kubelet,
//! Prometheus); /config and POST /shutdown answer only on loopback or with
//! the admin token (`access`). The listener is bounded like the data
//! plane's: a connection cap, a header-read timeout, a connection age, and
//! back-off when accepting fails.

mod access;
mod app_probes;

pub use access::{AdminAccess, Granted, Refusal};
pub use app_probes::{AppProbe, AppProbes, AppProbesError, Check, Outcome};

use crate::body::Body;
use crate::metrics::ListenerLabels;
use crate::proxy::Proxy;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

pub struct AdminState {
    pub proxy: Arc<Proxy>,
    /// True once a config is running (or none is expected).
    pub ready: Arc<AtomicBool>,
    pub shutdown: Arc<watch::Sender<bool>>,
    /// The app's probes this server answers (REMORA_APP_PROBES).
    pub app_probes: AppProbes,
    /// `--admin-token-file`: the token /config and POST /shutdown need
    /// from off loopback. Without it only loopback may call them.
    pub admin_token_file: Option<PathBuf>,
}

/// App probes running at once; past it, a probe is answered 503 at once.
/// The kubelet sends one at a time per probe, so only a flood hits this.
const MAX_APP_PROBES_IN_FLIGHT: usize = 32;

/// Admin connections open at once. Probes and scrapes need a handful;
/// past it the listener stops accepting (the kernel backlog holds the
/// rest) instead of taking a file descriptor per attacker.
const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive whole within this, counted from when the
/// connection starts waiting for it: a slowloris client is cut, and so is
/// a keep-alive connection idle for as long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read, bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// After this a connection takes no new request; it is closed once the
/// one in flight is answered.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long past its age a connection may still be answering (plus the
/// longest app probe) before it is cut: a client that never reads.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Waits after a failed accept (EMFILE and friends): the first, and the
/// longest, doubling between them, so a persistent error neither spins
/// nor leaves the port unserved for long once it clears.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// The admin server's state, and what it needs to probe the app.
struct Admin {
    state: AdminState,
    access: AdminAccess,
    /// Where the app's probes go: the pod's IP ($POD_IP), where the
    /// kubelet would have reached the app, or 127.0.0.1.
    app_ip: IpAddr,
    app_probe_permits: Semaphore,
}

/// Starts the admin server on a thread of its own.
pub fn spawn(listener: std::net::TcpListener, state: AdminState) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let app_ip = app_ip(std::env::var("POD_IP").ok().as_deref());
    if !state.app_probes.is_empty() {
        info!(probes = state.app_probes.len(), %app_ip, "answering the app's probes under /app-health/");
    }
    let access = AdminAccess::new(state.admin_token_file.clone());
    access.warn_if_unusable();
    let admin = Admin {
        state,
        access,
        app_ip,
        app_probe_permits: Semaphore::new(MAX_APP_PROBES_IN_FLIGHT),
    };
    std::thread::Builder::new()
        .name("remora-admin".into())
        .spawn(move || rt.block_on(serve(listener, Arc::new(admin))))?;
    Ok(())
}

/// $POD_IP if it is an IP address, else 127.0.0.1.
fn app_ip(pod_ip: Option<&str>) -> IpAddr {
    let loopback = IpAddr::from([127, 0, 0, 1]);
    match pod_ip.map(str::trim).filter(|ip| !ip.is_empty()) {
        None => loopback,
        Some(text) => text.parse().unwrap_or_else(|_| {
            warn!(
                pod_ip = text,
                "POD_IP is not an IP address: app probes go to 127.0.0.1"
            );
            loopback
        }),
    }
}

/// Accepts for as long as the process runs: the admin port answers
/// (/ready says "draining") until the data plane has drained.
async fn serve(listener: std::net::TcpListener, admin: Arc<Admin>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, "admin listener failed"),
    };
    if let Ok(addr) = listener.local_addr() {
        info!(listener = "admin", %addr, "listening");
    }
    let metrics = &admin.state.proxy.metrics;
    let labels = ListenerLabels { listener: "admin" };
    let active = metrics.connections_active.get_or_create_owned(&labels);
    let total = metrics.connections_total.get_or_create_owned(&labels);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        // At the cap, wait for a connection to close before accepting.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, say: the pending connection
                // stays queued and accept fails again at once, so wait.
                if backoff == ACCEPT_BACKOFF.0 {
                    warn!(listener = "admin", error = %e, "accept failed; backing off");
                } else {
                    debug!(listener = "admin", error = %e, ?backoff, "accept failed again");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF.0;
        total.inc();
        active.inc();
        let (admin, active) = (admin.clone(), active.clone());
        tokio::spawn(async move {
            connection(admin, stream, peer).await;
            active.dec();
            drop(permit);
        });
    }
}

/// Serves one admin connection within its bounds: the header-read
/// timeout, then its age, then a grace for the answer in flight.
async fn connection(admin: Arc<Admin>, stream: TcpStream, peer: SocketAddr) {
    let grace = CLOSE_GRACE + admin.state.app_probes.longest_timeout();
    // Set by POST /shutdown; the drain starts once its answer is sent,
    // so a quick exit cannot cut the answer off.
    let shutdown_asked = Arc::new(AtomicBool::new(false));
    let svc = service_fn({
        let (admin, asked) = (admin.clone(), shutdown_asked.clone());
        move |req| {
            let (admin, asked) = (admin.clone(), asked.clone());
            async move { Ok::<_, Infallible>(route(&admin, peer, req, &asked).await) }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        res = conn.as_mut() => Some(res),
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(grace, conn.as_mut()).await.ok()
        }
    };
    match ended {
        None => debug!(%peer, "admin connection cut: still answering past its age"),
        Some(Err(e)) => debug!(%peer, error = %e, "admin connection ended with an error"),
        Some(Ok(())) => {}
    }
    if shutdown_asked.load(Relaxed) {
        admin.state.shutdown.send_replace(true);
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn route(
    admin: &Admin,
    peer: SocketAddr,
    req: Request<Incoming>,
    shutdown_asked: &AtomicBool,
) -> Response<Body> {
    if req.method() == Method::GET && req.uri().path().starts_with(app_probes::PATH_PREFIX) {
        return app_health(admin, &req).await;
    }
    // The running config and the off switch: loopback or the admin token.
    if let Some(path) = privileged(req.method(), req.uri().path()) {
        match admin.access.check(peer.ip(), req.headers()) {
            Ok(granted) => debug!(%peer, path, ?granted, "admin call allowed"),
            Err(refusal) => {
                info!(%peer, path, reason = %refusal, "admin call refused");
                admin.state.proxy.metrics.admin_refused(path);
                return text(StatusCode::FORBIDDEN, format!("forbidden: {refusal}\n"));
            }
        }
    }
    handle(&admin.state, peer, req, shutdown_asked)
}

/// The endpoint a privileged call is for, as a metric label; `None` for
/// the open ones.
fn privileged(method: &Method, path: &str) -> Option<&'static str> {
    match (method, path) {
        (&Method::GET, "/config") => Some("/config"),
        (&Method::POST, "/shutdown") => Some("/shutdown"),
        _ => None,
    }
}

/// `GET /app-health/...`: one of the app's kubelet probes, run against the
/// app and answered with its status and an empty body. Only the listed
/// paths exist.
async fn app_health(admin: &Admin, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let Some(probe) = admin.state.app_probes.get(path) else {
        return text(StatusCode::NOT_FOUND, "no app probe at this path\n");
    };
    let metrics = &admin.state.proxy.metrics;
    let Ok(_permit) = admin.app_probe_permits.try_acquire() else {
        debug!(probe = path, "app probe refused: too many in flight");
        metrics.app_probe(path, "overloaded");
        return empty(StatusCode::SERVICE_UNAVAILABLE);
    };
    let outcome = probe.run(admin.app_ip, req.headers()).await;
    let status = outcome.status();
    debug!(
        probe = path,
        ?outcome,
        status = status.as_u16(),
        "app probe"
    );
    metrics.app_probe(path, outcome.result());
    empty(status)
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = status;
    r
}

fn handle(
    state: &AdminState,
    peer: SocketAddr,
    req: Request<Incoming>,
    shutdown_asked: &AtomicBool,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if *state.shutdown.borrow() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !state.ready.load(Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n")
            } else if state
                .proxy
                .tls
                .as_ref()
                .is_some_and(|t| t.store().current().is_none())
            {
                // Without a certificate a sidecar can neither accept mesh
                // traffic (inbound fails closed) nor reach meshed endpoints:
                // before its first one, and after one expired unrenewed.
                // While renewals fail but the certificate is valid it stays
                // ready.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no valid workload certificate\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, state.proxy.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/config") => {
            let rt = state.proxy.runtime.load();
            let doc = serde_json::json!({ "version": rt.version, "config": &rt.config });
            let body = serde_json::to_string_pretty(&doc).unwrap_or_default();
            let mut r = text(StatusCode::OK, body + "\n");
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        (&Method::POST, "/shutdown") => {
            info!(%peer, "shutdown requested on the admin API");
            // The connection closes after this answer, then the drain starts.
            shutdown_asked.store(true, Relaxed);
            let mut r = text(StatusCode::OK, "draining\n");
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live /ready /metrics /config\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_config_and_shutdown_are_privileged() {
        assert_eq!(privileged(&Method::GET, "/config"), Some("/config"));
        assert_eq!(privileged(&Method::POST, "/shutdown"), Some("/shutdown"));
        // Probes and scrapes stay open to the kubelet and Prometheus.
        for (method, path) in [
            (Method::GET, "/live"),
            (Method::GET, "/ready"),
            (Method::GET, "/metrics"),
            (Method::GET, "/app-health/app/readyz"),
            (Method::GET, "/shutdown"),
        ] {
            assert_eq!(privileged(&method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn app_probes_go_to_the_pod_ip_or_loopback() {
        assert_eq!(app_ip(Some("10.0.3.7")), IpAddr::from([10, 0, 3, 7]));
        assert_eq!(
            app_ip(Some("fd00::7")),
            "fd00::7".parse::<IpAddr>().unwrap()
        );
        for unset in [None, Some(""), Some("not-an-ip")] {
            assert_eq!(app_ip(unset), IpAddr::from([127, 0, 0, 1]), "{unset:?}");
        }
    }
}
