//! A connection from the mesh to the local app. Read top to bottom:
//!
//!   addressed to the inbound listener itself:
//!     a TLS handshake (and this proxy has an identity, mode not Disabled)
//!       → mTLS: the caller's SPIFFE ID; then the transport header says
//!         which app port it meant and whether HTTP or opaque bytes follow
//!     anything else → plaintext (refused in Strict mode), to the default
//!       app address
//!   redirected by the pod's iptables (a client that dialled the app port):
//!     plaintext from outside the mesh (refused in Strict mode; the app's
//!     own TLS is opaque bytes to us), to the port it dialled
//!   then, by the port's protocol: HTTP (served here, each request
//!   authorized and limited in `Proxy::inbound`), or opaque bytes (the
//!   Service's AuthorizationPolicies checked once, for the connection)
//!
//! A port's protocol is the caller's word over mTLS (its proxy saw the same
//! declaration or detected it), else the local Service's declaration, else
//! detected from the first bytes.

use crate::app::AppTarget;
use crate::cluster::Protocol;
use crate::detect::{detect, Detected};
use crate::metrics::AuthzLabels;
use crate::proxy::{Direction, Proxy};
use crate::server::{original_dst, serve_http_conn, Conn, Lifecycle, Listener, ServerLimits};
use crate::tcp;
use crate::tls::MtlsMode;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

const LISTENER: &str = "inbound";

/// Serves the inbound listener until shutdown.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: ServerLimits,
    life: Lifecycle,
) {
    let handle = |stream, conn, l: Arc<Listener>| async move { connection(stream, conn, &l).await };
    crate::server::serve(
        listener,
        "inbound",
        Direction::Inbound,
        proxy,
        limits,
        life,
        handle,
    )
    .await
}

pub(crate) async fn connection(stream: TcpStream, conn: Conn, l: &Listener) {
    let local_ip = match stream.local_addr() {
        Ok(a) => a.ip(),
        Err(_) => return,
    };
    let redirected = original_dst(&stream);
    let proxy = conn.proxy.clone();
    let mode = match &proxy.tls {
        Some(_) => proxy.runtime.load().local.mode,
        None => MtlsMode::Disabled,
    };
    let peer = conn.peer;
    if let (Some(tls), None, MtlsMode::Strict | MtlsMode::Permissive) =
        (&proxy.tls, redirected, mode)
    {
        // A TLS record starts with 0x16 (handshake); HTTP/1 starts with a
        // method and h2c with "PRI".
        let mut first = [0u8; 1];
        let is_tls =
            match tokio::time::timeout(l.limits.header_read_timeout, stream.peek(&mut first)).await
            {
                Ok(Ok(1)) => first[0] == 0x16,
                Ok(_) => return,
                Err(_) => return debug!(%peer, "closed a connection that sent nothing"),
            };
        if is_tls {
            let tls = tls.clone();
            return match tls.accept(stream).await {
                Ok((s, client)) => mtls(s, conn, client, local_ip, l).await,
                Err(e) => info!(%peer, error = %e, "mTLS handshake refused"),
            };
        }
    }
    if mode == MtlsMode::Strict {
        proxy.metrics.plaintext_refused.inc();
        return info!(%peer, redirected = ?redirected, "plaintext connection refused: this Service's mTLS mode is Strict");
    }
    let (port, ip) = match redirected {
        Some(d) => (Some(d.port()), d.ip()),
        None => (None, local_ip),
    };
    plaintext(stream, conn, port, ip, l).await
}

/// The port's declared protocol in the local Service, if any.
fn declared(conn: &Conn, port: Option<u16>) -> Option<Protocol> {
    let port = port?;
    conn.proxy.runtime.load().local.ports.get(&port).copied()
}

