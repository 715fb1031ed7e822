//! Workload identity end to end: the real remora-control as the mesh's CA
//! (over TLS, one bootstrap token per identity), real proxies getting their
//! certificates and renewing them with the certificate itself, keeping them
//! across restarts, and the Identity service called directly.

use remora_proto::control::identity_client::IdentityClient;
use remora_proto::control::{IssueRequest, IssueResponse};
use remora_tests::control::{ControlProcess, Tokens};
use remora_tests::upstream::{Behavior, Upstream};
use remora_tests::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const EXPIRY: &str = "remora_identity_cert_expiry_seconds";
const ROTATIONS: &str = "remora_identity_rotations_total";

/// A control plane over TLS issuing `lifetime` certificates in trust domain
/// mesh.test, with its data and tokens.
struct Cp {
    cp: ControlProcess,
    data: TempDir,
    tokens: Tokens,
    _secrets: TempDir,
    lifetime: String,
}

impl Cp {
    async fn start(lifetime: &str) -> Cp {
        Self::start_on(any_port(), lifetime).await
    }

    async fn start_on(addr: SocketAddr, lifetime: &str) -> Cp {
        let (data, secrets) = (TempDir::new("id-data"), TempDir::new("id-secrets"));
        let tokens = Tokens::new(&secrets);
        let cp = control(addr, &data, &tokens, lifetime).await;
        Cp {
            cp,
            data,
            tokens,
            _secrets: secrets,
            lifetime: lifetime.to_string(),
        }
    }

    /// The same control plane again (same address, data and tokens).
    async fn restart(&mut self) {
        self.cp.kill();
        self.cp = control(self.cp.addr, &self.data, &self.tokens, &self.lifetime).await;
    }

    fn root(&self) -> PathBuf {
        self.data.path().join("ca/root.pem")
    }

    /// A proxy with identity shop/`sa`, presenting `token_file`.
    fn proxy(
        &self,
        state: &TempDir,
        node: &str,
        sa: &str,
        token_file: &std::path::Path,
    ) -> ProxyBuilder {
        ProxyBuilder::new()
            .control_plane(&self.cp.url(), node, state)
            .arg("--control-plane-ca")
            .arg(self.root().to_str().unwrap())
            .arg("--bootstrap-token-file")
            .arg(token_file.to_str().unwrap())
            .arg("--namespace")
            .arg("shop")
            .arg("--identity-service-account")
            .arg(sa)
    }

    /// Identity.Issue called directly, optionally authenticated by a
    /// certificate (chain PEM, key PEM) instead of a token.
    async fn issue(
        &self,
        token: &str,
        namespace: &str,
        service_account: &str,
        csr_pem: &str,
        cert: Option<(&str, &str)>,
    ) -> Result<IssueResponse, tonic::Status> {
        let root = std::fs::read_to_string(self.root()).unwrap();
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(root))
            .domain_name("localhost");
        if let Some((chain, key)) = cert {
            tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
        }
        let channel = tonic::transport::Endpoint::from_shared(self.cp.url())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        IdentityClient::new(channel)
            .issue(IssueRequest {
                csr_pem: csr_pem.to_string(),
                namespace: namespace.to_string(),
                service_account: service_account.to_string(),
                bootstrap_token: token.to_string(),
            })
            .await
            .map(|r| r.into_inner())
    }
}

async fn control(
    addr: SocketAddr,
    data: &TempDir,
    tokens: &Tokens,
    lifetime: &str,
) -> ControlProcess {
    let file = tokens.file();
    let flags = [
        "--tls",
        "--bootstrap-tokens",
        file.to_str().unwrap(),
        "--cert-lifetime",
        lifetime,
        "--trust-domain",
        "mesh.test",
    ];
    ControlProcess::start_with(addr, data, "2s", &flags).await
}

