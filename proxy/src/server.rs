//! Listeners: accept, bound, serve, drain. What a connection carries is
//! decided per connection (`outbound.rs`, `inbound.rs`); HTTP is served
//! here, HTTP/1.1 and h2c on one port (hyper-util's auto builder reads the
//! preface). Every HTTP connection watches two signals: shutdown (drain
//! gracefully) and idleness (close a keep-alive connection nobody uses).

use crate::cluster::Cluster;
use crate::metrics::{ListenerLabels, Metrics};
use crate::proxy::{Direction, Proxy};
use crate::tunnel::ConnCtx;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
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
    /// How long the first bytes of an undeclared port may take to say
    /// what the client speaks (then: opaque).
    pub detect_timeout: Duration,
    /// An opaque connection with no byte either way for this long is cut.
    pub tcp_idle_timeout: Duration,
    /// Time to open a connection to the local app or a passthrough address.
    pub connect_timeout: Duration,
}

/// Shared by every listener: the shutdown signal and the connections to
/// wait for when draining.
#[derive(Clone)]
pub struct Lifecycle {
    pub shutdown: watch::Receiver<bool>,
    pub tracker: TaskTracker,
}

/// What serving one connection needs.
pub(crate) struct Listener {
    pub builder: auto::Builder<TokioExecutor>,
    pub limits: ServerLimits,
}

/// HTTP/2 memory per client connection. What one client can pin here, by
/// not reading or by sending faster than its upstream reads, is at most:
///
/// - what it sent that no upstream has taken yet: the connection window,
///   `H2_CONN_WINDOW` (1 MiB);
/// - what is queued for it that it does not read: `H2_SEND_BUDGET` (4 MiB)
///   split across its streams (`h2_send_buf`), plus the body chunk each
///   stream is handing over;
/// - request heads waiting to be served: `--max-concurrent-streams` ×
///   `--max-header-bytes` at worst.
///
/// hyper's defaults were 1 MiB windows and 400 KiB of send buffer per
/// stream: 100 MiB for one client that stops reading with 256 streams.
///
/// The stream window is the spec's default: a stream whose upstream stalls
/// holds at most 1/16 of the connection window, so a few stuck uploads do
/// not stall the client's other streams, and a stream still moves about
/// 128 MB/s at a 0.5 ms round trip.
const H2_STREAM_WINDOW: u32 = 65_535;
const H2_CONN_WINDOW: u32 = 1024 * 1024;
const H2_SEND_BUDGET: usize = 4 * 1024 * 1024;
/// A stream's send buffer: never less than one DATA frame at the default
/// SETTINGS_MAX_FRAME_SIZE (what keeps a stream moving), never more than
/// hyper's default.
const H2_MIN_SEND_BUF: usize = 16 * 1024;
const H2_MAX_SEND_BUF: usize = 400 * 1024;
/// Streams a client may open and reset before they are served (rapid
/// reset; h2's default), and resets its protocol errors may force on us
/// (MadeYouReset) before the connection is closed with GOAWAY.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESETS: usize = 128;

/// Per-stream send buffer: `H2_SEND_BUDGET` over the streams a client may
/// have open (16 KiB each with the default 256 streams).
fn h2_send_buf(max_streams: u32) -> usize {
    (H2_SEND_BUDGET / max_streams.max(1) as usize).clamp(H2_MIN_SEND_BUF, H2_MAX_SEND_BUF)
}

