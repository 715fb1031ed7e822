//! Mutual TLS between proxies, end to end: the real remora-control as the
//! CA, real sidecars originating and terminating mTLS, and hand-made
//! clients (rustls, openssl s_client) knocking on a Strict inbound port.

use remora_proxy::tls::SpiffeServerVerifier;
use remora_tests::control::{ControlProcess, Tokens};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const API_ID: &str = "spiffe://mesh.test/ns/default/sa/api";
const WEB_ID: &str = "spiffe://mesh.test/ns/default/sa/web";

const SERVICES: &str = "\
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80}]
  mtls: {clientIdentityHeader: x-client-id}
---
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
  calls: [api]
---
kind: Service
metadata: {name: batch}
spec:
  ports: [{port: 80}]
  calls: [api]
";

/// A control plane (the CA, trust domain mesh.test) and its files.
struct Mesh {
    data: TempDir,
    state: TempDir,
    secrets: TempDir,
    /// One bootstrap token per identity (--bootstrap-tokens).
    tokens: Tokens,
    cp: ControlProcess,
    lifetime: String,
    /// The control plane serves TLS (--tls); sidecars verify it.
    tls: bool,
}

impl Mesh {
    /// The control plane over TLS, as in production: proxies send their
    /// bootstrap token only to an https control plane.
    async fn start(lifetime: &str) -> Mesh {
        Self::start_with(lifetime, true).await
    }

    async fn start_with(lifetime: &str, tls: bool) -> Mesh {
        let (data, state, secrets) = (
            TempDir::new("mtls-data"),
            TempDir::new("mtls-state"),
            TempDir::new("mtls-secrets"),
        );
        let tokens = Tokens::new(&secrets);
        let tls_flag: &[&str] = if tls { &["--tls"] } else { &[] };
        let cp = Self::control(any_port(), &data, &tokens, lifetime, tls_flag).await;
        cp.apply(SERVICES).await.unwrap();
        Mesh {
            data,
            state,
            secrets,
            tokens,
            cp,
            lifetime: lifetime.to_string(),
            tls,
        }
    }

    async fn control(
        addr: SocketAddr,
        data: &TempDir,
        tokens: &Tokens,
        lifetime: &str,
        extra: &[&str],
    ) -> ControlProcess {
        let file = tokens.file();
        let mut flags = vec![
            "--bootstrap-tokens",
            file.to_str().unwrap(),
            "--cert-lifetime",
            lifetime,
            "--trust-domain",
            "mesh.test",
        ];
        flags.extend_from_slice(extra);
        ControlProcess::start_with(addr, data, "30s", &flags).await
    }

    /// Replaces the control plane with one on the same address and data
    /// directory, with more flags (a CA or a trust bundle), as an upgrade
    /// would: SIGTERM, then start.
    async fn restart_control(&mut self, extra: &[&str]) {
        let addr = self.cp.addr;
        self.cp.stop().await;
        let mut flags = extra.to_vec();
        if self.tls {
            flags.push("--tls");
        }
        self.cp = Self::control(addr, &self.data, &self.tokens, &self.lifetime, &flags).await;
    }

    /// A sidecar for `service`, with its identity from the control plane.
    async fn sidecar(
        &self,
        node: &str,
        service: &str,
        app: Option<SocketAddr>,
        extra: &[&str],
    ) -> ProxyProcess {
        // Its own identity's token: default/<service>, unless it says
        // otherwise.
        let flag = |name: &str| {
            extra
                .iter()
                .position(|a| *a == name)
                .and_then(|i| extra.get(i + 1).copied())
        };
        let ns = flag("--identity-namespace").unwrap_or("default");
        let sa = flag("--identity-service-account").unwrap_or(service);
        let token = self.tokens.token_for(ns, sa);
        let mut b = ProxyBuilder::new()
            .control_plane(&self.cp.url(), node, &self.state)
            .arg("--service")
            .arg(service)
            .arg("--bootstrap-token-file")
            .arg(token.to_str().unwrap());
        if self.tls {
            let root = self.data.path().join("ca/root.pem");
            b = b.arg("--control-plane-ca").arg(root.to_str().unwrap());
        } else {
            b = b.arg("--insecure-dev-plaintext");
        }
        if let Some(a) = app {
            b = b.app(a);
        }
        for a in extra {
            b = b.arg(a);
        }
        b.start().await
    }

