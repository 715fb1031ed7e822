//! What the control plane believes of a proxy, end to end: the real
//! remora-control over TLS with one bootstrap token per identity
//! (`--bootstrap-tokens`), real sidecars, and, where a real proxy cannot
//! misbehave, hand-made clients: a Discovery client with a workload
//! certificate it got from Identity.Issue, and raw HTTP/2 frames over TLS.
//!
//! - a proxy fronts only Services of its own identity, and only defined ones;
//! - a node id belongs to the identity that first registered it;
//! - a malformed instance never reaches a snapshot;
//! - before authentication: an oversized Hello, a Hello that never comes, a
//!   flood of streams on one connection and a rapid-reset flood are cut
//!   off, while a real proxy keeps streaming and ACKing;
//! - an emptied or deleted admin token file refuses every Admin call;
//! - a proxy gone longer than `--status-retention` leaves Admin.Status;
//! - plaintext beyond loopback needs `--insecure-dev-plaintext`.

use remora_proto::control::admin_client::AdminClient;
use remora_proto::control::discovery_client::DiscoveryClient;
use remora_proto::control::discovery_request::Kind;
use remora_proto::control::identity_client::IdentityClient;
use remora_proto::control::{
    ApplyRequest, DiscoveryRequest, Hello, Instance, IssueRequest, ProxyStatus, Snapshot,
    StatusRequest, StatusResponse,
};
use remora_tests::control::{ControlProcess, Tokens};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// api and web as usual (web calls api, so api's proxies see every
/// Service); shop's workloads run as sa-b.
const SERVICES: &str = "\
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
---
kind: Service
metadata: {name: shop}
spec:
  ports: [{port: 80}]
  serviceAccount: sa-b
";

/// The identities the tests use (namespace default); their tokens exist
/// before the control plane starts.
const IDENTITIES: &[&str] = &["api", "web", "sa-a", "sa-b", "ghost"];

/// The maximum concurrent streams the control plane allows per connection
/// (remora_control::MAX_STREAMS_PER_CONNECTION).
const MAX_STREAMS: usize = 32;

/// A control plane over TLS (trust domain mesh.test) with SERVICES applied.
struct Mesh {
    data: TempDir,
    state: TempDir,
    _secrets: TempDir,
    tokens: Tokens,
    cp: ControlProcess,
}

/// A workload certificate and its key (PEM).
struct Issued {
    chain: String,
    key: String,
}

impl Mesh {
    async fn start(extra: &[&str]) -> Mesh {
        let (data, state, secrets) = (
            TempDir::new("trust-data"),
            TempDir::new("trust-state"),
            TempDir::new("trust-secrets"),
        );
        let tokens = Tokens::new(&secrets);
        for sa in IDENTITIES {
            tokens.token_for("default", sa);
        }
        let file = tokens.file();
        let mut flags = vec![
            "--tls",
            "--bootstrap-tokens",
            file.to_str().unwrap(),
            "--trust-domain",
            "mesh.test",
        ];
        flags.extend_from_slice(extra);
        let cp = ControlProcess::start_with(any_port(), &data, "30s", &flags).await;
        cp.apply(SERVICES).await.unwrap();
        Mesh {
            data,
            state,
            _secrets: secrets,
            tokens,
            cp,
        }
    }

    fn root_file(&self) -> String {
        self.data.path().join("ca/root.pem").display().to_string()
    }

    /// A sidecar as node `node` fronting `service` with the identity
    /// default/`sa` (its own token), its state under `state`.
    fn sidecar(&self, node: &str, service: &str, sa: &str, state: &TempDir) -> ProxyBuilder {
        let token = self.tokens.token_for("default", sa);
        ProxyBuilder::new()
            .control_plane(&self.cp.url(), node, state)
            .arg("--service")
            .arg(service)
            .arg("--identity-service-account")
            .arg(sa)
            .arg("--bootstrap-token-file")
            .arg(token.to_str().unwrap())
            .arg("--control-plane-ca")
            .arg(&self.root_file())
    }

    /// The control plane's endpoint, verified with its root, presenting
    /// `cert` when given.
    fn endpoint(&self, cert: Option<&Issued>) -> Endpoint {
        let root = self.cp.ca_pem.as_deref().expect("a TLS control plane");
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
        if let Some(c) = cert {
            tls = tls.identity(Identity::from_pem(&c.chain, &c.key));
        }
        Endpoint::from_shared(self.cp.url())
            .unwrap()
            .tls_config(tls)
            .unwrap()
    }

    async fn channel(&self, cert: Option<&Issued>) -> Channel {
        self.endpoint(cert).connect().await.expect("connect")
    }

    /// A workload certificate for default/`sa`, as a proxy gets one:
    /// Identity.Issue with a CSR and its bootstrap token.
    async fn issue(&self, sa: &str) -> Issued {
        let token = std::fs::read_to_string(self.tokens.token_for("default", sa)).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let r = IdentityClient::new(self.channel(None).await)
            .issue(IssueRequest {
                csr_pem: csr,
                namespace: "default".into(),
                service_account: sa.into(),
                bootstrap_token: token.trim().into(),
            })
            .await
            .expect("Identity.Issue")
            .into_inner();
        Issued {
            chain: r.cert_chain_pem,
            key: key.serialize_pem(),
        }
    }

