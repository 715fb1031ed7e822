//! The control plane as a config source. One long-lived Discovery stream:
//! Hello (node, service, last version, this instance's endpoint), then a
//! snapshot whenever the mesh changes, each validated, compiled and swapped
//! by the same `source::apply` as a file, and answered with an ACK or a NACK.
//!
//! Static stability: the proxy never stops serving while disconnected. It
//! keeps the last snapshot it applied on disk, so a proxy restarted during
//! a control-plane outage boots from it.
//!
//! Failover: when the stream to a replica ends (connection refused or
//! reset, GOAWAY, the stream ended, the replica answered Unavailable), the
//! proxy tries the control plane's other addresses at once, one after the
//! other (`control_plane::ControlPlane::replicas`), and backs off
//! exponentially with jitter only once a whole round failed. Its Hello
//! names the version it runs, so a replica that has the same version sends
//! nothing again and counts it as ACKed.

use crate::control_plane::{endpoint, is_definitive, ControlPlane, Replica};
use crate::proxy::Proxy;
use crate::runtime::Settings;
use crate::source::{self, Input};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use remora_proto::control::discovery_client::DiscoveryClient;
use remora_proto::control::discovery_request::Kind;
use remora_proto::control::{
    Ack, Deregister, DiscoveryRequest, Hello, Instance, Register, Snapshot,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub struct DiscoveryConfig {
    /// The control plane's replicas (shared with the identity client).
    pub control_plane: Arc<ControlPlane>,
    pub node_id: String,
    /// `namespace/name` of the Service this proxy fronts, or empty.
    pub service: String,
    pub instance: Option<Instance>,
    /// Where the last-known-good snapshot is kept.
    pub state_dir: Option<PathBuf>,
    pub max_backoff: Duration,
    /// Roots (PEM) that verify an https control plane.
    pub ca_pem: Option<String>,
    /// Presented (as a bearer token) until the proxy has a workload
    /// certificate to present instead.
    pub token_file: Option<PathBuf>,
    /// The identity the token is for (namespace, service account), sent
    /// with it so a token reviewer can check the pair.
    pub identity: Option<(String, String)>,
}

const LKG_FILE: &str = "last-known-good.pb";
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// The wait after a stream that was up ends (before the next round, with
/// jitter: the proxies of a replica that died do not all arrive at once),
/// and the first backoff after a round in which no replica answered.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

impl DiscoveryConfig {
    fn lkg_path(&self) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join(LKG_FILE))
    }

    /// Applies the snapshot kept on disk, if there is a good one. Returns
    /// its version.
    pub fn boot_from_disk(&self, proxy: &Proxy, settings: &Settings) -> Option<String> {
        let path = self.lkg_path()?;
        let bytes = std::fs::read(&path).ok()?;
        let snap = match Snapshot::decode(bytes.as_slice()) {
            Ok(s) => s,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "last-known-good snapshot unreadable; ignoring it");
                return None;
            }
        };
        install_bundle(proxy, &snap.trust_bundle_pem);
        match source::apply(
            proxy,
            settings,
            Input::Encoded(snap.config),
            snap.version.clone(),
        ) {
            Ok(()) => {
                info!(version = %snap.version, path = %path.display(), "booted from the last-known-good snapshot");
                Some(snap.version)
            }
            Err(_) => None,
        }
    }
}

/// Installs the trust bundle a snapshot carries (the control plane's roots,
/// old and new during a rotation).
fn install_bundle(proxy: &Proxy, pem: &str) {
    let Some(tls) = proxy.tls.as_ref().filter(|_| !pem.is_empty()) else {
        return;
    };
    match tls.store().set_bundle(pem) {
        Ok((roots, changed)) => {
            proxy.metrics.identity_trust_roots.set(roots as i64);
            if changed {
                info!(roots, "trust bundle installed from the control plane");
            }
        }
        Err(e) => {
            warn!(error = %e, "trust bundle from the control plane refused; keeping the current one")
        }
    }
}

/// Writes the last-known-good snapshot atomically (temp file, fsync, rename).
fn save_snapshot(path: Option<PathBuf>, snap: &Snapshot) {
    let Some(path) = path else { return };
    {
        let write = || -> std::io::Result<()> {
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".{LKG_FILE}.tmp"));
            std::fs::write(&tmp, snap.encode_to_vec())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), error = %e, "could not save the last-known-good snapshot");
        }
    }
}

