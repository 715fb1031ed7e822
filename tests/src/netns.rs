//! Pods for end-to-end tests that need real networking: Linux network
//! namespaces joined by a bridge, each pod running its own processes (an
//! app, a remora-proxy sidecar) with its own IP, loopback and iptables.
//!
//! Layout of one [`Net`]:
//!
//! ```text
//! root namespace (the test process)          bridge namespace         pod namespaces
//!   rmr<k> 10.a.b.1/24  ──veth──  host ─┐
//!                                       br0 ─ p0 ──veth──  eth0 10.a.b.10/24 (pod 0)
//!                                           ─ p1 ──veth──  eth0 10.a.b.11/24 (pod 1)
//! ```
//!
//! The test process reaches every pod by its IP; pods reach each other and
//! the root namespace's address ([`Net::host_ip`]), where a control plane or
//! a server "outside the mesh" listens. Each pod's default route points at
//! that address, so a connection to any other IP (a virtual service IP such
//! as 10.96.0.10) leaves through `eth0`, which is what an iptables OUTPUT
//! redirect needs to see.
//!
//! Needs root, `ip` and `iptables`: tests call [`unavailable`] first and
//! skip when it gives a reason.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The ports a proxy in a pod listens on (iptables rules name them).
pub const POD_INBOUND_PORT: u16 = 4143;
pub const POD_OUTBOUND_PORT: u16 = 4140;
pub const POD_ADMIN_PORT: u16 = 4191;

/// The uid (and gid) a sidecar proxy runs as, by convention: interception
/// rules exempt its own traffic by owner.
pub const PROXY_UID: u32 = 2102;

/// Prefix of every namespace and root-namespace interface made here.
const PREFIX: &str = "rmr";

/// Pod subnets: 10.200.0.0/14, one /24 per Net (1024 of them), far from
/// the host's routes and from service ranges such as 10.96.0.0/12.
const SUBNETS: u32 = 1024;

/// Why namespaced tests cannot run on this machine, or None when they can.
/// Checked once per process.
pub fn unavailable() -> Option<String> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    match Command::new("id").arg("-u").output() {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {}
        Ok(_) => return Some("not running as root".into()),
        Err(e) => return Some(format!("cannot run `id -u`: {e}")),
    }
    for (tool, arg) in [
        ("ip", "-V"),
        ("iptables", "--version"),
        ("setpriv", "--version"),
    ] {
        match Command::new(tool).arg(arg).output() {
            Ok(o) if o.status.success() => {}
            _ => return Some(format!("`{tool}` is not installed")),
        }
    }
    let name = format!("{PREFIX}-{}-probe", std::process::id());
    let _ = ip(&["netns", "del", &name]);
    let made = ip(&["netns", "add", &name]);
    let why = match &made {
        Ok(_) => ip(&["netns", "exec", &name, "true"])
            .err()
            .map(|e| format!("`ip netns exec` fails: {e}")),
        Err(e) => Some(format!("`ip netns add` fails: {e}")),
    };
    let _ = ip(&["netns", "del", &name]);
    why
}

/// One isolated network for one test: a bridge in its own namespace, a
/// veth from the root namespace into it, and the pods made with
/// [`Net::pod`]. Dropping it deletes them all; kill the processes started
/// in its pods first (a namespace with processes left in it lives on,
/// unnamed, until they exit).
pub struct Net {
    /// The bridge's namespace; pods are named `<ns>-<pod name>`.
    ns: String,
    /// The root-namespace end of the veth into the bridge.
    host_if: String,
    /// The /24's first three octets.
    subnet: [u8; 3],
    /// Pod namespaces made so far.
    pods: Mutex<Vec<String>>,
}

impl Net {
    /// Makes the bridge namespace and the root veth, with a /24 no other
    /// Net on this machine uses (any process). `tag` only names things.
    pub fn new(tag: &str) -> Net {
        static N: AtomicUsize = AtomicUsize::new(0);
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let ns = format!("{PREFIX}-{pid}-{n}");
        remove_stale(&ns);
        ip_ok(&["netns", "add", &ns]);
        // From here on, drop cleans up whatever was made.
        let mut net = Net {
            ns,
            host_if: String::new(),
            subnet: [0; 3],
            pods: Mutex::new(vec![]),
        };
        ip_ok(&["-n", &net.ns, "link", "set", "lo", "up"]);
        ip_ok(&["-n", &net.ns, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &net.ns, "link", "set", "br0", "up"]);
        // The root-side interface is named after its subnet: creating it
        // claims the subnet atomically against every other process.
        let start = (pid as usize * 31 + n) as u32;
        let k = (0..SUBNETS)
            .map(|i| (start + i) % SUBNETS)
            .find(|k| {
                let name = format!("{PREFIX}{k}");
                match ip(&[
                    "link", "add", &name, "type", "veth", "peer", "name", "host", "netns", &net.ns,
                ]) {
                    Ok(_) => true,
                    Err(e) if e.contains("File exists") => false,
                    Err(e) => panic!("ip link add {name} (net {tag}): {e}"),
                }
            })
            .unwrap_or_else(|| panic!("no free pod subnet in 10.200.0.0/14 (net {tag})"));
        net.host_if = format!("{PREFIX}{k}");
        net.subnet = [10, 200 + (k / 256) as u8, (k % 256) as u8];
        let host = format!("{}/24", net.host_ip());
        ip_ok(&["addr", "add", &host, "dev", &net.host_if]);
        ip_ok(&["link", "set", &net.host_if, "up"]);
        ip_ok(&["-n", &net.ns, "link", "set", "host", "master", "br0", "up"]);
        net
    }

