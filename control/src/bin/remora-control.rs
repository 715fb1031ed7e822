//! remora-control: the control plane binary.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use remora_control::ca::{self, Ca};
use remora_control::etcd::Etcd;
use remora_control::history::Retention;
use remora_control::identity::IdentityService;
use remora_control::kube::{KubeConfig, KubernetesReviewer};
use remora_control::mesh::{Mesh, Options};
use remora_control::review::{SharedTokenReviewer, TokenFileReviewer, TokenReviewer};
use remora_control::store::StoreError;
use remora_control::store::{etcd::EtcdStore, Backend, FileStore};
use remora_control::{serve, Security};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(name = "remora-control", version, about = "Remora control plane")]
struct Args {
    /// gRPC listener for Discovery (proxies), Admin (remoractl) and
    /// Identity [default: 0.0.0.0:4200 with --tls, 127.0.0.1:4200 without].
    #[arg(long, env = "REMORA_CONTROL_LISTEN")]
    listen: Option<SocketAddr>,
    /// Where the config history is kept (embedded store).
    #[arg(long, env = "REMORA_DATA_DIR", default_value = "remora-data")]
    data_dir: PathBuf,
    /// Where the config history, registered instances, node bindings and
    /// proxies' status live: `file` (the data directory; one replica) or
    /// `etcd` (shared by every replica on the same --etcd-endpoints and
    /// --etcd-prefix; any of them serves any proxy).
    #[arg(long, env = "REMORA_STORE", default_value = "file", value_parser = ["file", "etcd"])]
    store: String,
    /// etcd members, comma-separated: `http://host:2379`, or `https://` with
    /// --etcd-ca-file (a bare host:port is https with a CA file, else http).
    #[arg(long, env = "REMORA_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The prefix of every key this mesh keeps in etcd.
    #[arg(long, env = "REMORA_ETCD_PREFIX", default_value = "/remora/")]
    etcd_prefix: String,
    /// The CA (PEM) that verifies the etcd members' certificates.
    #[arg(long, env = "REMORA_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for etcd members that require one.
    #[arg(long, env = "REMORA_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// The key of --etcd-cert-file (PEM).
    #[arg(long, env = "REMORA_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// etcd's own authentication: the user...
    #[arg(long, env = "REMORA_ETCD_USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// ...and a file holding its password (read when a token is needed).
    #[arg(long, env = "REMORA_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Keep at most this many config versions (0: all). The current
    /// version and the one before it are always kept.
    #[arg(long, env = "REMORA_HISTORY_KEEP", default_value_t = 1000)]
    history_keep: u64,
    /// Prune config versions older than this ("30d", "720h"); the current
    /// version and the one before it are always kept [default: no limit].
    #[arg(long, env = "REMORA_HISTORY_MAX_AGE", value_parser = remora_proto::duration::parse)]
    history_max_age: Option<Duration>,
    /// Prometheus metrics (GET /metrics) on this address, or "off".
    /// Loopback by default: it tells who is connected and what they run.
    #[arg(long, env = "REMORA_CONTROL_METRICS_ADDR", default_value = "127.0.0.1:4201", value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// How long a registered instance outlives its proxy's stream.
    #[arg(long, env = "REMORA_REGISTRATION_GRACE", default_value = "10s", value_parser = remora_proto::duration::parse)]
    registration_grace: Duration,
    /// Log format: text or json. Levels come from RUST_LOG (default info).
    #[arg(long, env = "REMORA_LOG_FORMAT", default_value = "text")]
    log_format: String,

