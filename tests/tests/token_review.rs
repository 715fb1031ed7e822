//! The Kubernetes TokenReview reviewer end to end: the real remora-control
//! with --kubernetes-token-review against a stand-in Kubernetes API server
//! on loopback (HTTPS under a CA of its own, speaking the real
//! `authentication.k8s.io/v1` TokenReview and core/v1 ServiceAccount JSON),
//! and Identity.Issue called as a proxy calls it. The stand-in records
//! every request, so the tests check what the control plane sent as well
//! as what it decided.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use remora_proto::control::identity_client::IdentityClient;
use remora_proto::control::{IssueRequest, IssueResponse};
use remora_tests::control::ControlProcess;
use remora_tests::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The control plane's own service-account token, as the stand-in knows it.
const CP_TOKEN: &str = "control-plane-sa-token-1";
const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

// ------------------------------------------------------------ the stand-in

/// One request the stand-in API server received.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    headers: http::HeaderMap,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// What the stand-in cluster knows; the test sets it.
#[derive(Default)]
struct Cluster {
    /// A workload's token → the user a review authenticates it as. Any
    /// other token is not authenticated.
    tokens: HashMap<String, String>,
    /// The bearer tokens the API accepts from its callers (else 401).
    callers: HashSet<String>,
    /// The callers' RBAC allows nothing (403).
    forbidden: bool,
    /// Never answer (a hung API server).
    hang: bool,
    /// Answer 1 MiB of JSON.
    huge: bool,
    /// `namespace/name` of each service account that exists.
    service_accounts: HashSet<String>,
    /// Every request, in order.
    seen: Vec<Seen>,
}

struct StandInApi {
    url: String,
    /// The CA (PEM) that verifies it: the control plane's --kube-ca-file.
    ca_file: String,
    cluster: Arc<Mutex<Cluster>>,
    /// Accepts connections and serves them; aborting it closes them all.
    server: Option<tokio::task::JoinHandle<()>>,
}

impl StandInApi {
    /// Serves HTTPS on a loopback port with a certificate for 127.0.0.1
    /// from a CA of its own (written to `dir`).
    async fn start(dir: &TempDir) -> StandInApi {
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stand-in kubernetes CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &*ca)
            .unwrap();
        let ca_file = dir.write("kube-ca.crt", &ca.pem()).display().to_string();

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let cluster = Arc::new(Mutex::new(Cluster::default()));
        let state = cluster.clone();
        let server = tokio::spawn(async move {
            // Owned here: aborting the server drops them, closing every
            // connection, pooled ones included.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let (acceptor, state) = (acceptor.clone(), state.clone());
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| answer(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        StandInApi {
            url,
            ca_file,
            cluster,
            server: Some(server),
        }
    }

    fn set(&self, f: impl FnOnce(&mut Cluster)) {
        f(&mut self.cluster.lock().unwrap());
    }

    fn seen(&self) -> Vec<Seen> {
        self.cluster.lock().unwrap().seen.clone()
    }

    fn last(&self) -> Seen {
        self.seen().last().cloned().expect("the API saw a request")
    }

    /// Stops listening and closes every connection.
    async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
    }
}

impl Drop for StandInApi {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.abort();
        }
    }
}

type Answer = Response<Full<Bytes>>;

/// The stand-in's API: records the request, then answers it (or, when
/// told to hang, never does).
async fn answer(
    cluster: Arc<Mutex<Cluster>>,
    req: Request<Incoming>,
) -> Result<Answer, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        headers: parts.headers.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let decided = decide(&mut cluster.lock().unwrap(), seen, &body);
    match decided {
        Some(a) => Ok(a),
        None => std::future::pending().await,
    }
}