    fn root_pem(&self) -> String {
        std::fs::read_to_string(self.data.path().join("ca/root.pem")).unwrap()
    }

    /// The control plane's own CA, to sign test certificates with.
    fn issuer(&self) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let key = std::fs::read_to_string(self.data.path().join("ca/root-key.pem")).unwrap();
        let key = rcgen::KeyPair::from_pem(&key).unwrap();
        rcgen::Issuer::from_ca_cert_pem(&self.root_pem(), key).unwrap()
    }
}

/// Waits until `caller`'s outbound reaches `host` and gets a 200.
async fn wait_serving(caller: &ProxyProcess, host: &str) {
    let c = http1_client();
    let o = caller.outbound;
    wait_until(
        &format!("{host} answers over mTLS"),
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move { matches!(get_via(&c, o, host, "/").await, Ok(r) if r.status == 200) }
        },
    )
    .await;
}

/// A leaf certificate for `spiffe_id`: (chain PEM, key PEM).
fn leaf(
    spiffe_id: &str,
    issuer: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
    expired: bool,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = match issuer {
        Some(i) => p.signed_by(&key, i).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    (cert.pem(), key.serialize_pem())
}

/// A root CA of our own: (issuer, certificate PEM, key PEM).
fn other_root() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "another root");
    p.distinguished_name = dn;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key).unwrap();
    (issuer, cert_pem, key_pem)
}

