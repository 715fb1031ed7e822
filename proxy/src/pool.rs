//! Upstream connections. hyper-util's pooling client does keep-alive and
//! HTTP/2 multiplexing; this module bounds it: a per-backend semaphore caps
//! open connections (the permit lives inside the connection and is released
//! when it closes), and an in-flight cap turns excess load into a clear 503
//! instead of an unbounded queue.
//!
//! Endpoints fronted by a Remora proxy are addressed `https://ip:port`: the
//! connector originates mTLS to them and checks the peer's SPIFFE ID, and
//! ALPN settles on HTTP/2, so a few long-lived connections carry every
//! request between two proxies.

use crate::body::Body;
use crate::tls::{Alpn, MeshTls};
use crate::transport::TransportHeader;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits and timeouts for one backend's connections.
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    /// Longest a request waits for a connection when the backend is at its
    /// connection cap.
    pub pending_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_pending: usize,
}

/// The identity a backend's meshed endpoints must present, and the port
/// on those workloads that the transport header names.
#[derive(Clone)]
pub struct ClusterTls {
    pub mesh: Arc<MeshTls>,
    pub namespace: String,
    pub service_account: String,
    /// The Service port's targetPort: the app port behind the peer proxy.
    pub app_port: u16,
}

impl ClusterTls {
    fn same(&self, other: &ClusterTls) -> bool {
        Arc::ptr_eq(&self.mesh, &other.mesh)
            && self.namespace == other.namespace
            && self.service_account == other.service_account
            && self.app_port == other.app_port
    }
}

/// Streams allowed per HTTP/2 connection when sizing the in-flight cap.
const H2_STREAMS_PER_CONN: usize = 100;

/// The connection pool of one backend.
pub struct Pool {
    pub client: Client<Connector, Body>,
    /// For Upgrade requests (WebSocket) to mTLS endpoints: HTTP/1.1 over
    /// mTLS, since an HTTP/2 connection cannot carry an HTTP/1.1 upgrade.
    pub upgrade_client: Option<Client<Connector, Body>>,
    /// A port whose protocol is detected keeps the caller's HTTP version:
    /// its HTTP/2 requests to plaintext endpoints go through this h2c
    /// client, made on first use.
    h2c_client: OnceLock<Client<Connector, Body>>,
    connector: Connector,
    cfg: PoolConfig,
    tls: Option<ClusterTls>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
}

/// HTTP/2 pings on upstream connections, and how long an answer may take:
/// a black-holed peer is noticed without waiting for a request to time out.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive on upstream connections (also for opaque TCP).
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Upstream HTTP/2 memory. A response whose downstream client stops
/// reading holds at most its stream window here (the spec's 64 KiB; hyper's
/// default was 2 MiB). The connection window bounds what one upstream
/// connection holds in all, and the connection is shared by every client's
/// requests: at 4 MiB it takes 64 such stuck responses, not 3 (hyper's
/// 5 MiB / 2 MiB), before it stalls for everyone (pools count on 100
/// streams a connection).
const UPSTREAM_H2_STREAM_WINDOW: u32 = 65_535;
const UPSTREAM_H2_CONN_WINDOW: u32 = 4 * 1024 * 1024;
/// Request body bytes queued per stream for an upstream that does not read
/// (hyper's default: 1 MiB); past it the downstream is not read either.
const UPSTREAM_H2_SEND_BUF: usize = 64 * 1024;
/// How far an upstream HTTP/1 connection's read buffer may grow (hyper's
/// default: about 400 KiB), and so the largest body chunk it hands over:
/// a response whose client stops reading holds both (32 KiB, not 800),
/// and the buffer keeps its size while the connection idles in the pool.
/// It is also the largest response head accepted: HAProxy's default
/// buffer is the same, nginx's (proxy_buffer_size) 4-8 KiB.
const UPSTREAM_H1_MAX_BUF: usize = 16 * 1024;

fn client_builder(cfg: &PoolConfig) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(cfg.idle_timeout)
        .pool_max_idle_per_host(cfg.max_connections)
        .http1_max_buf_size(UPSTREAM_H1_MAX_BUF)
        .http2_initial_stream_window_size(UPSTREAM_H2_STREAM_WINDOW)
        .http2_initial_connection_window_size(UPSTREAM_H2_CONN_WINDOW)
        .http2_max_send_buf_size(UPSTREAM_H2_SEND_BUF)
        .http2_keep_alive_interval(H2_KEEPALIVE)
        .http2_keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true);
    b
}

impl Pool {
    pub fn new(cfg: PoolConfig, http2: bool, tls: Option<ClusterTls>) -> Pool {
        let connector = Connector {
            connect_timeout: cfg.connect_timeout,
            pending_timeout: cfg.pending_timeout,
            permits: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
            tls: tls.clone(),
            alpn: Alpn::H2,
        };
        let mut b = client_builder(&cfg);
        // Upgrades share the connection cap.
        let upgrade_client = tls.is_some().then(|| {
            b.build(Connector {
                alpn: Alpn::Http1,
                ..connector.clone()
            })
        });
        b.http2_only(http2);
        let per_conn = if http2 { H2_STREAMS_PER_CONN } else { 1 };
        Pool {
            upgrade_client,
            client: b.build(connector.clone()),
            h2c_client: OnceLock::new(),
            connector,
            cfg,
            tls,
            inflight: Arc::new(AtomicUsize::new(0)),
            max_inflight: cfg.max_connections.max(1) * per_conn + cfg.max_pending,
        }
    }