/// Authenticates the caller, authorizes it, then TokenReview or
/// ServiceAccount. None: hang.
fn decide(c: &mut Cluster, seen: Seen, body: &[u8]) -> Option<Answer> {
    c.seen.push(seen.clone());
    let bearer = seen.header("authorization").strip_prefix("Bearer ");
    if !bearer.is_some_and(|t| c.callers.contains(t)) {
        return Some(status(401, "Unauthorized", "Unauthorized"));
    }
    if c.forbidden {
        return Some(status(
            403,
            "Forbidden",
            "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:remora-system:remora-control\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
        ));
    }
    if c.hang {
        return None;
    }
    if c.huge {
        let padding = "x".repeat(1 << 20);
        return Some(reply(
            200,
            json!({"kind": "TokenReview", "metadata": {"annotations": {"padding": padding}}}),
        ));
    }
    if seen.method == Method::POST && seen.path == REVIEWS {
        return Some(token_review(c, body));
    }
    let account = seen
        .path
        .strip_prefix("/api/v1/namespaces/")
        .and_then(|p| p.split_once("/serviceaccounts/"));
    match account {
        Some((ns, name)) if seen.method == Method::GET => {
            if c.service_accounts.contains(&format!("{ns}/{name}")) {
                Some(reply(
                    200,
                    json!({
                        "kind": "ServiceAccount",
                        "apiVersion": "v1",
                        "metadata": {"name": name, "namespace": ns, "uid": "5f0c2a4e-1111-4b1e-9c1a-2f0d3e4b5a6c"},
                    }),
                ))
            } else {
                Some(status(
                    404,
                    "NotFound",
                    &format!("serviceaccounts \"{name}\" not found"),
                ))
            }
        }
        _ => Some(status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
}

/// kube-apiserver's answer to a TokenReview: the spec echoed, and whose
/// token it is (or why it is not accepted).
fn token_review(c: &Cluster, body: &[u8]) -> Answer {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    if req["apiVersion"] != "authentication.k8s.io/v1" || req["kind"] != "TokenReview" {
        return status(
            400,
            "BadRequest",
            "not an authentication.k8s.io/v1 TokenReview",
        );
    }
    let token = req["spec"]["token"].as_str().unwrap_or("");
    let st = match c.tokens.get(token) {
        Some(username) => {
            let ns = username.split(':').nth(2).unwrap_or("");
            json!({
                "authenticated": true,
                "user": {
                    "username": username,
                    "uid": "8d1f3c2b-2222-4c4d-8e9f-0a1b2c3d4e5f",
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                    "extra": {"authentication.kubernetes.io/pod-name": ["app-7d4b9c-x2x9q"]},
                },
                "audiences": req["spec"]["audiences"].clone(),
            })
        }
        None => json!({
            "user": {},
            "error": "[invalid bearer token, service account token has been invalidated]",
        }),
    };
    reply(
        201,
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": req["spec"].clone(),
            "status": st,
        }),
    )
}

fn reply(code: u16, v: Value) -> Answer {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

/// A `Status`, as the API server answers errors.
fn status(code: u16, reason: &str, message: &str) -> Answer {
    reply(
        code,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }),
    )
}

// ------------------------------------------------------------ the mesh side

/// The stand-in API, the control plane's own token file, and remora-control
/// reviewing with them.
struct Setup {
    _data: TempDir,
    secrets: TempDir,
    api: StandInApi,
    cp: ControlProcess,
}

impl Setup {
    /// `extra`: more remora-control flags (--tls); `ca_file`: another
    /// --kube-ca-file than the stand-in's.
    async fn start(extra: &[&str], ca_file: Option<&str>) -> Setup {
        let (data, secrets) = (TempDir::new("kube-data"), TempDir::new("kube-secrets"));
        let api = StandInApi::start(&secrets).await;
        api.set(|c| {
            c.callers.insert(CP_TOKEN.into());
        });
        let own = secrets.write("cp-token", &format!("{CP_TOKEN}\n"));
        let ca = ca_file.unwrap_or(&api.ca_file).to_string();
        let mut flags = vec![
            "--kubernetes-token-review",
            "--kube-api",
            &api.url,
            "--kube-ca-file",
            &ca,
            "--kube-token-file",
            own.to_str().unwrap(),
            "--trust-domain",
            "mesh.test",
        ];
        flags.extend_from_slice(extra);
        let cp = ControlProcess::start_with(any_port(), &data, "2s", &flags).await;
        Setup {
            _data: data,
            secrets,
            api,
            cp,
        }
    }

    /// Replaces the control plane's own token (as the kubelet rotates it).
    fn own_token(&self, token: &str) {
        self.secrets.write("cp-token", &format!("{token}\n"));
    }