    /// Opens a Discovery stream presenting `cert` (or nothing) and sends
    /// `hello`, keeping the request stream open afterwards.
    async fn hello(
        &self,
        cert: Option<&Issued>,
        hello: Hello,
    ) -> Result<tonic::Streaming<Snapshot>, tonic::Status> {
        let first = DiscoveryRequest {
            kind: Some(Kind::Hello(hello)),
        };
        let requests = futures_util::StreamExt::chain(
            futures_util::stream::iter([first]),
            futures_util::stream::pending(),
        );
        DiscoveryClient::new(self.channel(cert).await)
            .stream(requests)
            .await
            .map(|r| r.into_inner())
    }

    fn cp_logs(&self) -> String {
        self.cp.logs.lock().unwrap().clone()
    }

    /// Applies one more Service, `name`, and waits until `node` ACKed the
    /// snapshot that carries it and NACKed nothing: the proxy keeps
    /// streaming and applying.
    async fn apply_acked(&self, node: &str, name: &str) {
        let yaml =
            format!("kind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80}}]\n");
        let version = self.cp.apply(&yaml).await.expect("apply");
        let cp = &self.cp;
        wait_until(
            &format!("{node} ACKs config version {version}"),
            Duration::from_secs(20),
            || async move {
                let s = cp.status().await;
                s.config_version >= version
                    && proxy(&s, node).is_some_and(|p| {
                        p.connected
                            && p.acked_version == s.snapshot_version
                            && p.nacked_version.is_empty()
                            && p.nack_error.is_empty()
                    })
            },
        )
        .await;
    }
}

fn proxy<'a>(s: &'a StatusResponse, node: &str) -> Option<&'a ProxyStatus> {
    s.proxies.iter().find(|p| p.node_id == node)
}

/// The lines of `logs` that contain every one of `needles`.
fn lines_with<'a>(logs: &'a str, needles: &[&str]) -> Vec<&'a str> {
    logs.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// Waits until `logs` has at least `n` lines containing every one of
/// `needles`, and returns them.
async fn logged(logs: &std::sync::Mutex<String>, n: usize, needles: &[&str]) -> Vec<String> {
    wait_until(
        &format!("{n} log lines with {needles:?}"),
        Duration::from_secs(30),
        || async { lines_with(&logs.lock().unwrap(), needles).len() >= n },
    )
    .await;
    lines_with(&logs.lock().unwrap(), needles)
        .into_iter()
        .map(String::from)
        .collect()
}

