//! Upstream connections. hyper-util's pooling client does keep-alive and
//! HTTP/2 multiplexing; this module bounds it: a per-backend semaphore caps
//! open connections (the permit lives inside the connection and is released
//! when it closes), and an in-flight cap turns excess load into a clear 503
//! instead of an unbounded queue.

use crate::body::Body;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits and timeouts for one backend's connections.
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_pending: usize,
}

/// Streams allowed per HTTP/2 connection when sizing the in-flight cap.
const H2_STREAMS_PER_CONN: usize = 100;

/// The connection pool of one backend.
pub struct Pool {
    pub client: Client<Connector, Body>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
}

impl Pool {
    pub fn new(cfg: PoolConfig, http2: bool) -> Pool {
        let connector = Connector {
            connect_timeout: cfg.connect_timeout,
            permits: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cfg.idle_timeout)
            .pool_max_idle_per_host(cfg.max_connections)
            .http2_only(http2);
        let per_conn = if http2 { H2_STREAMS_PER_CONN } else { 1 };
        Pool {
            client: b.build(connector),
            inflight: Arc::new(AtomicUsize::new(0)),
            max_inflight: cfg.max_connections.max(1) * per_conn + cfg.max_pending,
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
}

/// One admitted request; releases its place when dropped.
pub struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Opens TCP connections to `http://ip:port` URIs, at most
/// `max_connections` at once per backend.
#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
    permits: Arc<Semaphore>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = PooledConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<PooledConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let permits = self.permits.clone();
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an ip:port"))?;
            let permit = permits.acquire_owned().await?;
            let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = stream.set_nodelay(true);
            Ok(PooledConn {
                io: TokioIo::new(stream),
                _permit: permit,
            })
        })
    }
}

/// An upstream connection holding its place under the connection cap.
pub struct PooledConn {
    io: TokioIo<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl Connection for PooledConn {
    fn connected(&self) -> Connected {
        Connected::new()
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
