//! remora-control: the control plane binary.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use remora_control::ca::{self, Ca};
use remora_control::identity::{FileTokenReviewer, IdentityService, TokenReviewer};
use remora_control::{mesh::Mesh, serve, store::FileStore, Security};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(name = "remora-control", version, about = "Remora control plane")]
struct Args {
    /// gRPC listener for Discovery (proxies) and Admin (remoractl).
    #[arg(long, env = "REMORA_CONTROL_LISTEN", default_value = "0.0.0.0:4200")]
    listen: SocketAddr,
    /// Where the config history is kept (embedded store).
    #[arg(long, env = "REMORA_DATA_DIR", default_value = "remora-data")]
    data_dir: PathBuf,
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
    /// start is kept in <data-dir>/ca.
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
    /// File holding the token proxies present to get a certificate (read on
    /// every request, so it can be replaced). Without it no certificate is
    /// issued.
    #[arg(long, env = "REMORA_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,

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
    if args.tls && args.bootstrap_token_file.is_none() {
        anyhow::bail!(
            "--tls needs --bootstrap-token-file: Discovery then requires a workload certificate or the bootstrap token, and without tokens no proxy could get either"
        );
    }
    let store = FileStore::open(&args.data_dir).context("opening the data directory")?;
    let mesh = Mesh::open(store, args.registration_grace)
        .await
        .context("loading the config history")?;
    mesh.persist_instances(args.data_dir.join("instances.pb"));
    let pki = identity(&args)?;
    mesh.set_trust_bundle(&pki.bundle);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("listener address")?;
    let mut security = Security {
        discovery_reviewer: pki.reviewer.clone(),
        admin_token_file: args.admin_token_file.clone(),
        tls: None,
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
        warn!("no --tls: gRPC is plaintext, and Discovery is open to anyone who reaches {addr}");
    }
    info!(%addr, data_dir = %args.data_dir.display(), "control plane listening");
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

fn identity(args: &Args) -> anyhow::Result<Pki> {
    let reviewer = match &args.bootstrap_token_file {
        Some(path) => {
            let r = FileTokenReviewer::open(path)
                .map_err(|e| anyhow::anyhow!("--bootstrap-token-file: {e}"))?;
            Some(Arc::new(r) as Arc<dyn TokenReviewer>)
        }
        None => {
            warn!("no --bootstrap-token-file: proxies will be refused certificates");
            None
        }
    };
    let settings = ca::Settings {
        trust_domain: args.trust_domain.clone(),
        lifetime: args.cert_lifetime,
    };
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Ca::from_files(cert, key, args.ca_chain.as_deref(), settings),
        _ => Ca::open_or_create(&args.data_dir.join("ca"), settings),
    }
    .context("setting up the CA")?;
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