/// The endpoints ("address:port") a proxy's running config gives
/// `service`; panics if its config has no such Service.
async fn endpoints_of(p: &ProxyProcess, service: &str) -> Vec<String> {
    let body = get_text(&format!("http://{}/config", p.admin)).await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let services = doc["config"]["services"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let found = services
        .iter()
        .find(|s| s["metadata"]["name"] == service)
        .unwrap_or_else(|| panic!("no Service {service} in the proxy's config: {body}"));
    found["spec"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| format!("{}:{}", e["address"].as_str().unwrap_or("?"), e["port"]))
        .collect()
}

/// The status a refused Discovery stream ended with: the call's error, or
/// the error its first message brings. Panics if a snapshot arrives.
async fn refusal(r: Result<tonic::Streaming<Snapshot>, tonic::Status>) -> tonic::Status {
    match r {
        Err(s) => s,
        Ok(mut stream) => {
            match tokio::time::timeout(Duration::from_secs(20), stream.message()).await {
                Ok(Err(s)) => s,
                Ok(Ok(Some(snap))) => panic!("accepted: got snapshot {}", snap.version),
                Ok(Ok(None)) => panic!("the stream ended with OK"),
                Err(_) => panic!("neither refused nor answered within 20s"),
            }
        }
    }
}

// ------------------------------------------------- 1. whose Service it is

#[tokio::test]
async fn a_proxy_fronts_only_a_defined_service_of_its_own_identity() {
    let mesh = Mesh::start(&[]).await;
    // shop's own identity (sa-b) is admitted: what follows is refused for
    // who the proxy is, nothing else.
    let good = mesh
        .sidecar("shop-good", "shop", "sa-b", &mesh.state)
        .start()
        .await;

    // sa-a's proxy claims shop.
    let bad = mesh
        .sidecar("shop-bad", "shop", "sa-a", &mesh.state)
        .start_live()
        .await;
    let reason =
        "default/sa-a may not front Service default/shop, whose workloads run as default/sa-b";
    // Refused, and refused again as it retries.
    let lines = logged(
        &mesh.cp.logs,
        2,
        &["Discovery stream refused", "shop-bad", reason],
    )
    .await;
    assert!(lines[0].contains("identity=default/sa-a"), "{}", lines[0]);
    let logs = bad.logs_with(&[reason]).await;
    let line = lines_with(&logs, &[reason])
        .first()
        .map(|l| l.to_string())
        .unwrap_or_else(|| panic!("the proxy does not say why it was refused:\n{logs}"));
    assert!(
        line.contains("code=PermissionDenied") && line.contains("refused this proxy's stream"),
        "the proxy's log names no PERMISSION_DENIED: {line}"
    );
    assert!(
        lines_with(&mesh.cp_logs(), &["proxy connected", "node=\"shop-bad\""]).is_empty(),
        "shop-bad connected"
    );

    // A Service that is not defined: refused too.
    let ghost = mesh
        .sidecar("ghost-1", "ghost", "ghost", &mesh.state)
        .start_live()
        .await;
    let not_defined = "Service default/ghost is not defined";
    logged(
        &mesh.cp.logs,
        2,
        &["Discovery stream refused", "ghost-1", not_defined],
    )
    .await;
    assert!(!lines_with(&ghost.logs_with(&[not_defined]).await, &[not_defined]).is_empty());

    // Neither is ever listed, nor its instance in shop's endpoints.
    let s = mesh.cp.status().await;
    assert!(proxy(&s, "shop-bad").is_none(), "{s:?}");
    assert!(proxy(&s, "ghost-1").is_none(), "{s:?}");
    let shop = endpoints_of(&good, "shop").await;
    assert_eq!(shop, [good.inbound.to_string()], "shop's endpoints");
    assert!(proxy(&s, "shop-good").is_some_and(|p| p.connected));

    // A refused Hello claimed nothing: shop's own identity may still use
    // the node id sa-a's proxy kept asking for (which is still refused).
    let other_state = TempDir::new("trust-state-b");
    let _rightful = mesh
        .sidecar("shop-bad", "shop", "sa-b", &other_state)
        .start()
        .await;
    let cp = &mesh.cp;
    wait_until(
        "sa-b's proxy holds node shop-bad",
        Duration::from_secs(20),
        || async { proxy(&cp.status().await, "shop-bad").is_some_and(|p| p.connected) },
    )
    .await;
    let n = lines_with(&mesh.cp_logs(), &["Discovery stream refused", reason]).len();
    logged(
        &mesh.cp.logs,
        n + 1,
        &["Discovery stream refused", "identity=default/sa-a", reason],
    )
    .await;
}

// ------------------------------------------------ 2. whose node id it is

#[tokio::test]
async fn a_node_id_cannot_be_taken_over_by_another_identity() {
    let mesh = Mesh::start(&[]).await;
    let app = Upstream::start("api-app", Behavior::Demo).await;
    let api = mesh
        .sidecar("n1", "api", "api", &mesh.state)
        .app(app.addr)
        .start()
        .await;
    let before = proxy(&mesh.cp.status().await, "n1").cloned().unwrap();
    assert!(before.connected);
    assert_eq!(before.instance, api.inbound.to_string());

    // web's proxy (legitimately fronting web) says it is n1.
    let thief_state = TempDir::new("trust-thief");
    let thief = mesh
        .sidecar("n1", "web", "web", &thief_state)
        .start_live()
        .await;
    let reason = "node n1 belongs to default/api: another identity cannot take it over";
    logged(
        &mesh.cp.logs,
        2,
        &["Discovery stream refused", "identity=default/web", reason],
    )
    .await;
    assert!(!lines_with(&thief.logs_with(&[reason]).await, &[reason]).is_empty());

    // n1 is still api's proxy, on the same stream, with its instance.
    let after = proxy(&mesh.cp.status().await, "n1").cloned().unwrap();
    assert!(after.connected, "{after:?}");
    assert_eq!(after.service, "default/api");
    assert_eq!(after.instance, api.inbound.to_string());
    assert_eq!(after.connected_since_unix, before.connected_since_unix);
    assert_eq!(
        lines_with(&mesh.cp_logs(), &["proxy connected", "node=\"n1\""]).len(),
        1,
        "n1 connected more than once"
    );

    // Other proxies still route to it: web's sidecar reaches api's app
    // over mTLS through n1.
    let web = mesh
        .sidecar("web-1", "web", "web", &mesh.state)
        .start()
        .await;
    assert_eq!(endpoints_of(&web, "api").await, [api.inbound.to_string()]);
    let c = http1_client();
    let o = web.outbound;
    wait_until("web reaches api through n1", Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            matches!(get_via(&c, o, "api", "/").await, Ok(r) if r.status == 200 && r.body.contains("api-app"))
        }
    })
    .await;
    assert!(app.hits() >= 1);

    // The thief goes away (its stream never opened, so nothing of n1 goes
    // with it).
    drop(thief);
    let r = get_via(&c, o, "api", "/").await.unwrap();
    assert_eq!(r.status, 200);
    let s = mesh.cp.status().await;
    assert!(proxy(&s, "n1").is_some_and(|p| p.connected && p.instance == api.inbound.to_string()));
}

