//! remora-proxy: the sidecar. Every address, port and limit is a flag with
//! an environment variable; `remora-proxy --help` lists them.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand};
use remora_proto::ObjectRef;
use remora_proxy::app::LocalApp;
use remora_proxy::balance::OutlierConfig;
use remora_proxy::cluster::Protocol;
use remora_proxy::control_plane::ControlPlane;
use remora_proxy::discovery::DiscoveryConfig;
use remora_proxy::identity::{CertStore, IdentityConfig};
use remora_proxy::init::{Cidr, InitConfig, PortRange};
use remora_proxy::metrics::Metrics;
use remora_proxy::pool::PoolConfig;
use remora_proxy::proxy::Proxy;
use remora_proxy::retry::BudgetParams;
use remora_proxy::runtime::{Runtime, Settings};
use remora_proxy::server::{Lifecycle, ServerLimits};
use remora_proxy::tls::MeshTls;
use remora_proxy::{admin, source};
use remora_proxy::{inbound, outbound};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// jemalloc, not glibc's malloc: glibc keeps what connections freed in its
/// heap (an allocation still live above it pins the rest), so RSS stayed at
/// its peak after the connections closed; jemalloc's background thread
/// hands unused pages back within seconds. See BENCHMARKS.md,
/// "Per-connection memory".
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn duration(s: &str) -> Result<Duration, String> {
    remora_proto::duration::parse(s)
}

/// A listener address, or "off" to disable the listener.
#[derive(Clone, Copy, Debug)]
struct Listen(Option<SocketAddr>);

fn listen_addr(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("{s:?} is not ip:port or \"off\""))
}

