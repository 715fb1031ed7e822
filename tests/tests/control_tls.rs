//! The control plane's own API over TLS: proxies verify it, remoractl
//! needs the admin token, and Discovery needs a workload certificate (or,
//! before the first one, the bootstrap token).

use remora_proto::control::discovery_client::DiscoveryClient;
use remora_proto::control::{discovery_request::Kind, DiscoveryRequest, Hello};
use remora_tests::control::{ControlProcess, Tokens};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::process::Command;
use std::time::Duration;

const ADMIN: &str = "tls-admin-token";
const MESH: &str = "\
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80}]
---
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
  calls: [api]
";

struct Tls {
    data: TempDir,
    state: TempDir,
    secrets: TempDir,
    cp: ControlProcess,
}

impl Tls {
    async fn start() -> Tls {
        let (data, state, secrets) = (
            TempDir::new("cptls-data"),
            TempDir::new("cptls-state"),
            TempDir::new("cptls-secrets"),
        );
        Tokens::new(&secrets);
        secrets.write("admin", ADMIN);
        secrets.write("wrong-admin", "not-the-token");
        secrets.write("mesh.yaml", MESH);
        let cp = Self::control(&data, &secrets, any_port()).await;
        Tls {
            data,
            state,
            secrets,
            cp,
        }
    }

    async fn control(
        data: &TempDir,
        secrets: &TempDir,
        addr: std::net::SocketAddr,
    ) -> ControlProcess {
        let (b, a) = (secrets.path().join("tokens"), secrets.path().join("admin"));
        ControlProcess::spawn_with(
            addr,
            data,
            "30s",
            &[
                "--tls",
                "--trust-domain",
                "mesh.test",
                "--bootstrap-tokens",
                b.to_str().unwrap(),
                "--admin-token-file",
                a.to_str().unwrap(),
            ],
        )
        .await
    }

    fn url(&self) -> String {
        format!("https://{}", self.cp.addr)
    }

    fn root(&self) -> String {
        self.data.path().join("ca/root.pem").display().to_string()
    }

    /// remoractl against the control plane: (exit code, stdout + stderr).
    fn ctl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(binary("remoractl"))
            .arg("--server")
            .arg(self.url())
            .args(args)
            .output()
            .expect("run remoractl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    fn sidecar(&self, node: &str, service: &str, ca: &str) -> ProxyBuilder {
        let token = Tokens::at(&self.secrets).token_for("default", service);
        ProxyBuilder::new()
            .control_plane(&self.url(), node, &self.state)
            .arg("--control-plane-ca")
            .arg(ca)
            .arg("--service")
            .arg(service)
            .arg("--bootstrap-token-file")
            .arg(token.to_str().unwrap())
    }

