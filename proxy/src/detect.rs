//! Protocol detection: what a client speaks, from its first bytes.
//!
//! With interception, the app's connections reach the proxy whatever they
//! carry. The first bytes tell HTTP/1 (a method and a space), HTTP/2 with
//! prior knowledge (the connection preface), the app's own TLS (a
//! handshake record, forwarded as opaque bytes: the app's TLS is never
//! terminated) or anything else (opaque TCP). A client that says nothing
//! within the timeout may be waiting for a server-first protocol to speak:
//! it is opaque too. The bytes read are replayed to whoever serves the
//! connection (`Prefixed`).

use bytes::{Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What the first bytes said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// A TLS handshake from the app: opaque to the proxy.
    Tls,
    /// Bytes that are not HTTP.
    Opaque,
    /// Nothing within the timeout (a server-first protocol?): opaque.
    Timeout,
    /// The client closed before sending anything.
    Closed,
}

impl Detected {
    pub fn as_str(self) -> &'static str {
        match self {
            Detected::Http1 => "http1",
            Detected::Http2 => "http2",
            Detected::Tls => "tls",
            Detected::Opaque => "opaque",
            Detected::Timeout => "timeout",
            Detected::Closed => "closed",
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Detected::Http1 | Detected::Http2)
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token taken for HTTP/1 (longer ones are not HTTP).
const MAX_METHOD: usize = 24;
/// Enough bytes to decide in every case.
const MAX_PEEK: usize = 32;

/// Classifies the first bytes; `None` while more are needed to tell.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    let first = *buf.first()?;
    if first == 0x16 {
        return Some(Detected::Tls);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        // The preface's "PRI " also reads as an HTTP/1 method: wait for
        // the whole preface, which an HTTP/2 client sends at once.
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    // HTTP/1: a method token (RFC 9110 tchar), a space, then the target:
    // "/", "*", an absolute URI, or an authority for CONNECT.
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        if b == b' ' {
            return match (i, &buf[i + 1..]) {
                (0, _) => Some(Detected::Opaque),
                (_, []) => None,
                (_, [b'/' | b'*', ..]) => Some(Detected::Http1),
                _ if &buf[..i] == b"CONNECT" => Some(Detected::Http1),
                (_, target) => absolute_uri(target),
            };
        }
        if !is_tchar(b) {
            return Some(Detected::Opaque);
        }
    }
    if buf.len() <= MAX_METHOD {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Whether a request target starts like `http://` or `https://`.
fn absolute_uri(target: &[u8]) -> Option<Detected> {
    for scheme in [&b"http://"[..], b"https://"] {
        let n = target.len().min(scheme.len());
        if target[..n].eq_ignore_ascii_case(&scheme[..n]) {
            return (n == scheme.len()).then_some(Detected::Http1);
        }
    }
    Some(Detected::Opaque)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads from `io` until the first bytes tell what it speaks, the client
/// closes, or `timeout` passes. Returns the verdict and the bytes read,
/// which must be replayed (`Prefixed`).
pub async fn detect<S: AsyncRead + Unpin>(io: &mut S, timeout: Duration) -> (Detected, Bytes) {
    let mut buf = BytesMut::with_capacity(MAX_PEEK);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(&buf) {
            return (d, buf.freeze());
        }
        if buf.len() >= MAX_PEEK {
            return (Detected::Opaque, buf.freeze());
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => {
                let d = if buf.is_empty() {
                    Detected::Timeout
                } else {
                    Detected::Opaque
                };
                return (d, buf.freeze());
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                let d = if buf.is_empty() {
                    Detected::Closed
                } else {
                    Detected::Opaque
                };
                return (d, buf.freeze());
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// A stream whose first reads return bytes already read from it.
pub struct Prefixed<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, io: S) -> Prefixed<S> {
        Prefixed { prefix, io }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
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

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST http://a/ HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Detected::Tls));
        assert_eq!(classify(b"\x00\x01binary"), Some(Detected::Opaque));
        assert_eq!(classify(b"CONNECT a:443 HTTP/1.1"), Some(Detected::Http1));
        // A text protocol that is not HTTP (SMTP's client greeting).
        assert_eq!(classify(b"HELO example\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"GET h"), None);
        assert_eq!(classify(b"ping\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b" GET"), Some(Detected::Opaque));
        assert_eq!(classify(b"GET  /"), Some(Detected::Opaque));
        // Not enough yet.
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET "), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        // A token longer than any method is not HTTP.
        assert_eq!(classify(&[b'A'; 30]), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn detects_across_reads_and_replays_the_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let t = tokio::spawn(async move {
            client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
            client.write_all(b"\r\nSM\r\n\r\nrest").await.unwrap();
            client
        });
        let (d, prefix) = detect(&mut server, Duration::from_secs(5)).await;
        assert_eq!(d, Detected::Http2);
        let _client = t.await.unwrap();
        let mut p = Prefixed::new(prefix, server);
        let mut got = vec![0u8; H2_PREFACE.len()];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(got, H2_PREFACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out_as_opaque() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (d, prefix) = detect(&mut server, Duration::from_millis(300)).await;
        assert_eq!(d, Detected::Timeout);
        assert!(prefix.is_empty());
    }

    #[tokio::test]
    async fn a_closed_client_is_closed() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let (d, _) = detect(&mut server, Duration::from_secs(5)).await;
        assert_eq!(d, Detected::Closed);
    }
}
