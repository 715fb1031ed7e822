//! A connection from the local app. Read top to bottom:
//!
//!   addressed to the outbound listener itself → HTTP, routed by Host
//!   redirected by the pod's iptables → its original destination picks the
//!   Service port (a virtual IP, or an endpoint's address):
//!     none            → the mesh's outbound policy: AllowAny forwards the
//!                       bytes to where the app meant to go, RegistryOnly
//!                       refuses
//!     declared tcp    → opaque bytes to the Service's endpoints
//!     declared HTTP   → HTTP (routed by Host, else by that Service port)
//!     undeclared      → the first bytes decide: HTTP, or opaque bytes

use crate::cluster::{Cluster, Protocol};
use crate::detect::{detect, Detected, Prefixed};
use crate::metrics::ResultLabels;
use crate::proxy::{Direction, Proxy};
use crate::runtime::OutboundPolicy;
use crate::server::{original_dst, serve_http_conn, Conn, Lifecycle, Listener, ServerLimits};
use crate::tcp;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

const LISTENER: &str = "outbound";

/// Serves the outbound listener until shutdown.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: ServerLimits,
    life: Lifecycle,
) {
    let handle = |stream, conn, l: Arc<Listener>| async move { connection(stream, conn, &l).await };
    crate::server::serve(
        listener,
        "outbound",
        Direction::Outbound,
        proxy,
        limits,
        life,
        handle,
    )
    .await
}

pub(crate) async fn connection(stream: TcpStream, mut conn: Conn, l: &Listener) {
    let Some(dst) = original_dst(&stream) else {
        return serve_http_conn(stream, conn, &l.builder, None).await;
    };
    let proxy = conn.proxy.clone();
    let found = {
        let rt = proxy.runtime.load();
        match rt.routes.destination(&dst) {
            Some(port) => Ok(port.cluster.clone()),
            None => Err(rt.outbound_policy),
        }
    };
    let cluster = match found {
        Ok(c) => c,
        Err(policy) => return unknown_destination(stream, dst, &conn, policy, l).await,
    };
    conn.dst = Some(dst);
    match cluster.protocol {
        Protocol::Tcp => {
            proxy.metrics.detected(LISTENER, "declared");
            opaque(stream, &cluster, &conn, l).await
        }
        Protocol::Detect => {
            let mut stream = stream;
            let (found, prefix) = detect(&mut stream, l.limits.detect_timeout).await;
            proxy.metrics.detected(LISTENER, found.as_str());
            let io = Prefixed::new(prefix, stream);
            match found {
                Detected::Http1 | Detected::Http2 => {
                    serve_http_conn(io, conn, &l.builder, None).await
                }
                Detected::Closed => {}
                Detected::Tls | Detected::Opaque | Detected::Timeout => {
                    opaque(io, &cluster, &conn, l).await
                }
            }
        }
        Protocol::Http1 | Protocol::Http2 | Protocol::Grpc => {
            proxy.metrics.detected(LISTENER, "declared");
            serve_http_conn(stream, conn, &l.builder, None).await
        }
    }
}

/// Opaque bytes to one endpoint of the Service port: over mTLS to a meshed
/// one (the peer proxy checks who we are; we check who it is).
async fn opaque<S>(io: S, cluster: &Arc<Cluster>, conn: &Conn, l: &Listener)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &conn.proxy.metrics;
    let peer = conn.peer;
    let (upstream, endpoint) = match tcp::connect_cluster(cluster).await {
        Ok(c) => c,
        Err((endpoint, error)) => {
            metrics.error(LISTENER, "tcp_connect");
            return warn!(%peer, backend = %cluster.id, %endpoint, %error, "opaque connection: no endpoint could be reached");
        }
    };
    let counters = metrics.tcp(LISTENER, &cluster.id);
    let ended = tcp::splice(
        io,
        upstream.stream,
        l.limits.tcp_idle_timeout,
        None,
        &counters,
    )
    .await;
    debug!(%peer, backend = %cluster.id, %endpoint, ?ended, "opaque connection closed");
}

/// A connection to an address that belongs to no Service.
async fn unknown_destination(
    stream: TcpStream,
    dst: SocketAddr,
    conn: &Conn,
    policy: OutboundPolicy,
    l: &Listener,
) {
    let metrics = &conn.proxy.metrics;
    let count = |result| {
        metrics
            .unknown_destinations
            .get_or_create(&ResultLabels { result })
            .inc()
    };
    let peer = conn.peer;
    match policy {
        OutboundPolicy::RegistryOnly => {
            count("refused");
            info!(%peer, %dst, "connection refused: the destination is no Service of the mesh (outboundTrafficPolicy RegistryOnly)");
        }
        OutboundPolicy::AllowAny => {
            count("passthrough");
            debug!(%peer, %dst, "passthrough: the destination is no Service of the mesh");
            let upstream = match tcp::connect(dst, l.limits.connect_timeout).await {
                Ok(s) => s,
                Err(error) => {
                    metrics.error(LISTENER, "tcp_connect");
                    return debug!(%peer, %dst, %error, "passthrough connect failed");
                }
            };
            let counters = metrics.tcp(LISTENER, "passthrough");
            let ended =
                tcp::splice(stream, upstream, l.limits.tcp_idle_timeout, None, &counters).await;
            debug!(%peer, %dst, ?ended, "passthrough connection closed");
        }
    }
}
