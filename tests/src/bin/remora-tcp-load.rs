//! remora-tcp-load: fixed-rate request/response load over plain TCP, for
//! bench/intercept.sh (what oha does for HTTP, for an echo server).
//!
//! It opens `--conns` connections to ADDR, then, on a fixed schedule,
//! sends a `--size`-byte request every 1/`--rate` seconds on the first idle
//! connection and waits until the server has echoed all of it back.
//! Latency runs from the request's scheduled send time, not from the moment
//! a connection was free to send it, so a stall counts against every
//! request it delayed (coordinated omission corrected, as with
//! `oha --latency-correction` or wrk2). Requests due during `--warmup` are
//! sent but not counted.
//!
//! A request is an 8-byte big-endian sequence number, then filler; the
//! echo must match it byte for byte. Its first byte is 0, which no HTTP
//! request starts with, so a proxy that detects protocols sees opaque TCP
//! at once. A connection that fails or echoes something else is counted as
//! an error and replaced.
//!
//! Prints one JSON line on stdout: requests, ok, errors, p50/p90/p99/p99.9
//! and max latency in ms (over the measured requests), the rate achieved,
//! how late the pacing thread was, and with `--cpu-pid`, the utime + stime
//! clock ticks (`/proc/PID/stat`) each of those processes used between the
//! end of the warm-up and the last answer. Exit status 0 when the run
//! completed (even with errors: the caller reads `errors`), 2 when it could
//! not start.

use clap::Parser;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

#[derive(Parser)]
#[command(
    name = "remora-tcp-load",
    about = "Fixed-rate TCP request/echo load, latency from each request's scheduled time"
)]
struct Cli {
    /// The echo server (or the address an intercepted app would dial).
    addr: SocketAddr,
    /// Requests per second, across all connections.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of the same load before it, not measured.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Connections, opened before the schedule starts and kept.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Bytes per request (and per echo), at least 8.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// A request not echoed within this many milliseconds is an error.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Report this process's CPU ticks over the measured phase (repeat).
    #[arg(long = "cpu-pid")]
    cpu_pids: Vec<u32>,
}

/// One scheduled request.
struct Job {
    seq: u64,
    due: Instant,
}

