//! The admin server: /live, /ready, /metrics, /config, /shutdown, and the
//! app's kubelet probes under /app-health/ (`app_probes`). It runs on its
//! own thread and runtime so a saturated data plane never starves health
//! checks or metric scrapes.

mod app_probes;

pub use app_probes::{AppProbe, AppProbes, AppProbesError, Check, Outcome};

use crate::body::Body;
use crate::proxy::Proxy;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

pub struct AdminState {
    pub proxy: Arc<Proxy>,
    /// True once a config is running (or none is expected).
    pub ready: Arc<AtomicBool>,
    pub shutdown: Arc<watch::Sender<bool>>,
    /// The app's probes this server answers (REMORA_APP_PROBES).
    pub app_probes: AppProbes,
}

/// App probes running at once; past it, a probe is answered 503 at once.
/// The kubelet sends one at a time per probe, so only a flood hits this.
const MAX_APP_PROBES_IN_FLIGHT: usize = 32;

/// The admin server's state, and what it needs to probe the app.
struct Admin {
    state: AdminState,
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
    let admin = Admin {
        state,
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

async fn serve(listener: std::net::TcpListener, admin: Arc<Admin>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, "admin listener failed"),
    };
    if let Ok(addr) = listener.local_addr() {
        info!(listener = "admin", %addr, "listening");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
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

async fn route(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::GET && req.uri().path().starts_with(app_probes::PATH_PREFIX) {
        return app_health(admin, &req).await;
    }
    handle(&admin.state, req)
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

fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
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
                .is_some_and(|t| !t.store().had_certificate())
            {
                // Without its first certificate a sidecar can neither accept
                // mesh traffic (Strict) nor reach meshed endpoints. Once it
                // had one it stays ready, even while renewals fail.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no workload certificate yet\n",
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
            let doc = serde_json::json!({ "version": rt.version, "config": &*rt.config });
            let body = serde_json::to_string_pretty(&doc).unwrap_or_default();
            let mut r = text(StatusCode::OK, body + "\n");
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        (&Method::POST, "/shutdown") => {
            info!("shutdown requested on the admin API");
            state.shutdown.send_replace(true);
            text(StatusCode::OK, "draining\n")
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
