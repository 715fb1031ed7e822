//! Harness for end-to-end tests: real upstream servers on loopback, the real
//! remora-proxy binary, and small HTTP clients. No mocks, no sleeps for
//! synchronisation: everything waits for a condition with a deadline.

pub mod control;
pub mod etcd;
pub mod grpc;
pub mod netns;
pub mod upstream;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Polls `cond` until it holds or `deadline` passes.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for a "listening" log line containing `key` and returns its
/// `addr=`; panics with the logs if the process exits first.
pub async fn bound_addr(
    child: &mut Child,
    logs: &Mutex<String>,
    key: &str,
    deadline: Duration,
) -> SocketAddr {
    let end = Instant::now() + deadline;
    loop {
        if let Some(a) = logged_addr(&logs.lock().unwrap(), key) {
            return a;
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Give the log reader a moment to drain the pipe.
            std::thread::sleep(Duration::from_millis(50));
            panic!(
                "process exited ({status}) before listening ({key}):\n{}",
                logs.lock().unwrap()
            );
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for a listening line ({key}):\n{}",
            logs.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `addr=` of the first "listening" log line that contains `key`.
pub fn logged_addr(logs: &str, key: &str) -> Option<SocketAddr> {
    logs.lines()
        .filter(|l| l.contains("listening") && l.contains(key))
        .find_map(|l| {
            let v = l.split("addr=").nth(1)?.split_whitespace().next()?;
            v.parse().ok()
        })
}

/// Port 0 on loopback: the kernel picks a free port when the process binds.
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A loopback address with a free port.
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap()
}

/// Path of a workspace binary, built once per test process (a no-op when
/// it is fresh), so `cargo test` alone always runs current binaries.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "remora-proxy",
                "-p",
                "remora-control",
                "--bins",
            ])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).unwrap();
    dir.join(name)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A running remora-proxy. Killed on drop; its stderr is kept for asserts.
pub struct ProxyProcess {
    pub child: Child,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<String>>,
}

pub struct ProxyBuilder {
    args: Vec<String>,
    config: Option<PathBuf>,
    app: Option<SocketAddr>,
    /// Run inside this pod as this uid (and gid).
    pod: Option<(netns::Pod, u32)>,
    /// The inbound address to bind (a restart keeping its address, as a
    /// pod keeps its IP); the kernel picks one otherwise.
    inbound: Option<SocketAddr>,
    /// An /etc/hosts of its own (`hosts`).
    hosts: Option<PathBuf>,
}