/// What happened to it.
struct Sample {
    seq: u64,
    due: Instant,
    done: Instant,
    ok: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (bad_duration, bad_warmup) = (
        cli.duration.is_nan() || cli.duration <= 0.0,
        cli.warmup.is_nan() || cli.warmup < 0.0,
    );
    if cli.rate == 0 || cli.conns == 0 || cli.size < 8 || bad_duration || bad_warmup {
        eprintln!(
            "remora-tcp-load: --rate and --conns must be >= 1, --size >= 8, --duration > 0, --warmup >= 0"
        );
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remora-tcp-load: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("remora-tcp-load: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<Value, String> {
    let timeout = Duration::from_millis(cli.timeout_ms);
    // Every connection up before the first request is due: connection
    // setup (for an intercepted one, the proxies' mTLS handshake) is not
    // part of any request's latency or of the measured CPU.
    let mut streams = Vec::with_capacity(cli.conns);
    for _ in 0..cli.conns {
        streams.push(
            connect(cli.addr, timeout)
                .await
                .map_err(|e| format!("connect {}: {e}", cli.addr))?,
        );
    }

    let warm_n = (cli.rate as f64 * cli.warmup).round() as u64;
    let total = warm_n + (cli.rate as f64 * cli.duration).round() as u64;
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    // Idle connections wait in line on the one receiver (tokio's Mutex is
    // fair): the next due request goes to the connection idle longest.
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::with_capacity(cli.conns);
    for stream in streams {
        let (rx, addr, size) = (rx.clone(), cli.addr, cli.size);
        workers.push(tokio::spawn(worker(stream, rx, addr, size, timeout)));
    }

    // Paced by a thread of its own: std's sleep is much finer than tokio's
    // 1 ms timer. It reads the CPU ticks when the measured phase starts.
    let (rate, pids) = (cli.rate as u64, cli.cpu_pids.clone());
    let pacer = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(20);
        let mut ticks0 = None;
        let mut lag = Vec::with_capacity((total - warm_n) as usize);
        for seq in 0..total {
            let due = start + Duration::from_nanos(seq * 1_000_000_000 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if seq == warm_n {
                ticks0 = Some(pids.iter().map(|&p| cpu_ticks(p)).collect::<Vec<_>>());
            }
            if seq >= warm_n {
                lag.push(Instant::now().saturating_duration_since(due));
            }
            if tx.send(Job { seq, due }).is_err() {
                break;
            }
        }
        (ticks0.unwrap_or_default(), lag)
    });

    let mut samples = Vec::with_capacity(total as usize);
    let mut reconnects = 0u64;
    for w in workers {
        let (s, r) = w.await.map_err(|e| format!("worker: {e}"))?;
        samples.extend(s);
        reconnects += r;
    }
    let ticks1: Vec<Option<u64>> = cli.cpu_pids.iter().map(|&p| cpu_ticks(p)).collect();
    let (ticks0, mut lag) = pacer.join().map_err(|_| "pacing thread panicked")?;

    samples.retain(|s| s.seq >= warm_n);
    if samples.len() as u64 != total - warm_n {
        return Err(format!(
            "{} of {} measured requests accounted for",
            samples.len(),
            total - warm_n
        ));
    }
    let ok = samples.iter().filter(|s| s.ok).count();
    let mut lat: Vec<Duration> = samples.iter().map(|s| s.done - s.due).collect();
    lat.sort_unstable();
    lag.sort_unstable();
    let first_due = samples.iter().map(|s| s.due).min();
    let last_done = samples.iter().map(|s| s.done).max();
    let span = match (first_due, last_done) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let mut cpu = Map::new();
    for (i, pid) in cli.cpu_pids.iter().enumerate() {
        let used = match (ticks0.get(i).copied().flatten(), ticks1[i]) {
            (Some(a), Some(b)) => json!(b.saturating_sub(a)),
            _ => Value::Null, // the process was gone
        };
        cpu.insert(pid.to_string(), used);
    }
    let mean = lat.iter().map(Duration::as_secs_f64).sum::<f64>() / lat.len().max(1) as f64;
    Ok(json!({
        "addr": cli.addr.to_string(),
        "rate": cli.rate,
        "conns": cli.conns,
        "size": cli.size,
        "warmup_s": cli.warmup,
        "duration_s": cli.duration,
        "requests": samples.len(),
        "ok": ok,
        "errors": samples.len() - ok,
        "reconnects": reconnects,
        "p50_ms": ms(pct(&lat, 50.0)),
        "p90_ms": ms(pct(&lat, 90.0)),
        "p99_ms": ms(pct(&lat, 99.0)),
        "p999_ms": ms(pct(&lat, 99.9)),
        "max_ms": ms(pct(&lat, 100.0)),
        "mean_ms": (mean * 1e6).round() / 1e3,
        "achieved_rps": if span > 0.0 { (ok as f64 / span).round() } else { 0.0 },
        "pacer_lag_p99_ms": ms(pct(&lag, 99.0)),
        "pacer_lag_max_ms": ms(pct(&lag, 100.0)),
        "cpu_ticks": cpu,
    }))
}

/// One connection: takes the next due request whenever it is idle.
/// Returns its samples and how many times it reconnected.
async fn worker(
    stream: TcpStream,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    addr: SocketAddr,
    size: usize,
    timeout: Duration,
) -> (Vec<Sample>, u64) {
    let mut stream = Some(stream);
    let mut samples = Vec::new();
    let mut reconnects = 0;
    let (mut req, mut got) = (vec![0u8; size], vec![0u8; size]);
    for (i, b) in req.iter_mut().enumerate().skip(8) {
        *b = b'a' + (i % 26) as u8;
    }
    loop {
        let job = rx.lock().await.recv().await;
        let Some(Job { seq, due }) = job else {
            return (samples, reconnects);
        };
        req[..8].copy_from_slice(&seq.to_be_bytes());
        if stream.is_none() {
            reconnects += 1;
            stream = connect(addr, timeout).await.ok();
        }
        let ok = match stream.as_mut() {
            Some(s) => matches!(
                tokio::time::timeout(timeout, exchange(s, &req, &mut got)).await,
                Ok(Ok(()))
            ),
            None => false,
        };
        samples.push(Sample {
            seq,
            due,
            done: Instant::now(),
            ok,
        });
        if !ok {
            // Whatever is still in flight on it would answer the wrong request.
            stream = None;
        }
    }
}

/// Writes the request and reads the echo; an error unless it matches.
async fn exchange(s: &mut TcpStream, req: &[u8], got: &mut [u8]) -> std::io::Result<()> {
    s.write_all(req).await?;
    s.read_exact(got).await?;
    if got != req {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the echo differs from the request",
        ));
    }
    Ok(())
}

async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// utime + stime of every thread of `pid`, in clock ticks; None if it is gone.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the
    // last ')'. utime and stime are fields 14 and 15 (11 and 12 after it).
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