// ------------------------------------------- 3. what an instance may be

#[tokio::test]
async fn a_malformed_instance_never_reaches_a_snapshot() {
    let mesh = Mesh::start(&[]).await;
    // api calls nothing: its proxy's snapshot holds every Service, web's
    // endpoints included.
    let api = mesh
        .sidecar("api-1", "api", "api", &mesh.state)
        .start()
        .await;
    let web_cert = mesh.issue("web").await;
    let before = mesh.cp.status().await.snapshot_version;

    let bad = [
        ("not-an-ip", 4143, "is not an IP address"),
        ("127.0.0.1", 70000, "instance port 70000 is not 1..65535"),
        ("127.0.0.1", 0, "instance port 0 is not 1..65535"),
        ("0.0.0.0", 4143, "cannot receive traffic"),
    ];
    for (address, port, why) in bad {
        let hello = Hello {
            node_id: "raw-web".into(),
            service: "default/web".into(),
            instance: Some(Instance {
                address: address.into(),
                port,
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = refusal(mesh.hello(Some(&web_cert), hello).await).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{address}:{port}: {s:?}");
        assert!(s.message().contains(why), "{address}:{port}: {s:?}");
    }
    logged(
        &mesh.cp.logs,
        bad.len(),
        &["Discovery stream refused", "raw-web", "instance"],
    )
    .await;

    // The same client and certificate with a well-formed Hello: admitted
    // (the refusals were for the instance alone).
    let hello = Hello {
        node_id: "raw-web".into(),
        service: "default/web".into(),
        ..Default::default()
    };
    let mut ok = mesh.hello(Some(&web_cert), hello).await.expect("admitted");
    let first = tokio::time::timeout(Duration::from_secs(10), ok.message())
        .await
        .expect("a snapshot")
        .expect("a snapshot")
        .expect("a snapshot");
    assert!(!first.version.is_empty());

    // Nothing reached any snapshot: the snapshot version (which covers
    // every registered instance) is unchanged, and the running proxy keeps
    // ACKing, web without endpoints.
    let s = mesh.cp.status().await;
    assert_eq!(
        s.snapshot_version, before,
        "a refused instance changed the snapshot"
    );
    assert!(proxy(&s, "raw-web").is_some_and(|p| p.connected && p.instance.is_empty()));
    mesh.apply_acked("api-1", "after-bad-instances").await;
    assert_eq!(endpoints_of(&api, "web").await, Vec::<String>::new());
    let config = get_text(&format!("http://{}/config", api.admin)).await;
    assert!(config.contains("after-bad-instances"));
    assert!(!config.contains("not-an-ip") && !config.contains("70000"));
}

// -------------------------------------- 4. before anyone is authenticated

#[tokio::test]
async fn an_oversized_hello_is_refused() {
    let mesh = Mesh::start(&[]).await;
    let _api = mesh
        .sidecar("api-1", "api", "api", &mesh.state)
        .start()
        .await;
    let web_cert = mesh.issue("web").await;
    // ~100 KiB of labels: past the 64 KiB a Discovery message may be.
    let labels = (0..100)
        .map(|i| (format!("k{i}"), "v".repeat(1000)))
        .collect();
    let hello = Hello {
        node_id: "big-1".into(),
        service: "default/web".into(),
        instance: Some(Instance {
            address: "127.0.0.1".into(),
            port: 4143,
            labels,
        }),
        ..Default::default()
    };
    assert!(prost::Message::encoded_len(&hello) > 64 << 10);
    // With web's certificate, and with no credential at all.
    for (who, cert) in [("web", Some(&web_cert)), ("anonymous", None)] {
        let s = refusal(mesh.hello(cert, hello.clone()).await).await;
        assert_ne!(s.code(), Code::Ok, "{who}: {s:?}");
        if who == "anonymous" {
            // Refused for its size, before anyone asked who it is.
            assert_ne!(s.code(), Code::Unauthenticated, "{who}: {s:?}");
        }
    }
    logged(
        &mesh.cp.logs,
        2,
        &["Discovery stream refused before its Hello", "too large"],
    )
    .await;
    assert!(proxy(&mesh.cp.status().await, "big-1").is_none());
    mesh.apply_acked("api-1", "after-big-hello").await;
}

#[tokio::test]
async fn a_hello_that_never_comes_is_cut_off() {
    let mesh = Mesh::start(&["--hello-timeout", "1s"]).await;
    let _api = mesh
        .sidecar("api-1", "api", "api", &mesh.state)
        .start()
        .await;
    let since = proxy(&mesh.cp.status().await, "api-1")
        .unwrap()
        .connected_since_unix;

    // A stream that opens and says nothing, with no credential; meanwhile
    // an apply reaches the real proxy.
    let channel = mesh.channel(None).await;
    let started = Instant::now();
    let silent = async {
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            DiscoveryClient::new(channel)
                .stream(futures_util::stream::pending::<DiscoveryRequest>()),
        )
        .await
        .expect("the silent stream was never ended");
        (refusal(r.map(|r| r.into_inner())).await, started.elapsed())
    };
    let ((s, took), ()) = tokio::join!(silent, mesh.apply_acked("api-1", "during-silence"));
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(took >= Duration::from_millis(900), "ended after {took:?}");
    logged(
        &mesh.cp.logs,
        1,
        &["Discovery stream refused: no Hello within 1s"],
    )
    .await;

    // The limit is on the Hello only: the real proxy's stream outlived it.
    let p = proxy(&mesh.cp.status().await, "api-1").cloned().unwrap();
    assert!(p.connected);
    assert_eq!(p.connected_since_unix, since);
    assert_eq!(
        lines_with(&mesh.cp_logs(), &["proxy connected", "node=\"api-1\""]).len(),
        1
    );
    mesh.apply_acked("api-1", "after-silence").await;
}

#[tokio::test]
async fn a_flood_of_streams_on_one_connection_is_refused_past_the_limit() {
    let mesh = Mesh::start(&["--hello-timeout", "2s"]).await;
    let _api = mesh
        .sidecar("api-1", "api", "api", &mesh.state)
        .start()
        .await;
    let mut h2 = RawH2::connect(mesh.cp.addr, mesh.cp.ca_pem.as_deref().unwrap()).await;
    assert_eq!(
        h2.server_settings.get(&SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(&(MAX_STREAMS as u32)),
        "the control plane's SETTINGS: {:?}",
        h2.server_settings
    );
    // 100 Discovery streams at once, none with a Hello.
    let ids: Vec<u32> = (0..100).map(|i| 2 * i + 1).collect();
    let mut burst = Vec::new();
    for id in &ids {
        burst.extend(h2.discovery_headers(*id));
    }
    h2.send(&burst).await;
    let (outcome, ()) = tokio::join!(
        h2.outcome(&ids, Duration::from_secs(30)),
        mesh.apply_acked("api-1", "during-flood"),
    );
    let accepted: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|id| !outcome.refused(*id))
        .collect();
    // At most 32 accepted (they wait for a Hello); every other one refused:
    // RST_STREAM(REFUSED_STREAM), or past the last stream id of a GOAWAY.
    assert!(
        !accepted.is_empty() && accepted.len() <= MAX_STREAMS,
        "{} streams accepted ({accepted:?}); {outcome:?}",
        accepted.len()
    );
    mesh.apply_acked("api-1", "after-flood").await;
}

#[tokio::test]
async fn a_rapid_reset_flood_is_stopped() {
    let mesh = Mesh::start(&[]).await;
    let _api = mesh
        .sidecar("api-1", "api", "api", &mesh.state)
        .start()
        .await;
    let mut h2 = RawH2::connect(mesh.cp.addr, mesh.cp.ca_pem.as_deref().unwrap()).await;
    // Open and cancel 1000 streams, as fast as the socket takes them.
    let ids: Vec<u32> = (0..1000).map(|i| 2 * i + 1).collect();
    let mut burst = Vec::new();
    for id in &ids {
        burst.extend(h2.discovery_headers(*id));
        burst.extend(frame(FRAME_RST_STREAM, 0, *id, &CANCEL.to_be_bytes()));
    }
    // The server may close before it has read it all.
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        let _ = h2.tls.write_all(&burst).await;
        let _ = h2.tls.flush().await;
    })
    .await;
    let (end, ()) = tokio::join!(
        h2.until_goaway_or_close(Duration::from_secs(30)),
        mesh.apply_acked("api-1", "during-resets"),
    );
    match end {
        Ending::GoAway { last, code } => {
            assert_eq!(code, ENHANCE_YOUR_CALM, "{end:?}");
            assert!(
                last < ids[ids.len() - 1],
                "every stream was processed: {end:?}"
            );
        }
        Ending::Closed => {}
    }
    mesh.apply_acked("api-1", "after-resets").await;
}