/// A TLS 1.3 client that trusts `root_pem` for the server `API_ID` and
/// presents `cert` (chain PEM, key PEM), or no certificate.
fn client_config(root_pem: &str, cert: Option<&(String, String)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = SpiffeServerVerifier::new(Arc::new(roots), API_ID.to_string());
    let b = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier));
    let cfg = match cert {
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// One HTTP/1.1 request over mTLS straight to a proxy's inbound port:
/// the status, or why there was none.
async fn tls_get(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(addr.ip().into());
    let exchange = async {
        let mut tls = TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let read = tls.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf);
        match text.split(' ').nth(1).and_then(|s| s.parse().ok()) {
            Some(status) => Ok(status),
            None => Err(format!("no response ({read:?})")),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[tokio::test]
async fn strict_inbound_accepts_only_a_valid_mesh_certificate() {
    let mesh = Mesh::start("1h").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    let api = mesh.sidecar("api-1", "api", Some(app.addr), &[]).await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    wait_serving(&web, "api").await;

    // Through the mesh: mTLS, and the app learns who called (a caller's
    // own copy of the header is replaced).
    let c = http1_client();
    let req = http::Request::get(format!("http://{}/who", web.outbound))
        .header("host", "api")
        .header("x-client-id", "spiffe://mesh.test/ns/default/sa/admin")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, req).await.unwrap().status, 200);
    let seen = app.seen();
    let last = seen.iter().rev().find(|s| s.path == "/who").unwrap();
    let ids: Vec<_> = last.headers.get_all("x-client-id").iter().collect();
    assert_eq!(
        ids,
        [WEB_ID],
        "the app must see exactly the verified caller"
    );
    assert_eq!(
        last.headers.get("host").and_then(|h| h.to_str().ok()),
        Some("api"),
        "the Host the caller wrote survives the HTTP/2 hop between proxies"
    );
    assert!(
        web.metric(
            "remora_tls_handshakes_total",
            &["direction=\"outbound\"", "result=\"ok\""]
        )
        .await
            >= 1.0
    );
    assert!(
        api.metric(
            "remora_tls_handshakes_total",
            &["direction=\"inbound\"", "result=\"ok\""]
        )
        .await
            >= 1.0
    );

    // Between the proxies, one long-lived HTTP/2 connection carries many
    // concurrent requests (HTTP/1.1 would open one per request in flight).
    let calls = (0..40).map(|i| {
        let c = c.clone();
        let o = web.outbound;
        async move { get_via(&c, o, "api", &format!("/many/{i}")).await }
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().status, 200);
    }
    let conns = api
        .metric("remora_connections_total", &["listener=\"inbound\""])
        .await;
    assert!(
        conns <= 2.0,
        "{conns} connections into api's sidecar for 41 requests"
    );

    // Plaintext straight to the inbound port: refused.
    let hits = app.hits();
    let plain = get_via(&http1_client(), api.inbound, "api", "/").await;
    assert!(
        plain.is_err(),
        "plaintext got an answer: {:?}",
        plain.map(|r| r.status)
    );
    assert!(
        api.metric("remora_inbound_plaintext_refused_total", &[])
            .await
            >= 1.0
    );

    let root = mesh.root_pem();
    let ca = mesh.issuer();
    let (other_ca, _, _) = other_root();
    let refused = [
        ("no client certificate", client_config(&root, None)),
        (
            "a self-signed certificate",
            client_config(&root, Some(&leaf(WEB_ID, None, false))),
        ),
        (
            "a certificate from another CA",
            client_config(&root, Some(&leaf(WEB_ID, Some(&other_ca), false))),
        ),
        (
            "an expired certificate",
            client_config(&root, Some(&leaf(WEB_ID, Some(&ca), true))),
        ),
        (
            "a certificate for another trust domain",
            client_config(
                &root,
                Some(&leaf(
                    "spiffe://other.test/ns/default/sa/web",
                    Some(&ca),
                    false,
                )),
            ),
        ),
    ];
    for (what, cfg) in refused {
        let r = tls_get(api.inbound, cfg).await;
        assert!(r.is_err(), "{what} was accepted: {r:?}");
    }
    assert_eq!(app.hits(), hits, "a refused connection reached the app");
    assert!(
        api.metric(
            "remora_tls_handshakes_total",
            &["direction=\"inbound\"", "result=\"error\""]
        )
        .await
            >= 4.0
    );

    // The right certificate, from the mesh's CA: accepted.
    let good = client_config(&root, Some(&leaf(WEB_ID, Some(&ca), false)));
    assert_eq!(tls_get(api.inbound, good).await, Ok(200));
}

#[tokio::test]
async fn outbound_refuses_a_server_with_another_identity() {
    let mesh = Mesh::start("1h").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    // A proxy of another identity ("impostor", legitimately its own
    // Service) that api's config lists as a meshed endpoint: the control
    // plane lets no proxy register under api without api's identity, so
    // a bad endpoint can only come from config.
    mesh.cp
        .apply("kind: Service\nmetadata: {name: impostor}\nspec:\n  ports: [{port: 80}]\n")
        .await
        .unwrap();
    let impostor = mesh
        .sidecar("impostor-1", "impostor", Some(app.addr), &[])
        .await;
    let api_with = |sa: &str| {
        format!(
            "kind: Service\nmetadata: {{name: api}}\nspec:\n  ports: [{{port: 80}}]\n{sa}  endpoints: [{{address: 127.0.0.1, port: {}, meshed: true}}]\n",
            impostor.inbound.port()
        )
    };
    mesh.cp.apply(&api_with("")).await.unwrap();
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    let c = http1_client();
    let o = web.outbound;
    wait_until("a refused handshake", Duration::from_secs(30), || {
        let (c, web) = (c.clone(), &web);
        async move {
            let r = get_via(&c, o, "api", "/").await;
            assert!(
                !matches!(&r, Ok(r) if r.status == 200),
                "the impostor was trusted"
            );
            web.metric(
                "remora_tls_handshakes_total",
                &["direction=\"outbound\"", "result=\"error\""],
            )
            .await
                >= 1.0
        }
    })
    .await;
    let r = get_via(&c, o, "api", "/").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(app.hits(), 0);
    wait_until("the refusal is logged", Duration::from_secs(5), || async {
        let logs = web.logs();
        logs.contains("mTLS handshake to a peer proxy failed")
            && logs.contains(&format!("expected={API_ID}"))
            && logs.contains("impostor")
    })
    .await;

    // Once the Service says its workloads run as "impostor", they are it.
    mesh.cp
        .apply(&api_with("  serviceAccount: impostor\n"))
        .await
        .unwrap();
    wait_serving(&web, "api").await;
}

#[tokio::test]
async fn permissive_accepts_plaintext_and_mtls_and_disabled_sends_plaintext() {
    let mesh = Mesh::start("1h").await;
    mesh.cp
        .apply("kind: Service\nmetadata: {name: api}\nspec:\n  ports: [{port: 80}]\n  mtls: {mode: Permissive, clientIdentityHeader: x-client-id}\n")
        .await
        .unwrap();
    let app = Upstream::start("api", Behavior::Demo).await;
    let api = mesh.sidecar("api-1", "api", Some(app.addr), &[]).await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    wait_serving(&web, "api").await;
    let handshakes = || async {
        api.metric(
            "remora_tls_handshakes_total",
            &["direction=\"inbound\"", "result=\"ok\""],
        )
        .await
    };
    assert!(handshakes().await >= 1.0);

    // Plaintext straight to the inbound port is served, with no identity.
    let r = get_via(&http1_client(), api.inbound, "api", "/plain")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let seen = app.seen();
    let plain = seen.iter().rev().find(|s| s.path == "/plain").unwrap();
    assert!(plain.headers.get("x-client-id").is_none());

    // Disabled: callers stop originating mTLS; the inbound serves plaintext.
    let before = handshakes().await;
    mesh.cp
        .apply("kind: Service\nmetadata: {name: api}\nspec:\n  ports: [{port: 80}]\n  mtls: {mode: Disabled}\n")
        .await
        .unwrap();
    let c = http1_client();
    let o = web.outbound;
    wait_until(
        "plaintext between the proxies",
        Duration::from_secs(20),
        || {
            let c = c.clone();
            let app = &app;
            async move {
                let _ = get_via(&c, o, "api", "/after").await;
                app.seen()
                    .iter()
                    .rev()
                    .find(|s| s.path == "/after")
                    .is_some_and(|s| s.headers.get("x-client-id").is_none())
            }
        },
    )
    .await;
    for _ in 0..20 {
        assert_eq!(get_via(&c, o, "api", "/").await.unwrap().status, 200);
    }
    assert_eq!(handshakes().await, before, "Disabled still used mTLS");
}

#[tokio::test]
async fn authorization_policy_allows_and_denies_by_identity_and_route() {
    let mesh = Mesh::start("1h").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    let api = mesh.sidecar("api-1", "api", Some(app.addr), &[]).await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    let batch = mesh.sidecar("batch-1", "batch", None, &[]).await;
    wait_serving(&web, "api").await;
    wait_serving(&batch, "api").await;

    // Service-wide: only web. On the admin route: only namespace ops.
    mesh.cp
        .apply(
            "kind: HTTPRoute\nmetadata: {name: admin}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /admin}}]\n    backendRefs: [{name: api}]\n---\n\
             kind: HTTPRoute\nmetadata: {name: rest}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - backendRefs: [{name: api}]\n---\n\
             kind: AuthorizationPolicy\nmetadata: {name: api-callers}\nspec:\n  targetRef: {name: api}\n  from: [{identity: 'spiffe://mesh.test/ns/default/sa/web'}]\n---\n\
             kind: AuthorizationPolicy\nmetadata: {name: admin-only-ops}\nspec:\n  targetRef: {kind: HTTPRoute, name: admin}\n  from: [{namespace: ops}]\n",
        )
        .await
        .unwrap();
    let c = http1_client();
    let (w, b) = (web.outbound, batch.outbound);
    wait_until("batch is denied", Duration::from_secs(20), || {
        let c = c.clone();
        async move { matches!(get_via(&c, b, "api", "/").await, Ok(r) if r.status == 403) }
    })
    .await;
    let denied = get_via(&c, b, "api", "/orders").await.unwrap();
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-remora-error"), Some("forbidden"));
    assert_eq!(get_via(&c, w, "api", "/orders").await.unwrap().status, 200);
    // web is allowed on the Service, but not on the admin route.
    assert_eq!(
        get_via(&c, w, "api", "/admin/users").await.unwrap().status,
        403
    );
    assert!(
        app.seen().iter().all(|s| s.path != "/admin/users"),
        "a denied request reached the app"
    );

    // gRPC callers get PERMISSION_DENIED.
    let req = http::Request::post(format!("http://{b}/shop.Api/Get"))
        .header("host", "api")
        .header("content-type", "application/grpc")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = send(&c, req).await.unwrap();
    assert_eq!(r.header("grpc-status"), Some("7"), "{:?}", r.headers);

    // Counted by target and result, and logged with the caller.
    let denied = api
        .metric("remora_authz_decisions_total", &["result=\"denied\""])
        .await;
    assert!(denied >= 4.0, "denied {denied}");
    assert!(
        api.metric(
            "remora_authz_decisions_total",
            &["target=\"Service default/api\"", "result=\"allowed\""]
        )
        .await
            >= 1.0
    );
    let who = "client=spiffe://mesh.test/ns/default/sa/batch";
    assert!(api.logs_with(&[who]).await.contains(who));
}

#[tokio::test]
async fn client_identity_is_a_rate_limit_key() {
    let mesh = Mesh::start("1h").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    let _api = mesh.sidecar("api-1", "api", Some(app.addr), &[]).await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    let batch = mesh.sidecar("batch-1", "batch", None, &[]).await;
    wait_serving(&web, "api").await;
    wait_serving(&batch, "api").await;
    mesh.cp
        .apply("kind: RateLimitPolicy\nmetadata: {name: per-caller}\nspec:\n  targetRef: {name: api}\n  limits: [{name: by-identity, requests: 3, per: hour, key: [{type: ClientIdentity}]}]\n")
        .await
        .unwrap();
    let c = http1_client();
    let (w, b) = (web.outbound, batch.outbound);
    // web uses up its own bucket...
    wait_until("web is limited", Duration::from_secs(20), || {
        let c = c.clone();
        async move { matches!(get_via(&c, w, "api", "/").await, Ok(r) if r.status == 429) }
    })
    .await;
    // ...and batch still has all of its own.
    for _ in 0..3 {
        assert_eq!(get_via(&c, b, "api", "/").await.unwrap().status, 200);
    }
    assert_eq!(get_via(&c, b, "api", "/").await.unwrap().status, 429);
}

/// Requests through `caller` to api, back to back on a few connections,
/// until `stop`; counts answers that were not 200.
fn load(
    caller: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (ok, failed, stop) = (ok2.clone(), failed2.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let c = http1_client();
                let mut errors = Vec::new();
                while !stop.load(Relaxed) {
                    match get_via(&c, caller, "api", "/").await {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Relaxed);
                            errors.push(format!("{:?}", other.map(|r| (r.status, r.body))));
                        }
                    }
                }
                errors
            }));
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all
    });
    (ok, failed, task)
}

