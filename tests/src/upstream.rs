//! A real HTTP upstream on loopback (HTTP/1.1 and h2c on one port) whose
//! behaviour tests choose, and which counts the requests it served. The demo
//! binary runs the same server.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// What the upstream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// The demo behaviour: `/status/N` answers N, `/delay/MS` waits, `/echo`
    /// echoes the body, `/headers` lists the request's headers (`name:
    /// value` lines), an Upgrade request becomes a byte echo; anything else
    /// answers 200 with the upstream's name.
    Demo,
    /// Always this status.
    Status(u16),
}

/// What one request looked like when it arrived.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    fail: Arc<Failing>,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str, behavior: Behavior) -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name, behavior).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str, behavior: Behavior) -> Upstream {
        Self::try_start_on(addr, name, behavior)
            .await
            .expect("bind upstream")
    }

    pub async fn try_start_on(
        addr: SocketAddr,
        name: &str,
        behavior: Behavior,
    ) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(Failing::default());
        let (h, s, n, f) = (hits.clone(), seen.clone(), name.to_string(), fail.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // The port this connection arrived on, for x-served-port.
                let port = stream.local_addr().map_or(0, |a| a.port());
                let (h, s, n, f) = (h.clone(), s.clone(), n.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (h, s, n, f) = (h.clone(), s.clone(), n.clone(), f.clone());
                        async move {
                            let behavior = f.take().map_or(behavior, Behavior::Status);
                            let served = Served { name: &n, port };
                            Ok::<_, Infallible>(handle(req, behavior, served, &h, &s).await)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Upstream {
            addr,
            name: name.to_string(),
            fail,
            hits,
            seen,
            task,
        })
    }

    /// Answers every request with `status` from now on (None: behave again).
    pub fn fail_with(&self, status: Option<u16>) {
        self.fail_next(
            if status.is_some() { usize::MAX } else { 0 },
            status.unwrap_or(0),
        );
    }

    /// Answers the next `n` requests with `status`, then behaves again.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.fail.status.store(status, Ordering::SeqCst);
        self.fail.remaining.store(n, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A failure override: `remaining` requests (usize::MAX: all) get `status`.
#[derive(Default)]
struct Failing {
    status: AtomicU16,
    remaining: AtomicUsize,
}

impl Failing {
    fn take(&self) -> Option<u16> {
        let taken = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                usize::MAX => Some(n),
                n => Some(n - 1),
            });
        taken.ok().map(|_| self.status.load(Ordering::SeqCst))
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Who answers: every response says it in `x-served-by` (the upstream's
/// name) and `x-served-port` (the local port the connection arrived on).
#[derive(Clone, Copy)]
struct Served<'a> {
    name: &'a str,
    port: u16,
}

impl Served<'_> {
    fn response(self) -> http::response::Builder {
        Response::builder()
            .header("x-served-by", self.name)
            .header("x-served-port", self.port)
    }
}

async fn handle(
    mut req: Request<Incoming>,
    behavior: Behavior,
    served: Served<'_>,
    hits: &AtomicUsize,
    seen: &Mutex<Vec<Seen>>,
) -> Response<Full<Bytes>> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let upgrade = req.headers().contains_key(http::header::UPGRADE);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = if upgrade {
        Bytes::new()
    } else {
        body.collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    };
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
        version: parts.version,
    });
    let name = served.name;
    let reply = |status: u16, text: String| {
        served
            .response()
            .status(status)
            .body(Full::new(Bytes::from(text)))
            .unwrap()
    };
    if let Behavior::Status(code) = behavior {
        return reply(code, format!("{name} says {code}\n"));
    }
    if let Some(on_upgrade) = on_upgrade {
        tokio::spawn(async move {
            if let Ok(up) = on_upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let proto = parts.headers.get(http::header::UPGRADE).cloned().unwrap();
        return served
            .response()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, proto)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
        return reply(code, format!("{name} says {code}\n"));
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|c| c.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return reply(200, format!("{name} waited {ms}ms\n"));
    }
    if path == "/echo" {
        return served.response().body(Full::new(body)).unwrap();
    }
    if path == "/headers" {
        let lines: String = parts
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        return reply(200, lines);
    }
    reply(200, format!("hello from {name}\n"))
}
