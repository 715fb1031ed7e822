//! remora-demo: the demo upstream the quickstart runs behind remora-proxy.
//! HTTP/1.1 and h2c; `/status/N`, `/delay/MS`, `/echo`, otherwise
//! "hello from NAME".
use clap::Parser;
use remora_tests::upstream::{Behavior, Upstream};

#[derive(Parser)]
#[command(name = "remora-demo", about = "Demo upstream for Remora")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    #[arg(long, default_value = "demo")]
    name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match Upstream::try_start_on(args.addr, &args.name, Behavior::Demo).await {
        Ok(up) => {
            eprintln!("remora-demo {} listening on {}", up.name, up.addr);
            let _ = tokio::signal::ctrl_c().await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("remora-demo: cannot listen on {}: {e}", args.addr);
            std::process::ExitCode::from(2)
        }
    }
}
