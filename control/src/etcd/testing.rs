//! A one-member etcd for unit tests: the real `etcd` binary on loopback
//! ports the kernel picked, in a temp dir, killed on drop. Tests that need
//! it print `SKIPPED: <why>` and return when etcd is not installed.

use super::{Etcd, Options};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestEtcd {
    child: Child,
    dir: PathBuf,
    pub endpoint: String,
}

/// Why etcd tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("etcd").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("etcd is not installed (apt-get install etcd-server)".into()),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl TestEtcd {
    /// Starts a member and waits until it answers; `None` (after printing
    /// SKIPPED) when etcd is not installed.
    pub async fn start(test: &str) -> Option<TestEtcd> {
        if let Some(why) = unavailable() {
            println!("SKIPPED: {test}: {why}");
            return None;
        }
        for _ in 0..5 {
            let (client, peer) = (free_port(), free_port());
            let dir = std::env::temp_dir().join(format!(
                "remora-etcd-{test}-{}-{client}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(&dir)
                .args(["--listen-client-urls", &endpoint])
                .args(["--advertise-client-urls", &endpoint])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("t={peer_url}")])
                .args(["--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start etcd");
            let mut e = TestEtcd {
                child,
                dir,
                endpoint,
            };
            let client = e.client();
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if client.get(b"/").await.is_ok() {
                    return Some(e);
                }
                if let Ok(Some(_)) = e.child.try_wait() {
                    break; // a port was taken meanwhile: try others
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = e.child.kill();
        }
        panic!("etcd did not start");
    }

    pub fn options(&self) -> Options {
        Options {
            endpoints: vec![self.endpoint.clone()],
            ..Default::default()
        }
    }

    pub fn client(&self) -> Etcd {
        Etcd::new(&self.options()).expect("etcd client")
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
