//! remora-cp-bench: the client side of the control-plane scale benchmark
//! (`bench/control_plane.sh`, BENCHMARKS.md "Control plane"). It does not
//! start servers; the script does, and passes their addresses and pids.
//!
//! * `fanout`: opens N Discovery streams (multiplexed over a few HTTP/2
//!   connections) to one remora-control, ACKs every snapshot at once, then
//!   applies changes and measures Apply → each stream's ACK (client side)
//!   and Apply → every proxy ACKed in Admin.Status (server side), plus the
//!   control plane's RSS while it holds the streams.
//! * `seed`: applies the big mesh (N HTTPRoutes) a real proxy then boots on.
//! * `versions`: on that mesh, commits many one-route changes back to back
//!   and follows the control plane's RSS as versions accumulate, and the
//!   Admin.Apply time.
//! * `swap`: with a real remora-proxy subscribed to that mesh, reads the
//!   `config applied ... micros=` lines of its (JSON) log for re-applies,
//!   and runs a paced open-loop HTTP load through its outbound listener,
//!   without swaps and then with a swap every few hundred ms.
//! * `breakdown`: in process, the steps a proxy runs on a snapshot
//!   (decode, `remora_proto::prepare`, `runtime::compile`, swap) timed one
//!   by one, for a few mesh shapes.
//!
//! Every subcommand prints a small table and writes JSON (`--out`).

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use prost::Message;
use remora_proto::control::admin_client::AdminClient;
use remora_proto::control::discovery_client::DiscoveryClient;
use remora_proto::control::discovery_request::Kind;
use remora_proto::control::{Ack, ApplyRequest, DiscoveryRequest, Hello, StatusRequest};
use remora_proto::model::Config;
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Parser)]
#[command(
    name = "remora-cp-bench",
    about = "Control-plane scale benchmark client (see bench/control_plane.sh)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N subscriber streams on one control plane; Apply → ACK latency; RSS.
    Fanout(FanoutArgs),
    /// Applies the N-route mesh that `swap` then changes.
    Seed(SeedArgs),
    /// Many one-route changes in a row: control-plane RSS as versions accumulate.
    Versions(VersionsArgs),
    /// A real proxy on the N-route mesh: apply cost and request latency during swaps.
    Swap(SwapArgs),
    /// In process: decode / validate / compile / swap of an N-route snapshot, step by step.
    Breakdown(BreakdownArgs),
}

/// The generated mesh: `parents` Services (svc-N) that callers address,
/// `backends` Services (backend-N) with one endpoint each, and `routes`
/// HTTPRoutes, route i attached to svc-(i % parents) with a PathPrefix
/// match `/r<i>` and a backendRef to backend-(i % backends).
#[derive(Args, Clone, Debug)]
struct MeshArgs {
    /// HTTPRoutes in the mesh.
    #[arg(long, default_value_t = 5000)]
    routes: usize,
    /// Services the routes attach to (parentRefs).
    #[arg(long, default_value_t = 50)]
    parents: usize,
    /// Services the routes send to (backendRefs); at least 2.
    #[arg(long, default_value_t = 4)]
    backends: usize,
    /// The endpoint of every backend Service.
    #[arg(long, default_value = "127.0.0.1:9")]
    upstream: SocketAddr,
}

#[derive(Args)]
struct FanoutArgs {
    /// remora-control's gRPC address.
    #[arg(long)]
    control: SocketAddr,
    /// Its pid, for /proc/<pid>/status (RSS) and CPU time.
    #[arg(long)]
    control_pid: u32,
    /// Subscriber streams to open.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// HTTP/2 connections (tonic Channels) the streams are spread over.
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Applies to measure (the report shows medians).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Pause between applies.
    #[arg(long, default_value_t = 1000)]
    pause_ms: u64,
    /// Admin.Status poll interval while waiting for every ACK (0: do not
    /// poll; each Status of 10,000 proxies costs the control plane CPU
    /// during the push it measures).
    #[arg(long, default_value_t = 20)]
    status_poll_ms: u64,
    /// Give up on an apply after this long.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// remora-control's metrics address (--metrics-addr), to read its own
    /// commit → last ACK gauge after each apply.
    #[arg(long)]
    control_metrics: Option<SocketAddr>,
    #[command(flatten)]
    mesh: MeshArgs,
    /// Where the JSON results go.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct SeedArgs {
    #[arg(long)]
    control: SocketAddr,
    #[command(flatten)]
    mesh: MeshArgs,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct VersionsArgs {
    #[arg(long)]
    control: SocketAddr,
    /// remora-control's pid (RSS).
    #[arg(long)]
    control_pid: u32,
    /// Versions to commit after the seed.
    #[arg(long, default_value_t = 1000)]
    versions: usize,
    #[command(flatten)]
    mesh: MeshArgs,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct SwapArgs {
    #[arg(long)]
    control: SocketAddr,
    /// remora-control's pid (RSS after the applies).
    #[arg(long)]
    control_pid: u32,
    /// The proxy's stderr, written with --log-format json and RUST_LOG=info.
    #[arg(long)]
    proxy_log: PathBuf,
    /// The proxy's outbound listener.
    #[arg(long)]
    proxy_outbound: SocketAddr,
    /// The proxy's pid (RSS, CPU time).
    #[arg(long)]
    proxy_pid: u32,
    /// The core the proxy is pinned to, to account for other work on it.
    #[arg(long)]
    proxy_core: Option<usize>,
    /// Re-applies measured without load (one route changed each time).
    #[arg(long, default_value_t = 10)]
    idle_swaps: usize,
    /// Requests per second of the paced load.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of each load phase (without swaps, with swaps).
    #[arg(long, default_value_t = 5)]
    duration_s: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1)]
    warmup_s: u64,
    /// A swap (Apply of a one-route change) every this many ms in the second phase.
    #[arg(long, default_value_t = 500)]
    swap_every_ms: u64,
    #[command(flatten)]
    mesh: MeshArgs,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BreakdownArgs {
    #[arg(long, default_value_t = 5000)]
    routes: usize,
    /// Comma-separated parent counts to try.
    #[arg(long, default_value = "1,50,500")]
    parents: String,
    #[arg(long, default_value_t = 4)]
    backends: usize,
    /// Applies per shape and kind of apply.
    #[arg(long, default_value_t = 11)]
    iters: usize,
    /// Kinds of apply to run: full (onto an empty runtime), same (the same
    /// snapshot again), 1-route (one route changed); e.g. `--kinds 1-route`
    /// to profile one.
    #[arg(long, default_value = "full,same,1-route")]
    kinds: String,
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    epoch();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Fanout(a) => fanout(a).await,
            Cmd::Seed(a) => seed(a).await,
            Cmd::Versions(a) => versions(a).await,
            Cmd::Swap(a) => swap(a).await,
            Cmd::Breakdown(a) => breakdown(a).await,
        }
    })
}

