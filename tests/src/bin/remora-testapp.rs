//! remora-testapp: the app that end-to-end tests run in their pods (network
//! namespaces), one mode per protocol a sidecar must carry:
//!
//! - `http --name N --listen ADDR`: the demo upstream (HTTP/1.1 + h2c,
//!   `/echo`, `/headers`, `/status/N`, Upgrade → byte echo), every answer
//!   with `x-served-by: N` and `x-served-port`;
//! - `grpc --name N --listen ADDR`: the gRPC echo service;
//! - `tcp-echo --listen ADDR`: client speaks first; echoes every byte and
//!   closes after the client's half-close;
//! - `tcp-banner --banner T --listen ADDR`: server speaks first (`T\r\n`),
//!   then echoes;
//! - `connect ADDR --send T [--read-banner]`: a client: writes T, shuts down
//!   its write side, prints everything it read until EOF to stdout.
//!
//! `--listen` repeats; each server prints `listening on ADDR` to stderr once
//! bound, then runs until killed.

use clap::{Args, Parser, Subcommand};
use remora_tests::grpc::GrpcServer;
use remora_tests::upstream::{Behavior, Upstream};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(name = "remora-testapp", about = "The app in end-to-end test pods")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP/1.1 + h2c demo upstream.
    Http {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        listen: Listen,
    },
    /// gRPC echo service.
    Grpc {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        listen: Listen,
    },
    /// Client-first TCP: echoes bytes, honours half-close.
    TcpEcho {
        #[command(flatten)]
        listen: Listen,
    },
    /// Server-first TCP: writes `BANNER\r\n` on accept, then echoes.
    TcpBanner {
        #[arg(long)]
        banner: String,
        #[command(flatten)]
        listen: Listen,
    },
    /// Connects, (reads a banner line,) writes, half-closes, prints the rest.
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value = "")]
        send: String,
        /// Read one line before writing anything (a server-first protocol).
        #[arg(long)]
        read_banner: bool,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

#[derive(Args)]
struct Listen {
    /// Address to listen on (repeatable).
    #[arg(long = "listen", required = true)]
    addrs: Vec<SocketAddr>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let result = match Cli::parse().mode {
        Mode::Http { name, listen } => serve_http(&name, &listen.addrs).await,
        Mode::Grpc { name, listen } => serve_grpc(&name, &listen.addrs).await,
        Mode::TcpEcho { listen } => serve_tcp(&listen.addrs, None).await,
        Mode::TcpBanner { banner, listen } => serve_tcp(&listen.addrs, Some(banner)).await,
        Mode::Connect {
            addr,
            send,
            read_banner,
            timeout_ms,
        } => {
            let limit = Duration::from_millis(timeout_ms);
            match tokio::time::timeout(limit, connect(addr, &send, read_banner)).await {
                Ok(Ok(got)) => {
                    let mut out = std::io::stdout();
                    return match out.write_all(&got).and_then(|_| out.flush()) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(_) => ExitCode::FAILURE,
                    };
                }
                Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
                Err(_) => Err(format!("connect {addr}: timed out after {limit:?}")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remora-testapp: {e}");
            ExitCode::from(2)
        }
    }
}

async fn serve_http(name: &str, addrs: &[SocketAddr]) -> Result<(), String> {
    let mut servers = Vec::new();
    for &addr in addrs {
        let up = Upstream::try_start_on(addr, name, Behavior::Demo)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        eprintln!("listening on {}", up.addr);
        servers.push(up);
    }
    std::future::pending().await
}

async fn serve_grpc(name: &str, addrs: &[SocketAddr]) -> Result<(), String> {
    let mut servers = Vec::new();
    for &addr in addrs {
        let server = GrpcServer::start_on(addr, name)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        eprintln!("listening on {}", server.addr);
        servers.push(server);
    }
    std::future::pending().await
}

/// Echo servers, with a banner first when given.
async fn serve_tcp(addrs: &[SocketAddr], banner: Option<String>) -> Result<(), String> {
    let mut listeners = Vec::new();
    for &addr in addrs {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = l.local_addr().map_err(|e| e.to_string())?;
        eprintln!("listening on {bound}");
        listeners.push(l);
    }
    let banner = banner.map(|b| format!("{b}\r\n"));
    for l in listeners {
        let banner = banner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(echo(stream, banner.clone()));
            }
        });
    }
    std::future::pending().await
}

/// Writes the banner, then echoes until the client half-closes, then
/// finishes writing and closes.
async fn echo(mut stream: TcpStream, banner: Option<String>) {
    if let Some(b) = banner {
        if stream.write_all(b.as_bytes()).await.is_err() {
            return;
        }
    }
    let (mut r, mut w) = stream.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// The client side: everything read, banner included.
async fn connect(addr: SocketAddr, send: &str, read_banner: bool) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut got = Vec::new();
    if read_banner {
        let mut buf = [0u8; 1024];
        while !got.contains(&b'\n') {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(got);
            }
            got.extend_from_slice(&buf[..n]);
        }
    }
    stream.write_all(send.as_bytes()).await?;
    stream.shutdown().await?;
    stream.read_to_end(&mut got).await?;
    Ok(got)
}
