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
//!   its write side, prints everything it read until EOF to stdout;
//! - `grpc-call URL --message M`: a gRPC client: one unary call and one
//!   server stream of 3; prints `unary <message> <server>`, then the
//!   streamed messages and the stream's trailer;
//! - `upgrade ADDR --host H --send T`: an HTTP/1.1 Upgrade (as a WebSocket
//!   handshake), then T through the upgraded connection; prints the status
//!   line and what came back.
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
    /// A gRPC unary call and a server stream.
    GrpcCall {
        /// http://host:port
        url: String,
        #[arg(long)]
        message: String,
    },
    /// An HTTP/1.1 Upgrade, then bytes through the tunnel.
    Upgrade {
        addr: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        send: String,
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
        Mode::GrpcCall { url, message } => within(grpc_call(url, message)).await,
        Mode::Upgrade { addr, host, send } => within(upgrade(addr, host, send)).await,
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

/// Runs a client step under a 10 s cap, printing what it returns.
async fn within(
    f: impl std::future::Future<Output = Result<String, String>>,
) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(Ok(out)) => {
            print!("{out}");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err("timed out after 10s".into()),
    }
}

async fn grpc_call(url: String, message: String) -> Result<String, String> {
    use remora_tests::grpc::echo::echo_client::EchoClient;
    use remora_tests::grpc::echo::{EchoRequest, StreamRequest};
    let mut client = EchoClient::connect(url.clone())
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    let reply = client
        .unary(EchoRequest {
            message: message.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("unary: {e}"))?
        .into_inner();
    let mut out = format!("unary {} {}\n", reply.message, reply.server);
    let mut stream = client
        .server_stream(StreamRequest {
            message,
            count: 3,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("server_stream: {e}"))?
        .into_inner();
    while let Some(m) = stream.message().await.map_err(|e| format!("stream: {e}"))? {
        out.push_str(&format!("stream {}\n", m.message));
    }
    let trailers = stream
        .trailers()
        .await
        .map_err(|e| format!("trailers: {e}"))?
        .unwrap_or_default();
    let tag = trailers
        .get("x-echo-trailer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    out.push_str(&format!("trailer {tag}\n"));
    Ok(out)
}

async fn upgrade(addr: SocketAddr, host: String, send: String) -> Result<String, String> {
    let err = |e: std::io::Error| e.to_string();
    let mut s = TcpStream::connect(addr).await.map_err(err)?;
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(err)?;
    // The response head, byte by byte up to the blank line.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.map_err(err)? == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&head)));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.lines().next().unwrap_or("").to_string();
    if !status.contains(" 101 ") {
        return Ok(format!("{status}\n"));
    }
    s.write_all(send.as_bytes()).await.map_err(err)?;
    let mut back = vec![0u8; send.len()];
    s.read_exact(&mut back).await.map_err(err)?;
    Ok(format!("{status}\n{}", String::from_utf8_lossy(&back)))
}