// ------------------------------------------------------------------ helpers

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// VmRSS and VmHWM of a process, kB.
fn mem_kb(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mem_json(pid: u32) -> Value {
    let (rss, hwm) = mem_kb(pid);
    json!({"vm_rss_kb": rss, "vm_hwm_kb": hwm, "vm_rss_mb": round(rss as f64 / 1024.0, 1), "vm_hwm_mb": round(hwm as f64 / 1024.0, 1)})
}

/// CPU time of a process so far, ns: the sum of its threads' run time from
/// /proc/<pid>/task/*/schedstat (finer than the tick counts in stat).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Busy CPU time of the whole machine (`core` None) or of one core so far,
/// ms, from /proc/stat (user + nice + system + irq + softirq + steal, in
/// USER_HZ = 100 ticks per second).
fn busy_ms(core: Option<usize>) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let name = core.map_or("cpu".to_string(), |c| format!("cpu{c}"));
    stat.lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            [0, 1, 2, 5, 6, 7]
                .iter()
                .map(|&i| f.get(i).copied().unwrap_or(0))
                .sum::<u64>() as f64
                * 10.0
        })
        .unwrap_or(0.0)
}

/// A JSON value as a table cell: numbers as they are, strings unquoted, null as "-".
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

// ------------------------------------------------------------------ the mesh

fn service_yaml(name: &str, endpoint: Option<SocketAddr>) -> String {
    let eps = match endpoint {
        Some(e) => format!("[{{address: {}, port: {}}}]", e.ip(), e.port()),
        None => "[]".into(),
    };
    format!(
        "kind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80, protocol: http}}]\n  endpoints: {eps}\n"
    )
}

fn route_yaml(i: usize, parents: usize, backend: usize) -> String {
    format!(
        "kind: HTTPRoute\nmetadata: {{name: route-{i:05}}}\nspec:\n  parentRefs: [{{name: svc-{p}}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /r{i}}}}}]\n    backendRefs: [{{name: backend-{backend}, port: 80}}]\n",
        p = i % parents
    )
}

fn mesh_yaml(m: &MeshArgs) -> String {
    let mut docs = Vec::new();
    for b in 0..m.backends {
        docs.push(service_yaml(&format!("backend-{b}"), Some(m.upstream)));
    }
    for p in 0..m.parents {
        docs.push(service_yaml(&format!("svc-{p}"), None));
    }
    for i in 0..m.routes {
        docs.push(route_yaml(i, m.parents, i % m.backends));
    }
    docs.join("---\n")
}

fn mesh_config(m: &MeshArgs) -> Result<Config> {
    if m.backends < 2 || m.parents < 1 || m.routes < 1 {
        bail!("need --backends >= 2, --parents >= 1, --routes >= 1");
    }
    remora_proto::parse_yaml(&mesh_yaml(m), "bench").map_err(|e| anyhow::anyhow!("{e}"))
}

/// Changes one route per call (its backend), so each Apply makes a new
/// version whose snapshot still has every route.
struct Changer {
    mesh: MeshArgs,
    backend: Vec<usize>,
    n: usize,
}

impl Changer {
    fn new(mesh: &MeshArgs) -> Changer {
        Changer {
            mesh: mesh.clone(),
            backend: (0..mesh.routes).map(|i| i % mesh.backends).collect(),
            n: 0,
        }
    }
    fn next(&mut self) -> Config {
        let i = (self.n * 7919) % self.mesh.routes;
        self.n += 1;
        self.backend[i] = (self.backend[i] + 1) % self.mesh.backends;
        remora_proto::parse_yaml(&route_yaml(i, self.mesh.parents, self.backend[i]), "bench")
            .expect("generated route parses")
    }
}