/// The token in a token file.
fn token_in(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

/// The expiry gauge, or None when the proxy has no certificate.
fn expiry(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{EXPIRY} ")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn rotations(p: &ProxyProcess, result: &str) -> f64 {
    p.metric(ROTATIONS, &[&format!("result=\"{result}\"")])
        .await
}

/// A key and a CSR that asks for a DNS name and an IP it must not get.
fn greedy_csr_and_key() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["evil.example".to_string(), "10.0.0.1".to_string()])
            .unwrap();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (csr, key.serialize_pem())
}

fn greedy_csr() -> String {
    greedy_csr_and_key().0
}

fn ders(pem_text: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem_text.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

#[tokio::test]
async fn proxy_gets_a_certificate_and_renews_it_before_expiry() {
    let cp = Cp::start("4s").await;
    let state = TempDir::new("id-state");
    let token = cp.tokens.token_for("shop", "api");
    let p = cp.proxy(&state, "api-1", "api", &token).start().await;

    wait_until("first certificate", Duration::from_secs(10), || async {
        rotations(&p, "ok").await >= 1.0
    })
    .await;
    let left = expiry(&p.metrics().await).expect("the expiry gauge has a sample");
    assert!(left > 0.0 && left <= 4.0, "expires in {left}s");
    // Renewals authenticate with the certificate: the token is not needed.
    std::fs::remove_file(&token).unwrap();

    // Renewals at about 70% of 4s: two of them (three issuances) within a
    // few seconds, and the certificate never runs out in between.
    let lowest = std::cell::Cell::new(f64::MAX);
    wait_until("two renewals", Duration::from_secs(20), || async {
        let m = p.metrics().await;
        lowest.set(lowest.get().min(expiry(&m).unwrap_or(0.0)));
        sum_metric(&m, ROTATIONS, &["result=\"ok\""]) >= 3.0
    })
    .await;
    assert!(
        lowest.get() > 0.0,
        "the certificate expired before it was renewed"
    );
    assert_eq!(rotations(&p, "error").await, 0.0);

    // Log lines are read by other threads and may trail the metrics.
    wait_until(
        "three issuances logged",
        Duration::from_secs(10),
        || async {
            cp.cp
                .logs
                .lock()
                .unwrap()
                .matches("certificate issued")
                .count()
                >= 3
        },
    )
    .await;
    let plogs = p.logs_with(&["identity certificate installed"]).await;
    let clogs = cp.cp.logs.lock().unwrap().clone();
    assert!(
        plogs.contains("identity certificate installed")
            && plogs.contains("spiffe://mesh.test/ns/shop/sa/api"),
        "{plogs}"
    );
    assert!(
        clogs.matches("certificate issued").count() >= 3
            && clogs.contains("spiffe://mesh.test/ns/shop/sa/api"),
        "{clogs}"
    );
    assert!(
        clogs.contains("authenticated_by=\"bootstrap token\"")
            && clogs.contains("authenticated_by=\"certificate\""),
        "the first by token, the renewals by certificate:\n{clogs}"
    );
}

#[tokio::test]
async fn wrong_token_is_refused_and_the_proxy_keeps_serving() {
    let cp = Cp::start("4s").await;
    let state = TempDir::new("id-state");
    cp.tokens.token_for("shop", "api");
    let wrong = cp._secrets.write("wrong", "not-the-token\n");
    let mut p = cp.proxy(&state, "api-1", "api", &wrong).start_live().await;

    // It retries (with backoff), failing each time.
    wait_until("refusals counted", Duration::from_secs(10), || async {
        rotations(&p, "error").await >= 3.0
    })
    .await;
    assert_eq!(rotations(&p, "ok").await, 0.0);
    assert_eq!(
        expiry(&p.metrics().await),
        None,
        "no certificate, no sample"
    );
    let logs = p.logs_with(&["PERMISSION_DENIED"]).await;
    assert!(logs.contains("PERMISSION_DENIED"), "{logs}");
    assert!(
        logs_with(&cp.cp.logs, &["certificate refused"])
            .await
            .contains("certificate refused"),
        "the control plane logs the refusal"
    );
    // And it is still up and serving its config.
    assert!(p.child.try_wait().unwrap().is_none(), "the proxy exited");
    assert_eq!(
        get_status(&format!("http://{}/live", p.admin)).await,
        Some(200)
    );
    // Not ready, though: without a certificate it can do no mTLS (and the
    // control plane refuses its Discovery stream too: no config either).
    assert_eq!(
        get_status(&format!("http://{}/ready", p.admin)).await,
        Some(503)
    );
    let why = get_text(&format!("http://{}/ready", p.admin)).await;
    assert!(
        why == "no valid workload certificate\n" || why == "no config yet\n",
        "{why}"
    );
}

#[tokio::test]
async fn issued_certificate_names_only_the_spiffe_id() {
    let cp = Cp::start("4s").await;
    let token = token_in(&cp.tokens.token_for("shop", "api"));
    let resp = cp
        .issue(&token, "shop", "api", &greedy_csr(), None)
        .await
        .unwrap();
    let chain = ders(&resp.cert_chain_pem);
    assert_eq!(chain.len(), 1, "a generated root signs leaves itself");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let names = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("a SAN extension")
        .value
        .general_names
        .clone();
    assert_eq!(
        names,
        vec![GeneralName::URI("spiffe://mesh.test/ns/shop/sa/api")],
        "exactly the SPIFFE ID: no DNS or IP SAN from the CSR"
    );
    assert!(!leaf.is_ca());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(leaf.validity().not_after.timestamp(), resp.not_after_unix);
    assert!((now..=now + 4).contains(&resp.not_after_unix));
    let roots = ders(&resp.trust_bundle_pem);
    let (_, root) = X509Certificate::from_der(&roots[0]).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();

    // Refusals, each with its code.
    let code = |r: Result<IssueResponse, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(cp.issue("wrong", "shop", "api", &greedy_csr(), None).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            cp.issue(&token, "Not_A_Label", "api", &greedy_csr(), None)
                .await
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            cp.issue(
                &token,
                "shop",
                "api",
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                None
            )
            .await
        ),
        tonic::Code::InvalidArgument
    );

    // A control plane without a token reviewer issues nothing, and says why.
    let off_data = TempDir::new("id-off");
    let off = ControlProcess::start(&off_data).await;
    let mut client = IdentityClient::connect(off.url()).await.unwrap();
    let status = client
        .issue(IssueRequest {
            csr_pem: greedy_csr(),
            namespace: "shop".into(),
            service_account: "api".into(),
            bootstrap_token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("--bootstrap-tokens"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn restart_keeps_the_root_and_proxies_ride_out_the_outage() {
    let mut cp = Cp::start_on(free_addr(), "4s").await;
    let state = TempDir::new("id-state");
    let token_file = cp.tokens.token_for("shop", "api");
    let token = token_in(&token_file);
    let before = cp
        .issue(&token, "shop", "api", &greedy_csr(), None)
        .await
        .unwrap();
    let p = cp.proxy(&state, "api-1", "api", &token_file).start().await;
    wait_until("first certificate", Duration::from_secs(10), || async {
        rotations(&p, "ok").await >= 1.0
    })
    .await;

    // Control plane down: renewals fail, the certificate is kept until it
    // expires, then dropped.
    cp.cp.kill();
    wait_until("a failed renewal", Duration::from_secs(10), || async {
        rotations(&p, "error").await >= 1.0
    })
    .await;
    wait_until(
        "the certificate dropped at expiry",
        Duration::from_secs(10),
        || async { expiry(&p.metrics().await).is_none() },
    )
    .await;
    // The log line is read from the proxy's stderr by another thread.
    wait_until("the expiry is logged", Duration::from_secs(5), || async {
        p.logs().contains("expired and could not be renewed")
    })
    .await;
    // Without a certificate it can serve no mesh traffic: not ready.
    let ready = format!("http://{}/ready", p.admin);
    assert_eq!(get_status(&ready).await, Some(503));
    assert_eq!(get_text(&ready).await, "no valid workload certificate\n");

    // Back with the same data directory: the same root, and the proxy gets
    // a certificate again on its own.
    cp.restart().await;
    let after = cp
        .issue(&token, "shop", "api", &greedy_csr(), None)
        .await
        .unwrap();
    assert_eq!(before.trust_bundle_pem, after.trust_bundle_pem);
    let ok = rotations(&p, "ok").await;
    wait_until(
        "a certificate after the restart",
        Duration::from_secs(10),
        || async {
            rotations(&p, "ok").await > ok && expiry(&p.metrics().await).is_some_and(|s| s > 0.0)
        },
    )
    .await;
    assert_eq!(get_status(&ready).await, Some(200), "ready again");
    assert!(p.child.id() > 0);
}

#[tokio::test]
async fn a_token_proves_its_own_identity_and_a_certificate_renews_only_its_own() {
    let cp = Cp::start("1h").await;
    let api = token_in(&cp.tokens.token_for("shop", "api"));
    cp.tokens.token_for("shop", "web");

    // api's token gets api, and nothing else.
    let (csr, key) = greedy_csr_and_key();
    let issued = cp.issue(&api, "shop", "api", &csr, None).await.unwrap();
    let refused = cp
        .issue(&api, "shop", "web", &greedy_csr(), None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("this token is for shop/api, not shop/web"),
        "{}",
        refused.message()
    );

    // api's certificate renews api without a token; it cannot get web.
    let cert = Some((issued.cert_chain_pem.as_str(), key.as_str()));
    let renewed = cp
        .issue("", "shop", "api", &greedy_csr(), cert)
        .await
        .unwrap();
    assert!(renewed
        .cert_chain_pem
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let refused = cp
        .issue("", "shop", "web", &greedy_csr(), cert)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("a certificate of spiffe://mesh.test/ns/shop/sa/api cannot renew spiffe://mesh.test/ns/shop/sa/web"),
        "{}",
        refused.message()
    );
    // Not even with web's token alongside: the certificate speaks first.
    let web = token_in(&cp.tokens.token_for("shop", "web"));
    assert!(cp
        .issue(&web, "shop", "web", &greedy_csr(), cert)
        .await
        .is_err());
    assert!(cp
        .issue(&web, "shop", "web", &greedy_csr(), None)
        .await
        .is_ok());
}

#[tokio::test]
async fn a_revoked_identity_is_not_renewed_but_its_certificate_serves_until_it_expires() {
    let cp = Cp::start("6s").await;
    let state = TempDir::new("id-state");
    let token = cp.tokens.token_for("shop", "api");
    let p = cp.proxy(&state, "api-1", "api", &token).start().await;
    wait_until("first certificate", Duration::from_secs(10), || async {
        rotations(&p, "ok").await >= 1.0
    })
    .await;

    cp.tokens.revoke("shop", "api");
    let ok = rotations(&p, "ok").await;
    wait_until("a refused renewal", Duration::from_secs(15), || async {
        rotations(&p, "error").await >= 1.0
    })
    .await;
    assert_eq!(
        rotations(&p, "ok").await,
        ok,
        "no renewal after the revocation"
    );
    // The current certificate is kept until it expires...
    let left = expiry(&p.metrics().await);
    assert!(left.is_some_and(|s| s > 0.0), "kept while valid: {left:?}");
    let logs = logs_with(&cp.cp.logs, &["revoked"]).await;
    assert!(
        logs.contains("shop/api has no bootstrap token any more"),
        "{logs}"
    );
    // ...then dropped.
    wait_until(
        "the certificate dropped at expiry",
        Duration::from_secs(15),
        || async { expiry(&p.metrics().await).is_none() },
    )
    .await;
}

#[tokio::test]
async fn a_proxy_restarted_while_the_control_plane_is_down_serves_mtls() {
    let cp = Cp::start("1h").await;
    cp.cp
        .apply("kind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}\n")
        .await
        .unwrap();
    let app = Upstream::start("api", Behavior::Demo).await;
    let state = TempDir::new("id-state");
    let (api_token, web_token) = (
        cp.tokens.token_for("shop", "api"),
        cp.tokens.token_for("shop", "web"),
    );
    let api = |b: ProxyBuilder| b.arg("--service").arg("api").app(app.addr);
    let api_proxy = api(cp.proxy(&state, "api-1", "api", &api_token))
        .start()
        .await;
    let web = cp
        .proxy(&state, "web-1", "web", &web_token)
        .arg("--service")
        .arg("web")
        .start()
        .await;
    let c = http1_client();
    let o = web.outbound;
    wait_until("web reaches api over mTLS", Duration::from_secs(20), || {
        let c = c.clone();
        async move { matches!(get_via(&c, o, "api.shop", "/").await, Ok(r) if r.status == 200) }
    })
    .await;
    let kept = state.path().join("api-1/identity.json");
    assert!(
        kept.exists(),
        "the certificate is kept next to the snapshot"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only");
    }

    // The control plane goes away; api's proxy restarts, with its token
    // gone too: it boots from what it kept, is ready, and serves mTLS.
    drop(cp.cp);
    let inbound = api_proxy.inbound;
    drop(api_proxy);
    std::fs::remove_file(&api_token).unwrap();
    let handshakes = web
        .metric(
            "remora_tls_handshakes_total",
            &["direction=\"outbound\"", "result=\"ok\""],
        )
        .await;
    std::fs::write(&api_token, "gone\n").unwrap();
    // Same inbound address (a pod keeps its IP and port): the address web
    // holds in its last snapshot.
    let restarted = api(cp_proxy_offline(&state, &api_token, &cp.data))
        .inbound_at(inbound)
        .start()
        .await;
    let logs = restarted
        .logs_with(&["restored the workload certificate"])
        .await;
    assert!(logs.contains("spiffe://mesh.test/ns/shop/sa/api"), "{logs}");
    wait_until(
        "web reaches the restarted api",
        Duration::from_secs(20),
        || {
            let c = c.clone();
            async move { matches!(get_via(&c, o, "api.shop", "/").await, Ok(r) if r.status == 200) }
        },
    )
    .await;
    let after = web
        .metric(
            "remora_tls_handshakes_total",
            &["direction=\"outbound\"", "result=\"ok\""],
        )
        .await;
    assert!(
        after > handshakes,
        "a new mTLS handshake with the restarted proxy"
    );
    assert_eq!(
        restarted
            .metric("remora_control_plane_connected", &[])
            .await,
        0.0,
        "the control plane is still down"
    );
}

/// api's proxy pointed at a control plane that is gone (its address no
/// longer answers), with the same node id and state directory.
fn cp_proxy_offline(state: &TempDir, token: &std::path::Path, data: &TempDir) -> ProxyBuilder {
    let gone = format!("https://{}", free_addr());
    ProxyBuilder::new()
        .control_plane(&gone, "api-1", state)
        .arg("--control-plane-ca")
        .arg(data.path().join("ca/root.pem").to_str().unwrap())
        .arg("--bootstrap-token-file")
        .arg(token.to_str().unwrap())
        .arg("--namespace")
        .arg("shop")
        .arg("--identity-service-account")
        .arg("api")
}

#[tokio::test]
async fn the_ca_refuses_a_data_directory_with_a_missing_root() {
    let cp = Cp::start("1h").await;
    let data = cp.data.path().to_path_buf();
    drop(cp.cp);
    std::fs::remove_file(data.join("ca/root.pem")).unwrap();
    let out = std::process::Command::new(binary("remora-control"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root-key.pem is there but"), "{err}");
    assert!(err.contains("root.pem is missing"), "{err}");
    assert!(!data.join("ca/root.pem").exists(), "no new root was made");
}

#[tokio::test]
async fn a_proxy_never_sends_its_token_to_a_plaintext_control_plane() {
    let secrets = TempDir::new("id-plain");
    let token = secrets.write("token", "t0k\n");
    let out = std::process::Command::new(binary("remora-proxy"))
        .args([
            "--control-plane",
            "http://127.0.0.1:1",
            "--bootstrap-token-file",
        ])
        .arg(&token)
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "off",
            "--outbound-addr",
            "off",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in the clear") && err.contains("--insecure-dev-plaintext"),
        "{err}"
    );
}