async fn rotations(p: &ProxyProcess) -> f64 {
    p.metric("remora_identity_rotations_total", &["result=\"ok\""])
        .await
}

#[tokio::test]
async fn certificate_rotation_under_load_fails_no_request() {
    // 10 s certificates, renewed at about 7 s: 60 s of traffic spans
    // several renewals on both sides, and connections are re-established
    // as the certificates they were made with expire.
    let secs: u64 = std::env::var("REMORA_ROTATION_TEST_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mesh = Mesh::start("10s").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    let api = mesh.sidecar("api-1", "api", Some(app.addr), &[]).await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    wait_serving(&web, "api").await;
    let (api_rot, web_rot) = (rotations(&api).await, rotations(&web).await);
    let handshakes = |p: &ProxyProcess| {
        let admin = p.admin;
        async move {
            sum_metric(
                &get_text(&format!("http://{admin}/metrics")).await,
                "remora_tls_handshakes_total",
                &["direction=\"inbound\"", "result=\"ok\""],
            )
        }
    };
    let hs = handshakes(&api).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed, task) = load(web.outbound, stop.clone());
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Relaxed);
    let errors = task.await.unwrap();
    let (ok, failed) = (ok.load(Relaxed), failed.load(Relaxed));
    let renewed = (
        rotations(&api).await - api_rot,
        rotations(&web).await - web_rot,
    );
    let new_handshakes = handshakes(&api).await - hs;
    eprintln!(
        "{ok} requests ok, {failed} failed; renewals api {} web {}; new handshakes {new_handshakes}",
        renewed.0, renewed.1
    );
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 1000, "too little traffic to mean anything: {ok}");
    let expected = (secs / 10).max(1) as f64;
    assert!(
        renewed.0 >= expected && renewed.1 >= expected,
        "renewals {renewed:?} in {secs}s"
    );
    assert!(
        new_handshakes >= expected,
        "connections were not re-established as certificates expired: {new_handshakes}"
    );
}