fn http_builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper gives every HTTP/1 connection an 8 KiB write buffer and a read
    // buffer of at least 8 KiB, kept for its whole life, and neither can be
    // made smaller here (see BENCHMARKS.md, "Per-connection memory").
    // max_buf_size bounds how far the read buffer grows (the largest request
    // head) and how many response bytes may wait for a slow client.
    // writev: response bodies are queued as they are, never copied into the
    // write buffer, which would keep the size of the largest response it
    // ever held (hyper's choice when an I/O type says it cannot writev).
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .writev(true)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_send_buf_size(h2_send_buf(limits.max_concurrent_streams))
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Accepts until shutdown; then closes the listener (new connections are
/// refused) and leaves open ones to drain. `handle` serves each connection:
/// `outbound::serve` (from the local app) and `inbound::serve` (from the
/// mesh) pass theirs, so this module depends on neither.
pub(crate) async fn serve<H, Fut>(
    listener: TcpListener,
    name: &'static str,
    direction: Direction,
    proxy: Arc<Proxy>,
    limits: ServerLimits,
    life: Lifecycle,
    handle: H,
) where
    H: Fn(TcpStream, Conn, Arc<Listener>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let shared = Arc::new(Listener {
        builder: http_builder(&limits),
        limits: limits.clone(),
    });
    accept_loop(
        listener,
        name,
        &proxy.metrics.clone(),
        &limits,
        life.clone(),
        move |stream, peer| {
            let (proxy, shared, shutdown) = (proxy.clone(), shared.clone(), life.shutdown.clone());
            let conn = Conn {
                peer,
                direction,
                proxy,
                idle: shared.limits.idle_timeout,
                shutdown,
                dst: None,
                app: None,
            };
            handle(stream, conn, shared)
        },
    )
    .await
}

/// One accepted connection's context.
pub(crate) struct Conn {
    pub peer: SocketAddr,
    pub direction: Direction,
    pub proxy: Arc<Proxy>,
    pub idle: Duration,
    pub shutdown: watch::Receiver<bool>,
    /// Outbound: where the app meant to go (an intercepted connection).
    pub dst: Option<SocketAddr>,
    /// Inbound: the local app port the connection is for.
    pub app: Option<Arc<Cluster>>,
}

/// Where a connection redirected by the pod's iptables rules was going
/// (SO_ORIGINAL_DST); `None` when it was addressed to the listener itself.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let sock = socket2::SockRef::from(stream);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let orig = orig.ok()?.as_socket()?;
    (orig != local).then_some(orig)
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
pub(crate) async fn serve_http_conn<S>(
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
        dst,
        app,
    } = conn;
    let (client, expires) = match client {
        Some((id, at)) => (Some(id), Some(at)),
        None => (None, None),
    };
    let activity = Arc::new(Activity::default());
    activity.last_ms.store(crate::balance::now_ms(), Relaxed);
    let act = activity.clone();
    // Upgraded connections (tunnels) stay part of this one: its task waits
    // for them, so they keep its place under the connection cap and are
    // waited for when draining.
    let ctx = ConnCtx {
        tunnels: TaskTracker::new(),
        expires,
        idle: proxy.stream_idle,
    };
    let tunnels = ctx.tunnels.clone();
    let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let act = act.clone();
        let client = client.clone();
        let app = app.clone();
        req.extensions_mut().insert(ctx.clone());
        // Boxed: hyper keeps a slot for the service's future for the
        // connection's whole life, sized to the future (~11 KiB for the
        // proxy's request path). A box per request costs an allocation; an
        // idle connection then costs 16 bytes here.
        let fut: Pin<Box<dyn Future<Output = Result<_, Infallible>> + Send>> =
            Box::pin(async move {
                act.inflight.fetch_add(1, Relaxed);
                let resp = match (direction, app) {
                    (Direction::Inbound, Some(app)) => {
                        proxy.inbound(req, peer.ip(), client, app).await
                    }
                    _ => proxy.outbound(req, peer.ip(), dst).await,
                };
                act.last_ms.store(crate::balance::now_ms(), Relaxed);
                act.inflight.fetch_sub(1, Relaxed);
                Ok::<_, Infallible>(resp)
            });
        fut
    });
    // Boxed too: the connection's state (~17 KiB: hyper's HTTP/1 and
    // HTTP/2 machinery) would otherwise sit inline in the connection's task,
    // which is sized for its largest phase, so every phase (detection, TLS
    // handshake) would pay for it.
    let mut conn = Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(stream), svc));
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
                tunnels.close();
                tunnels.wait().await;
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