    /// Trust domain of the identities issued to proxies:
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, env = "REMORA_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of the certificates issued to proxies (they renew at about
    /// 70% of it).
    #[arg(long, env = "REMORA_CERT_LIFETIME", default_value = "24h", value_parser = remora_proto::duration::parse)]
    cert_lifetime: Duration,
    /// The CA certificate (PEM) that signs proxies' certificates: a root, or
    /// an intermediate with --ca-chain. Without it, a root generated at first
    /// start is kept in <data-dir>/ca (with --store etcd: in etcd, made by
    /// the first replica and loaded by the others).
    #[arg(long, env = "REMORA_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, env = "REMORA_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// When --ca-cert is an intermediate: the certificates above it up to and
    /// including the root (PEM). Every root here joins the trust bundle.
    #[arg(long, env = "REMORA_CA_CHAIN", requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// More root certificates (PEM) to publish in the trust bundle next to
    /// the CA's own root, to every proxy over the config stream: how a root
    /// rotation is done (see the README).
    #[arg(long, env = "REMORA_TRUST_BUNDLE")]
    trust_bundle: Option<PathBuf>,
    /// Bootstrap tokens, one per identity: lines of `namespace/serviceAccount
    /// sha256:<hex>` (the SHA-256 of the token; `remoractl token` makes
    /// them). Re-read when it changes. A token gets only its own identity.
    #[arg(long, env = "REMORA_BOOTSTRAP_TOKENS", group = "reviewer")]
    bootstrap_tokens: Option<PathBuf>,
    /// Check proxies' projected service-account tokens with the Kubernetes
    /// TokenReview API (in a cluster: its address, CA and credentials come
    /// from the pod's environment).
    #[arg(long, env = "REMORA_KUBERNETES_TOKEN_REVIEW", group = "reviewer")]
    kubernetes_token_review: bool,
    /// The Kubernetes API server [default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, env = "REMORA_KUBE_API", requires = "kubernetes_token_review")]
    kube_api: Option<String>,
    /// The cluster CA that verifies the API server.
    #[arg(
        long,
        env = "REMORA_KUBE_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    kube_ca_file: PathBuf,
    /// The control plane's own service-account token, for the API server.
    #[arg(
        long,
        env = "REMORA_KUBE_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    kube_token_file: PathBuf,
    /// The audience proxies' tokens must be issued for.
    #[arg(long, env = "REMORA_TOKEN_AUDIENCE", default_value = "remora")]
    token_audience: String,
    /// INSECURE: one token, in this file, for every identity: whoever holds
    /// it may get a certificate for any namespace and service account. For
    /// a laptop or a test, never for a mesh with tenants.
    #[arg(
        long,
        env = "REMORA_INSECURE_SHARED_BOOTSTRAP_TOKEN_FILE",
        group = "reviewer"
    )]
    insecure_shared_bootstrap_token_file: Option<PathBuf>,
    /// Most client connections (proxies, remoractl) open at once; past it,
    /// accepting pauses.
    #[arg(long, env = "REMORA_CONTROL_MAX_CONNECTIONS", default_value_t = 20_000)]
    max_connections: usize,
    /// Longest a proxy may take to send its Hello on a new Discovery stream.
    #[arg(long, env = "REMORA_HELLO_TIMEOUT", default_value = "10s", value_parser = remora_proto::duration::parse)]
    hello_timeout: Duration,
    /// How long a proxy whose stream ended stays in `remoractl status`.
    #[arg(long, env = "REMORA_STATUS_RETENTION", default_value = "1h", value_parser = remora_proto::duration::parse)]
    status_retention: Duration,
    /// INSECURE: allow serving plaintext gRPC (no --tls) on an address other
    /// than loopback: a local development setup only.
    #[arg(long, env = "REMORA_INSECURE_DEV_PLAINTEXT")]
    insecure_dev_plaintext: bool,

    /// Serve gRPC over TLS, with a certificate the CA issues to the control
    /// plane itself for the --server-name names and the --listen IP (when
    /// it is not 0.0.0.0). Proxies verify it (remora-proxy
    /// --control-plane-ca); Discovery then requires a workload certificate
    /// or the bootstrap token.
    #[arg(long, env = "REMORA_TLS")]
    tls: bool,
    /// DNS names in the control plane's own certificate (comma-separated or
    /// repeated).
    #[arg(
        long,
        env = "REMORA_SERVER_NAME",
        value_delimiter = ',',
        default_value = "remora-control,localhost"
    )]
    server_name: Vec<String>,
    /// Lifetime of the control plane's own certificate (2160h: 90 days); it
    /// is renewed in place at about 70% of it.
    #[arg(long, env = "REMORA_SERVER_CERT_LIFETIME", default_value = "2160h", value_parser = remora_proto::duration::parse)]
    server_cert_lifetime: Duration,
    /// File holding the token every Admin call (remoractl) must present
    /// (read on each call, so it can be replaced). Without it the Admin API
    /// is open to anyone who can reach it.
    #[arg(long, env = "REMORA_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: log collectors get plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    if args.tls && !has_reviewer(&args) {
        anyhow::bail!(
            "--tls needs a token reviewer (--bootstrap-tokens, --kubernetes-token-review or --insecure-shared-bootstrap-token-file): Discovery then requires a workload certificate or a bootstrap credential, and without a reviewer no proxy could get either"
        );
    }
    let listen = args.listen.unwrap_or_else(|| match args.tls {
        true => SocketAddr::from(([0, 0, 0, 0], 4200)),
        false => SocketAddr::from(([127, 0, 0, 1], 4200)),
    });
    if !args.tls && !listen.ip().is_loopback() && !args.insecure_dev_plaintext {
        anyhow::bail!(
            "--listen {listen}: without --tls the control plane serves loopback only (anyone who reaches it could read the config, register endpoints and change the mesh). Add --tls, listen on 127.0.0.1, or say --insecure-dev-plaintext for a local development setup"
        );
    }
    let metrics_listener = match args.metrics_addr {
        MetricsAddr::Off => None,
        MetricsAddr::At(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("--metrics-addr {a}"))?,
        ),
    };
    let etcd = match args.store.as_str() {
        "etcd" => Some(Etcd::new(&etcd_options(&args)).context("--store etcd")?),
        _ => None,
    };
    let store = match &etcd {
        Some(e) => Backend::Etcd(EtcdStore::open(e.clone(), &args.etcd_prefix)),
        None => {
            Backend::File(FileStore::open(&args.data_dir).context("opening the data directory")?)
        }
    };
    let options = Options {
        grace: args.registration_grace,
        retention: Retention {
            keep: args.history_keep,
            max_age: args.history_max_age,
        },
    };
    let mesh = open_mesh(store, options).await?;
    if let Some(l) = metrics_listener {
        let addr = l.local_addr().context("metrics address")?;
        info!(%addr, "metrics listening");
        tokio::spawn(remora_control::metrics::serve(l, mesh.metrics()));
    }
    match &etcd {
        Some(e) => {
            mesh.share(e.clone(), &args.etcd_prefix);
            info!(endpoints = %e.endpoints(), prefix = %args.etcd_prefix, "sharing the mesh through etcd with every replica on these endpoints and prefix");
        }
        None => {
            mesh.persist_instances(args.data_dir.join("instances.pb"));
        }
    }
    let pki = identity(&args, etcd.as_ref()).await?;
    mesh.set_trust_bundle(&pki.bundle);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr().context("listener address")?;
    mesh.set_status_retention(args.status_retention);
    let mut security = Security {
        discovery_reviewer: pki.reviewer.clone(),
        admin_token_file: args.admin_token_file.clone(),
        tls: None,
        trust_domain: args.trust_domain.clone(),
        max_connections: args.max_connections,
        hello_timeout: args.hello_timeout,
    };
    match &args.admin_token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("--admin-token-file {}", f.display()))?;
            anyhow::ensure!(
                !t.trim().is_empty(),
                "--admin-token-file {}: empty",
                f.display()
            );
        }
        None => warn!("no --admin-token-file: the Admin API is open to anyone who reaches {addr}"),
    }
    if args.tls {
        let ips: Vec<std::net::IpAddr> = [addr.ip()]
            .into_iter()
            .filter(|ip| !ip.is_unspecified())
            .collect();
        let serving = remora_control::tls::ServingTls::new(
            pki.ca.clone(),
            args.server_name.clone(),
            ips.clone(),
            args.server_cert_lifetime,
            &pki.bundle,
        )?;
        serving.spawn_renewal();
        info!(names = ?args.server_name, ips = ?ips, lifetime = ?args.server_cert_lifetime, "serving gRPC over TLS (certificate renewed at ~70% of its lifetime)");
        security.tls = Some(serving);
    } else {
        warn!(%addr, "no --tls: gRPC is plaintext; Discovery (config, instance registration) and Identity are unauthenticated and bootstrap tokens cross in the clear: anyone who reaches this address can read the mesh's config and register endpoints");
    }
    match &etcd {
        Some(_) => info!(%addr, store = "etcd", "control plane listening"),
        None => info!(%addr, data_dir = %args.data_dir.display(), "control plane listening"),
    }
    // Graceful shutdown waits for open streams, and a proxy's Discovery
    // stream never ends by itself: after a short grace, close them (the
    // proxies keep serving and reconnect, to this or another replica).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown().await;
        let _ = stop_tx.send(true);
    });
    let (mut graceful, mut forced) = (stop_rx.clone(), stop_rx);
    let graceful = async move {
        let _ = graceful.wait_for(|stop| *stop).await;
    };
    tokio::select! {
        served = serve(mesh.clone(), pki.service, security, listener, graceful) => served?,
        _ = async {
            let _ = forced.wait_for(|stop| *stop).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => info!("closed the remaining Discovery streams"),
    }
    mesh.save_instances();
    info!("stopped");
    Ok(())
}