    /// Identity.Issue for `ns/sa` with `token`, presenting `cert` (chain
    /// and key PEM) when given, as a proxy renewing does.
    async fn issue(
        &self,
        ns: &str,
        sa: &str,
        token: &str,
        cert: Option<(&str, &str)>,
    ) -> Result<Issued, tonic::Status> {
        let mut endpoint = Endpoint::from_shared(self.cp.url()).unwrap();
        if let Some(root) = &self.cp.ca_pem {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
            if let Some((chain, key)) = cert {
                tls = tls.identity(Identity::from_pem(chain, key));
            }
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        let mut client = IdentityClient::new(endpoint.connect().await.unwrap());
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let r: IssueResponse = client
            .issue(IssueRequest {
                csr_pem: csr,
                namespace: ns.into(),
                service_account: sa.into(),
                bootstrap_token: token.into(),
            })
            .await?
            .into_inner();
        Ok(Issued {
            chain: r.cert_chain_pem,
            key: key.serialize_pem(),
        })
    }
}

struct Issued {
    chain: String,
    key: String,
}

impl Issued {
    /// The URI SANs of the leaf.
    fn uris(&self) -> Vec<String> {
        let der = x509_parser::pem::Pem::iter_from_buffer(self.chain.as_bytes())
            .next()
            .expect("a certificate")
            .unwrap()
            .contents;
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        let san = leaf.subject_alternative_name().unwrap().expect("a SAN");
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect()
    }
}

#[track_caller]
fn refused(r: Result<Issued, tonic::Status>, code: Code, needles: &[&str]) -> String {
    let Err(s) = r else {
        panic!("expected {code:?}, a certificate was issued");
    };
    assert_eq!(s.code(), code, "{s:?}");
    for n in needles {
        assert!(s.message().contains(n), "{n:?} not in {:?}", s.message());
    }
    s.message().to_string()
}

fn sa(ns: &str, name: &str) -> String {
    format!("system:serviceaccount:{ns}:{name}")
}

// ------------------------------------------------------------ the tests

#[tokio::test]
async fn a_review_for_the_claimed_account_issues_its_certificate_and_is_a_real_token_review() {
    let t = Setup::start(&[], None).await;
    t.api.set(|c| {
        c.tokens
            .insert("pod-token-shop-api".into(), sa("shop", "api"));
    });

    let issued = t
        .issue("shop", "api", "pod-token-shop-api", None)
        .await
        .unwrap();
    assert_eq!(issued.uris(), ["spiffe://mesh.test/ns/shop/sa/api"]);

    // Exactly one call, shaped as kube-apiserver expects it.
    let seen = t.api.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let r = &seen[0];
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.path, REVIEWS);
    assert_eq!(r.header("authorization"), format!("Bearer {CP_TOKEN}"));
    assert_eq!(r.header("content-type"), "application/json");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        body,
        json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": "pod-token-shop-api", "audiences": ["remora"]},
        })
    );

    // Neither token is ever logged.
    let logs = logs_with(&t.cp.logs, &["certificate issued"]).await;
    assert!(logs.contains("Kubernetes service-account token"), "{logs}");
    assert!(
        !logs.contains("pod-token-shop-api") && !logs.contains(CP_TOKEN),
        "{logs}"
    );
}

#[tokio::test]
async fn a_token_of_another_account_a_user_or_nobody_is_refused() {
    let t = Setup::start(&[], None).await;
    t.api.set(|c| {
        c.tokens
            .insert("pod-token-shop-web".into(), sa("shop", "web"));
        c.tokens
            .insert("pod-token-other-ns".into(), sa("billing", "api"));
        c.tokens
            .insert("node-token".into(), "system:node:worker-1".into());
    });

    // A real token, of another service account: it gets nothing, not even
    // its own identity through this claim.
    refused(
        t.issue("shop", "api", "pod-token-shop-web", None).await,
        Code::PermissionDenied,
        &["this token is for shop/web, not shop/api"],
    );
    refused(
        t.issue("shop", "api", "pod-token-other-ns", None).await,
        Code::PermissionDenied,
        &["this token is for billing/api, not shop/api"],
    );
    refused(
        t.issue("shop", "api", "node-token", None).await,
        Code::PermissionDenied,
        &["system:node:worker-1", "not a service account"],
    );
    // A forged token: the API's own reason comes back.
    refused(
        t.issue("shop", "api", "forged.jwt.token", None).await,
        Code::PermissionDenied,
        &[
            "did not authenticate",
            "service account token has been invalidated",
        ],
    );
    // No token: refused without asking the API.
    refused(
        t.issue("shop", "api", "", None).await,
        Code::PermissionDenied,
        &["no bootstrap token"],
    );
    assert_eq!(t.api.seen().len(), 4);
    assert!(t.api.seen().iter().all(|r| r.path == REVIEWS));
    let logs = logs_with(&t.cp.logs, &["certificate refused"]).await;
    assert!(!logs.contains("certificate issued"), "{logs}");
    assert!(
        !logs.contains("forged.jwt.token") && !logs.contains("pod-token-shop-web"),
        "{logs}"
    );
}