#[tokio::test]
async fn the_connection_cap_pauses_accepting_until_a_place_frees() {
    let mesh = Mesh::start(&["--max-connections", "2"]).await;
    let (addr, root) = (mesh.cp.addr, mesh.cp.ca_pem.clone().unwrap());
    // Two HTTP/2 connections take both places (they keep them until the
    // keepalive finds they answer no PING, 15 s later).
    let first = RawH2::connect(addr, &root).await;
    let _second = RawH2::connect(addr, &root).await;
    // A third is not accepted: its TLS handshake gets no answer...
    let r = root.clone();
    let mut third = tokio::spawn(async move { tls_handshake(addr, &r).await });
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut third)
            .await
            .is_err(),
        "a third connection was accepted past --max-connections 2"
    );
    // ...until a place frees.
    drop(first);
    let third = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third connection is accepted once a place frees")
        .unwrap()
        .expect("TLS handshake");
    drop(third);
    let cp = &mesh.cp;
    wait_until(
        "the control plane answers",
        Duration::from_secs(10),
        || async { answers(cp).await },
    )
    .await;
}

/// Admin.Status answers within 2 s (a fresh connection, 2 s to connect).
async fn answers(cp: &ControlProcess) -> bool {
    let tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(cp.ca_pem.as_deref().unwrap()));
    let e = Endpoint::from_shared(cp.url())
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(2), e.connect()).await else {
        return false;
    };
    let mut admin = AdminClient::new(ch);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), admin.status(StatusRequest {})).await,
        Ok(Ok(_))
    )
}

