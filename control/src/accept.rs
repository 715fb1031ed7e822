//! Accepting client connections within a cap: past `max` open connections
//! the control plane stops accepting (the kernel's backlog holds the rest)
//! instead of taking every socket an attacker opens. Each connection holds
//! its place until it closes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

/// How long a connection may stay silent after it is accepted (and after
/// its TLS handshake): a client that never speaks must not keep its place.
/// Once HTTP/2 is up, its keep-alive pings notice a dead peer.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection holding its place under the cap.
pub struct Capped<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
    /// Until the first bytes arrive: when to give up on them.
    first: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Capped<T> {
    pub fn new(inner: T, permit: OwnedSemaphorePermit) -> Capped<T> {
        Capped {
            inner,
            _permit: permit,
            first: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
        }
    }
}

impl<T: Connected> Connected for Capped<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Capped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let Some(first) = self.first.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.first = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match first.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    debug!("closed a connection that sent nothing within {FIRST_BYTES_TIMEOUT:?}");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nothing received after the connection was accepted",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Capped<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, at most `permits` open at once, with
/// TCP_NODELAY (small ACK and snapshot frames must not wait on Nagle: a
/// 500-route apply went from 58 ms to 18 ms with it). Each accepted socket
/// goes through `then`, whose output (if any) is the connection served.
pub fn accept_loop<T, F, Fut>(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    then: F,
) -> ReceiverStream<io::Result<Capped<T>>>
where
    T: Send + 'static,
    F: Fn(TcpStream, std::net::SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<T>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let then = Arc::new(then);
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let (tx, then) = (tx.clone(), then.clone());
            // Each connection on its own task (a TLS handshake must not
            // hold up the others).
            tokio::spawn(async move {
                if let Some(conn) = then(tcp, peer).await {
                    let _ = tx.send(Ok(Capped::new(conn, permit))).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Plaintext connections within the cap.
pub fn plaintext(
    listener: TcpListener,
    max: usize,
) -> ReceiverStream<io::Result<Capped<TcpStream>>> {
    accept_loop(
        listener,
        Arc::new(Semaphore::new(max.max(1))),
        |tcp, _| async move { Some(tcp) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_sockets_have_tcp_nodelay() {
        // Without it a snapshot waits for the proxy's delayed ACK (Nagle):
        // tonic's own setting does not reach sockets accepted here.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = plaintext(listener, 4);
        let _client = TcpStream::connect(addr).await.unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        assert!(conn.inner.nodelay().unwrap());
    }
}
