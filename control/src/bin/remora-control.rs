//! remora-control: the control plane binary.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use remora_control::{mesh::Mesh, serve, store::FileStore};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tracing::info;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let store = FileStore::open(&args.data_dir).context("opening the data directory")?;
    let mesh = Mesh::open(store, args.registration_grace)
        .await
        .context("loading the config history")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    info!(addr = ?remora_control::local(&listener), data_dir = %args.data_dir.display(), "control plane listening");
    serve(mesh, listener, shutdown()).await?;
    info!("stopped");
    Ok(())
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