#[tokio::test]
async fn a_silent_connection_does_not_hold_its_place_forever() {
    let mesh = Mesh::start(&["--max-connections", "2"]).await;
    let (addr, root) = (mesh.cp.addr, mesh.cp.ca_pem.clone().unwrap());
    // Two connections that finish TLS and never say a word: anyone who
    // reaches the port can open them, no credential needed.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tls_handshake(addr, &root).await.expect("TLS handshake"));
    }
    // They must not lock every proxy and remoractl out: like a slow TLS
    // handshake (10 s), a connection that does not start HTTP/2 is closed.
    let cp = &mesh.cp;
    wait_until(
        "the control plane serves again despite two silent connections",
        Duration::from_secs(40),
        || async { answers(cp).await },
    )
    .await;
    // Closed by the server (after whatever it had sent: its SETTINGS).
    for mut s in silent {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
            "a silent connection is still open: {closed:?}"
        );
    }
}

// ------------------------------------------------------- 5. admin token

#[tokio::test]
async fn an_emptied_or_deleted_admin_token_file_refuses_every_admin_call() {
    let (data, secrets) = (TempDir::new("trust-data"), TempDir::new("trust-secrets"));
    let tokens = Tokens::new(&secrets);
    tokens.token_for("default", "api");
    let admin = secrets.write("admin-token", "admin-secret-1\n");
    let file = tokens.file();
    let cp = ControlProcess::spawn_with(
        any_port(),
        &data,
        "30s",
        &[
            "--tls",
            "--bootstrap-tokens",
            file.to_str().unwrap(),
            "--trust-domain",
            "mesh.test",
            "--admin-token-file",
            admin.to_str().unwrap(),
        ],
    )
    .await;
    let admin_client = || async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(cp.ca_pem.as_deref().unwrap()));
        let ch = Endpoint::from_shared(cp.url())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("connect");
        AdminClient::new(ch)
    };
    let status = |bearer: Option<&'static str>| async move {
        admin_client()
            .await
            .status(authed(bearer, StatusRequest {}))
            .await
            .map(|r| r.into_inner())
    };
    let apply = |bearer: Option<&'static str>| async move {
        let cfg = remora_proto::parse_yaml(SERVICES, "test").unwrap();
        let req = ApplyRequest {
            resources: Some(cfg),
            author: "test".into(),
        };
        admin_client()
            .await
            .apply(authed(bearer, req))
            .await
            .map(|r| r.into_inner().version)
    };
    wait_until(
        "the control plane answers",
        Duration::from_secs(20),
        || async { status(Some("admin-secret-1")).await.is_ok() },
    )
    .await;

    // The token works; anything else is unauthenticated.
    let applied = apply(Some("admin-secret-1"))
        .await
        .expect("apply with the token");
    assert_eq!(code(status(Some("wrong")).await), Code::Unauthenticated);
    assert_eq!(code(status(Some("")).await), Code::Unauthenticated);
    assert_eq!(code(status(None).await), Code::Unauthenticated);

    // Emptied in place (truncated): every call refused, the old token, an
    // empty bearer and no bearer alike; an apply does not land.
    std::fs::write(&admin, "").unwrap();
    for bearer in [Some("admin-secret-1"), Some(""), None] {
        assert_eq!(code(status(bearer).await), Code::Unavailable, "{bearer:?}");
    }
    assert_eq!(code(apply(Some("")).await), Code::Unavailable);
    assert_eq!(code(apply(None).await), Code::Unavailable);
    logged(
        &cp.logs,
        1,
        &["admin token file is empty: every Admin call is refused"],
    )
    .await;
    // Whitespace only is empty too.
    std::fs::write(&admin, " \n\t\n").unwrap();
    assert_eq!(code(status(Some("")).await), Code::Unavailable);
    assert_eq!(
        code(status(Some("admin-secret-1")).await),
        Code::Unavailable
    );

    // Deleted: refused.
    std::fs::remove_file(&admin).unwrap();
    for bearer in [Some("admin-secret-1"), Some(""), None] {
        assert_eq!(code(status(bearer).await), Code::Unavailable, "{bearer:?}");
    }
    logged(
        &cp.logs,
        1,
        &["admin token file unreadable: every Admin call is refused"],
    )
    .await;

    // A new token in place: it works, the old one does not, and nothing
    // was applied while the file was empty or gone.
    secrets.write("admin-token", "admin-secret-2\n");
    assert_eq!(
        code(status(Some("admin-secret-1")).await),
        Code::Unauthenticated
    );
    let s = status(Some("admin-secret-2"))
        .await
        .expect("the new token works");
    assert_eq!(s.config_version, applied);
}

