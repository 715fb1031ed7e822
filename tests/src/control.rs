//! Running the real remora-control binary in tests, and talking to it with
//! the generated Admin client.

use crate::{binary, wait_until, TempDir};
use remora_proto::control::admin_client::AdminClient;
use remora_proto::control::*;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct ControlProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its Prometheus metrics (`--metrics-addr`, a port the kernel picks).
    pub metrics: SocketAddr,
    pub logs: Arc<Mutex<String>>,
    /// With --tls: the root (PEM) that verifies it.
    pub ca_pem: Option<String>,
}

impl ControlProcess {
    /// Starts remora-control on `addr` with `data` as its data directory and
    /// waits until it answers.
    pub async fn start_on(addr: SocketAddr, data: &TempDir, grace: &str) -> ControlProcess {
        Self::start_with(addr, data, grace, &[]).await
    }

    /// As `start_on`, with more flags (e.g. `--bootstrap-token-file`).
    pub async fn start_with(
        addr: SocketAddr,
        data: &TempDir,
        grace: &str,
        extra: &[&str],
    ) -> ControlProcess {
        let cp = Self::spawn_with(addr, data, grace, extra).await;
        wait_until("control plane answers", Duration::from_secs(20), || async {
            match cp.try_admin().await {
                Some(mut c) => c.status(StatusRequest {}).await.is_ok(),
                None => false,
            }
        })
        .await;
        cp
    }

    /// Starts the control plane and waits until it listens (not until it
    /// answers: with --tls, plain clients cannot tell).
    pub async fn spawn_with(
        addr: SocketAddr,
        data: &TempDir,
        grace: &str,
        extra: &[&str],
    ) -> ControlProcess {
        let mut child = Command::new(binary("remora-control"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data.path())
            .arg("--registration-grace")
            .arg(grace)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start remora-control");
        let logs = Arc::new(Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), logs.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if std::env::var_os("REMORA_TEST_ECHO").is_some() {
                    eprintln!("[control] {line}");
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = crate::bound_addr(
            &mut child,
            &logs,
            "control plane listening",
            Duration::from_secs(20),
        )
        .await;
        let metrics = crate::bound_addr(
            &mut child,
            &logs,
            "metrics listening",
            Duration::from_secs(20),
        )
        .await;
        // The roots that verify it: the generated one, and --ca-cert's.
        let ca_pem = extra.contains(&"--tls").then(|| {
            let mut pem =
                std::fs::read_to_string(data.path().join("ca/root.pem")).unwrap_or_default();
            if let Some(i) = extra.iter().position(|a| *a == "--ca-cert") {
                pem.push_str(&std::fs::read_to_string(extra[i + 1]).unwrap_or_default());
            }
            pem
        });
        ControlProcess {
            child,
            addr,
            metrics,
            logs,
            ca_pem,
        }
    }

    pub async fn start(data: &TempDir) -> ControlProcess {
        // Port 0: the kernel picks, so parallel tests never collide.
        Self::start_on(crate::any_port(), data, "2s").await
    }

    pub fn url(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    async fn try_admin(&self) -> Option<AdminClient<tonic::transport::Channel>> {
        let mut e = tonic::transport::Endpoint::from_shared(self.url()).ok()?;
        if let Some(pem) = &self.ca_pem {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem));
            e = e.tls_config(tls).ok()?;
        }
        e.connect().await.ok().map(AdminClient::new)
    }

    pub async fn admin(&self) -> AdminClient<tonic::transport::Channel> {
        self.try_admin().await.expect("connect admin")
    }

    /// Applies YAML; returns the new version or the server's error text.
    pub async fn apply(&self, yaml: &str) -> Result<u64, String> {
        let cfg = remora_proto::parse_yaml(yaml, "test").map_err(|e| e.to_string())?;
        self.admin()
            .await
            .apply(ApplyRequest {
                resources: Some(cfg),
                author: "test".into(),
            })
            .await
            .map(|r| r.into_inner().version)
            .map_err(|s| s.message().to_string())
    }

    pub async fn status(&self) -> StatusResponse {
        self.admin()
            .await
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// SIGTERM, as an upgrade does, and waits for the exit (10 s at most,
    /// then SIGKILL).
    pub async fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Bootstrap tokens, one per identity, as an operator outside Kubernetes
/// keeps them: the control plane's tokens file (`--bootstrap-tokens`, the
/// tokens' SHA-256 only) and one token file per identity for its proxies.
pub struct Tokens {
    dir: std::path::PathBuf,
}

impl Tokens {
    /// An empty tokens file in `dir` (the control plane reads it at start
    /// and again whenever it changes).
    pub fn new(dir: &TempDir) -> Tokens {
        let t = Tokens {
            dir: dir.path().to_path_buf(),
        };
        std::fs::write(t.file(), "# namespace/serviceAccount sha256:<hex>\n").unwrap();
        t
    }

    /// The tokens already in `dir` (made by `new`).
    pub fn at(dir: &TempDir) -> Tokens {
        Tokens {
            dir: dir.path().to_path_buf(),
        }
    }

    /// The control plane's `--bootstrap-tokens` file.
    pub fn file(&self) -> std::path::PathBuf {
        self.dir.join("tokens")
    }

    /// The token file for `namespace/service_account`, made (and its hash
    /// added to the tokens file) on first use.
    pub fn token_for(&self, namespace: &str, service_account: &str) -> std::path::PathBuf {
        let path = self
            .dir
            .join(format!("{namespace}.{service_account}.token"));
        if !path.exists() {
            let token = format!("token-of-{namespace}-{service_account}");
            std::fs::write(&path, format!("{token}\n")).unwrap();
            self.grant(namespace, service_account, &token);
        }
        path
    }

    /// Adds a token for an identity to the tokens file.
    pub fn grant(&self, namespace: &str, service_account: &str, token: &str) {
        use std::io::Write;
        let line = format!(
            "{namespace}/{service_account} {}\n",
            remora_control_hash(token)
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.file())
            .unwrap()
            .write_all(line.as_bytes())
            .unwrap();
    }

    /// Removes every token of an identity from the tokens file (revokes it).
    pub fn revoke(&self, namespace: &str, service_account: &str) {
        let prefix = format!("{namespace}/{service_account} ");
        let text = std::fs::read_to_string(self.file()).unwrap();
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with(&prefix))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(self.file(), kept).unwrap();
    }
}

/// `sha256:<hex>` of a token, as the tokens file keeps it.
fn remora_control_hash(token: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(token.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    let hex = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", hex.split_whitespace().next().unwrap_or(""))
}

/// A root CA in files, as an operator hands the same one to every
/// control-plane replica (`--ca-cert`, `--ca-key`): each replica then
/// issues under it, proxies' certificates and its own.
pub struct SharedCa {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub pem: String,
}

impl SharedCa {
    /// A new root (ECDSA P-256), written to `dir` as root.pem and root-key.pem.
    pub fn new(dir: &TempDir) -> SharedCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "remora test mesh root");
        p.distinguished_name = dn;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let pem = p.self_signed(&key).unwrap().pem();
        SharedCa {
            cert: dir.write("root.pem", &pem),
            key: dir.write("root-key.pem", &key.serialize_pem()),
            pem,
        }
    }

    /// The remora-control flags that make a replica issue under this CA.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--ca-cert".into(),
            self.cert.display().to_string(),
            "--ca-key".into(),
            self.key.display().to_string(),
        ]
    }
}