    /// The root namespace's address on this network: pods reach the test
    /// process's servers there.
    pub fn host_ip(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The bridge's namespace name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The root-namespace interface into this network.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Every namespace this Net made (the bridge's, then the pods').
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.ns.clone()];
        all.extend(self.pods.lock().unwrap().iter().cloned());
        all
    }

    /// A new pod: its namespace with `lo` up, `eth0` on the bridge with the
    /// next address of the /24, and a default route via [`Net::host_ip`].
    /// `name` (letters, digits, `-`, `_`) must be unique within this Net.
    pub fn pod(&self, name: &str) -> Pod {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "pod name {name:?}: letters, digits, - and _ only"
        );
        let mut pods = self.pods.lock().unwrap();
        let i = pods.len();
        assert!(i < 200, "too many pods on one Net");
        let ns = format!("{}-{name}", self.ns);
        assert!(!pods.contains(&ns), "pod {name} exists already");
        ip_ok(&["netns", "add", &ns]);
        pods.push(ns.clone());
        drop(pods);
        let [a, b, c] = self.subnet;
        let pod_ip = Ipv4Addr::new(a, b, c, 10 + i as u8);
        let port = format!("p{i}");
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n", &self.ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        ip_ok(&["-n", &self.ns, "link", "set", &port, "master", "br0", "up"]);
        ip_ok(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "eth0",
        ]);
        ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        let via = self.host_ip().to_string();
        ip_ok(&["-n", &ns, "route", "add", "default", "via", &via]);
        Pod {
            name: name.to_string(),
            ns,
            ip: pod_ip,
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The root veth first, by name: a deleted namespace's interfaces
        // go away asynchronously, and this one's name is the subnet claim.
        if !self.host_if.is_empty() {
            let _ = ip(&["link", "del", &self.host_if]);
        }
        for ns in self.pods.lock().unwrap().iter() {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// One pod: a network namespace on a [`Net`]'s bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// The namespace's name (for `ip netns exec`, `ip -n`).
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    /// `program` run inside the pod (`ip netns exec <ns> program`, which
    /// execs it: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// `program` run inside the pod as `uid`:`gid`, with no supplementary
    /// groups (through `setpriv`, which execs it too).
    pub fn command_as(&self, uid: u32, gid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(program);
        cmd
    }

    /// Runs `args` (program first) in the pod; panics with its stderr if it
    /// fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("a program to run");
        let out = self
            .command(program)
            .args(rest)
            .output()
            .unwrap_or_else(|e| panic!("run {args:?} in pod {}: {e}", self.name));
        assert!(
            out.status.success(),
            "{args:?} in pod {} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `args` (program first) in the pod; whether it succeeded.
    pub fn run_ok(&self, args: &[&str]) -> bool {
        let Some((program, rest)) = args.split_first() else {
            return false;
        };
        self.command(program)
            .args(rest)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `ip:port` in this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// A process started in a pod (or anywhere): killed on drop, its stderr
/// kept for asserts, stdout discarded.
pub struct PodProcess {
    pub child: Child,
    pub logs: Arc<Mutex<String>>,
}

impl PodProcess {
    /// Spawns `cmd` (typically from [`Pod::command`] or [`Pod::command_as`]).
    pub fn spawn(mut cmd: Command) -> PodProcess {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let logs = crate::capture_stderr(&mut child, "pod");
        PodProcess { child, logs }
    }

    /// The program's pid (`ip netns exec` and `setpriv` exec it).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The logs once they contain every one of `needles` (10 s at most).
    pub async fn logs_with(&self, needles: &[&str]) -> String {
        crate::logs_with(&self.logs, needles).await
    }

    /// Waits (20 s at most) until the process has logged `count` lines
    /// `listening on ADDR` (as remora-testapp does) and returns the
    /// addresses; panics with the logs if it exits first.
    pub async fn listening(&mut self, count: usize) -> Vec<SocketAddr> {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let addrs: Vec<SocketAddr> = self
                .logs()
                .lines()
                .filter_map(|l| l.split("listening on ").nth(1)?.trim().parse().ok())
                .collect();
            if addrs.len() >= count {
                return addrs;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the log reader a moment to drain the pipe.
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "process exited ({status}) before listening:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {count} listening line(s):\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, and waits for the exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Path of the remora-testapp binary (cargo builds it for this package's
/// integration tests).
pub fn testapp() -> PathBuf {
    crate::binary("remora-testapp")
}

/// Deletes namespaces left by a crashed run: those named `ns` or `ns-*`
/// (this pid reused), and any `rmr-<pid>-*` whose pid no longer runs.
fn remove_stale(ns: &str) {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let mine = format!("{ns}-");
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let dead = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        if name == ns || name.starts_with(&mine) || dead {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Runs `ip args`; its stderr when it fails.
fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("ip {}: {e}", args.join(" "));
    }
}