async fn trust_roots(p: &ProxyProcess) -> f64 {
    p.metric("remora_identity_trust_roots", &[]).await
}

#[tokio::test]
async fn root_rotation_through_a_two_root_bundle_fails_no_request() {
    // The control plane serves TLS too: its own certificate moves to the
    // new root with everything else, and proxies follow via the bundle.
    // 12 s certificates: renewed at ~8 s, which leaves room for a control
    // plane restart (a few seconds) between renewals.
    let mut mesh = Mesh::start_with("12s", true).await;
    let app = Upstream::start("api", Behavior::Demo).await;
    let api = mesh.sidecar("api-1", "api", Some(app.addr), &[]).await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    wait_serving(&web, "api").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed, task) = load(web.outbound, stop.clone());

    let old_root = mesh.data.path().join("ca/root.pem").display().to_string();
    let (_, new_cert, new_key) = other_root();
    let new_root = mesh
        .secrets
        .write("new-root.pem", &new_cert)
        .display()
        .to_string();
    let new_key = mesh
        .secrets
        .write("new-root-key.pem", &new_key)
        .display()
        .to_string();
    let both = |n: f64| {
        let (api, web) = (&api, &web);
        move || async move { trust_roots(api).await == n && trust_roots(web).await == n }
    };

    // 1. Publish old + new roots; still issuing from the old one.
    mesh.restart_control(&["--trust-bundle", &new_root]).await;
    wait_until(
        "both proxies trust two roots",
        Duration::from_secs(20),
        both(2.0),
    )
    .await;

    // 2. Issue from the new root, the old one still trusted.
    mesh.restart_control(&[
        "--ca-cert",
        &new_root,
        "--ca-key",
        &new_key,
        "--trust-bundle",
        &old_root,
    ])
    .await;
    let (a0, w0) = (rotations(&api).await, rotations(&web).await);
    // Two renewals each: every certificate of the old root has expired.
    wait_until(
        "certificates from the new root",
        Duration::from_secs(30),
        || async { rotations(&api).await >= a0 + 2.0 && rotations(&web).await >= w0 + 2.0 },
    )
    .await;

    // 3. Retire the old root.
    mesh.restart_control(&["--ca-cert", &new_root, "--ca-key", &new_key])
        .await;
    wait_until(
        "both proxies trust the new root only",
        Duration::from_secs(20),
        both(1.0),
    )
    .await;
    let (a1, w1) = (rotations(&api).await, rotations(&web).await);
    wait_until(
        "a renewal on the new root alone",
        Duration::from_secs(30),
        || async { rotations(&api).await > a1 && rotations(&web).await > w1 },
    )
    .await;

    stop.store(true, Relaxed);
    let errors = task.await.unwrap();
    let (ok, failed) = (ok.load(Relaxed), failed.load(Relaxed));
    eprintln!("{ok} requests ok, {failed} failed across the root rotation");
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 500, "too little traffic to mean anything: {ok}");
    // And new connections still work on the new root alone.
    let c = http1_client();
    assert_eq!(
        get_via(&c, web.outbound, "api", "/").await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn openssl_sees_tls13_only_and_a_demanded_client_certificate() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: openssl is not installed (CI installs it)");
        return;
    }
    let mesh = Mesh::start("1h").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    let api = mesh.sidecar("api-1", "api", Some(app.addr), &[]).await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    wait_serving(&web, "api").await;
    let addr = api.inbound.to_string();
    let s_client = |args: &[&str]| {
        let mut cmd = std::process::Command::new("openssl");
        cmd.args(["s_client", "-connect", &addr, "-servername", "api"])
            .args(args)
            .stdin(std::process::Stdio::null());
        let out = cmd.output().expect("run openssl");
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // TLS 1.2 and below: no handshake.
    let tls12 = s_client(&["-tls1_2"]);
    assert!(
        tls12.contains("alert")
            || tls12.contains("no protocols available")
            || tls12.contains("wrong version"),
        "TLS 1.2 was not refused:\n{tls12}"
    );
    assert!(
        tls12.contains("Cipher is (NONE)"),
        "a TLS 1.2 cipher was negotiated:\n{tls12}"
    );
    // TLS 1.3: the server asks for a client certificate.
    let tls13 = s_client(&["-tls1_3", "-msg"]);
    assert!(tls13.contains("TLSv1.3"), "no TLS 1.3 handshake:\n{tls13}");
    assert!(
        tls13.contains("CertificateRequest"),
        "no client certificate was demanded:\n{tls13}"
    );
}

