//! The Identity service: a proxy sends a CSR for its key pair with a
//! bootstrap token, and gets back a short-lived certificate naming its
//! workload by SPIFFE ID, the chain, and the trust bundle.
//!
//! Who may claim an identity is a pluggable step (`TokenReviewer`): today a
//! token shared through a file; a Kubernetes TokenReview (a pod's projected
//! service-account token, checked against the namespace and service account
//! it claims) fits the same trait.

use crate::ca::{check_label, Ca, IssueError};
use remora_proto::control::identity_server::Identity;
use remora_proto::control::{IssueRequest, IssueResponse};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// The identity a caller asks for.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token does not entitle its bearer to the identity.
    #[error("{0}")]
    Denied(String),
    /// The token could not be checked (the reviewer's backend failed).
    #[error("{0}")]
    Unavailable(String),
}

/// Decides whether a bootstrap token entitles its bearer to an identity.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    async fn review(&self, token: &str, workload: Workload<'_>) -> Result<(), ReviewError>;
}

/// One token for every workload, kept in a file. The file is read on each
/// review, so replacing it rotates the token without a restart.
///
/// Whoever holds the token may claim any identity: fine to bootstrap a mesh
/// whose proxies are all trusted, not a boundary between tenants.
#[derive(Debug)]
pub struct FileTokenReviewer {
    path: PathBuf,
}

impl FileTokenReviewer {
    /// Checks now that the file holds a token, so a typo fails at start.
    pub fn open(path: &Path) -> Result<FileTokenReviewer, String> {
        let token = read_token(path)?;
        if token.is_empty() {
            return Err(format!(
                "{}: the bootstrap token file is empty",
                path.display()
            ));
        }
        Ok(FileTokenReviewer {
            path: path.to_path_buf(),
        })
    }
}

/// The file's contents without surrounding whitespace (a final newline).
fn read_token(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[tonic::async_trait]
impl TokenReviewer for FileTokenReviewer {
    async fn review(&self, token: &str, _: Workload<'_>) -> Result<(), ReviewError> {
        let path = self.path.clone();
        let expected = tokio::task::spawn_blocking(move || read_token(&path))
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?
            .map_err(ReviewError::Unavailable)?;
        if token.is_empty() {
            return Err(ReviewError::Denied("no bootstrap token".into()));
        }
        if expected.is_empty() || !same_secret(token.as_bytes(), expected.as_bytes()) {
            return Err(ReviewError::Denied("bootstrap token not accepted".into()));
        }
        Ok(())
    }
}

/// Compares two secrets in constant time. Both are hashed first, so not
/// even their lengths leak through timing.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use aws_lc_rs::digest::{digest, SHA256};
    let (a, b) = (digest(&SHA256, a), digest(&SHA256, b));
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_ref(), b.as_ref()).is_ok()
}

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
        let r = r.into_inner();
        let Some(reviewer) = &self.reviewer else {
            return Err(self.refuse(
                &r,
                &peer,
                Status::failed_precondition(
                    "identity issuance is off: remora-control was started without --bootstrap-token-file",
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
        match reviewer.review(&r.bootstrap_token, workload).await {
            Ok(()) => {}
            Err(ReviewError::Denied(m)) => {
                return Err(self.refuse(&r, &peer, Status::permission_denied(m)))
            }
            Err(ReviewError::Unavailable(m)) => {
                return Err(self.refuse(
                    &r,
                    &peer,
                    Status::unavailable(format!("checking the bootstrap token: {m}")),
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
    use std::time::Duration;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("remora-identity-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const ANY: Workload<'static> = Workload {
        namespace: "shop",
        service_account: "api",
    };

    #[tokio::test]
    async fn file_token_is_compared_exactly_and_reread() {
        let dir = temp("token");
        let path = dir.join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let r = FileTokenReviewer::open(&path).unwrap();
        assert!(
            r.review("s3cret", ANY).await.is_ok(),
            "the final newline is not part of it"
        );
        for wrong in ["", "s3cre", "s3cret2", "S3CRET", "s3cret\n"] {
            assert!(
                matches!(r.review(wrong, ANY).await, Err(ReviewError::Denied(_))),
                "{wrong:?}"
            );
        }
        // Rotated by replacing the file.
        std::fs::write(&path, "n3w").unwrap();
        assert!(r.review("s3cret", ANY).await.is_err());
        assert!(r.review("n3w", ANY).await.is_ok());
        // A file gone missing is an outage, not a refusal of the caller.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            r.review("n3w", ANY).await,
            Err(ReviewError::Unavailable(_))
        ));

        std::fs::write(&path, " \n").unwrap();
        assert!(
            FileTokenReviewer::open(&path).is_err(),
            "an empty token is refused at start"
        );
        assert!(FileTokenReviewer::open(&dir.join("absent")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
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
        let reviewer = Arc::new(FileTokenReviewer::open(&dir.join("token")).unwrap());
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
        assert!(status.message().contains("--bootstrap-token-file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