#[tokio::test]
async fn the_control_plane_rereads_its_own_token_and_says_when_the_api_refuses_it() {
    let t = Setup::start(&[], None).await;
    t.api.set(|c| {
        c.tokens.insert("pod-token".into(), sa("shop", "api"));
        c.callers.insert("control-plane-sa-token-2".into());
    });
    t.issue("shop", "api", "pod-token", None).await.unwrap();
    assert_eq!(
        t.api.last().header("authorization"),
        format!("Bearer {CP_TOKEN}")
    );

    // The kubelet rotated the token: the next call carries the new one.
    t.own_token("control-plane-sa-token-2");
    t.issue("shop", "api", "pod-token", None).await.unwrap();
    assert_eq!(
        t.api.last().header("authorization"),
        "Bearer control-plane-sa-token-2"
    );

    // A token the API does not accept: the proxy is told to come back, and
    // why (the control plane's credentials, not its token).
    t.own_token("expired-control-plane-token");
    let api_url = format!("{}{REVIEWS}", t.api.url);
    refused(
        t.issue("shop", "api", "pod-token", None).await,
        Code::Unavailable,
        &[
            &api_url,
            "401 Unauthorized",
            "control plane's own credentials",
            "--kube-token-file",
        ],
    );
    assert_eq!(
        t.api.last().header("authorization"),
        "Bearer expired-control-plane-token"
    );

    // Accepted credentials, RBAC missing: says which permission.
    t.own_token("control-plane-sa-token-2");
    t.api.set(|c| c.forbidden = true);
    refused(
        t.issue("shop", "api", "pod-token", None).await,
        Code::Unavailable,
        &[&api_url, "403 Forbidden", "may not create tokenreviews"],
    );
    t.api.set(|c| c.forbidden = false);
    t.issue("shop", "api", "pod-token", None).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_api_makes_issuance_unavailable() {
    let mut t = Setup::start(&[], None).await;
    t.api.set(|c| {
        c.tokens.insert("pod-token".into(), sa("shop", "api"));
    });
    // First with a pooled connection to the API, then without the API.
    t.issue("shop", "api", "pod-token", None).await.unwrap();
    t.api.stop().await;
    let m = refused(
        t.issue("shop", "api", "pod-token", None).await,
        Code::Unavailable,
        &[
            "checking the Kubernetes service-account token",
            &format!("Kubernetes API {}{REVIEWS}", t.api.url),
        ],
    );
    assert!(m.contains("cannot connect") || m.contains("closed"), "{m}");
}

#[tokio::test]
async fn only_an_api_server_the_cluster_ca_vouches_for_is_trusted() {
    let other = TempDir::new("kube-other-ca");
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
    let ca = other.write("ca.crt", &root.pem());
    let t = Setup::start(&[], Some(ca.to_str().unwrap())).await;
    t.api.set(|c| {
        c.tokens.insert("pod-token".into(), sa("shop", "api"));
    });
    refused(
        t.issue("shop", "api", "pod-token", None).await,
        Code::Unavailable,
        &["cannot connect", "certificate"],
    );
    // The handshake failed: the token never reached the impostor.
    assert!(t.api.seen().is_empty());
}

#[tokio::test]
async fn a_renewal_is_granted_while_the_service_account_exists() {
    let t = Setup::start(&["--tls"], None).await;
    t.api.set(|c| {
        c.tokens.insert("pod-token".into(), sa("shop", "api"));
        c.service_accounts.insert("shop/api".into());
    });
    let first = t.issue("shop", "api", "pod-token", None).await.unwrap();

    // A renewal presents the certificate and no token: the control plane
    // asks whether the service account still exists.
    let renewed = t
        .issue("shop", "api", "", Some((&first.chain, &first.key)))
        .await
        .unwrap();
    assert_eq!(renewed.uris(), ["spiffe://mesh.test/ns/shop/sa/api"]);
    let r = t.api.last();
    assert_eq!(r.method, Method::GET);
    assert_eq!(r.path, "/api/v1/namespaces/shop/serviceaccounts/api");
    assert_eq!(r.header("authorization"), format!("Bearer {CP_TOKEN}"));
    assert_eq!(t.api.seen().len(), 2);

    // The service account is deleted: its identity is revoked.
    t.api.set(|c| {
        c.service_accounts.remove("shop/api");
    });
    refused(
        t.issue("shop", "api", "", Some((&renewed.chain, &renewed.key)))
            .await,
        Code::PermissionDenied,
        &["service account shop/api no longer exists: its identity was revoked"],
    );
    let logs = logs_with(&t.cp.logs, &["no longer exists"]).await;
    assert!(logs.contains("certificate refused"), "{logs}");
}

#[tokio::test]
async fn a_hung_or_huge_answer_is_bounded() {
    let t = Setup::start(&[], None).await;
    t.api.set(|c| {
        c.tokens.insert("pod-token".into(), sa("shop", "api"));
        c.huge = true;
    });
    refused(
        t.issue("shop", "api", "pod-token", None).await,
        Code::Unavailable,
        &[&t.api.url, "an answer larger than 65536 bytes"],
    );
    t.api.set(|c| {
        c.huge = false;
        c.hang = true;
    });
    let started = std::time::Instant::now();
    refused(
        t.issue("shop", "api", "pod-token", None).await,
        Code::Unavailable,
        &[&t.api.url, "no answer within 5s"],
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    t.api.set(|c| c.hang = false);
    t.issue("shop", "api", "pod-token", None).await.unwrap();
}