#[tokio::test]
async fn websocket_upgrade_crosses_the_mesh_over_mtls() {
    let mesh = Mesh::start("1h").await;
    let app = Upstream::start("api", Behavior::Demo).await;
    let api = mesh.sidecar("api-1", "api", Some(app.addr), &[]).await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    wait_serving(&web, "api").await;

    let mut s = TcpStream::connect(web.outbound).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("101 in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed before the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let payload: Vec<u8> = (0..32 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; payload.len()];
    let (mut r, mut w) = s.split();
    let (wr, rd) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(w.write_all(&payload), r.read_exact(&mut back))
    })
    .await
    .expect("echo in time");
    wr.unwrap();
    rd.unwrap();
    assert!(back == payload, "the tunnel changed the bytes");
    // It crossed the mesh over mTLS.
    assert!(
        api.metric(
            "remora_tls_handshakes_total",
            &["direction=\"inbound\"", "result=\"ok\""]
        )
        .await
            >= 2.0,
        "the upgrade did not use its own mTLS connection"
    );
}

#[tokio::test]
async fn grpc_streams_and_trailers_cross_the_mesh_over_mtls() {
    use remora_tests::grpc::echo::echo_client::EchoClient;
    use remora_tests::grpc::echo::{EchoRequest, StreamRequest};
    use remora_tests::grpc::GrpcServer;
    let mesh = Mesh::start("1h").await;
    mesh.cp
        .apply("kind: Service\nmetadata: {name: greeter}\nspec:\n  ports: [{port: 50051, protocol: grpc}]\n---\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n  calls: [api, greeter]\n")
        .await
        .unwrap();
    let server = GrpcServer::start("greeter-1").await;
    let greeter = mesh
        .sidecar(
            "greeter-1",
            "greeter",
            Some(server.addr),
            &["--app-protocol", "grpc"],
        )
        .await;
    let web = mesh.sidecar("web-1", "web", None, &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", web.outbound))
        .unwrap()
        .origin("http://greeter:50051".parse().unwrap())
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);
    let req = || EchoRequest {
        message: "hi".into(),
        ..Default::default()
    };
    wait_until("greeter answers over mTLS", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move { c.unary(req()).await.is_ok() }
    })
    .await;
    let reply = client.unary(req()).await.unwrap().into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.server.as_str()),
        ("hi", "greeter-1")
    );

    // A server stream ending in a status with custom trailers.
    let mut stream = client
        .server_stream(StreamRequest {
            message: "s".into(),
            count: 50,
            end_code: tonic::Code::Ok as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m.message, format!("s-{n}"));
        n += 1;
    }
    assert_eq!(n, 50);
    let trailers = stream.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("x-echo-trailer").unwrap(), "s");
    assert!(
        greeter
            .metric(
                "remora_tls_handshakes_total",
                &["direction=\"inbound\"", "result=\"ok\""]
            )
            .await
            >= 1.0
    );
}