/// Control-plane replicas on a shared etcd (`--store etcd`).
impl ControlProcess {
    /// Starts a replica on `etcd` (its own data directory stays empty) and
    /// waits until it answers.
    pub async fn start_replica(
        etcd: &crate::etcd::EtcdCluster,
        data: &TempDir,
        grace: &str,
        extra: &[&str],
    ) -> ControlProcess {
        let mut flags: Vec<String> = etcd.flags();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Self::start_with(crate::any_port(), data, grace, &flags).await
    }

    /// Applies YAML; the new version, or the server's status.
    pub async fn apply_status(&self, yaml: &str) -> Result<u64, tonic::Status> {
        let cfg = remora_proto::parse_yaml(yaml, "test")
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut admin = self
            .try_admin()
            .await
            .ok_or_else(|| tonic::Status::unavailable("cannot connect"))?;
        admin
            .apply(ApplyRequest {
                resources: Some(cfg),
                author: "test".into(),
            })
            .await
            .map(|r| r.into_inner().version)
    }

    /// The status, or None while the replica does not answer.
    pub async fn try_status(&self) -> Option<StatusResponse> {
        let mut admin = self.try_admin().await?;
        admin
            .status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Every version in its history, oldest first.
    pub async fn history(&self) -> Vec<HistoryEntry> {
        self.admin()
            .await
            .history(HistoryRequest {})
            .await
            .unwrap()
            .into_inner()
            .entries
    }
}