    fn cp_logs(&self) -> String {
        self.cp.logs.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn control_plane_serves_tls_and_authenticates_admin_and_discovery() {
    let mut t = Tls::start().await;
    let (root, secrets) = (t.root(), t.secrets.path().to_path_buf());
    let file = |n: &str| secrets.join(n).display().to_string();

    // remoractl: TLS verified with the root; the admin token is required.
    let (code, out) = t.ctl(&["--ca-file", &root, "apply", "-f", &file("mesh.yaml")]);
    assert_eq!(code, 2, "no token: {out}");
    assert!(out.contains("admin token"), "{out}");
    let (code, out) = t.ctl(&[
        "--ca-file",
        &root,
        "--token-file",
        &file("wrong-admin"),
        "status",
    ]);
    assert_eq!(code, 2, "wrong token: {out}");
    let (code, out) = t.ctl(&["--token-file", &file("admin"), "status"]);
    assert_eq!(
        code, 3,
        "without --ca-file the server must not be trusted: {out}"
    );
    let (code, out) = t.ctl(&[
        "--ca-file",
        &root,
        "--token-file",
        &file("admin"),
        "apply",
        "-f",
        &file("mesh.yaml"),
    ]);
    assert_eq!(code, 0, "{out}");

    // Sidecars verify the control plane, get config and certificates, and
    // talk mTLS to each other.
    let app = Upstream::start("api", Behavior::Demo).await;
    let api = t.sidecar("api-1", "api", &root).app(app.addr).start().await;
    let web = t.sidecar("web-1", "web", &root).start().await;
    let c = http1_client();
    let o = web.outbound;
    wait_until("web reaches api", Duration::from_secs(30), || {
        let c = c.clone();
        async move { matches!(get_via(&c, o, "api", "/").await, Ok(r) if r.status == 200) }
    })
    .await;
    // Before their first certificate they opened Discovery with the token.
    assert!(logs_with(&t.cp.logs, &["credential=bootstrap token"])
        .await
        .contains("credential=bootstrap token identity=default/web"));

    // Once they have certificates, they present them: a restarted control
    // plane sees workload identities.
    wait_until("certificates", Duration::from_secs(10), || async {
        api.metric("remora_identity_rotations_total", &["result=\"ok\""])
            .await
            >= 1.0
            && web
                .metric("remora_identity_rotations_total", &["result=\"ok\""])
                .await
                >= 1.0
    })
    .await;
    let addr = t.cp.addr;
    t.cp.stop().await;
    t.cp = Tls::control(&t.data, &t.secrets, addr).await;
    wait_until(
        "proxies reconnect with their certificates",
        Duration::from_secs(20),
        || async {
            let logs = t.cp_logs();
            logs.contains("credential=certificate identity=default/web")
                && logs.contains("credential=certificate identity=default/api")
        },
    )
    .await;
    assert_eq!(get_via(&c, o, "api", "/").await.unwrap().status, 200);

    // A Discovery client with neither certificate nor token: refused.
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read_to_string(&root).unwrap()),
    );
    let channel = tonic::transport::Endpoint::from_shared(t.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let hello = DiscoveryRequest {
        kind: Some(Kind::Hello(Hello {
            node_id: "intruder".into(),
            service: "default/api".into(),
            ..Default::default()
        })),
    };
    let r = DiscoveryClient::new(channel)
        .stream(futures_util::stream::iter(vec![hello]))
        .await;
    let Err(status) = r else {
        panic!("an anonymous Discovery stream was accepted");
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // A proxy that trusts another root never talks to this control plane.
    let other = t.secrets.write("other-root.pem", &other_root_pem());
    let stranger = t
        .sidecar("stranger-1", "web", &other.display().to_string())
        .spawn();
    wait_until(
        "the stranger refuses the control plane's certificate",
        Duration::from_secs(20),
        || async { stranger.logs().contains("control plane unreachable") },
    )
    .await;
    assert!(
        !t.cp_logs().contains("stranger-1"),
        "the stranger got through"
    );
}

fn other_root_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn control_plane_renews_its_own_certificate_in_place() {
    let data = TempDir::new("cptls-renew");
    let token = Tokens::new(&data).file();
    let cp = ControlProcess::spawn_with(
        any_port(),
        &data,
        "10s",
        &[
            "--tls",
            "--server-cert-lifetime",
            "2s",
            "--bootstrap-tokens",
            token.to_str().unwrap(),
        ],
    )
    .await;
    // Renewed at ~70% of 2 s: after the second renewal the first
    // certificate has expired, so a new connection that verifies proves
    // the renewed one is served.
    wait_until("two renewals", Duration::from_secs(20), || async {
        cp.logs
            .lock()
            .unwrap()
            .matches("renewed the control plane's certificate")
            .count()
            >= 2
    })
    .await;
    let root = data.path().join("ca/root.pem").display().to_string();
    let out = Command::new(binary("remoractl"))
        .args([
            "--server",
            &format!("https://{}", cp.addr),
            "--ca-file",
            &root,
            "status",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tls_without_bootstrap_tokens_is_refused_at_start() {
    let data = TempDir::new("cptls-notoken");
    let out = Command::new(binary("remora-control"))
        .args(["--tls", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls needs a token reviewer"), "{err}");
    assert!(
        !data.path().join("ca").exists(),
        "it failed before writing anything"
    );
}
