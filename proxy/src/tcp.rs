//! Opaque TCP: connections whose bytes the proxy does not parse. Outbound
//! they go to a Service port's endpoints (over mTLS to a meshed one, with a
//! transport header saying opaque bytes follow) or, for an address of no
//! Service, straight to where the app meant to go; inbound, to the local
//! app's port. Bytes are copied both ways with half-close kept (one side's
//! EOF becomes a shutdown of the other's write side), counted as they flow,
//! and the connection is cut after `idle` without a byte either way, or at
//! `until` (when the peer's certificate expires).

use crate::cluster::Cluster;
use crate::metrics::TcpCounters;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why a spliced connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides closed.
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// The peer's credentials expired.
    Expired,
}

/// Copies between `client` and `server` until both are done, the
/// connection has been idle for `idle`, or `until` passes.
pub async fn splice<C, S>(
    client: C,
    server: S,
    idle: Duration,
    until: Option<Instant>,
    counters: &TcpCounters,
) -> io::Result<Ended>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut client = Counted {
        io: client,
        read: counters.to_server.clone(),
        written: counters.to_client.clone(),
        last: last.clone(),
        start,
    };
    let mut server = Counted {
        io: server,
        // The server side's reads were counted as the client's writes.
        read: Default::default(),
        written: Default::default(),
        last: last.clone(),
        start,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(copy);
    loop {
        let quiet_at = start + Duration::from_millis(last.load(Relaxed)) + idle;
        tokio::select! {
            r = &mut copy => return r.map(|_| Ended::Closed),
            _ = tokio::time::sleep_until(until.unwrap_or(quiet_at)), if until.is_some() => {
                return Ok(Ended::Expired);
            }
            _ = tokio::time::sleep_until(quiet_at) => {
                let quiet = start + Duration::from_millis(last.load(Relaxed)) + idle;
                if Instant::now() >= quiet {
                    return Ok(Ended::Idle);
                }
            }
        }
    }
}

/// Opens an upstream connection for opaque bytes to one endpoint of
/// `cluster` (P2C), trying another endpoint once if the first refuses.
/// Returns the stream, its place under the connection cap, and the
/// endpoint's in-flight marker (for P2C's load estimate).
pub async fn connect_cluster(
    cluster: &Cluster,
) -> Result<(ClusterConn, SocketAddr), (SocketAddr, String)> {
    let mut last = None;
    let mut error = (
        SocketAddr::from(([0, 0, 0, 0], 0)),
        "no endpoints".to_string(),
    );
    for _ in 0..2 {
        let Some(ep) = cluster.pick_avoiding(last) else {
            break;
        };
        if last == Some(ep.addr) {
            break;
        }
        last = Some(ep.addr);
        let inflight = ep.load.start_owned();
        let t0 = std::time::Instant::now();
        match cluster.pool.connect_opaque(ep.addr, ep.tls()).await {
            Ok(conn) => {
                ep.load.observe(t0.elapsed());
                ep.load.succeeded();
                let (stream, permit) = conn.into_stream();
                let conn = ClusterConn {
                    stream,
                    _permit: permit,
                    _inflight: inflight,
                };
                return Ok((conn, ep.addr));
            }
            Err(e) => {
                if ep.load.failed(&cluster.outlier, true) {
                    cluster.ejections.inc();
                }
                error = (ep.addr, e.to_string());
            }
        }
    }
    Err(error)
}

/// An upstream connection for opaque bytes, holding its place under the
/// backend's connection cap and in the endpoint's load.
pub struct ClusterConn {
    pub stream: crate::pool::Stream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _inflight: crate::balance::OwnedInflight,
}

/// Plain TCP to `addr` within `timeout`, with TCP_NODELAY.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A stream that counts bytes and notes when any moved.
struct Counted<T> {
    io: T,
    read: prometheus_client::metrics::counter::Counter,
    written: prometheus_client::metrics::counter::Counter,
    /// Milliseconds after `start` of the last byte either way.
    last: Arc<AtomicU64>,
    start: Instant,
}

impl<T> Counted<T> {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.written.inc_by(n as u64);
                self.touch();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn counters() -> TcpCounters {
        TcpCounters {
            to_server: Default::default(),
            to_client: Default::default(),
        }
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (mut app, client_side) = tokio::io::duplex(1024);
        let (server_side, mut upstream) = tokio::io::duplex(1024);
        let c = counters();
        let task = {
            let c = c.clone();
            tokio::spawn(async move {
                splice(client_side, server_side, Duration::from_secs(60), None, &c).await
            })
        };
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping", "the client's EOF reached the server");
        // The server still answers after the client's half-close.
        upstream.write_all(b"pong!").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        assert_eq!(task.await.unwrap().unwrap(), Ended::Closed);
        assert_eq!((c.to_server.get(), c.to_client.get()), (4, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_cut_and_activity_defers_it() {
        let (mut app, client_side) = tokio::io::duplex(1024);
        let (server_side, _upstream) = tokio::io::duplex(1024);
        let c = counters();
        let t0 = Instant::now();
        let task = tokio::spawn(async move {
            splice(client_side, server_side, Duration::from_secs(10), None, &c).await
        });
        tokio::time::sleep(Duration::from_secs(6)).await;
        app.write_all(b"x").await.unwrap();
        let ended = task.await.unwrap().unwrap();
        assert_eq!(ended, Ended::Idle);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(16) && took < Duration::from_secs(17),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_cuts_a_busy_connection() {
        let (_app, client_side) = tokio::io::duplex(1024);
        let (server_side, _upstream) = tokio::io::duplex(1024);
        let c = counters();
        let until = Instant::now() + Duration::from_secs(3);
        let ended = splice(
            client_side,
            server_side,
            Duration::from_secs(60),
            Some(until),
            &c,
        )
        .await
        .unwrap();
        assert_eq!(ended, Ended::Expired);
    }
}