#[derive(Parser, Debug)]
#[command(
    name = "remora-proxy",
    version,
    about = "Remora sidecar proxy",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Config file, or directory of *.yaml files, watched for changes.
    #[arg(long, env = "REMORA_CONFIG", conflicts_with = "control_plane")]
    config: Option<PathBuf>,
    /// Control plane URL (e.g. https://remora-control:4200): config streams
    /// from it instead of a file. Several replicas: comma-separated URLs
    /// (at most 16, one scheme), or a name that resolves to each of them
    /// (resolved again before each reconnect); the proxy moves to another
    /// when its replica goes away, verifying TLS against the URL's host.
    #[arg(long, env = "REMORA_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Root certificate(s) (PEM) that verify an https control plane (its
    /// CA's root, <data-dir>/ca/root.pem; in Kubernetes a ConfigMap).
    #[arg(long, env = "REMORA_CONTROL_PLANE_CA", requires = "control_plane")]
    control_plane_ca: Option<PathBuf>,
    /// The Service this proxy fronts ("name" or "namespace/name"); its
    /// instance registers under it with the control plane.
    #[arg(long, env = "REMORA_SERVICE")]
    service: Option<String>,
    /// This proxy's id at the control plane (defaults to the host name).
    #[arg(long, env = "REMORA_NODE_ID")]
    node_id: Option<String>,
    /// The address other proxies reach this instance at (defaults to the
    /// inbound address, or $POD_IP with the inbound port).
    #[arg(long, env = "REMORA_ADVERTISE_ADDR")]
    advertise_addr: Option<SocketAddr>,
    /// Labels of this instance (key=value, comma-separated), e.g. version=v2.
    #[arg(long = "label", env = "REMORA_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// Where the last-known-good snapshot from the control plane, and the
    /// workload certificate and its key, are kept (defaults to
    /// <tmp>/remora/<node id>). In Kubernetes: an in-memory emptyDir.
    #[arg(long, env = "REMORA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// INSECURE: send the bootstrap token to an http:// control plane, in
    /// the clear. For a local development setup only.
    #[arg(long, env = "REMORA_INSECURE_DEV_PLAINTEXT")]
    insecure_dev_plaintext: bool,
    /// Longest wait between control-plane reconnects.
    #[arg(long, env = "REMORA_CONTROL_PLANE_MAX_BACKOFF", default_value = "10s", value_parser = duration)]
    control_plane_max_backoff: Duration,
    /// File holding the bootstrap token presented to the control plane for
    /// this proxy's identity certificate (read before each request). With
    /// it the proxy gets a certificate, renews it, and speaks mTLS with the
    /// other sidecars.
    #[arg(long, env = "REMORA_BOOTSTRAP_TOKEN_FILE", requires = "control_plane")]
    bootstrap_token_file: Option<PathBuf>,
    /// Namespace of this proxy's identity (defaults to --namespace).
    #[arg(
        long,
        env = "REMORA_IDENTITY_NAMESPACE",
        requires = "bootstrap_token_file"
    )]
    identity_namespace: Option<String>,
    /// Service account of this proxy's identity (defaults to the Service
    /// name of --service, or "default").
    #[arg(
        long,
        env = "REMORA_IDENTITY_SERVICE_ACCOUNT",
        requires = "bootstrap_token_file"
    )]
    identity_service_account: Option<String>,
    /// Keys tracked per rate limit, each with its own bucket (about 22 bytes
    /// a key); past it, keys not yet tracked share one overflow bucket until
    /// idle keys are evicted (every 10 s), and tracked keys keep theirs.
    #[arg(long, env = "REMORA_RATELIMIT_MAX_KEYS", default_value_t = remora_proxy::ratelimit::DEFAULT_MAX_KEYS)]
    ratelimit_max_keys: usize,
    /// Most route rules a config may hold; a bigger one is rejected (NACK).
    #[arg(long, env = "REMORA_MAX_ROUTE_RULES", default_value_t = 100_000)]
    max_route_rules: usize,
    /// How often the config path is checked for changes (SIGHUP checks at once).
    #[arg(long, env = "REMORA_CONFIG_POLL_INTERVAL", default_value = "1s", value_parser = duration)]
    config_poll_interval: Duration,

    /// Inbound listener: traffic from the mesh to the local app ("off" disables).
    #[arg(long, env = "REMORA_INBOUND_ADDR", default_value = "0.0.0.0:4143", value_parser = listen_addr)]
    inbound_addr: Listen,
    /// Send every inbound connection to this address (setups without
    /// interception). Without it, a connection goes to the port the caller
    /// meant on the pod's address, or to 127.0.0.1:8080 when it names none.
    #[arg(long, env = "REMORA_APP_ADDR")]
    app_addr: Option<SocketAddr>,
    /// What the app at --app-addr (or 127.0.0.1:8080) speaks when its
    /// Service does not declare it: http, http2, grpc, or tcp (opaque bytes).
    #[arg(long, env = "REMORA_APP_PROTOCOL", default_value = "http")]
    app_protocol: String,
    /// How long an intercepted connection to an undeclared port may take to
    /// send its first bytes before it is taken as opaque TCP (a
    /// server-first protocol: declare its port `tcp` to skip the wait).
    #[arg(long, env = "REMORA_DETECT_TIMEOUT", default_value = "1s", value_parser = duration)]
    detect_timeout: Duration,
    /// An opaque TCP connection with no byte either way for this long is closed.
    #[arg(long, env = "REMORA_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = duration)]
    tcp_idle_timeout: Duration,
    /// A request or upgraded connection with no byte either way (headers
    /// or body) for this long is cut off.
    #[arg(long, env = "REMORA_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    stream_idle_timeout: Duration,
    /// Outbound listener: the local app's calls to other services ("off" disables).
    #[arg(long, env = "REMORA_OUTBOUND_ADDR", default_value = "127.0.0.1:4140", value_parser = listen_addr)]
    outbound_addr: Listen,
    /// Admin listener: /live /ready /metrics /config /shutdown.
    #[arg(long, env = "REMORA_ADMIN_ADDR", default_value = "0.0.0.0:4191")]
    admin_addr: SocketAddr,
    /// File holding the token /config and POST /shutdown need from off
    /// loopback (Authorization: Bearer <token>); read at each call, so
    /// replacing it rotates the token. Without it, or while it is empty or
    /// unreadable, only loopback may call them.
    #[arg(long, env = "REMORA_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// The app's kubelet probes, answered on the admin port under
    /// /app-health/: JSON from path to {"httpGet": {...}} or {"tcpSocket":
    /// {...}} (`remoractl inject` writes it).
    #[arg(long, env = "REMORA_APP_PROBES")]
    app_probes: Option<String>,
    /// Namespace this proxy runs in; short Service names resolve in it.
    #[arg(long, env = "REMORA_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Data-plane worker threads (1 runs a single-threaded runtime).
    #[arg(long, env = "REMORA_WORKERS", default_value_t = 1)]
    workers: usize,

    /// Most client connections open at once per listener; past it, accepting pauses.
    #[arg(long, env = "REMORA_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Largest request head (HTTP/1 buffer, HTTP/2 header list), bytes.
    #[arg(long, env = "REMORA_MAX_HEADER_BYTES", default_value_t = 65_536)]
    max_header_bytes: usize,
    /// Most headers in an HTTP/1 request.
    #[arg(long, env = "REMORA_MAX_HEADERS", default_value_t = 100)]
    max_headers: usize,
    /// Time a client has to send a request head.
    #[arg(long, env = "REMORA_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    header_read_timeout: Duration,
    /// A client connection with no request for this long is closed.
    #[arg(long, env = "REMORA_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per client connection.
    #[arg(long, env = "REMORA_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    max_concurrent_streams: u32,
    /// On SIGTERM (or /shutdown): how long the proxy keeps serving, with
    /// /ready at 503 and its instance deregistered, before it stops
    /// accepting, so every caller has a snapshot without it first.
    #[arg(long, env = "REMORA_SHUTDOWN_GRACE", default_value = "5s", value_parser = duration)]
    shutdown_grace: Duration,
    /// After the grace: time given to in-flight requests before exit.
    #[arg(long, env = "REMORA_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration)]
    drain_timeout: Duration,

    /// Time to open an upstream connection.
    #[arg(long, env = "REMORA_CONNECT_TIMEOUT", default_value = "1s", value_parser = duration)]
    connect_timeout: Duration,
    /// Idle upstream connections are closed after this long.
    #[arg(long, env = "REMORA_UPSTREAM_IDLE_TIMEOUT", default_value = "90s", value_parser = duration)]
    upstream_idle_timeout: Duration,
    /// Most open connections per backend.
    #[arg(long, env = "REMORA_UPSTREAM_MAX_CONNECTIONS", default_value_t = 1024)]
    upstream_max_connections: usize,
    /// Longest a request waits for a connection to a backend that is at
    /// --upstream-max-connections; then 503.
    #[arg(long, env = "REMORA_UPSTREAM_PENDING_TIMEOUT", default_value = "5s", value_parser = duration)]
    upstream_pending_timeout: Duration,
    /// Most requests per backend waiting beyond its connections; past it, 503.
    #[arg(long, env = "REMORA_UPSTREAM_MAX_PENDING", default_value_t = 1024)]
    upstream_max_pending: usize,
    /// Largest request body buffered so it can be retried or mirrored.
    #[arg(long, env = "REMORA_RETRY_BUFFER_BYTES", default_value_t = 65_536)]
    retry_buffer_bytes: usize,
    /// Default retry budget: retries may add this percent to the request rate.
    #[arg(long, env = "REMORA_RETRY_BUDGET_PERCENT", default_value_t = 20.0)]
    retry_budget_percent: f64,
    /// Default retry budget floor, retries per second.
    #[arg(long, env = "REMORA_RETRY_BUDGET_MIN_PER_SECOND", default_value_t = 10)]
    retry_budget_min_per_second: u32,
    /// Default retry budget window.
    #[arg(long, env = "REMORA_RETRY_BUDGET_INTERVAL", default_value = "10s", value_parser = duration)]
    retry_budget_interval: Duration,
    /// Failures in a row (5xx or connection error) that eject an endpoint.
    #[arg(long, env = "REMORA_OUTLIER_CONSECUTIVE_FAILURES", default_value_t = 5)]
    outlier_consecutive_failures: u32,
    /// First ejection period; doubles on each ejection in a row.
    #[arg(long, env = "REMORA_OUTLIER_EJECTION", default_value = "10s", value_parser = duration)]
    outlier_ejection: Duration,
    /// Longest ejection period.
    #[arg(long, env = "REMORA_OUTLIER_MAX_EJECTION", default_value = "5m", value_parser = duration)]
    outlier_max_ejection: Duration,

    /// Log one line per request (target "access").
    #[arg(long, env = "REMORA_ACCESS_LOG")]
    access_log: bool,
    /// Log format: text or json. Levels come from RUST_LOG (default info).
    #[arg(long, env = "REMORA_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install the iptables rules that send the pod's TCP traffic through
    /// the sidecar (an init container with NET_ADMIN and NET_RAW runs it in
    /// the pod's network namespace). Running it again gives the same rules.
    Init(InitArgs),
}

