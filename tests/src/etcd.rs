//! A real 3-member etcd cluster on loopback for end-to-end tests, started
//! and stopped (whole or member by member) by the test.
//!
//! Its ports come from below the kernel's ephemeral range (20000-32767),
//! where no `bind(:0)` of a parallel test lands, each checked free and
//! never handed out twice by this process; a member keeps its ports across
//! a restart, as a cluster member must. Tests print `SKIPPED: <why>` and
//! return when `etcd` is not installed (`unavailable`).

use crate::{wait_until, TempDir};
use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// Why etcd tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("etcd").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("etcd is not installed (apt-get install etcd-server)".into()),
    }
}

/// Ports handed out by this process.
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback port outside the ephemeral range, not handed out before.
fn port() -> u16 {
    let mut taken = TAKEN.lock().unwrap();
    let taken = taken.get_or_insert_with(HashSet::new);
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    for i in 0..12_768u64 {
        let p = 20_000 + ((seed + i * 131) % 12_768) as u16;
        if !taken.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            taken.insert(p);
            return p;
        }
    }
    panic!("no free port for etcd");
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    dir: TempDir,
    members: Vec<Member>,
    token: String,
}

impl EtcdCluster {
    /// Starts three members and waits until the cluster is healthy; `None`
    /// (after printing SKIPPED) without etcd.
    pub async fn start(test: &str) -> Option<EtcdCluster> {
        if let Some(why) = unavailable() {
            println!("SKIPPED: {test}: {why}");
            return None;
        }
        let members = (0..3)
            .map(|i| Member {
                name: format!("m{i}"),
                client: port(),
                peer: port(),
                child: None,
            })
            .collect();
        let mut c = EtcdCluster {
            dir: TempDir::new(&format!("etcd-{test}")),
            members,
            token: format!("remora-{test}-{}", std::process::id()),
        };
        for i in 0..3 {
            c.spawn(i);
        }
        c.wait_healthy().await;
        Some(c)
    }

    /// `--etcd-endpoints` for the replicas.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The remora-control flags that put a replica on this cluster.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            self.endpoints(),
        ]
    }

    fn spawn(&mut self, i: usize) {
        let initial = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Fast elections: a killed leader is replaced within ~1 s.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every member: etcd is gone.
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }

    /// Starts every stopped member again (same data, same ports) and waits
    /// until the cluster is healthy.
    pub async fn restart(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        self.wait_healthy().await;
    }

    /// Waits until every running member says it is healthy (it has a
    /// leader and can commit).
    pub async fn wait_healthy(&self) {
        let urls: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://127.0.0.1:{}/health", m.client))
            .collect();
        wait_until("etcd healthy", Duration::from_secs(30), || {
            let urls = urls.clone();
            async move {
                for u in &urls {
                    if !crate::get_text(u).await.contains("\"health\":\"true\"") {
                        return false;
                    }
                }
                true
            }
        })
        .await;
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