/// The CA (the operator's, or the one kept in the data directory) and who
/// may ask it for certificates.
/// The CA, the Identity service on it, the trust bundle, and the reviewer
/// of bootstrap tokens.
struct Pki {
    service: IdentityService,
    ca: Arc<Ca>,
    bundle: String,
    reviewer: Option<Arc<dyn TokenReviewer>>,
}

fn has_reviewer(args: &Args) -> bool {
    args.bootstrap_tokens.is_some()
        || args.kubernetes_token_review
        || args.insecure_shared_bootstrap_token_file.is_some()
}

/// Who may get which identity (the flags are exclusive).
fn reviewer(args: &Args) -> anyhow::Result<Option<Arc<dyn TokenReviewer>>> {
    if let Some(path) = &args.bootstrap_tokens {
        let r = TokenFileReviewer::open(path)
            .map_err(|e| anyhow::anyhow!("--bootstrap-tokens: {e}"))?;
        return Ok(Some(Arc::new(r)));
    }
    if args.kubernetes_token_review {
        let api = match &args.kube_api {
            Some(a) => a.clone(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").context(
                    "--kubernetes-token-review outside a cluster needs --kube-api ($KUBERNETES_SERVICE_HOST is not set)",
                )?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let r = KubernetesReviewer::new(KubeConfig {
            api,
            ca_file: args.kube_ca_file.clone(),
            token_file: args.kube_token_file.clone(),
            audience: args.token_audience.clone(),
        })
        .map_err(|e| anyhow::anyhow!("--kubernetes-token-review: {e}"))?;
        return Ok(Some(Arc::new(r)));
    }
    if let Some(path) = &args.insecure_shared_bootstrap_token_file {
        let r = SharedTokenReviewer::open(path)
            .map_err(|e| anyhow::anyhow!("--insecure-shared-bootstrap-token-file: {e}"))?;
        warn!("INSECURE: one bootstrap token for every identity (--insecure-shared-bootstrap-token-file): whoever holds it can get a certificate for any workload");
        return Ok(Some(Arc::new(r)));
    }
    warn!("no token reviewer (--bootstrap-tokens or --kubernetes-token-review): proxies will be refused certificates");
    Ok(None)
}

async fn identity(args: &Args, etcd: Option<&Etcd>) -> anyhow::Result<Pki> {
    let reviewer = reviewer(args)?;
    let settings = ca::Settings {
        trust_domain: args.trust_domain.clone(),
        lifetime: args.cert_lifetime,
    };
    let ca = match (&args.ca_cert, &args.ca_key, etcd) {
        (Some(cert), Some(key), _) => Ca::from_files(cert, key, args.ca_chain.as_deref(), settings)
            .context("setting up the CA")?,
        (_, _, Some(etcd)) => shared_ca(etcd, &args.etcd_prefix, settings).await?,
        _ => {
            Ca::open_or_create(&args.data_dir.join("ca"), settings).context("setting up the CA")?
        }
    };
    let ca = match &args.trust_bundle {
        Some(extra) => ca.with_extra_roots(extra).context("--trust-bundle")?,
        None => ca,
    };
    let bundle = ca.trust_bundle_pem().to_string();
    let ca = Arc::new(ca);
    Ok(Pki {
        service: IdentityService::new(ca.clone(), reviewer.clone()),
        ca,
        bundle,
        reviewer,
    })
}

fn etcd_options(args: &Args) -> remora_control::etcd::Options {
    remora_control::etcd::Options {
        endpoints: args.etcd_endpoints.clone(),
        ca_file: args.etcd_ca_file.clone(),
        cert_file: args.etcd_cert_file.clone(),
        key_file: args.etcd_key_file.clone(),
        user: args.etcd_user.clone(),
        password_file: args.etcd_password_file.clone(),
    }
}

/// Opens the mesh on its store; with etcd away at start, waits for it
/// (a replica without the current config has nothing to serve).
async fn open_mesh(store: Backend, options: Options) -> anyhow::Result<Arc<Mesh<Backend>>> {
    use remora_control::store::Store;
    let mut waited = false;
    while let Err(StoreError::Unavailable(e)) = store.load_current().await {
        if !waited {
            warn!(error = %e, "the store is unavailable; waiting for it");
            waited = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Mesh::open(store, options)
        .await
        .context("loading the config history")
}

/// The root every replica shares through etcd (made by the first).
async fn shared_ca(etcd: &Etcd, prefix: &str, settings: ca::Settings) -> anyhow::Result<Ca> {
    use remora_control::shared::ca::{load_or_create, SharedCaError};
    let mut waited = false;
    loop {
        match load_or_create(etcd, prefix, settings.clone()).await {
            Ok(ca) => {
                warn!("the CA's key is kept in etcd (no --ca-cert/--ca-key): whoever can read {prefix}ca/ there can issue any identity; restrict it with etcd's RBAC, or give every replica the same CA from files or a Secret");
                return Ok(ca);
            }
            Err(SharedCaError::Etcd(remora_control::etcd::EtcdError::Unavailable { .. }))
                if !waited =>
            {
                warn!("etcd is unavailable; waiting for it to load the CA");
                waited = true;
            }
            Err(SharedCaError::Etcd(remora_control::etcd::EtcdError::Unavailable { .. })) => {}
            Err(e) => return Err(anyhow::Error::new(e).context("the CA in etcd")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `--metrics-addr`: an address, or off.
#[derive(Clone, Debug)]
enum MetricsAddr {
    Off,
    At(SocketAddr),
}

fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    match text {
        "off" => Ok(MetricsAddr::Off),
        a => a
            .parse()
            .map(MetricsAddr::At)
            .map_err(|e| format!("{a:?}: {e} (an address like 127.0.0.1:4201, or off)")),
    }
}

async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => info!("SIGINT"),
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