#[derive(clap::Args, Debug)]
struct InitArgs {
    /// The sidecar's user id: its own connections are not redirected.
    #[arg(long, env = "REMORA_PROXY_UID", default_value_t = 2102)]
    proxy_uid: u32,
    /// The inbound listener's port: TCP arriving for the pod goes there.
    #[arg(long, env = "REMORA_INBOUND_PORT", default_value_t = 4143)]
    inbound_port: u16,
    /// The outbound listener's port: TCP the pod sends goes there.
    #[arg(long, env = "REMORA_OUTBOUND_PORT", default_value_t = 4140)]
    outbound_port: u16,
    /// The admin port (probes and metrics reach it directly).
    #[arg(long, env = "REMORA_ADMIN_PORT", default_value_t = 4191)]
    admin_port: u16,
    /// Inbound ports (or ranges a-b) that reach the app directly, comma-separated.
    #[arg(long, env = "REMORA_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    skip_inbound_ports: Vec<PortRange>,
    /// Destination ports (or ranges a-b) the app reaches directly.
    #[arg(long, env = "REMORA_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    skip_outbound_ports: Vec<PortRange>,
    /// Destination address blocks (ip/prefix) the app reaches directly.
    #[arg(long, env = "REMORA_SKIP_OUTBOUND_CIDRS", value_delimiter = ',')]
    skip_outbound_cidrs: Vec<Cidr>,
    /// Remove the rules instead.
    #[arg(long)]
    uninstall: bool,
    /// Print the rules instead of installing them.
    #[arg(long, conflicts_with = "uninstall")]
    dry_run: bool,
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    init_logs(&args.log_format);
    if let Some(Command::Init(init)) = args.command.take() {
        return match run_init(init) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("remora-proxy init: {e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remora-proxy: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// `remora-proxy init`.
fn run_init(a: InitArgs) -> Result<(), remora_proxy::init::InitError> {
    let cfg = InitConfig {
        proxy_uid: a.proxy_uid,
        inbound_port: a.inbound_port,
        outbound_port: a.outbound_port,
        admin_port: a.admin_port,
        skip_inbound_ports: a.skip_inbound_ports,
        skip_outbound_ports: a.skip_outbound_ports,
        skip_outbound_cidrs: a.skip_outbound_cidrs,
    };
    let rules = remora_proxy::init::ruleset(&cfg);
    if a.dry_run {
        print!("{rules}");
        return Ok(());
    }
    if a.uninstall {
        remora_proxy::init::uninstall()?;
        info!("interception rules removed");
        return Ok(());
    }
    remora_proxy::init::install(&cfg)?;
    info!(
        proxy_uid = cfg.proxy_uid,
        inbound = cfg.inbound_port,
        outbound = cfg.outbound_port,
        "interception rules installed:\n{rules}"
    );
    Ok(())
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: log collectors get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn bind(addr: SocketAddr, what: &str) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("{what} listener {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn run(args: Args) -> Result<()> {
    let Some(app_protocol) = Protocol::parse(&args.app_protocol).filter(|p| *p != Protocol::Detect)
    else {
        bail!(
            "--app-protocol {:?}: expected http, http2, grpc or tcp",
            args.app_protocol
        );
    };
    let app_probes = match &args.app_probes {
        Some(json) => admin::AppProbes::parse(json).context("--app-probes (REMORA_APP_PROBES)")?,
        None => admin::AppProbes::default(),
    };
    let metrics = Metrics::new();
    // With an identity, mTLS between proxies: one certificate store, fed by
    // the identity task, read by every handshake.
    let mesh_tls = args
        .bootstrap_token_file
        .is_some()
        .then(|| MeshTls::new(CertStore::new(), metrics.clone()));
    let settings = Settings {
        tls: mesh_tls.clone(),
        pool: PoolConfig {
            connect_timeout: args.connect_timeout,
            pending_timeout: args.upstream_pending_timeout,
            idle_timeout: args.upstream_idle_timeout,
            max_connections: args.upstream_max_connections,
            max_pending: args.upstream_max_pending,
        },
        outlier: OutlierConfig {
            consecutive_failures: args.outlier_consecutive_failures.max(1),
            base_ejection: args.outlier_ejection,
            max_ejection: args.outlier_max_ejection,
        },
        namespace: args.namespace.clone(),
        default_budget: BudgetParams {
            percent: args.retry_budget_percent,
            min_per_sec: args.retry_budget_min_per_second,
            window: args.retry_budget_interval,
        },
        max_route_rules: args.max_route_rules,
        service: args
            .service
            .as_ref()
            .map(|s| ObjectRef::qualify(&args.namespace, s)),
        ratelimit_max_keys: args.ratelimit_max_keys,
    };
    let limits = ServerLimits {
        max_connections: args.max_connections,
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        header_read_timeout: args.header_read_timeout,
        idle_timeout: args.idle_timeout,
        max_concurrent_streams: args.max_concurrent_streams,
        detect_timeout: args.detect_timeout,
        tcp_idle_timeout: args.tcp_idle_timeout,
        connect_timeout: args.connect_timeout,
    };

    // Bind everything first: a taken port is an error at start, not later.
    let inbound_l = args
        .inbound_addr
        .0
        .map(|a| bind(a, "inbound"))
        .transpose()?;
    let outbound_l = args
        .outbound_addr
        .0
        .map(|a| bind(a, "outbound"))
        .transpose()?;
    let admin_l = bind(args.admin_addr, "admin")?;

    for (on, name) in [
        (inbound_l.is_some(), "inbound"),
        (outbound_l.is_some(), "outbound"),
    ] {
        if on {
            metrics.listener(name);
        }
    }
    let app = LocalApp::new(
        args.app_addr,
        SocketAddr::from(([127, 0, 0, 1], 8080)),
        app_protocol,
        settings.clone(),
        metrics.clone(),
    );
    let proxy = Arc::new(Proxy {
        runtime: ArcSwap::from_pointee(Runtime::empty()),
        app,
        metrics: metrics.clone(),
        retry_buffer: args.retry_buffer_bytes,
        access_log: args.access_log,
        tls: mesh_tls.clone(),
        stream_idle: args.stream_idle_timeout,
    });

    // The first config must be good: a sidecar with a broken config at boot
    // has nothing to serve, so it says so and exits.
    let mut fingerprint = None;
    if let Some(path) = &args.config {
        let (fp, cfg) = source::read(path).map_err(anyhow::Error::msg)?;
        source::apply(
            &proxy,
            &settings,
            source::Input::Config(cfg),
            source::file_version(fp),
        )
        .map_err(anyhow::Error::msg)?;
        fingerprint = Some(fp);
    }
    // Workload identity: a certificate from the control plane, renewed in
    // the background. A bad flag fails here, before anything runs.
    let control_plane = args
        .control_plane
        .as_deref()
        .map(ControlPlane::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    let cp_ca = control_plane_ca(&args, control_plane.as_deref())?;
    let node_id = node_id(&args);
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("remora").join(&node_id));
    let identity = match (&args.bootstrap_token_file, &control_plane) {
        (Some(f), Some(cp)) => Some(identity_config(
            &args,
            f.clone(),
            cp.clone(),
            cp_ca.clone(),
            state_dir.clone(),
        )?),
        _ => None,
    };
    // A certificate kept by an earlier run: mTLS at once, even while the
    // control plane is down.
    if let (Some(cfg), Some(mesh)) = (&identity, &mesh_tls) {
        if let Some(c) = remora_proxy::identity::restore(cfg) {
            metrics.identity_cert_expiry.set(c.not_after);
            metrics
                .identity_trust_roots
                .set(c.bundle.roots.len() as i64);
            mesh.store().install(c);
        }
    }
    // With a control plane, ready means a config is running: from disk at
    // once if one was kept, else when the first snapshot is applied.
    let discovery = control_plane.clone().map(|cp| {
        // The address actually bound (port 0 picks one) is what registers.
        let inbound = inbound_l.as_ref().and_then(|l| l.local_addr().ok());
        discovery_config(
            &args,
            inbound,
            cp,
            cp_ca,
            identity.as_ref(),
            node_id.clone(),
            state_dir.clone(),
        )
    });
    let discovery = discovery.transpose()?;
    let mut last_version = String::new();
    if let Some(d) = &discovery {
        if let Some(v) = d.boot_from_disk(&proxy, &settings) {
            last_version = v;
        }
    }
    let ready = Arc::new(AtomicBool::new(
        discovery.is_none() || !last_version.is_empty(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let (inbound_tx, inbound_rx) = watch::channel(false);
    let (outbound_tx, outbound_rx) = watch::channel(false);
    admin::spawn(
        admin_l,
        admin::AdminState {
            proxy: proxy.clone(),
            ready: ready.clone(),
            shutdown: stop_tx.clone(),
            app_probes,
            admin_token_file: args.admin_token_file.clone(),
        },
    )?;

    let rt = if args.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        // Three stages of a stop. `stop_rx`: SIGTERM or /shutdown: /ready
        // turns 503 and the instance deregisters, while everything keeps
        // serving for --shutdown-grace, so every caller gets a snapshot
        // without this instance first. `inbound`: then the inbound
        // listener stops accepting and its connections drain. `outbound`:
        // last, once the app is gone (its connections closed) or at the
        // drain timeout: the app may need its calls out while it finishes.
        let inbound_life = Lifecycle {
            shutdown: inbound_rx.clone(),
            tracker: tokio_util::task::TaskTracker::new(),
        };
        let outbound_life = Lifecycle {
            shutdown: outbound_rx.clone(),
            tracker: tokio_util::task::TaskTracker::new(),
        };
        let mut inbound_listener = None;
        let mut outbound_listener = None;
        if let Some(l) = outbound_l {
            let l = tokio::net::TcpListener::from_std(l)?;
            outbound_listener = Some(tokio::spawn(outbound::serve(l, proxy.clone(), limits.clone(), outbound_life.clone())));
        }
        if let Some(l) = inbound_l {
            let l = tokio::net::TcpListener::from_std(l)?;
            inbound_listener = Some(tokio::spawn(inbound::serve(l, proxy.clone(), limits.clone(), inbound_life.clone())));
        }
        // Idle rate-limit keys are evicted in the background.
        let gc_proxy = proxy.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                for limit in gc_proxy.runtime.load().limits.values() {
                    limit.gc();
                }
            }
        });
        let mut discovery_task = None;
        if let Some(d) = discovery {
            discovery_task = Some(tokio::spawn(remora_proxy::discovery::run(
                d,
                proxy.clone(),
                settings.clone(),
                ready.clone(),
                stop_rx.clone(),
                last_version,
            )));
        }
        if let (Some(cfg), Some(mesh)) = (identity, &mesh_tls) {
            tokio::spawn(remora_proxy::identity::run(
                cfg,
                mesh.store().clone(),
                metrics.clone(),
                outbound_rx.clone(),
            ));
        }
        if let Some(path) = args.config.clone() {
            tokio::spawn(source::watch_file(path, args.config_poll_interval, proxy.clone(), settings, ready.clone(), fingerprint));
        }

        wait_for_signal(&stop_tx).await;
        ready.store(false, std::sync::atomic::Ordering::Relaxed);
        info!(grace = ?args.shutdown_grace, "stopping: /ready answers 503 and the instance deregisters; serving on for the grace period");
        // Deregistering is bounded; the grace runs alongside it.
        let grace = tokio::time::sleep(args.shutdown_grace);
        if let Some(t) = discovery_task {
            let _ = tokio::time::timeout(args.shutdown_grace.max(Duration::from_secs(2)), t).await;
        }
        grace.await;

        let deadline = tokio::time::Instant::now() + args.drain_timeout;
        info!(drain_timeout = ?args.drain_timeout, "draining: the inbound listener takes no new connections, in-flight requests finish");
        let _ = inbound_tx.send(true);
        if let Some(l) = inbound_listener {
            let _ = l.await;
        }
        inbound_life.tracker.close();
        if tokio::time::timeout_at(deadline, inbound_life.tracker.wait()).await.is_err() {
            warn!(open = inbound_life.tracker.len(), "drain timeout: closing the remaining inbound connections");
        }
        // The outbound side until the app has gone (no connection of its
        // left), at the latest at the drain timeout.
        outbound_life.tracker.close();
        if tokio::time::timeout_at(deadline, outbound_life.tracker.wait()).await.is_err() {
            info!(open = outbound_life.tracker.len(), "drain timeout: closing the app's remaining outbound connections");
        }
        let _ = outbound_tx.send(true);
        if let Some(l) = outbound_listener {
            let _ = l.await;
        }
        info!("stopped");
        Ok::<_, anyhow::Error>(())
    })
}

/// This proxy's id at the control plane: --node-id, else the host name.
fn node_id(args: &Args) -> String {
    args.node_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("proxy-{}", std::process::id()))
}

fn discovery_config(
    args: &Args,
    inbound: Option<SocketAddr>,
    control_plane: Arc<ControlPlane>,
    ca_pem: Option<String>,
    identity: Option<&IdentityConfig>,
    node_id: String,
    state_dir: PathBuf,
) -> Result<DiscoveryConfig> {
    let service = args
        .service
        .as_ref()
        .map(|s| ObjectRef::qualify(&args.namespace, s).to_string())
        .unwrap_or_default();
    let advertise = args.advertise_addr.or_else(|| {
        let inbound = inbound?;
        if !inbound.ip().is_unspecified() {
            return Some(inbound);
        }
        let ip = std::env::var("POD_IP").ok()?.parse().ok()?;
        Some(SocketAddr::new(ip, inbound.port()))
    });
    let mut labels = std::collections::HashMap::new();
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?}: expected key=value");
        };
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    if !service.is_empty() && advertise.is_none() {
        warn!("--service is set but there is no address to advertise (--advertise-addr or $POD_IP): this instance will not register");
    }
    let instance =
        advertise
            .filter(|_| !service.is_empty())
            .map(|a| remora_proto::control::Instance {
                address: a.ip().to_string(),
                port: a.port() as u32,
                labels,
            });
    info!(control_plane = %control_plane.describe(), "config from the control plane");
    Ok(DiscoveryConfig {
        control_plane,
        node_id,
        service,
        instance,
        state_dir: Some(state_dir),
        max_backoff: args.control_plane_max_backoff,
        ca_pem,
        token_file: args.bootstrap_token_file.clone(),
        identity: identity.map(|c| (c.namespace.clone(), c.service_account.clone())),
    })
}