impl ProxyBuilder {
    pub fn new() -> Self {
        ProxyBuilder {
            args: vec![],
            config: None,
            app: None,
            pod: None,
            inbound: None,
            hosts: None,
        }
    }
    pub fn config(mut self, path: &Path) -> Self {
        self.config = Some(path.to_path_buf());
        self
    }
    pub fn app(mut self, addr: SocketAddr) -> Self {
        self.app = Some(addr);
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    /// Runs the proxy inside `pod` as `uid` (gid the same), on the fixed
    /// ports iptables rules name: inbound 0.0.0.0:4143, outbound
    /// 127.0.0.1:4140, admin 0.0.0.0:4191. The `ProxyProcess` then has
    /// `inbound` and `admin` at the pod's IP (reachable from the test
    /// process) and `outbound` 127.0.0.1:4140 (reachable only inside the
    /// pod). Its `--state-dir`, if any, is made and handed to `uid`.
    /// Binds the inbound listener to `addr`.
    pub fn inbound_at(mut self, addr: SocketAddr) -> Self {
        self.inbound = Some(addr);
        self
    }

    /// Runs the proxy with `file` as its /etc/hosts (bind-mounted in a
    /// mount namespace of its own, so nothing else sees it): names that
    /// resolve to several loopback addresses. Check
    /// [`private_hosts_unavailable`] first.
    pub fn hosts(mut self, file: &Path) -> Self {
        self.hosts = Some(file.to_path_buf());
        self
    }

    pub fn in_pod(mut self, pod: &netns::Pod, uid: u32) -> Self {
        self.pod = Some((pod.clone(), uid));
        self
    }

    /// Config from the control plane at `url`, as node `node` keeping its
    /// last-known-good copy under `state`, reconnecting quickly.
    pub fn control_plane(self, url: &str, node: &str, state: &TempDir) -> Self {
        let dir = state.path().join(node);
        self.arg("--control-plane")
            .arg(url)
            .arg("--node-id")
            .arg(node)
            .arg("--state-dir")
            .arg(dir.to_str().expect("utf-8 temp path"))
            .arg("--control-plane-max-backoff")
            .arg("200ms")
    }

    /// Starts the proxy on ports the kernel picks (no races with other
    /// tests over "free" ports), learns them from its "listening" log
    /// lines, and waits until /ready answers 200.
    pub async fn start(self) -> ProxyProcess {
        self.start_until("/ready").await
    }

    /// Like `start`, but waits only for /live (a proxy that cannot become
    /// ready, e.g. without a certificate).
    pub async fn start_live(self) -> ProxyProcess {
        self.start_until("/live").await
    }

    async fn start_until(self, path: &str) -> ProxyProcess {
        let pod_ip = self.pod.as_ref().map(|(pod, _)| pod.ip);
        let mut p = match pod_ip {
            Some(_) => {
                let (inbound, outbound, admin) = pod_listen_addrs();
                self.spawn_on(inbound, outbound, admin)
            }
            None => {
                let inbound = self.inbound.unwrap_or_else(any_port);
                self.spawn_on(inbound, any_port(), any_port())
            }
        };
        let deadline = Duration::from_secs(20);
        p.inbound = bound_addr(&mut p.child, &p.logs, "listener=\"inbound\"", deadline).await;
        p.outbound = bound_addr(&mut p.child, &p.logs, "listener=\"outbound\"", deadline).await;
        p.admin = bound_addr(&mut p.child, &p.logs, "listener=\"admin\"", deadline).await;
        if let Some(ip) = pod_ip {
            p.reachable_in_pod(ip);
        }
        let url = format!("http://{}{path}", p.admin);
        wait_until(&format!("proxy {path}"), deadline, || {
            let url = url.clone();
            async move { matches!(get_status(&url).await, Some(200)) }
        })
        .await;
        p
    }

    /// Starts the proxy without waiting for it.
    pub fn spawn(self) -> ProxyProcess {
        match self.pod.as_ref().map(|(pod, _)| pod.ip) {
            Some(ip) => {
                let (inbound, outbound, admin) = pod_listen_addrs();
                let mut p = self.spawn_on(inbound, outbound, admin);
                p.reachable_in_pod(ip);
                p
            }
            None => self.spawn_on(free_addr(), free_addr(), free_addr()),
        }
    }

    /// Makes each `--state-dir` exist and belong to `uid`, who runs the
    /// proxy and writes its last-known-good snapshot there.
    fn give_state_dirs(&self, uid: u32) {
        let given = self
            .args
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a.as_str() {
                "--state-dir" => self.args.get(i + 1).map(String::as_str),
                a => a.strip_prefix("--state-dir="),
            });
        for dir in given {
            std::fs::create_dir_all(dir).expect("create the state dir");
            chown_tree(Path::new(dir), uid);
        }
    }

    fn spawn_on(
        self,
        inbound: SocketAddr,
        outbound: SocketAddr,
        admin: SocketAddr,
    ) -> ProxyProcess {
        let mut cmd = match (&self.pod, &self.hosts) {
            (Some((pod, uid)), _) => {
                self.give_state_dirs(*uid);
                pod.command_as(*uid, *uid, binary("remora-proxy"))
            }
            (None, Some(hosts)) => with_hosts(hosts, binary("remora-proxy")),
            (None, None) => Command::new(binary("remora-proxy")),
        };
        cmd.arg("--inbound-addr")
            .arg(inbound.to_string())
            .arg("--outbound-addr")
            .arg(outbound.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--config-poll-interval")
            .arg("20ms");
        // A proxy in a pod finds its app by the port each connection is
        // for; elsewhere every inbound connection goes to the one app.
        match (self.app, &self.pod) {
            (Some(app), _) => {
                cmd.arg("--app-addr").arg(app.to_string());
            }
            (None, None) => {
                cmd.arg("--app-addr").arg(free_addr().to_string());
            }
            (None, Some(_)) => {}
        }
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("REMORA_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start remora-proxy");
        let logs = capture_stderr(&mut child, "proxy");
        ProxyProcess {
            child,
            inbound,
            outbound,
            admin,
            logs,
        }
    }
}

/// `program` run with `hosts` as its /etc/hosts: `unshare --mount` gives
/// it a private mount namespace, where the file is bind-mounted over
/// /etc/hosts, and the shell execs the program (the child's pid is the
/// program's).
pub fn with_hosts(hosts: &Path, program: PathBuf) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "sh",
        "-c",
        r#"mount --bind "$0" /etc/hosts && exec "$@""#,
    ])
    .arg(hosts)
    .arg(program);
    c
}

/// Why a process cannot be given an /etc/hosts of its own here (not root,
/// no `unshare`, mounts refused), or None when it can. Checked once.
pub fn private_hosts_unavailable() -> Option<String> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("remora-hosts-probe-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("hosts");
        if let Err(e) = std::fs::write(&file, "127.0.0.9 probe.remora.test\n") {
            return Some(format!("cannot write {}: {e}", file.display()));
        }
        let out = with_hosts(&file, PathBuf::from("getent"))
            .args(["hosts", "probe.remora.test"])
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        match out {
            Ok(o) if String::from_utf8_lossy(&o.stdout).contains("127.0.0.9") => None,
            Ok(o) => Some(format!(
                "`unshare --mount` with a bind-mounted /etc/hosts does not work here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("cannot run `unshare`: {e}")),
        }
    })
    .clone()
}

