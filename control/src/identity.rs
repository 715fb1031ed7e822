//! The Identity service: a proxy sends a CSR for its key pair and gets back
//! a short-lived certificate naming its workload by SPIFFE ID, the chain,
//! and the trust bundle.
//!
//! The first certificate is earned with a bootstrap credential that a
//! `TokenReviewer` (review.rs) checks against the identity claimed. A
//! renewal is authenticated by the current certificate (the TLS client
//! certificate of the call, verified in the handshake): it may renew only
//! its own identity, and only while the reviewer still grants it.

use crate::ca::{check_label, Ca, IssueError};
use crate::review::{ReviewError, TokenReviewer, Workload};
use remora_proto::control::identity_server::Identity;
use remora_proto::control::{IssueRequest, IssueResponse};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// The gRPC service. Without a reviewer it issues nothing.
pub struct IdentityService {
    ca: Arc<Ca>,
    reviewer: Option<Arc<dyn TokenReviewer>>,
    issued: AtomicU64,
    refused: AtomicU64,
}

impl IdentityService {
    pub fn new(ca: Arc<Ca>, reviewer: Option<Arc<dyn TokenReviewer>>) -> IdentityService {
        IdentityService {
            ca,
            reviewer,
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn refuse(&self, r: &IssueRequest, peer: &str, status: Status) -> Status {
        let refused_total = self.refused.fetch_add(1, Relaxed) + 1;
        warn!(
            namespace = %r.namespace.chars().take(64).collect::<String>(),
            service_account = %r.service_account.chars().take(64).collect::<String>(),
            peer,
            code = ?status.code(),
            reason = status.message(),
            refused_total,
            "certificate refused"
        );
        status
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn issue(&self, r: Request<IssueRequest>) -> Result<Response<IssueResponse>, Status> {
        let peer = r.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        // The workload certificate the caller authenticated with, if any.
        let presented = r.peer_certs().and_then(|c| {
            c.first()
                .and_then(|leaf| crate::discovery::spiffe_id(leaf.as_ref()))
        });
        let r = r.into_inner();
        let Some(reviewer) = &self.reviewer else {
            return Err(self.refuse(
                &r,
                &peer,
                Status::failed_precondition(
                    "identity issuance is off: remora-control was started without a token reviewer (--bootstrap-tokens or --kubernetes-token-review)",
                ),
            ));
        };
        // The names' shape first (no secret in that), then the token, and
        // only for an accepted caller the CSR parser.
        for (field, value) in [
            ("namespace", &r.namespace),
            ("service_account", &r.service_account),
        ] {
            if let Err(e) = check_label(field, value) {
                return Err(self.refuse(&r, &peer, Status::invalid_argument(e.to_string())));
            }
        }
        let workload = Workload {
            namespace: &r.namespace,
            service_account: &r.service_account,
        };
        // A renewal: the certificate must be of the identity asked for, and
        // that identity still granted. Else the bootstrap credential.
        let (checked, how) = match &presented {
            Some(id) => {
                let wanted = self.ca.spiffe_id(&r.namespace, &r.service_account);
                if *id != wanted {
                    return Err(self.refuse(
                        &r,
                        &peer,
                        Status::permission_denied(format!(
                            "a certificate of {id} cannot renew {wanted}"
                        )),
                    ));
                }
                (reviewer.still_granted(workload).await, "certificate")
            }
            None => (
                reviewer.review(&r.bootstrap_token, workload).await,
                reviewer.kind(),
            ),
        };
        match checked {
            Ok(()) => {}
            Err(ReviewError::Denied(m)) => {
                return Err(self.refuse(&r, &peer, Status::permission_denied(m)))
            }
            Err(ReviewError::Unavailable(m)) => {
                return Err(self.refuse(
                    &r,
                    &peer,
                    Status::unavailable(format!("checking the {how}: {m}")),
                ))
            }
        }
        let issued = match self.ca.issue(&r.csr_pem, &r.namespace, &r.service_account) {
            Ok(i) => i,
            Err(e) => {
                let status = match e {
                    IssueError::Name { .. } | IssueError::Csr(_) => {
                        Status::invalid_argument(e.to_string())
                    }
                    IssueError::CaExpired => Status::failed_precondition(e.to_string()),
                    IssueError::Sign(_) => Status::internal(e.to_string()),
                };
                return Err(self.refuse(&r, &peer, status));
            }
        };
        let issued_total = self.issued.fetch_add(1, Relaxed) + 1;
        info!(
            identity = %issued.spiffe_id,
            not_after_unix = issued.not_after_unix,
            serial = %issued.serial,
            peer,
            issued_total,
            authenticated_by = if presented.is_some() { "certificate" } else { reviewer.kind() },
            "certificate issued"
        );
        Ok(Response::new(IssueResponse {
            cert_chain_pem: issued.cert_chain_pem,
            trust_bundle_pem: self.ca.trust_bundle_pem().to_string(),
            not_after_unix: issued.not_after_unix,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Settings;
    use std::path::PathBuf;
    use std::time::Duration;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("remora-identity-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    fn request(token: &str, ns: &str, csr: &str) -> Request<IssueRequest> {
        Request::new(IssueRequest {
            csr_pem: csr.into(),
            namespace: ns.into(),
            service_account: "api".into(),
            bootstrap_token: token.into(),
        })
    }

    #[tokio::test]
    async fn issue_maps_each_refusal_to_its_status() {
        let dir = temp("service");
        let ca = Arc::new(
            Ca::open_or_create(
                &dir.join("ca"),
                Settings {
                    trust_domain: "cluster.local".into(),
                    lifetime: Duration::from_secs(60),
                },
            )
            .unwrap(),
        );
        std::fs::write(dir.join("token"), "t0k").unwrap();
        let reviewer =
            Arc::new(crate::review::SharedTokenReviewer::open(&dir.join("token")).unwrap());
        let svc = IdentityService::new(ca.clone(), Some(reviewer));
        let csr = csr();

        let ok = svc
            .issue(request("t0k", "shop", &csr))
            .await
            .unwrap()
            .into_inner();
        assert!(ok.cert_chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ok.trust_bundle_pem, ca.trust_bundle_pem());
        assert!(ok.not_after_unix > 0);

        let code = |r: Result<Response<IssueResponse>, Status>| r.unwrap_err().code();
        use tonic::Code;
        assert_eq!(
            code(svc.issue(request("nope", "shop", &csr)).await),
            Code::PermissionDenied
        );
        assert_eq!(
            code(svc.issue(request("", "shop", &csr)).await),
            Code::PermissionDenied
        );
        assert_eq!(
            code(svc.issue(request("t0k", "Shop", &csr)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(svc.issue(request("t0k", "shop", "junk")).await),
            Code::InvalidArgument
        );

        let off = IdentityService::new(ca, None);
        let status = off.issue(request("t0k", "shop", &csr)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("--bootstrap-tokens"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