/// The roots that verify an https control plane (--control-plane-ca).
fn control_plane_ca(args: &Args, cp: Option<&ControlPlane>) -> Result<Option<String>> {
    let https = cp.is_some_and(ControlPlane::https);
    match &args.control_plane_ca {
        Some(f) => {
            let pem = std::fs::read_to_string(f)
                .with_context(|| format!("--control-plane-ca {}", f.display()))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                bail!("--control-plane-ca {}: no PEM certificate in it", f.display());
            }
            Ok(Some(pem))
        }
        None if https => bail!(
            "--control-plane {}: an https control plane needs --control-plane-ca (its root certificate, PEM)",
            args.control_plane.as_deref().unwrap_or("")
        ),
        None => Ok(None),
    }
}

fn identity_config(
    args: &Args,
    token_file: PathBuf,
    control_plane: Arc<ControlPlane>,
    ca_pem: Option<String>,
    state_dir: PathBuf,
) -> Result<IdentityConfig> {
    // The token may go to any address of the list: each must be https.
    if let Some(url) = control_plane
        .urls()
        .find(|u| u.starts_with("http://"))
        .filter(|_| !args.insecure_dev_plaintext)
    {
        bail!(
            "--control-plane {url}: the bootstrap token would cross the network in the clear. Use an https:// control plane (remora-control --tls, and --control-plane-ca here), or say --insecure-dev-plaintext for a local development setup"
        );
    }
    let service_name = args
        .service
        .as_deref()
        .map(|s| s.rsplit('/').next().unwrap_or(s));
    let cfg = IdentityConfig {
        control_plane,
        state_dir: Some(state_dir),
        namespace: args
            .identity_namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone()),
        service_account: args
            .identity_service_account
            .clone()
            .or_else(|| service_name.map(str::to_string))
            .unwrap_or_else(|| "default".to_string()),
        token_file,
        max_backoff: args.control_plane_max_backoff,
        ca_pem,
    };
    cfg.check().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// Waits for SIGTERM, SIGINT or /shutdown, then raises the shutdown flag.
async fn wait_for_signal(tx: &watch::Sender<bool>) {
    let mut rx = tx.subscribe();
    let admin = async {
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let term_fut = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term_fut => info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT"),
            _ = admin => {},
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
        _ = admin => {},
    }
    tx.send_replace(true);
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