async fn admin(addr: SocketAddr) -> Result<AdminClient<Channel>> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("connecting to remora-control at {addr}"))?;
    Ok(AdminClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Applies `cfg`; returns the new version and the RPC's duration.
async fn apply(a: &mut AdminClient<Channel>, cfg: Config) -> Result<(u64, Duration)> {
    let t = Instant::now();
    let r = a
        .apply(ApplyRequest {
            resources: Some(cfg),
            author: "remora-cp-bench".into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("Admin.Apply: {}", s.message()))?
        .into_inner();
    if !r.changed {
        bail!("Admin.Apply changed nothing (version {})", r.version);
    }
    Ok((r.version, t.elapsed()))
}

// ------------------------------------------------------------------ fanout

struct Slot {
    version: AtomicU64,
    at_ns: AtomicU64,
}

struct Fanout {
    slots: Vec<Slot>,
    snapshot_bytes: AtomicUsize,
    ended: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

async fn subscriber(ch: Channel, idx: usize, st: Arc<Fanout>) {
    let fail = |e: String| {
        st.ended.fetch_add(1, Ordering::Relaxed);
        st.first_error.lock().unwrap().get_or_insert(e);
    };
    let (tx, rx) = mpsc::channel(4);
    let hello = Hello {
        node_id: format!("bench-{idx:05}"),
        ..Default::default()
    };
    let _ = tx
        .send(DiscoveryRequest {
            kind: Some(Kind::Hello(hello)),
        })
        .await;
    let mut client = DiscoveryClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut stream = match client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return fail(format!("stream {idx}: {e}")),
    };
    let slot = &st.slots[idx];
    loop {
        match stream.message().await {
            Ok(Some(snap)) => {
                let ack = DiscoveryRequest {
                    kind: Some(Kind::Ack(Ack {
                        version: snap.version,
                        error: String::new(),
                    })),
                };
                if tx.send(ack).await.is_err() {
                    return fail(format!("stream {idx}: request stream closed"));
                }
                slot.at_ns.store(now_ns(), Ordering::Relaxed);
                slot.version.store(snap.config_version, Ordering::Release);
                st.snapshot_bytes
                    .store(snap.config.len(), Ordering::Relaxed);
            }
            Ok(None) => return fail(format!("stream {idx}: ended by the server")),
            Err(e) => return fail(format!("stream {idx}: {e}")),
        }
    }
}

impl Fanout {
    fn count_at(&self, v: u64) -> usize {
        self.slots
            .iter()
            .filter(|s| s.version.load(Ordering::Acquire) >= v)
            .count()
    }

    /// Waits until every stream has version `v` (or the deadline).
    async fn wait_all(&self, v: u64, deadline: Duration) -> usize {
        let end = Instant::now() + deadline;
        loop {
            let n = self.count_at(v);
            if n == self.slots.len() || Instant::now() > end {
                return n;
            }
            if self.ended.load(Ordering::Relaxed) > 0 && n + self.ended() >= self.slots.len() {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn ended(&self) -> usize {
        self.ended.load(Ordering::Relaxed)
    }
}

/// Polls Admin.Status until every one of `n` proxies ACKed config version
/// `v`; returns the time (since `t0_ns`) of the first such answer, and how
/// long each Status call took.
async fn status_until_acked(
    mut a: AdminClient<Channel>,
    v: u64,
    n: usize,
    t0_ns: u64,
    poll: Duration,
    deadline: Duration,
) -> (Option<f64>, Vec<f64>) {
    let end = Instant::now() + deadline;
    let mut rpc = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        if let Ok(r) = a.status(StatusRequest {}).await {
            let s = r.into_inner();
            rpc.push(t.elapsed().as_secs_f64() * 1e3);
            let acked = s
                .proxies
                .iter()
                .filter(|p| p.connected && p.acked_version == s.snapshot_version)
                .count();
            if s.config_version == v && acked >= n {
                return (Some(ms(now_ns() - t0_ns)), rpc);
            }
        }
        tokio::time::sleep(poll).await;
    }
    (None, rpc)
}

async fn fanout(a: FanoutArgs) -> Result<()> {
    if a.streams == 0 || a.channels == 0 {
        bail!("--streams and --channels must be positive");
    }
    let pid = a.control_pid;
    let mut adm = admin(a.control).await?;
    let baseline = mem_json(pid);
    let (v1, seed_rpc) = apply(&mut adm, mesh_config(&a.mesh)?).await?;
    let after_seed = mem_json(pid);

    // Connections first, then every stream at once.
    let t_conn = Instant::now();
    let mut channels = Vec::with_capacity(a.channels);
    for _ in 0..a.channels {
        channels.push(
            Endpoint::from_shared(format!("http://{}", a.control))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .connect()
                .await
                .context("opening a Discovery connection")?,
        );
    }
    let connect_ms = t_conn.elapsed().as_secs_f64() * 1e3;
    let st = Arc::new(Fanout {
        slots: (0..a.streams)
            .map(|_| Slot {
                version: AtomicU64::new(0),
                at_ns: AtomicU64::new(0),
            })
            .collect(),
        snapshot_bytes: AtomicUsize::new(0),
        ended: AtomicUsize::new(0),
        first_error: Mutex::new(None),
    });
    let t_ramp = now_ns();
    for i in 0..a.streams {
        tokio::spawn(subscriber(channels[i % a.channels].clone(), i, st.clone()));
    }
    let got = st.wait_all(v1, Duration::from_secs(a.timeout_s * 2)).await;
    let ramp_ms = ms(now_ns() - t_ramp);
    if got < a.streams {
        bail!(
            "only {got} of {} streams got the first snapshot ({} ended; first error: {:?})",
            a.streams,
            st.ended(),
            st.first_error.lock().unwrap()
        );
    }
    let snapshot_bytes = st.snapshot_bytes.load(Ordering::Relaxed);
    eprintln!(
        "{} streams over {} connections got version {v1} ({snapshot_bytes} B) in {ramp_ms:.0} ms",
        a.streams, a.channels
    );
    // Let the ACKs land and the server settle before measuring memory.
    let (ramp_status, _) = status_until_acked(
        admin(a.control).await?,
        v1,
        a.streams,
        t_ramp,
        Duration::from_millis(200),
        Duration::from_secs(a.timeout_s),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holding = mem_json(pid);

    let mut changer = Changer::new(&a.mesh);
    let mut runs = Vec::new();
    for r in 0..a.repeat {
        tokio::time::sleep(Duration::from_millis(a.pause_ms)).await;
        let change = changer.next();
        let status_client = admin(a.control).await?;
        let pushes_before = match a.control_metrics {
            Some(m) => scrape(m, "remora_control_push_seconds_count").await,
            None => None,
        };
        let (cp0, me0, busy0) = (cpu_ns(pid), cpu_ns(std::process::id()), busy_ms(None));
        let t0 = now_ns();
        let (v, rpc) = apply(&mut adm, change).await?;
        let status = (a.status_poll_ms > 0).then(|| {
            tokio::spawn(status_until_acked(
                status_client,
                v,
                a.streams,
                t0,
                Duration::from_millis(a.status_poll_ms),
                Duration::from_secs(a.timeout_s),
            ))
        });
        let got = st.wait_all(v, Duration::from_secs(a.timeout_s)).await;
        let client_done_ms = ms(now_ns() - t0);
        let (status_last, status_rpc) = match status {
            Some(s) => s.await?,
            None => (None, Vec::new()),
        };
        // The server's own view: its push histogram counted every stream's
        // ACK (one per proxy); then its commit → last ACK gauge.
        let server_last_ack = match (a.control_metrics, pushes_before) {
            (Some(m), Some(before)) => {
                let end = Instant::now() + Duration::from_secs(a.timeout_s);
                while Instant::now() < end
                    && scrape(m, "remora_control_push_seconds_count")
                        .await
                        .is_none_or(|n| n < before + got as f64)
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                scrape(m, "remora_control_push_last_ack_seconds")
                    .await
                    .map(|s| round(s * 1e3, 2))
            }
            _ => None,
        };
        let (cp_cpu, me_cpu) = (cpu_ns(pid) - cp0, cpu_ns(std::process::id()) - me0);
        // What else ran on the machine meanwhile (other work steals the cores
        // the two processes share).
        let other = (busy_ms(None) - busy0 - ms(cp_cpu) - ms(me_cpu)).max(0.0);
        let lat = sorted(
            st.slots
                .iter()
                .filter(|s| s.version.load(Ordering::Acquire) >= v)
                .map(|s| ms(s.at_ns.load(Ordering::Relaxed).saturating_sub(t0)))
                .collect(),
        );
        let run = json!({
            "run": r + 1,
            "version": v,
            "acked_streams": got,
            "missing_streams": a.streams - got,
            "apply_rpc_ms": round(rpc.as_secs_f64() * 1e3, 2),
            "ack_p50_ms": round(pct(&lat, 50.0), 2),
            "ack_p99_ms": round(pct(&lat, 99.0), 2),
            "ack_max_ms": round(pct(&lat, 100.0), 2),
            "first_ack_ms": round(pct(&lat, 0.0), 2),
            "client_all_seen_ms": round(client_done_ms, 2),
            "status_last_ack_ms": status_last.map(|x| round(x, 2)),
            "server_commit_to_last_ack_ms": server_last_ack,
            "status_polls": status_rpc.len(),
            "status_rpc_ms_median": round(median(&status_rpc), 2),
            "control_cpu_ms": round(ms(cp_cpu), 1),
            "client_cpu_ms": round(ms(me_cpu), 1),
            "other_cpu_ms": round(other, 0),
        });
        eprintln!("apply {}: {run}", r + 1);
        runs.push(run);
    }
    let end = mem_json(pid);
    let col = |k: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[k].as_f64()).collect() };
    let med = |k: &str| round(median(&col(k)), 2);
    let summary = json!({
        "apply_rpc_ms": med("apply_rpc_ms"),
        "ack_p50_ms": med("ack_p50_ms"),
        "ack_p99_ms": med("ack_p99_ms"),
        "ack_max_ms": med("ack_max_ms"),
        "status_last_ack_ms": med("status_last_ack_ms"),
        "server_commit_to_last_ack_ms": med("server_commit_to_last_ack_ms"),
        "status_rpc_ms": med("status_rpc_ms_median"),
        "control_cpu_ms": med("control_cpu_ms"),
        "client_cpu_ms": med("client_cpu_ms"),
        "other_cpu_ms": med("other_cpu_ms"),
        "worst_ack_max_ms": round(col("ack_max_ms").into_iter().fold(0.0, f64::max), 2),
        "worst_status_last_ack_ms": round(col("status_last_ack_ms").into_iter().fold(0.0, f64::max), 2),
    });
    let out = json!({
        "scenario": "fanout",
        "streams": a.streams,
        "channels": a.channels,
        "mesh": {"routes": a.mesh.routes, "parents": a.mesh.parents, "backends": a.mesh.backends},
        "snapshot_bytes": snapshot_bytes,
        "seed_apply_rpc_ms": round(seed_rpc.as_secs_f64() * 1e3, 2),
        "connect_ms": round(connect_ms, 1),
        "ramp_all_first_snapshot_ms": round(ramp_ms, 1),
        "ramp_status_all_acked_ms": ramp_status.map(|x| round(x, 1)),
        "streams_ended": st.ended(),
        "first_error": st.first_error.lock().unwrap().clone(),
        "control_mem": {"baseline": baseline, "after_seed": after_seed, "holding_streams": holding, "end": end},
        "runs": runs,
        "median": summary,
    });
    write_json(&a.out, &out)?;

    println!();
    println!(
        "Fan-out: {} streams over {} HTTP/2 connections, snapshot {:.1} KB ({} routes)",
        a.streams,
        a.channels,
        snapshot_bytes as f64 / 1024.0,
        a.mesh.routes
    );
    println!(
        "ramp: all streams had version {v1} after {ramp_ms:.0} ms (server saw every ACK after {} ms)",
        ramp_status.map_or("?".into(), |x| format!("{x:.0}"))
    );
    println!(
        "{:<6}{:>10}{:>10}{:>10}{:>10}{:>16}{:>16}{:>12}{:>12}{:>12}",
        "apply",
        "rpc ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "status-last ms",
        "server-last ms",
        "cp cpu ms",
        "cli cpu ms",
        "other ms"
    );
    let row = |name: &str, r: &Value| {
        println!(
            "{:<6}{:>10}{:>10}{:>10}{:>10}{:>16}{:>16}{:>12}{:>12}{:>12}",
            name,
            cell(&r["apply_rpc_ms"]),
            cell(&r["ack_p50_ms"]),
            cell(&r["ack_p99_ms"]),
            cell(&r["ack_max_ms"]),
            cell(&r["status_last_ack_ms"]),
            cell(&r["server_commit_to_last_ack_ms"]),
            cell(&r["control_cpu_ms"]),
            cell(&r["client_cpu_ms"]),
            cell(&r["other_cpu_ms"])
        )
    };
    for r in &runs {
        row(&r["run"].to_string(), r);
    }
    row("median", &out["median"]);
    println!(
        "remora-control memory: baseline {} MB; holding {} streams: VmRSS {} MB; end: VmRSS {} MB, VmHWM {} MB",
        out["control_mem"]["baseline"]["vm_rss_mb"],
        a.streams,
        out["control_mem"]["holding_streams"]["vm_rss_mb"],
        out["control_mem"]["end"]["vm_rss_mb"],
        out["control_mem"]["end"]["vm_hwm_mb"],
    );
    if st.ended() > 0 {
        println!(
            "WARNING: {} streams ended early; first error: {:?}",
            st.ended(),
            st.first_error.lock().unwrap()
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ seed

async fn seed(a: SeedArgs) -> Result<()> {
    let cfg = mesh_config(&a.mesh)?;
    let bytes = cfg.encoded_len();
    let mut adm = admin(a.control).await?;
    let (v, rpc) = apply(&mut adm, cfg).await?;
    let out = json!({
        "scenario": "seed",
        "mesh": {"routes": a.mesh.routes, "parents": a.mesh.parents, "backends": a.mesh.backends},
        "version": v,
        "apply_request_bytes": bytes,
        "apply_rpc_ms": round(rpc.as_secs_f64() * 1e3, 2),
    });
    println!(
        "seeded version {v}: {} routes, {} parents, {} backends ({:.1} KB), Admin.Apply took {:.1} ms",
        a.mesh.routes,
        a.mesh.parents,
        a.mesh.backends,
        bytes as f64 / 1024.0,
        rpc.as_secs_f64() * 1e3
    );
    write_json(&a.out, &out)
}

// ------------------------------------------------------------------ versions

/// One sample of a Prometheus metric (the first line named `name`).
async fn scrape(addr: SocketAddr, name: &str) -> Option<f64> {
    let req = http::Request::get(format!("http://{addr}/metrics"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = remora_tests::http1_client().request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn versions(a: VersionsArgs) -> Result<()> {
    let m = &a.mesh;
    let mut adm = admin(a.control).await?;
    let baseline = mem_json(a.control_pid);
    let (v0, seed_rpc) = apply(&mut adm, mesh_config(m)?).await?;
    let mut changer = Changer::new(m);
    let mut samples = vec![json!({"version": v0, "mem": mem_json(a.control_pid)})];
    let mut rpc = Vec::with_capacity(a.versions);
    let checkpoints = |n: usize| n == 1 || n == 10 || n.is_multiple_of(100);
    let t0 = Instant::now();
    for n in 1..=a.versions {
        let (v, took) = apply(&mut adm, changer.next()).await?;
        rpc.push(took.as_secs_f64() * 1e3);
        if checkpoints(n) || n == a.versions {
            let mem = mem_json(a.control_pid);
            eprintln!("version {v}: VmRSS {} MB", mem["vm_rss_mb"]);
            samples.push(json!({"version": v, "mem": mem}));
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let sorted_rpc = sorted(rpc.clone());
    let out = json!({
        "scenario": "versions",
        "mesh": {"routes": m.routes, "parents": m.parents, "backends": m.backends},
        "seed_apply_rpc_ms": round(seed_rpc.as_secs_f64() * 1e3, 2),
        "versions": a.versions,
        "seconds": round(elapsed, 1),
        "apply_rpc_ms": {"p50": round(pct(&sorted_rpc, 50.0), 2), "p99": round(pct(&sorted_rpc, 99.0), 2), "max": round(pct(&sorted_rpc, 100.0), 2)},
        "control_mem": {"baseline": baseline, "samples": samples, "end": mem_json(a.control_pid)},
    });
    write_json(&a.out, &out)?;
    println!();
    println!(
        "Versions: {} one-route changes on a {}-route mesh in {:.1} s; Admin.Apply p50 {} ms, p99 {} ms, max {} ms",
        a.versions,
        m.routes,
        elapsed,
        out["apply_rpc_ms"]["p50"],
        out["apply_rpc_ms"]["p99"],
        out["apply_rpc_ms"]["max"]
    );
    println!("{:>10}{:>14}{:>14}", "version", "VmRSS MB", "VmHWM MB");
    for s in out["control_mem"]["samples"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "{:>10}{:>14}{:>14}",
            cell(&s["version"]),
            cell(&s["mem"]["vm_rss_mb"]),
            cell(&s["mem"]["vm_hwm_mb"])
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ swap

/// One `config applied` line of the proxy's JSON log.
#[derive(Clone, Debug)]
struct Applied {
    version: String,
    routes: u64,
    micros: u64,
    /// The line's timestamp, Unix seconds (wall clock, same host).
    unix: f64,
}

/// Follows the proxy's log file.
struct LogTail {
    file: std::fs::File,
    pos: u64,
    partial: String,
    applied: Vec<Applied>,
    rejected: Vec<String>,
}

impl LogTail {
    fn open(path: &Path) -> Result<LogTail> {
        Ok(LogTail {
            file: std::fs::File::open(path)
                .with_context(|| format!("opening the proxy log {}", path.display()))?,
            pos: 0,
            partial: String::new(),
            applied: Vec::new(),
            rejected: Vec::new(),
        })
    }

    fn poll(&mut self) {
        let mut buf = String::new();
        if self.file.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let Ok(n) = self.file.read_to_string(&mut buf) else {
            return;
        };
        self.pos += n as u64;
        self.partial.push_str(&buf);
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let f = &v["fields"];
            match f["message"].as_str() {
                Some("config applied") => self.applied.push(Applied {
                    version: f["version"].as_str().unwrap_or("").to_string(),
                    routes: f["routes"].as_u64().unwrap_or(0),
                    micros: f["micros"].as_u64().unwrap_or(0),
                    unix: v["timestamp"]
                        .as_str()
                        .and_then(parse_utc)
                        .unwrap_or(f64::NAN),
                }),
                Some(m) if m.contains("rejected") => self.rejected.push(line.trim().to_string()),
                _ => {}
            }
        }
    }

    fn find(&self, config_version: u64) -> Option<Applied> {
        let prefix = format!("{config_version}.");
        self.applied
            .iter()
            .find(|a| a.version.starts_with(&prefix))
            .cloned()
    }

    async fn wait_for(&mut self, config_version: u64, deadline: Duration) -> Result<Applied> {
        let end = Instant::now() + deadline;
        loop {
            self.poll();
            if let Some(a) = self.find(config_version) {
                return Ok(a);
            }
            if let Some(r) = self.rejected.first() {
                bail!("the proxy rejected a config: {r}");
            }
            if Instant::now() > end {
                bail!("the proxy did not log `config applied` for version {config_version}.*");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

/// Unix seconds of an RFC 3339 UTC timestamp as tracing-subscriber writes
/// it ("2026-11-22T03:35:23.012332Z").
fn parse_utc(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + h * 3600 + min * 60) as f64 + sec)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

struct Sample {
    sched_ns: u64,
    lat_ns: u64,
    ok: bool,
}

/// Open-loop load: request i is due at start + i/rate and its latency is
/// measured from that due time (no coordinated omission).
async fn paced_load(
    client: remora_tests::HttpClient,
    proxy: SocketAddr,
    paths: Arc<Vec<(String, String)>>,
    rate: u32,
    dur: Duration,
) -> Vec<Sample> {
    let n = (rate as f64 * dur.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Paced by a thread of its own (std sleep is much finer than tokio's
    // 1 ms timer); the requests run on the runtime.
    let handle = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(5);
        for i in 0..n {
            let due = start + interval * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let (client, tx, paths) = (client.clone(), tx.clone(), paths.clone());
            handle.spawn(async move {
                let (host, path) = &paths[i % paths.len()];
                let req = http::Request::get(format!("http://{proxy}{path}"))
                    .header("host", host.as_str())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let ok = match tokio::time::timeout(Duration::from_secs(10), async {
                    let resp = client.request(req).await.ok()?;
                    let status = resp.status();
                    resp.into_body().collect().await.ok()?;
                    Some(status.is_success())
                })
                .await
                {
                    Ok(Some(ok)) => ok,
                    _ => false,
                };
                let done = Instant::now();
                let _ = tx.send(Sample {
                    sched_ns: due.duration_since(epoch()).as_nanos() as u64,
                    lat_ns: done.duration_since(due).as_nanos() as u64,
                    ok,
                });
            });
        }
    });
    let mut out = Vec::with_capacity(n);
    while let Some(s) = rx.recv().await {
        out.push(s);
    }
    out
}

fn latency_stats(samples: &[Sample]) -> Value {
    let lat = sorted(samples.iter().map(|s| ms(s.lat_ns)).collect());
    json!({
        "requests": samples.len(),
        "errors": samples.iter().filter(|s| !s.ok).count(),
        "p50_ms": round(pct(&lat, 50.0), 3),
        "p90_ms": round(pct(&lat, 90.0), 3),
        "p99_ms": round(pct(&lat, 99.0), 3),
        "p999_ms": round(pct(&lat, 99.9), 3),
        "max_ms": round(pct(&lat, 100.0), 3),
    })
}

/// The worst latency among requests due in each window [b_i, b_{i+1}).
fn window_max(samples: &[Sample], bounds: &[u64]) -> Vec<f64> {
    bounds
        .windows(2)
        .map(|w| {
            samples
                .iter()
                .filter(|s| s.sched_ns >= w[0] && s.sched_ns < w[1])
                .map(|s| ms(s.lat_ns))
                .fold(0.0, f64::max)
        })
        .collect()
}

async fn swap(a: SwapArgs) -> Result<()> {
    let m = &a.mesh;
    let mut tail = LogTail::open(&a.proxy_log)?;
    let mut adm = admin(a.control).await?;
    let current = adm
        .status(StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("Admin.Status: {}", s.message()))?
        .into_inner()
        .config_version;
    let initial = tail.wait_for(current, Duration::from_secs(10)).await?;
    if initial.routes != m.routes as u64 {
        bail!(
            "the proxy applied {} routes, expected {} (seed first)",
            initial.routes,
            m.routes
        );
    }
    eprintln!(
        "initial snapshot {}: {} routes applied in {} µs",
        initial.version, initial.routes, initial.micros
    );
    let proxy_mem_initial = mem_json(a.proxy_pid);
    let control_mem_start = mem_json(a.control_pid);
    let mut changer = Changer::new(m);

    // Re-applies without load: each waits for the proxy's log line.
    let mut idle = Vec::new();
    for _ in 0..a.idle_swaps {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = unix_now();
        let (v, rpc) = apply(&mut adm, changer.next()).await?;
        let got = tail.wait_for(v, Duration::from_secs(10)).await?;
        idle.push(json!({
            "version": got.version,
            "routes": got.routes,
            "micros": got.micros,
            "apply_rpc_ms": round(rpc.as_secs_f64() * 1e3, 2),
            "apply_to_proxy_log_ms": round((got.unix - t0) * 1e3, 2),
        }));
    }

    // Load: warm-up, without swaps, with swaps.
    let client = remora_tests::http1_client();
    let paths: Arc<Vec<(String, String)>> = Arc::new(
        (0..m.routes)
            .filter(|i| i % m.parents == 0)
            .map(|i| ("svc-0".to_string(), format!("/r{i}/x")))
            .collect(),
    );
    let warm = paced_load(
        client.clone(),
        a.proxy_outbound,
        paths.clone(),
        a.rate,
        Duration::from_secs(a.warmup_s),
    )
    .await;
    if warm.iter().all(|s| !s.ok) {
        bail!("no request through the proxy succeeded during the warm-up");
    }
    let dur = Duration::from_secs(a.duration_s);
    // CPU the proxy used, and what else ran on its core, during a phase.
    let mark = || (busy_ms(a.proxy_core), ms(cpu_ns(a.proxy_pid)));
    let cpu_json = |before: (f64, f64), after: (f64, f64)| {
        let proxy = after.1 - before.1;
        let other = a
            .proxy_core
            .map(|_| round((after.0 - before.0 - proxy).max(0.0), 0));
        json!({"proxy_cpu_ms": round(proxy, 1), "other_on_proxy_core_ms": other})
    };
    let m0 = mark();
    let base_start = now_ns();
    let base = paced_load(client.clone(), a.proxy_outbound, paths.clone(), a.rate, dur).await;
    let base_end = now_ns();
    let base_cpu = cpu_json(m0, mark());

    let every = Duration::from_millis(a.swap_every_ms);
    let n_swaps = (dur.as_millis() / every.as_millis().max(1)) as usize;
    let load = tokio::spawn(paced_load(
        client.clone(),
        a.proxy_outbound,
        paths.clone(),
        a.rate,
        dur,
    ));
    let m1 = mark();
    let phase_start = Instant::now();
    let mut issued = Vec::new();
    for k in 0..n_swaps {
        // The first swap a quarter-period in, so the phase starts and ends on load without one.
        tokio::time::sleep_until((phase_start + every / 4 + every * k as u32).into()).await;
        let (t, wall) = (now_ns(), unix_now());
        let (v, rpc) = apply(&mut adm, changer.next()).await?;
        issued.push((v, t, wall, rpc));
    }
    let swapped = load.await?;
    let swap_end = now_ns();
    let swap_cpu = cpu_json(m1, mark());
    // A proxy busy applying one snapshot gets only the newest of those
    // committed meanwhile (the control plane's watch channel keeps the
    // latest), so some versions may never be applied: wait for the last one.
    let mut under_load = Vec::new();
    let mut coalesced = 0;
    if let Some((last, ..)) = issued.last() {
        tail.wait_for(*last, Duration::from_secs(10)).await?;
    }
    for (v, _, wall, rpc) in &issued {
        let Some(got) = tail.find(*v) else {
            coalesced += 1;
            continue;
        };
        under_load.push(json!({
            "version": got.version,
            "routes": got.routes,
            "micros": got.micros,
            "apply_rpc_ms": round(rpc.as_secs_f64() * 1e3, 2),
            "apply_to_proxy_log_ms": round((got.unix - wall) * 1e3, 2),
        }));
    }

    // Worst latency per swap period, with and without swaps.
    let period = every.as_nanos() as u64;
    let mut sw_bounds: Vec<u64> = issued.iter().map(|(_, t, _, _)| *t).collect();
    sw_bounds.push(swap_end);
    let base_bounds: Vec<u64> = (0..)
        .map(|k| base_start + k * period)
        .take_while(|b| *b <= base_end)
        .collect();
    let base_win = window_max(&base, &base_bounds);
    let swap_win = window_max(&swapped, &sw_bounds);

    let micros = |v: &[Value]| -> Vec<f64> {
        v.iter()
            .filter_map(|x| x["micros"].as_f64())
            .map(|x| x / 1e3)
            .collect()
    };
    let (idle_ms, load_ms) = (micros(&idle), micros(&under_load));
    let col =
        |v: &[Value], k: &str| -> Vec<f64> { v.iter().filter_map(|x| x[k].as_f64()).collect() };
    let out = json!({
        "scenario": "swap",
        "mesh": {"routes": m.routes, "parents": m.parents, "backends": m.backends},
        "initial": {"version": initial.version, "routes": initial.routes, "micros": initial.micros},
        "idle_reapplies": idle,
        "idle_apply_ms": {"median": round(median(&idle_ms), 2), "max": round(idle_ms.iter().copied().fold(0.0, f64::max), 2)},
        "idle_apply_rpc_ms_median": round(median(&col(&idle, "apply_rpc_ms")), 2),
        "idle_apply_to_proxy_log_ms_median": round(median(&col(&idle, "apply_to_proxy_log_ms")), 2),
        "load": {
            "rate": a.rate,
            "duration_s": a.duration_s,
            "swap_every_ms": a.swap_every_ms,
            "without_swaps": latency_stats(&base),
            "with_swaps": latency_stats(&swapped),
            "cpu_without_swaps": base_cpu,
            "cpu_with_swaps": swap_cpu,
            "swaps_issued": issued.len(),
            "swaps_skipped_by_the_proxy": coalesced,
            "swaps": under_load,
            "swap_apply_ms": {"median": round(median(&load_ms), 2), "max": round(load_ms.iter().copied().fold(0.0, f64::max), 2)},
            "window_max_ms_without_swaps": {"median": round(median(&base_win), 3), "max": round(base_win.iter().copied().fold(0.0, f64::max), 3)},
            "window_max_ms_with_swaps": {"median": round(median(&swap_win), 3), "max": round(swap_win.iter().copied().fold(0.0, f64::max), 3)},
        },
        "proxy_mem": {"after_initial": proxy_mem_initial, "end": mem_json(a.proxy_pid)},
        "control_mem": {"start": control_mem_start, "version_at_start": current, "end": mem_json(a.control_pid), "versions_at_end": issued.last().map(|x| x.0)},
    });
    write_json(&a.out, &out)?;

    println!();
    println!(
        "Snapshot apply on a real proxy: {} routes on {} Services, {} backends",
        m.routes, m.parents, m.backends
    );
    println!(
        "initial (empty → {} routes): {:.1} ms",
        initial.routes,
        initial.micros as f64 / 1e3
    );
    println!(
        "re-apply, no load ({} runs): median {:.1} ms, max {:.1} ms; Admin.Apply rpc {} ms, Apply → proxy log {} ms (medians)",
        idle_ms.len(),
        median(&idle_ms),
        idle_ms.iter().copied().fold(0.0, f64::max),
        out["idle_apply_rpc_ms_median"],
        out["idle_apply_to_proxy_log_ms_median"]
    );
    println!(
        "re-apply under load ({} of {} swaps reached the proxy, the others were superseded): median {:.1} ms, max {:.1} ms",
        load_ms.len(),
        issued.len(),
        median(&load_ms),
        load_ms.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "{:<16}{:>10}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}{:>16}",
        "load",
        "requests",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "win-max med ms"
    );
    for (name, s, w) in [
        (
            "without swaps",
            &out["load"]["without_swaps"],
            &out["load"]["window_max_ms_without_swaps"],
        ),
        (
            "swap every 500ms",
            &out["load"]["with_swaps"],
            &out["load"]["window_max_ms_with_swaps"],
        ),
    ] {
        println!(
            "{:<16}{:>10}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}{:>16}",
            name,
            cell(&s["requests"]),
            cell(&s["errors"]),
            cell(&s["p50_ms"]),
            cell(&s["p90_ms"]),
            cell(&s["p99_ms"]),
            cell(&s["p999_ms"]),
            cell(&s["max_ms"]),
            cell(&w["median"])
        );
    }
    println!(
        "proxy CPU during the phases: {} ms without swaps, {} ms with swaps (other work on its core: {} / {} ms)",
        cell(&out["load"]["cpu_without_swaps"]["proxy_cpu_ms"]),
        cell(&out["load"]["cpu_with_swaps"]["proxy_cpu_ms"]),
        cell(&out["load"]["cpu_without_swaps"]["other_on_proxy_core_ms"]),
        cell(&out["load"]["cpu_with_swaps"]["other_on_proxy_core_ms"]),
    );
    println!(
        "proxy memory: VmRSS {} MB, VmHWM {} MB; remora-control: VmRSS {} MB at version {}, {} MB (VmHWM {} MB) at version {}",
        out["proxy_mem"]["end"]["vm_rss_mb"],
        out["proxy_mem"]["end"]["vm_hwm_mb"],
        out["control_mem"]["start"]["vm_rss_mb"],
        current,
        out["control_mem"]["end"]["vm_rss_mb"],
        out["control_mem"]["end"]["vm_hwm_mb"],
        cell(&out["control_mem"]["versions_at_end"]),
    );
    Ok(())
}

// ------------------------------------------------------------------ breakdown

async fn breakdown(a: BreakdownArgs) -> Result<()> {
    use remora_proxy::config::Validated;
    use remora_proxy::metrics::Metrics;
    use remora_proxy::runtime::{compile, Runtime, Settings};

    // The proxy's defaults (remora-proxy --help).
    let settings = Settings::default();
    let metrics = Metrics::new();
    // One apply the way the proxy runs a snapshot (source::apply): decode
    // and validate against the running runtime's cache, compile against
    // it, then free the old one (the proxy does that last step on its
    // retire thread, off the apply's path). Returns the new runtime and
    // the three times in ms.
    let apply =
        |bytes: &Bytes, current: &Arc<Runtime>, v: String| -> Result<(Arc<Runtime>, [f64; 3])> {
            let f = |d: Duration| d.as_secs_f64() * 1e3;
            let t = Instant::now();
            let c = Validated::from_snapshot(bytes, &current.decode_cache, &settings)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let t_check = t.elapsed();
            let t = Instant::now();
            let rt = compile(c, v, current, &settings, &metrics).map_err(anyhow::Error::msg)?;
            Ok((Arc::new(rt), [f(t_check), f(t.elapsed()), 0.0]))
        };
    let mut shapes = Vec::new();
    // Medians, and the fastest total: on a busy machine the minimum of a
    // deterministic step is the better estimate of its cost.
    println!(
        "{:<9}{:>8}{:>9}  {:<10}{:>15}{:>12}{:>11}{:>11}{:>15}",
        "parents", "routes", "KB", "apply", "decode+check", "compile", "total", "min", "drop (off)"
    );
    for p in a.parents.split(',') {
        let parents: usize = p.trim().parse().context("--parents")?;
        let mesh = MeshArgs {
            routes: a.routes,
            parents,
            backends: a.backends,
            upstream: "127.0.0.1:9".parse().unwrap(),
        };
        // What the control plane sends: the prepared config, encoded.
        let cfg = remora_proto::prepare(mesh_config(&mesh)?).map_err(|e| anyhow::anyhow!("{e}"))?;
        let bytes = Bytes::from(cfg.encode_to_vec());
        let iters = a.iters.max(2);
        let mut rows: Vec<(&str, Vec<[f64; 3]>)> = Vec::new();

        // full: onto an empty runtime (nothing to reuse), as at boot.
        let mut full = Vec::new();
        let run = |k: &str| a.kinds.split(',').any(|x| x.trim() == k);
        for i in 0..if run("full") { iters } else { 0 } {
            let (rt, mut times) = apply(&bytes, &Arc::new(Runtime::empty()), format!("f{i}"))?;
            let t = Instant::now();
            drop(rt);
            times[2] = t.elapsed().as_secs_f64() * 1e3;
            full.push(times);
        }
        if !full.is_empty() {
            rows.push(("full", full));
        }

        // same: the same snapshot again (a reconnect, an endpoint-only
        // change elsewhere).
        let mut current = apply(&bytes, &Arc::new(Runtime::empty()), "0".into())?.0;
        let mut same = Vec::new();
        for i in 0..if run("same") { iters } else { 0 } {
            let (rt, mut times) = apply(&bytes, &current, format!("s{i}"))?;
            let t = Instant::now();
            drop(std::mem::replace(&mut current, rt));
            times[2] = t.elapsed().as_secs_f64() * 1e3;
            same.push(times);
        }
        if !same.is_empty() {
            rows.push(("same", same));
        }

        // 1-route: one route changed per apply; the snapshot still
        // carries every route.
        let mut changer = Changer::new(&mesh);
        let mut changed_cfg = cfg;
        let mut one = Vec::new();
        for i in 0..if run("1-route") { iters } else { 0 } {
            for r in changer.next().http_routes {
                let name = r.metadata.as_ref().map(|m| m.name.clone());
                if let Some(slot) = changed_cfg
                    .http_routes
                    .iter_mut()
                    .find(|x| x.metadata.as_ref().map(|m| m.name.clone()) == name)
                {
                    *slot = r;
                }
            }
            let bytes = Bytes::from(changed_cfg.encode_to_vec());
            let (rt, mut times) = apply(&bytes, &current, format!("c{i}"))?;
            let t = Instant::now();
            drop(std::mem::replace(&mut current, rt));
            times[2] = t.elapsed().as_secs_f64() * 1e3;
            one.push(times);
        }
        if !one.is_empty() {
            rows.push(("1-route", one));
        }

        let mut out = serde_json::Map::new();
        for (name, r) in &rows {
            let med = |k: usize| median(&r.iter().map(|x| x[k]).collect::<Vec<_>>());
            let totals: Vec<f64> = r.iter().map(|x| x[0] + x[1]).collect();
            let total = median(&totals);
            let min = totals.iter().copied().fold(f64::INFINITY, f64::min);
            println!(
                "{:<9}{:>8}{:>9.0}  {:<10}{:>15.2}{:>12.2}{:>11.2}{:>11.2}{:>15.2}",
                parents,
                a.routes,
                bytes.len() as f64 / 1024.0,
                name,
                med(0),
                med(1),
                total,
                min,
                med(2)
            );
            out.insert(
                name.to_string(),
                json!({"decode_check_ms": round(med(0), 3), "compile_ms": round(med(1), 3), "apply_ms": round(total, 3), "apply_min_ms": round(min, 3), "drop_ms": round(med(2), 3)}),
            );
        }
        shapes.push(json!({
            "parents": parents,
            "routes": a.routes,
            "backends": a.backends,
            "snapshot_bytes": bytes.len(),
            "iterations": iters,
            "median": out,
        }));
    }
    write_json(&a.out, &json!({"scenario": "breakdown", "shapes": shapes}))
}
