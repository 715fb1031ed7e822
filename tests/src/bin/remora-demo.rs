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
async fn main() {
    let args = Args::parse();
    let up = Upstream::start_on(args.addr, &args.name, Behavior::Demo).await;
    eprintln!("remora-demo {} listening on {}", up.name, up.addr);
    let _ = tokio::signal::ctrl_c().await;
}
