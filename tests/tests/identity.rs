//! Workload identity end to end: the real remora-control as the mesh's CA,
//! real proxies getting their certificates and renewing them, and the
//! Identity service called directly.

use remora_proto::control::identity_client::IdentityClient;
use remora_proto::control::{IssueRequest, IssueResponse};
use remora_tests::control::ControlProcess;
use remora_tests::*;
use std::net::SocketAddr;
use std::time::Duration;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const TOKEN: &str = "s3cret-bootstrap";
const EXPIRY: &str = "remora_identity_cert_expiry_seconds";
const ROTATIONS: &str = "remora_identity_rotations_total";

/// remora-control issuing 4-second certificates in trust domain mesh.test.
async fn control(addr: SocketAddr, data: &TempDir, token_file: &str) -> ControlProcess {
    let flags = [
        "--bootstrap-token-file",
        token_file,
        "--cert-lifetime",
        "4s",
        "--trust-domain",
        "mesh.test",
    ];
    ControlProcess::start_with(addr, data, "2s", &flags).await
}

/// A proxy with identity shop/api, presenting the token in `token_file`.
async fn proxy(cp: &ControlProcess, state: &TempDir, token_file: &str) -> ProxyProcess {
    proxy_builder(cp, state, token_file).start().await
}

fn proxy_builder(cp: &ControlProcess, state: &TempDir, token_file: &str) -> ProxyBuilder {
    ProxyBuilder::new()
        .control_plane(&cp.url(), "api-1", state)
        .arg("--bootstrap-token-file")
        .arg(token_file)
        .arg("--identity-namespace")
        .arg("shop")
        .arg("--identity-service-account")
        .arg("api")
}

fn token_file(dir: &TempDir, name: &str, token: &str) -> String {
    dir.write(name, &format!("{token}\n")).display().to_string()
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

/// A CSR from a fresh key that asks for a DNS name and an IP it must not get.
fn greedy_csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["evil.example".to_string(), "10.0.0.1".to_string()])
            .unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn issue(
    cp: &ControlProcess,
    token: &str,
    namespace: &str,
    csr_pem: &str,
) -> Result<IssueResponse, tonic::Status> {
    let mut client = IdentityClient::connect(cp.url()).await.unwrap();
    client
        .issue(IssueRequest {
            csr_pem: csr_pem.to_string(),
            namespace: namespace.to_string(),
            service_account: "api".to_string(),
            bootstrap_token: token.to_string(),
        })
        .await
        .map(|r| r.into_inner())
}

fn ders(pem_text: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem_text.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

#[tokio::test]
async fn proxy_gets_a_certificate_and_renews_it_before_expiry() {
    let (data, state, secrets) = (
        TempDir::new("id-data"),
        TempDir::new("id-state"),
        TempDir::new("id-secrets"),
    );
    let token = token_file(&secrets, "token", TOKEN);
    let cp = control(any_port(), &data, &token).await;
    let p = proxy(&cp, &state, &token).await;

    wait_until("first certificate", Duration::from_secs(10), || async {
        rotations(&p, "ok").await >= 1.0
    })
    .await;
    let left = expiry(&p.metrics().await).expect("the expiry gauge has a sample");
    assert!(left > 0.0 && left <= 4.0, "expires in {left}s");

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
            cp.logs
                .lock()
                .unwrap()
                .matches("certificate issued")
                .count()
                >= 3
        },
    )
    .await;
    let plogs = p.logs_with(&["identity certificate installed"]).await;
    let clogs = cp.logs.lock().unwrap().clone();
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
}

#[tokio::test]
async fn wrong_token_is_refused_and_the_proxy_keeps_serving() {
    let (data, state, secrets) = (
        TempDir::new("id-data"),
        TempDir::new("id-state"),
        TempDir::new("id-secrets"),
    );
    let cp = control(any_port(), &data, &token_file(&secrets, "token", TOKEN)).await;
    let mut p = proxy_builder(&cp, &state, &token_file(&secrets, "wrong", "not-the-token"))
        .start_live()
        .await;

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
        logs_with(&cp.logs, &["certificate refused"])
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
    // Not ready, though: without a certificate it can do no mTLS.
    assert_eq!(
        get_status(&format!("http://{}/ready", p.admin)).await,
        Some(503)
    );
    assert_eq!(
        get_text(&format!("http://{}/ready", p.admin)).await,
        "no workload certificate yet\n"
    );
}

#[tokio::test]
async fn issued_certificate_names_only_the_spiffe_id() {
    let (data, secrets) = (TempDir::new("id-data"), TempDir::new("id-secrets"));
    let cp = control(any_port(), &data, &token_file(&secrets, "token", TOKEN)).await;

    let resp = issue(&cp, TOKEN, "shop", &greedy_csr()).await.unwrap();
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
        code(issue(&cp, "wrong", "shop", &greedy_csr()).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(issue(&cp, TOKEN, "Not_A_Label", &greedy_csr()).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            issue(
                &cp,
                TOKEN,
                "shop",
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            )
            .await
        ),
        tonic::Code::InvalidArgument
    );

    // A control plane without a token file issues nothing, and says why.
    let off_data = TempDir::new("id-off");
    let off = ControlProcess::start(&off_data).await;
    let status = issue(&off, TOKEN, "shop", &greedy_csr()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("--bootstrap-token-file"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn restart_keeps_the_root_and_proxies_ride_out_the_outage() {
    let (data, state, secrets) = (
        TempDir::new("id-data"),
        TempDir::new("id-state"),
        TempDir::new("id-secrets"),
    );
    let token = token_file(&secrets, "token", TOKEN);
    let addr = free_addr();
    let mut cp = control(addr, &data, &token).await;
    let before = issue(&cp, TOKEN, "shop", &greedy_csr()).await.unwrap();
    let p = proxy(&cp, &state, &token).await;
    wait_until("first certificate", Duration::from_secs(10), || async {
        rotations(&p, "ok").await >= 1.0
    })
    .await;

    // Control plane down: renewals fail, the certificate is kept until it
    // expires, then dropped.
    cp.kill();
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

    // Back with the same data directory: the same root, and the proxy gets
    // a certificate again on its own.
    let cp = control(addr, &data, &token).await;
    let after = issue(&cp, TOKEN, "shop", &greedy_csr()).await.unwrap();
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
    assert!(p.child.id() > 0);
}