/// After the handshake: the transport header, then HTTP or bytes, with the
/// caller's identity.
async fn mtls<S>(io: S, mut conn: Conn, client: crate::tls::Peer, local_ip: IpAddr, l: &Listener)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    debug!(%peer, client = %client.id, "mTLS connection");
    let left = client
        .expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let until = Instant::now() + left;
    let (header, io) = match crate::transport::read(io, l.limits.header_read_timeout).await {
        Ok(h) => h,
        Err(e) => {
            return info!(%peer, client = %client.id, error = %e, "mTLS connection closed: bad transport header")
        }
    };
    let port = header.as_ref().map(|h| h.port as u16);
    let target = conn.proxy.app.target(port, local_ip, declared(&conn, port));
    let opaque = match &header {
        Some(h) => h.protocol == crate::transport::OPAQUE,
        None => target.protocol == Protocol::Tcp,
    };
    if opaque {
        return to_app(io, &conn, target, Some(&client.id), Some(until), l).await;
    }
    let target = AppTarget {
        protocol: match target.protocol {
            Protocol::Tcp => Protocol::Detect,
            p => p,
        },
        ..target
    };
    conn.app = Some(conn.proxy.app.cluster(target));
    serve_http_conn(io, conn, &l.builder, Some((client.id, until))).await
}

/// A plaintext connection (Permissive or Disabled, or no identity).
async fn plaintext(
    mut stream: TcpStream,
    mut conn: Conn,
    port: Option<u16>,
    ip: IpAddr,
    l: &Listener,
) {
    let target = conn.proxy.app.target(port, ip, declared(&conn, port));
    let metrics = conn.proxy.metrics.clone();
    match target.protocol {
        Protocol::Tcp => {
            metrics.detected(LISTENER, "declared");
            to_app(stream, &conn, target, None, None, l).await
        }
        Protocol::Detect => {
            let (found, prefix) = detect(&mut stream, l.limits.detect_timeout).await;
            metrics.detected(LISTENER, found.as_str());
            let io = crate::detect::Prefixed::new(prefix, stream);
            match found {
                Detected::Http1 | Detected::Http2 => {
                    conn.app = Some(conn.proxy.app.cluster(target));
                    serve_http_conn(io, conn, &l.builder, None).await
                }
                Detected::Closed => {}
                Detected::Tls | Detected::Opaque | Detected::Timeout => {
                    to_app(io, &conn, target, None, None, l).await
                }
            }
        }
        Protocol::Http1 | Protocol::Http2 | Protocol::Grpc => {
            metrics.detected(LISTENER, "declared");
            conn.app = Some(conn.proxy.app.cluster(target));
            serve_http_conn(stream, conn, &l.builder, None).await
        }
    }
}

/// Opaque bytes to the app, once the local Service's AuthorizationPolicies
/// allow the caller (route rules have nothing to match on bytes).
async fn to_app<S>(
    io: S,
    conn: &Conn,
    target: AppTarget,
    client: Option<&Arc<str>>,
    until: Option<Instant>,
    l: &Listener,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let proxy = &conn.proxy;
    let peer = conn.peer;
    let client_id = client.map(|c| &**c);
    let rt = proxy.runtime.load();
    // Fails closed, as HTTP does: no config yet means no policies yet, and
    // a proxy with an identity serves only while it has a certificate.
    if let Some(tls) = &proxy.tls {
        if rt.version.is_empty() || tls.store().current().is_none() {
            proxy.metrics.error(LISTENER, "not-ready");
            return info!(%peer, "opaque connection refused: no config or no certificate yet");
        }
    }
    let decision = rt
        .local
        .authz
        .as_ref()
        .map(|a| a.check_connection(client_id).map(|t| t.map(str::to_string)));
    drop(rt);
    let count = |target: String, result| {
        proxy
            .metrics
            .authz_decisions
            .get_or_create(&AuthzLabels { target, result })
            .inc();
    };
    match decision {
        Some(Err(denied)) => {
            count(denied.target.clone(), "denied");
            proxy.metrics.error(LISTENER, "forbidden");
            return info!(client = %client_id.unwrap_or("-"), %peer, port = target.addr.port(),
                policy_target = %denied.target, "connection denied by authorization policy");
        }
        Some(Ok(Some(t))) => count(t, "allowed"),
        _ => {}
    }
    let upstream = match tcp::connect(target.addr, l.limits.connect_timeout).await {
        Ok(s) => s,
        Err(error) => {
            proxy.metrics.error(LISTENER, "tcp_connect");
            return warn!(%peer, app = %target.addr, %error, "opaque connection to the app failed");
        }
    };
    let counters = proxy.metrics.tcp(LISTENER, &app_label(target.addr));
    let ended = tcp::splice(io, upstream, l.limits.tcp_idle_timeout, until, &counters).await;
    debug!(%peer, app = %target.addr, ?ended, "opaque connection closed");
}

fn app_label(addr: SocketAddr) -> String {
    format!("app:{}", addr.port())
}