/// `message` as a request with `authorization: Bearer <bearer>`, if any.
fn authed<T>(bearer: Option<&str>, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(b) = bearer {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {b}").parse().unwrap());
    }
    r
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

// --------------------------------------------------- 6. status retention

#[tokio::test]
async fn a_stopped_proxy_leaves_status_after_the_retention() {
    let mesh = Mesh::start(&["--status-retention", "1s"]).await;
    let api = mesh
        .sidecar("api-1", "api", "api", &mesh.state)
        .start()
        .await;
    let web = mesh
        .sidecar("web-1", "web", "web", &mesh.state)
        .start()
        .await;
    let s = mesh.cp.status().await;
    assert!(proxy(&s, "api-1").is_some_and(|p| p.connected));
    assert!(proxy(&s, "web-1").is_some_and(|p| p.connected));

    drop(web);
    let cp = &mesh.cp;
    wait_until(
        "web-1 leaves Admin.Status",
        Duration::from_secs(30),
        || async { proxy(&cp.status().await, "web-1").is_none() },
    )
    .await;
    // A connected proxy is never forgotten, however long it has been there.
    let s = mesh.cp.status().await;
    assert!(proxy(&s, "api-1").is_some_and(|p| p.connected), "{s:?}");

    // web-1 comes back (same node, same identity): listed again.
    let _web = mesh
        .sidecar("web-1", "web", "web", &mesh.state)
        .start()
        .await;
    wait_until("web-1 is listed again", Duration::from_secs(30), || async {
        proxy(&cp.status().await, "web-1").is_some_and(|p| p.connected)
    })
    .await;
    drop(api);
}

// ------------------------------------------- 7. plaintext beyond loopback

#[tokio::test]
async fn plaintext_beyond_loopback_needs_insecure_dev_plaintext() {
    let data = TempDir::new("trust-plain");
    let mut child = Command::new(binary("remora-control"))
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start remora-control");
    let logs = capture_stderr(&mut child, "control");
    let end = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a plaintext control plane on 0.0.0.0 kept running:\n{}",
                logs.lock().unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!exit.success());
    let text = logs_with(&logs, &["--insecure-dev-plaintext"]).await;
    assert!(
        text.contains("--listen 0.0.0.0:0") && text.contains("--insecure-dev-plaintext"),
        "{text}"
    );
    assert!(!text.contains("control plane listening"), "{text}");

    // With the flag it starts, and says what is unprotected.
    let mut cp = ControlProcess::spawn_with(
        SocketAddr::from(([0, 0, 0, 0], 0)),
        &data,
        "2s",
        &["--insecure-dev-plaintext"],
    )
    .await;
    let text = logs_with(&cp.logs, &["no --tls"]).await;
    let warning = lines_with(&text, &["no --tls"]);
    let warning = warning
        .first()
        .unwrap_or_else(|| panic!("no warning:\n{text}"));
    for what in [
        "plaintext",
        "Discovery",
        "Identity",
        "unauthenticated",
        "bootstrap tokens",
    ] {
        assert!(warning.contains(what), "{what:?} not in {warning}");
    }
    assert!(warning.contains("WARN"), "{warning}");
    // It serves (on every address, loopback included).
    cp.addr = SocketAddr::from(([127, 0, 0, 1], cp.addr.port()));
    assert_eq!(cp.status().await.config_version, 0);
}

