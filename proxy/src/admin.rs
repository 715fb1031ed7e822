//! The admin server: /live, /ready, /metrics, /config, /shutdown. It runs on
//! its own thread and runtime so a saturated data plane never starves
//! health checks or metric scrapes.

use crate::body::Body;
use crate::proxy::Proxy;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

pub struct AdminState {
    pub proxy: Arc<Proxy>,
    /// True once a config is running (or none is expected).
    pub ready: Arc<AtomicBool>,
    pub shutdown: Arc<watch::Sender<bool>>,
}

/// Starts the admin server on a thread of its own.
pub fn spawn(listener: std::net::TcpListener, state: AdminState) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("remora-admin".into())
        .spawn(move || rt.block_on(serve(listener, Arc::new(state))))?;
    Ok(())
}

async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
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
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req)) }
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