/// Runs until shutdown: connect to a replica, stream, and on its loss move
/// to the next.
pub async fn run(
    cfg: DiscoveryConfig,
    proxy: Arc<Proxy>,
    settings: Settings,
    ready: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
    mut last_version: String,
) {
    let mut link = Link {
        failovers: proxy.metrics.control_plane_failovers("discovery"),
        last: None,
        up: false,
    };
    let mut backoff = FIRST_BACKOFF;
    // The replica whose stream ended last: tried last in the next round.
    let mut lost: Option<SocketAddr> = None;
    loop {
        let replicas = cfg.control_plane.replicas(lost).await;
        let mut was_up = false;
        for (i, replica) in replicas.iter().enumerate() {
            link.up = false;
            let result = session(
                &cfg,
                replica,
                &proxy,
                &settings,
                &ready,
                &mut shutdown,
                &mut last_version,
                &mut link,
            )
            .await;
            proxy.metrics.control_plane_down();
            if *shutdown.borrow() {
                return;
            }
            cfg.control_plane.failed(replica);
            let running = proxy.runtime.load().version.clone();
            let next = replicas.get(i + 1).filter(|_| !link.up);
            let next = next.map(|r| r.addr.to_string()).unwrap_or_default();
            let definitive = match &result {
                Ok(()) => {
                    warn!(replica = %replica, url = %replica.url, running_version = %running,
                        "control plane closed the stream; reconnecting");
                    false
                }
                // A stream that was up and broke: the replica went away
                // (reset, GOAWAY, a restart).
                Err(e) if link.up => {
                    warn!(replica = %replica, url = %replica.url, error = %crate::identity::with_sources(&**e), running_version = %running,
                        "lost the control-plane stream; serving the running config, reconnecting");
                    false
                }
                Err(e) => match e.downcast_ref::<tonic::Status>() {
                    Some(status) if status.code() != tonic::Code::Unavailable => {
                        warn!(replica = %replica, url = %replica.url, code = ?status.code(), reason = status.message(), running_version = %running, next = %next,
                            "control plane refused this proxy's stream; serving the running config");
                        is_definitive(status.code())
                    }
                    _ => {
                        warn!(replica = %replica, url = %replica.url, error = %crate::identity::with_sources(&**e), running_version = %running, next = %next,
                            "control plane unreachable; serving the running config");
                        false
                    }
                },
            };
            if link.up {
                // It was serving this proxy: a new round (names resolved
                // again), with this replica last.
                was_up = true;
                lost = Some(replica.addr);
                break;
            }
            if definitive {
                // Every replica judges this proxy's credentials alike.
                break;
            }
        }
        let wait = if was_up {
            backoff = FIRST_BACKOFF;
            FIRST_BACKOFF.mul_f64(0.5 + fastrand::f64() / 2.0)
        } else {
            // Full jitter over an exponentially growing window.
            let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            backoff = (backoff * 2).min(cfg.max_backoff);
            warn!(control_plane = %cfg.control_plane.describe(), tried = replicas.len(), retry_in = ?wait,
                "no control-plane replica reachable; serving the running config");
            wait
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Which replica the stream is on, across reconnections.
struct Link {
    failovers: Counter,
    /// The replica of the last stream that opened.
    last: Option<SocketAddr>,
    /// The current attempt's stream opened (the replica admitted the Hello).
    up: bool,
}

impl Link {
    /// The stream to `replica` opened: a failover when the last one was
    /// elsewhere.
    fn opened(&mut self, replica: &Replica, metrics: &crate::metrics::Metrics) {
        self.up = true;
        metrics.control_plane_up(&replica.url, replica.addr);
        if let Some(last) = self.last.filter(|a| *a != replica.addr) {
            self.failovers.inc();
            info!(from = %last, to = %replica, url = %replica.url, "failed over to another control-plane replica");
        }
        self.last = Some(replica.addr);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &DiscoveryConfig,
    replica: &Replica,
    proxy: &Arc<Proxy>,
    settings: &Settings,
    ready: &AtomicBool,
    shutdown: &mut watch::Receiver<bool>,
    last_version: &mut String,
    link: &mut Link,
) -> Result<(), BoxError> {
    // Our workload certificate once we have one; the bootstrap token before.
    let creds = proxy.tls.as_ref().and_then(|t| t.store().current());
    let client = creds
        .as_ref()
        .map(|c| (c.pem.0 .0.as_str(), c.pem.0 .1.as_str()));
    let token = match (&creds, &cfg.token_file) {
        (None, Some(f)) => tokio::fs::read_to_string(f)
            .await
            .ok()
            .map(|t| t.trim().to_string()),
        _ => None,
    };
    let bundle = proxy.tls.as_ref().and_then(|t| t.store().bundle());
    let roots: Vec<&str> = cfg
        .ca_pem
        .as_deref()
        .into_iter()
        .chain(bundle.as_ref().map(|b| b.pem.as_str()))
        .collect();
    let channel = endpoint(replica, &roots, client)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let bearer = token.filter(|t| !t.is_empty()).and_then(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .ok()
    });
    let (tx, rx) = mpsc::channel(16);
    // The instance registers once it can serve (Register, below), never
    // in the Hello: traffic must not arrive before its config and
    // certificate.
    let hello = Hello {
        node_id: cfg.node_id.clone(),
        service: cfg.service.clone(),
        last_version: last_version.clone(),
        instance: None,
    };
    let mut registered = cfg.instance.is_none();
    tx.send(request(Kind::Hello(hello))).await?;
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(b) = bearer {
        req.metadata_mut().insert("authorization", b);
        if let Some(v) = cfg
            .identity
            .as_ref()
            .and_then(|(ns, sa)| format!("{ns}/{sa}").parse().ok())
        {
            req.metadata_mut().insert("x-remora-identity", v);
        }
    }
    let mut stream = client.stream(req).await?.into_inner();
    link.opened(replica, &proxy.metrics);
    cfg.control_plane.answered(replica);
    info!(replica = %replica, url = %replica.url, node = %cfg.node_id, last_version = %last_version, "connected to the control plane");
    loop {
        tokio::select! {
            msg = stream.message() => {
                let Some(snap) = msg? else { return Ok(()) };
                let version = snap.version.clone();
                // Roots first: a config may bring endpoints whose
                // certificates only the new bundle verifies.
                install_bundle(proxy, &snap.trust_bundle_pem);
                // Decode, validate, compile, swap and the disk write run on
                // the blocking pool: a big snapshot never stalls requests on
                // the data-plane thread.
                let (p, s, v, lkg) = (proxy.clone(), settings.clone(), version.clone(), cfg.lkg_path());
                let result = tokio::task::spawn_blocking(move || {
                    let r = source::apply(&p, &s, Input::Encoded(snap.config.clone()), v);
                    if r.is_ok() {
                        save_snapshot(lkg, &snap);
                    }
                    r
                })
                .await
                .unwrap_or_else(|e| Err(format!("applying the snapshot failed: {e}")));
                let error = match result {
                    Ok(()) => {
                        ready.store(true, Relaxed);
                        *last_version = version.clone();
                        String::new()
                    }
                    Err(e) => e,
                };
                tx.send(request(Kind::Ack(Ack { version, error: bounded(error) }))).await?;
                register_when_ready(cfg, proxy, &tx, &mut registered).await?;
            }
            // Waiting for the first certificate after the config came.
            _ = tokio::time::sleep(Duration::from_millis(200)), if !registered => {
                register_when_ready(cfg, proxy, &tx, &mut registered).await?;
            }
            _ = shutdown.changed() => {
                // Take this instance out of everyone's endpoints first, so
                // traffic stops arriving while we drain.
                let _ = tx.send(request(Kind::Deregister(Deregister {}))).await;
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Ok(Some(_)) = stream.message().await {}
                })
                .await;
                info!("deregistered from the control plane");
                return Ok(());
            }
        }
    }
}

/// Registers this instance once it can serve: a config is running and,
/// with an identity, the certificate is there.
async fn register_when_ready(
    cfg: &DiscoveryConfig,
    proxy: &Proxy,
    tx: &mpsc::Sender<DiscoveryRequest>,
    registered: &mut bool,
) -> Result<(), BoxError> {
    if *registered {
        return Ok(());
    }
    let has_config = !proxy.runtime.load().version.is_empty();
    let has_cert = proxy
        .tls
        .as_ref()
        .is_none_or(|t| t.store().current().is_some());
    if let (true, true, Some(instance)) = (has_config, has_cert, cfg.instance.clone()) {
        let at = format!("{}:{}", instance.address, instance.port);
        tx.send(request(Kind::Register(Register {
            instance: Some(instance),
        })))
        .await?;
        *registered = true;
        info!(instance = %at, "registered with the control plane: ready to serve");
    }
    Ok(())
}

/// A NACK's reason, cut to what the control plane reads (it refuses big
/// messages before anything else).
fn bounded(mut error: String) -> String {
    const MAX: usize = 16 << 10;
    if error.len() > MAX {
        let mut cut = MAX;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
        error.push_str(" [cut]");
    }
    error
}

fn request(kind: Kind) -> DiscoveryRequest {
    DiscoveryRequest { kind: Some(kind) }
}