// ------------------------------------------------ raw HTTP/2 over TLS

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_PING: u8 = 6;
const FRAME_GOAWAY: u8 = 7;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 14);
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK literal header field without indexing, new name, no Huffman.
fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    block.push(0x00);
    block.push(name.len() as u8);
    block.extend_from_slice(name.as_bytes());
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the control plane at `addr` (verified with
/// `root_pem`, ALPN h2, no client certificate), handshake done.
async fn tls_handshake(addr: SocketAddr, root_pem: &str) -> std::io::Result<TlsStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

/// A client speaking HTTP/2 frames by hand over TLS (ALPN h2), with no
/// client certificate: what any attacker who reaches the port can do.
struct RawH2 {
    tls: TlsStream,
    authority: String,
    buf: Vec<u8>,
    /// The SETTINGS the server sent first.
    server_settings: BTreeMap<u16, u32>,
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// How the server answered a burst of streams.
#[derive(Debug, Default)]
struct Outcome {
    /// Streams reset with REFUSED_STREAM.
    refused_streams: BTreeSet<u32>,
    /// Streams reset with another code.
    other_resets: BTreeMap<u32, u32>,
    /// Streams the server answered (HEADERS), and those it ended.
    answered: BTreeSet<u32>,
    ended: BTreeSet<u32>,
    /// GOAWAY: (last stream id, error code).
    goaway: Option<(u32, u32)>,
    closed: bool,
}

impl Outcome {
    /// Refused: reset with REFUSED_STREAM, or beyond the GOAWAY's last
    /// stream id (never processed).
    fn refused(&self, id: u32) -> bool {
        self.refused_streams.contains(&id) || self.goaway.is_some_and(|(last, _)| id > last)
    }

    fn settled(&self, ids: &[u32]) -> bool {
        self.closed
            || ids.iter().all(|id| {
                self.refused(*id) || self.ended.contains(id) || self.other_resets.contains_key(id)
            })
    }
}

#[derive(Debug)]
enum Ending {
    GoAway { last: u32, code: u32 },
    Closed,
}

impl RawH2 {
    /// TLS to the control plane (verified with `root_pem`), the client
    /// preface and an empty SETTINGS; reads the server's SETTINGS and ACKs
    /// them, as a well-behaved client would before opening streams.
    async fn connect(addr: SocketAddr, root_pem: &str) -> RawH2 {
        let tls = tls_handshake(addr, root_pem)
            .await
            .expect("TLS handshake with the control plane");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut h2 = RawH2 {
            tls,
            authority: addr.to_string(),
            buf: Vec::new(),
            server_settings: BTreeMap::new(),
        };
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        h2.send(&hello).await;
        let settings = loop {
            let f = tokio::time::timeout(Duration::from_secs(10), h2.read_frame())
                .await
                .expect("the server's SETTINGS")
                .expect("the server's SETTINGS");
            if f.kind == FRAME_SETTINGS && f.flags & FLAG_ACK == 0 {
                break f;
            }
        };
        for s in settings.payload.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            h2.server_settings.insert(id, value);
        }
        h2.send(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[])).await;
        h2
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.expect("write");
        self.tls.flush().await.expect("flush");
    }

    /// HEADERS opening a Discovery stream (no body yet: no Hello).
    fn discovery_headers(&self, id: u32) -> Vec<u8> {
        let mut block = Vec::new();
        literal(&mut block, ":method", "POST");
        literal(&mut block, ":scheme", "https");
        literal(&mut block, ":path", "/remora.control.v1.Discovery/Stream");
        literal(&mut block, ":authority", &self.authority);
        literal(&mut block, "content-type", "application/grpc");
        literal(&mut block, "te", "trailers");
        frame(FRAME_HEADERS, FLAG_END_HEADERS, id, &block)
    }

    /// The next frame; None once the connection is closed (or broken).
    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 << 10];
            match self.tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Answers a PING, as a live client must.
    async fn pong(&mut self, f: &Frame) {
        if f.kind == FRAME_PING && f.flags & FLAG_ACK == 0 {
            let _ = self
                .tls
                .write_all(&frame(FRAME_PING, FLAG_ACK, 0, &f.payload))
                .await;
        }
    }

    /// Reads until every one of `ids` is refused or ended, or the
    /// connection closes.
    async fn outcome(&mut self, ids: &[u32], deadline: Duration) -> Outcome {
        let end = Instant::now() + deadline;
        let mut o = Outcome::default();
        while !o.settled(ids) {
            let left = end.saturating_duration_since(Instant::now());
            let Ok(next) = tokio::time::timeout(left, self.read_frame()).await else {
                panic!("the server left streams unanswered for {deadline:?}: {o:?}");
            };
            let Some(f) = next else {
                o.closed = true;
                break;
            };
            let word = |at: usize| {
                f.payload
                    .get(at..at + 4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0)
            };
            match f.kind {
                FRAME_RST_STREAM if word(0) == REFUSED_STREAM => {
                    o.refused_streams.insert(f.stream);
                }
                FRAME_RST_STREAM => {
                    o.other_resets.insert(f.stream, word(0));
                }
                FRAME_GOAWAY => o.goaway = Some((word(0) & 0x7fff_ffff, word(4))),
                FRAME_HEADERS | FRAME_DATA => {
                    if f.kind == FRAME_HEADERS {
                        o.answered.insert(f.stream);
                    }
                    if f.flags & FLAG_END_STREAM != 0 {
                        o.ended.insert(f.stream);
                    }
                }
                _ => self.pong(&f).await,
            }
        }
        o
    }

    /// Reads until the server sends GOAWAY or closes the connection.
    async fn until_goaway_or_close(&mut self, deadline: Duration) -> Ending {
        let end = Instant::now() + deadline;
        let mut seen = 0usize;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let Ok(next) = tokio::time::timeout(left, self.read_frame()).await else {
                panic!("after {seen} frames in {deadline:?}, neither GOAWAY nor close");
            };
            match next {
                None => return Ending::Closed,
                Some(f) if f.kind == FRAME_GOAWAY => {
                    let w = |at: usize| {
                        u32::from_be_bytes([
                            f.payload[at],
                            f.payload[at + 1],
                            f.payload[at + 2],
                            f.payload[at + 3],
                        ])
                    };
                    return Ending::GoAway {
                        last: w(0) & 0x7fff_ffff,
                        code: w(4),
                    };
                }
                Some(f) => {
                    seen += 1;
                    self.pong(&f).await;
                }
            }
        }
    }
}
