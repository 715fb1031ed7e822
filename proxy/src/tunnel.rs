//! Upgraded connections (WebSocket, and protocols a route allows): after the
//! 101, the client's and the upstream's connections are spliced into a byte
//! tunnel. A tunnel is part of the connection it came from: it keeps that
//! connection's place under the listener's connection cap (the connection's
//! task waits for its tunnels), has an idle timeout, ends when the peer's
//! certificate expires, and is waited for when the proxy drains.

use crate::metrics::TcpCounters;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// What a connection lends the requests it carries (a request extension).
#[derive(Clone)]
pub struct ConnCtx {
    /// The connection's tunnels, waited for before it lets go of its
    /// permit.
    pub tunnels: TaskTracker,
    /// When the caller's certificate (mTLS) expires.
    pub expires: Option<Instant>,
    /// A tunnel with no byte either way for this long is closed.
    pub idle: Duration,
}

/// Splices the two upgraded connections, on the connection's tracker.
pub fn spawn(ctx: &ConnCtx, client: OnUpgrade, upstream: Option<OnUpgrade>, counters: TcpCounters) {
    let (idle, until) = (ctx.idle, ctx.expires);
    ctx.tunnels.spawn(async move {
        let Some(upstream) = upstream else { return };
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let ended =
                    crate::tcp::splice(TokioIo::new(c), TokioIo::new(u), idle, until, &counters)
                        .await;
                debug!(?ended, "upgraded connection ended");
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
}
