//! Listeners: accept, bound, serve, drain. HTTP listeners serve HTTP/1.1 and
//! h2c on one port (hyper-util's auto builder reads the preface); opaque
//! listeners copy bytes. Every connection watches two signals: shutdown
//! (drain gracefully) and idleness (close a keep-alive connection nobody
//! uses).

use crate::authz::MtlsMode;
use crate::metrics::{ListenerLabels, Metrics};
use crate::proxy::{Direction, Proxy};
use crate::tls::MeshTls;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Limits applied to every client connection.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_concurrent_streams: u32,
}

/// Shared by every listener: the shutdown signal and the connections to
/// wait for when draining.
#[derive(Clone)]
pub struct Lifecycle {
    pub shutdown: watch::Receiver<bool>,
    pub tracker: TaskTracker,
}

fn http_builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Accepts until shutdown; then closes the listener (new connections are
/// refused) and leaves open ones to drain.
pub async fn serve_http(
    listener: TcpListener,
    name: &'static str,
    direction: Direction,
    proxy: Arc<Proxy>,
    limits: ServerLimits,
    life: Lifecycle,
) {
    let builder = Arc::new(http_builder(&limits));
    let idle = limits.idle_timeout;
    let first_byte_timeout = limits.header_read_timeout;
    accept_loop(
        listener,
        name,
        &proxy.metrics.clone(),
        &limits,
        life.clone(),
        move |stream, peer| {
            let (proxy, builder, shutdown) =
                (proxy.clone(), builder.clone(), life.shutdown.clone());
            async move {
                let conn = Conn {
                    peer,
                    direction,
                    proxy,
                    idle,
                    shutdown,
                };
                match (&conn.proxy.tls, direction) {
                    (Some(tls), Direction::Inbound) => {
                        let tls = tls.clone();
                        serve_inbound(stream, conn, &builder, &tls, first_byte_timeout).await
                    }
                    _ => serve_http_conn(stream, conn, &builder, None).await,
                }
            }
        },
    )
    .await
}

/// One accepted connection's context.
struct Conn {
    peer: SocketAddr,
    direction: Direction,
    proxy: Arc<Proxy>,
    idle: Duration,
    shutdown: watch::Receiver<bool>,
}

/// The inbound side of a proxy with an identity: a connection that opens
/// with a TLS handshake gets mTLS (the caller's identity rides along with
/// each request); plaintext is served only when the local Service's mode
/// allows it.
async fn serve_inbound(
    stream: TcpStream,
    conn: Conn,
    builder: &auto::Builder<TokioExecutor>,
    tls: &MeshTls,
    first_byte_timeout: Duration,
) {
    let mode = conn.proxy.runtime.load().local.mode;
    if mode == MtlsMode::Disabled {
        return serve_http_conn(stream, conn, builder, None).await;
    }
    // A TLS record starts with 0x16 (handshake); HTTP/1 starts with a
    // method and h2c with "PRI".
    let mut first = [0u8; 1];
    let peer = conn.peer;
    let is_tls = match tokio::time::timeout(first_byte_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == 0x16,
        Ok(_) => return,
        Err(_) => return debug!(%peer, "closed a connection that sent nothing"),
    };
    if is_tls {
        match tls.accept(stream).await {
            Ok((s, client)) => {
                debug!(%peer, client = %client.id, "mTLS connection");
                let left = client
                    .expires
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                let until = tokio::time::Instant::now() + left;
                serve_http_conn(s, conn, builder, Some((client.id, until))).await
            }
            Err(e) => info!(%peer, error = %e, "mTLS handshake refused"),
        }
    } else if mode == MtlsMode::Strict {
        conn.proxy.metrics.plaintext_refused.inc();
        info!(%peer, "plaintext connection refused: this Service's mTLS mode is Strict");
    } else {
        serve_http_conn(stream, conn, builder, None).await
    }
}

/// Accepts until shutdown and forwards each connection's bytes to `target`.
pub async fn serve_tcp(
    listener: TcpListener,
    name: &'static str,
    target: SocketAddr,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    limits: ServerLimits,
    life: Lifecycle,
) {
    let bytes = metrics
        .tcp_bytes
        .get_or_create_owned(&ListenerLabels { listener: name });
    accept_loop(
        listener,
        name,
        &metrics,
        &limits,
        life,
        move |client, peer| {
            let bytes = bytes.clone();
            async move {
                let upstream =
                    tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await;
                let mut upstream = match upstream {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return warn!(%peer, %target, error = %e, "opaque connect failed"),
                    Err(_) => return warn!(%peer, %target, "opaque connect timed out"),
                };
                let _ = upstream.set_nodelay(true);
                // Counted as bytes flow, so long-lived connections show too.
                let mut counted = Counted { io: client, bytes };
                if let Err(e) = tokio::io::copy_bidirectional(&mut counted, &mut upstream).await {
                    debug!(%peer, error = %e, "opaque connection ended");
                }
            }
        },
    )
    .await
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    metrics: &Metrics,
    limits: &ServerLimits,
    mut life: Lifecycle,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let labels = ListenerLabels { listener: name };
    let active = metrics.connections_active.get_or_create_owned(&labels);
    let total = metrics.connections_total.get_or_create_owned(&labels);
    // At most max_connections open: past it, stop accepting (the kernel
    // backlog holds the rest) rather than accept and drop.
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    if let Ok(addr) = listener.local_addr() {
        info!(listener = name, %addr, "listening");
    }
    loop {
        if *life.shutdown.borrow() {
            break;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = life.shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = life.shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        total.inc();
        active.inc();
        let active = active.clone();
        let fut = serve(stream, peer);
        life.tracker.spawn(async move {
            fut.await;
            active.dec();
            drop(permit);
        });
    }
    drop(listener);
    info!(listener = name, "stopped accepting");
}

/// When the connection last started or finished a request, and how many
/// are in flight: what the idle timer needs.
#[derive(Default)]
struct Activity {
    inflight: AtomicUsize,
    last_ms: AtomicU64,
}

/// Serves HTTP on one connection. `client` is the caller's SPIFFE ID on
/// an mTLS connection, with the instant its certificates expire.
async fn serve_http_conn<S>(
    stream: S,
    conn: Conn,
    builder: &auto::Builder<TokioExecutor>,
    client: Option<(Arc<str>, tokio::time::Instant)>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Conn {
        peer,
        direction,
        proxy,
        idle,
        mut shutdown,
    } = conn;
    let (client, expires) = match client {
        Some((id, at)) => (Some(id), Some(at)),
        None => (None, None),
    };
    let activity = Arc::new(Activity::default());
    activity.last_ms.store(crate::balance::now_ms(), Relaxed);
    let act = activity.clone();
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        let act = act.clone();
        let client = client.clone();
        async move {
            act.inflight.fetch_add(1, Relaxed);
            let resp = match direction {
                Direction::Outbound => proxy.outbound(req, peer.ip()).await,
                Direction::Inbound => proxy.inbound(req, peer.ip(), client).await,
            };
            act.last_ms.store(crate::balance::now_ms(), Relaxed);
            act.inflight.fetch_sub(1, Relaxed);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut closing = *shutdown.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let last = activity.last_ms.load(Relaxed);
        let idle_at = tokio::time::Instant::now()
            + (Duration::from_millis(last) + idle)
                .saturating_sub(Duration::from_millis(crate::balance::now_ms()));
        tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep_until(expires.unwrap_or(idle_at)), if !closing && expires.is_some() => {
                debug!(%peer, "closing an mTLS connection whose certificates expire");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep_until(idle_at), if !closing => {
                let quiet = crate::balance::now_ms().saturating_sub(activity.last_ms.load(Relaxed));
                if activity.inflight.load(Relaxed) == 0 && quiet >= idle.as_millis() as u64 {
                    debug!("closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// A stream that counts the bytes read from and written to it.
struct Counted {
    io: TcpStream,
    bytes: prometheus_client::metrics::counter::Counter,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        self.bytes.inc_by((buf.filled().len() - before) as u64);
        r
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.bytes.inc_by(n as u64);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