/// A pod proxy's listen addresses: inbound, outbound, admin.
fn pod_listen_addrs() -> (SocketAddr, SocketAddr, SocketAddr) {
    (
        SocketAddr::from(([0, 0, 0, 0], netns::POD_INBOUND_PORT)),
        SocketAddr::from(([127, 0, 0, 1], netns::POD_OUTBOUND_PORT)),
        SocketAddr::from(([0, 0, 0, 0], netns::POD_ADMIN_PORT)),
    )
}

/// `chown -R uid:uid path`.
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            chown_tree(&entry.path(), uid);
        }
    }
}

/// Reads the child's stderr on a thread into the returned buffer, line by
/// line (echoed as `[tag] line` when REMORA_TEST_ECHO is set).
pub fn capture_stderr(child: &mut Child, tag: &'static str) -> Arc<Mutex<String>> {
    let logs = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr piped");
    let sink = logs.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if std::env::var_os("REMORA_TEST_ECHO").is_some() {
                eprintln!("[{tag}] {line}");
            }
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    logs
}

impl Default for ProxyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits (up to 10 s) until `logs` contains every one of `needles`, and
/// returns them: a line the process wrote is read by another thread, so it
/// can trail the metric or response that the test saw first.
pub async fn logs_with(logs: &Mutex<String>, needles: &[&str]) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let text = logs.lock().unwrap().clone();
        if needles.iter().all(|n| text.contains(n)) || Instant::now() >= end {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl ProxyProcess {
    /// A proxy in the pod at `ip`: inbound and admin at that IP (the test
    /// process reaches them), outbound stays 127.0.0.1:4140 (in the pod).
    fn reachable_in_pod(&mut self, ip: std::net::Ipv4Addr) {
        self.inbound = SocketAddr::from((ip, netns::POD_INBOUND_PORT));
        self.outbound = SocketAddr::from(([127, 0, 0, 1], netns::POD_OUTBOUND_PORT));
        self.admin = SocketAddr::from((ip, netns::POD_ADMIN_PORT));
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The logs once they contain every one of `needles` (10 s at most).
    pub async fn logs_with(&self, needles: &[&str]) -> String {
        logs_with(&self.logs, needles).await
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// The /metrics text.
    pub async fn metrics(&self) -> String {
        get_text(&format!("http://{}/metrics", self.admin)).await
    }

    /// Sum of a metric's samples whose line contains every `parts`.
    pub async fn metric(&self, name: &str, parts: &[&str]) -> f64 {
        sum_metric(&self.metrics().await, name, parts)
    }

    /// The running config version, from /config.
    pub async fn config_version(&self) -> String {
        let body = get_text(&format!("http://{}/config", self.admin)).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["version"].as_str().unwrap_or("").to_string()
    }
}

pub fn sum_metric(text: &str, name: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client with keep-alive.
pub fn http1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client speaking h2c with prior knowledge.
pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A simple response: status, headers and the whole body.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Result<Reply, String> {
    let resp: Response<hyper::body::Incoming> =
        client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// GET `http://{proxy}{path}` with a Host header naming the service.
pub async fn get_via(
    client: &HttpClient,
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> Result<Reply, String> {
    let req = Request::get(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(client, req).await
}

pub async fn get_status(url: &str) -> Option<u16> {
    let req = Request::get(url).body(Full::new(Bytes::new())).ok()?;
    send(&http1_client(), req).await.ok().map(|r| r.status)
}

pub async fn get_text(url: &str) -> String {
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    send(&http1_client(), req)
        .await
        .map(|r| r.body)
        .unwrap_or_default()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("remora-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// Writes `name` atomically (temp file + rename), as a config tool would.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let tmp = self.0.join(format!(".{name}.tmp"));
        let dst = self.0.join(name);
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &dst).unwrap();
        dst
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// YAML for a Service with static endpoints.
pub fn service_yaml(name: &str, port: u16, protocol: &str, endpoints: &[SocketAddr]) -> String {
    let mut s = format!(
        "kind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: {port}, protocol: {protocol}}}]\n"
    );
    if endpoints.is_empty() {
        s.push_str("  endpoints: []\n");
    }
    if !endpoints.is_empty() {
        s.push_str("  endpoints:\n");
    }
    for e in endpoints {
        s.push_str(&format!(
            "  - {{address: {}, port: {}}}\n",
            e.ip(),
            e.port()
        ));
    }
    s
}