    /// The h2c client for HTTP/2 requests to a port whose protocol is
    /// detected (see `h2c_client`).
    pub fn h2c_client(&self) -> &Client<Connector, Body> {
        self.h2c_client.get_or_init(|| {
            let mut b = client_builder(&self.cfg);
            b.http2_only(true);
            b.build(self.connector.clone())
        })
    }

    /// Whether this pool checks the same identity as `tls` would.
    pub fn same_tls(&self, tls: Option<&ClusterTls>) -> bool {
        match (&self.tls, tls) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same(b),
            _ => false,
        }
    }

    /// Admits one more request, or `None` when the backend is over its
    /// connection plus pending limits.
    pub fn admit(&self) -> Option<Admitted> {
        let prev = self.inflight.fetch_add(1, Relaxed);
        if prev >= self.max_inflight {
            self.inflight.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Admitted(self.inflight.clone()))
    }

    /// Opens a connection for opaque bytes: plain TCP, or mTLS with a
    /// transport header that says opaque bytes follow. It counts under the
    /// backend's connection cap like an HTTP connection.
    pub async fn connect_opaque(
        &self,
        addr: SocketAddr,
        tls: bool,
    ) -> Result<PooledConn, BoxError> {
        let c = Connector {
            alpn: Alpn::None,
            ..self.connector.clone()
        };
        c.open(addr, tls.then(|| c.tls.clone())).await
    }
}

/// One admitted request; releases its place when dropped.
pub struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Opens TCP connections to `http://ip:port` URIs, and mTLS ones to
/// `https://ip:port`, at most `max_connections` at once per backend.
#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
    /// Longest wait for a place under the connection cap.
    pending_timeout: Duration,
    permits: Arc<Semaphore>,
    tls: Option<ClusterTls>,
    /// What an mTLS connection offers: h2, HTTP/1.1 (the upgrade client),
    /// or nothing (opaque bytes).
    alpn: Alpn,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No connection slot came free in time: the backend is at
/// `--upstream-max-connections` (answered 503, like an overflow).
#[derive(Debug, thiserror::Error)]
#[error("no connection to the backend came free within {0:?} (--upstream-max-connections)")]
pub struct SlotTimeout(pub Duration);

impl Connector {
    /// TCP to `addr` under the connection cap; with `tls`, mTLS to the peer
    /// proxy, which must prove the Service's identity, and the transport
    /// header naming the app port and what follows.
    async fn open(
        &self,
        addr: SocketAddr,
        tls: Option<Option<ClusterTls>>,
    ) -> Result<PooledConn, BoxError> {
        // Waiting for a place under the connection cap is bounded too.
        let permit =
            tokio::time::timeout(self.pending_timeout, self.permits.clone().acquire_owned())
                .await
                .map_err(|_| SlotTimeout(self.pending_timeout))??;
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE)
            .with_interval(TCP_KEEPALIVE / 3)
            .with_retries(3);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let io = match tls {
            None => Stream::Plain(stream),
            Some(None) => return Err("an mTLS endpoint, but this proxy has no identity".into()),
            Some(Some(t)) => {
                let expect = t
                    .mesh
                    .expected_id(&t.namespace, &t.service_account)
                    .ok_or("no workload certificate yet")?;
                let mut s = t.mesh.connect(stream, addr.ip(), expect, self.alpn).await?;
                let header = crate::transport::encode(&TransportHeader {
                    port: t.app_port.into(),
                    protocol: match self.alpn {
                        Alpn::None => crate::transport::OPAQUE.into(),
                        Alpn::H2 | Alpn::Http1 => String::new(),
                    },
                });
                s.write_all(&header).await?;
                Stream::Tls(Box::new(s))
            }
        };
        Ok(PooledConn {
            io: TokioIo::new(io),
            _permit: permit,
        })
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = PooledConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<PooledConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an ip:port"))?;
            let tls = (uri.scheme() == Some(&http::uri::Scheme::HTTPS)).then(|| this.tls.clone());
            this.open(addr, tls).await
        })
    }
}

/// Plaintext or mTLS to the upstream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// An upstream connection holding its place under the connection cap.
pub struct PooledConn {
    io: TokioIo<Stream>,
    _permit: OwnedSemaphorePermit,
}

impl PooledConn {
    /// The connection as a tokio stream (for opaque bytes), with its place
    /// under the cap, released when the stream is dropped.
    pub fn into_stream(self) -> (Stream, OwnedSemaphorePermit) {
        (self.io.into_inner(), self._permit)
    }
}

impl Connection for PooledConn {
    fn connected(&self) -> Connected {
        match self.io.inner() {
            Stream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                Connected::new().negotiated_h2()
            }
            _ => Connected::new(),
        }
    }
}

impl hyper::rt::Read for PooledConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
