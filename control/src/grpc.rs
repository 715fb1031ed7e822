//! The gRPC services: Discovery (one stream per proxy) and Admin (what
//! remoractl calls). Thin: the state and its rules live in `mesh.rs`.

use crate::identity::{TokenReviewer, Workload};
use crate::mesh::Mesh;
use crate::store::Store;
use futures_util::Stream;
use remora_proto::control::admin_server::Admin;
use remora_proto::control::discovery_request::Kind;
use remora_proto::control::discovery_server::Discovery;
use remora_proto::control::*;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

pub struct DiscoveryService<S> {
    pub mesh: Arc<Mesh<S>>,
    /// With TLS: who may open a Discovery stream.
    pub auth: Option<DiscoveryAuth>,
}

/// A proxy opens its Discovery stream with its workload certificate (a TLS
/// client certificate the CA issued, verified in the handshake) once it has
/// one, and with its bootstrap token before that.
pub struct DiscoveryAuth {
    pub reviewer: Option<Arc<dyn TokenReviewer>>,
}

impl DiscoveryAuth {
    async fn check<T>(&self, req: &Request<T>, hello: &Hello) -> Result<String, Status> {
        if let Some(certs) = req.peer_certs() {
            if let Some(leaf) = certs.first() {
                return Ok(spiffe_id(leaf.as_ref()).unwrap_or_else(|| "certificate".into()));
            }
        }
        let Some(token) = bearer(req) else {
            return Err(Status::unauthenticated(
                "Discovery requires a workload certificate or the bootstrap token",
            ));
        };
        let Some(reviewer) = &self.reviewer else {
            return Err(Status::unauthenticated(
                "Discovery requires a workload certificate (no bootstrap tokens are configured)",
            ));
        };
        // The identity the token claims (sent with it), else the Service.
        let claimed = req
            .metadata()
            .get("x-remora-identity")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once('/'));
        let (ns, sa) = claimed
            .or_else(|| hello.service.split_once('/'))
            .unwrap_or(("default", hello.node_id.as_str()));
        let workload = Workload {
            namespace: ns,
            service_account: sa,
        };
        reviewer
            .review(token, workload)
            .await
            .map_err(|e| Status::unauthenticated(format!("bootstrap token refused: {e}")))?;
        Ok("bootstrap token".into())
    }
}

/// The SPIFFE ID (URI SAN) of a DER certificate.
fn spiffe_id(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    })
}

fn bearer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Admin calls need the admin token when one is configured. The file is
/// read on every call, so replacing it rotates the token.
#[derive(Clone)]
pub struct AdminAuth {
    pub token_file: Option<Arc<std::path::PathBuf>>,
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(path) = &self.token_file else {
            return Ok(req);
        };
        let want = std::fs::read_to_string(path.as_path()).map_err(|e| {
            warn!(path = %path.display(), error = %e, "admin token file unreadable");
            Status::unavailable("the admin token cannot be checked")
        })?;
        match bearer(&req) {
            Some(got) if crate::identity::same_secret(got.as_bytes(), want.trim().as_bytes()) => {
                Ok(req)
            }
            got => {
                warn!(
                    presented = got.is_some(),
                    "Admin call refused: missing or wrong admin token"
                );
                Err(Status::unauthenticated(
                    "Admin requires the admin token (remoractl --token-file)",
                ))
            }
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

struct Sending<S> {
    rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    last: Option<String>,
    first: bool,
    node: String,
    mesh: Arc<Mesh<S>>,
}

#[tonic::async_trait]
impl<S: Store> Discovery for DiscoveryService<S> {
    type StreamStream = SnapshotStream;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        // What authentication needs of the request: its TLS peer and metadata.
        let request_head = {
            let mut r = Request::new(());
            *r.metadata_mut() = request.metadata().clone();
            if let Some(info) =
                request
                    .extensions()
                    .get::<tonic::transport::server::TlsConnectInfo<
                        tonic::transport::server::TcpConnectInfo,
                    >>()
            {
                r.extensions_mut().insert(info.clone());
            }
            r
        };
        let mut incoming = request.into_inner();
        let hello = match incoming.message().await? {
            Some(DiscoveryRequest {
                kind: Some(Kind::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.node_id.is_empty() {
            return Err(Status::invalid_argument("Hello.node_id is required"));
        }
        let node = hello.node_id.clone();
        let credential = match &self.auth {
            Some(auth) => match auth.check(&request_head, &hello).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(node, service = %hello.service, error = %e.message(), "Discovery stream refused");
                    return Err(e);
                }
            },
            None => "none".into(),
        };
        info!(node, service = %hello.service, last_version = %hello.last_version, %credential, "proxy connected");
        let (rx, conn) = self.mesh.connect(
            &node,
            &hello.service,
            &hello.last_version,
            hello.instance.clone(),
        );

        // Acks, NACKs and deregistration arrive on the request stream.
        let (mesh, n) = (self.mesh.clone(), node.clone());
        tokio::spawn(async move {
            loop {
                match incoming.message().await {
                    Ok(Some(DiscoveryRequest {
                        kind: Some(Kind::Ack(a)),
                    })) => mesh.ack(&n, &a.version, &a.error),
                    Ok(Some(DiscoveryRequest {
                        kind: Some(Kind::Deregister(_)),
                    })) => mesh.deregister(&n),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            debug!(node = n, "proxy stream ended");
            mesh.disconnected(&n, conn);
        });

        // Snapshots go out from the scope's watch channel: the latest only.
        let start = Sending {
            rx,
            last: (!hello.last_version.is_empty()).then_some(hello.last_version),
            first: true,
            node,
            mesh: self.mesh.clone(),
        };
        let out = futures_util::stream::unfold(start, |mut st| async move {
            loop {
                if !st.first && st.rx.changed().await.is_err() {
                    return None;
                }
                st.first = false;
                let snap = st.rx.borrow_and_update().clone();
                if snap.version.is_empty() || st.last.as_deref() == Some(snap.version.as_str()) {
                    continue;
                }
                st.last = Some(snap.version.clone());
                st.mesh.sent(&st.node, &snap.version);
                return Some((Ok((*snap).clone()), st));
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

pub struct AdminService<S> {
    pub mesh: Arc<Mesh<S>>,
}

#[tonic::async_trait]
impl<S: Store> Admin for AdminService<S> {
    async fn apply(&self, r: Request<ApplyRequest>) -> Result<Response<ChangeResponse>, Status> {
        let r = r.into_inner();
        let resp = self
            .mesh
            .apply(r.resources.unwrap_or_default(), &r.author)
            .await?;
        Ok(Response::new(resp))
    }

    async fn diff(&self, r: Request<ApplyRequest>) -> Result<Response<DiffResponse>, Status> {
        let changes = self
            .mesh
            .diff(r.into_inner().resources.unwrap_or_default())?;
        Ok(Response::new(DiffResponse { changes }))
    }

    async fn delete(&self, r: Request<DeleteRequest>) -> Result<Response<ChangeResponse>, Status> {
        let r = r.into_inner();
        let resp = self
            .mesh
            .delete(&r.kind, &r.namespace, &r.name, &r.author)
            .await?;
        Ok(Response::new(resp))
    }

    async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = r.into_inner();
        let (version, cfg) = self.mesh.get(&r.kind, &r.namespace, &r.name)?;
        Ok(Response::new(GetResponse {
            version,
            resources: Some(cfg),
        }))
    }

    async fn history(
        &self,
        _: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let entries = self
            .mesh
            .history()
            .into_iter()
            .map(|r| HistoryEntry {
                version: r.version,
                unix_time: r.unix_time,
                author: r.author,
                summary: r.summary,
            })
            .collect();
        Ok(Response::new(HistoryResponse { entries }))
    }

    async fn rollback(
        &self,
        r: Request<RollbackRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(
            self.mesh.rollback(r.version, &r.author).await?,
        ))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let (config_version, snapshot_version, proxies) = self.mesh.status();
        Ok(Response::new(StatusResponse {
            config_version,
            snapshot_version,
            proxies,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ReviewError;
    use std::sync::Mutex;

    /// Accepts one token and records whom it was asked about.
    #[derive(Default)]
    struct Recording(Mutex<Vec<(String, String)>>);

    #[tonic::async_trait]
    impl TokenReviewer for Recording {
        async fn review(&self, token: &str, w: Workload<'_>) -> Result<(), ReviewError> {
            self.0
                .lock()
                .unwrap()
                .push((w.namespace.to_string(), w.service_account.to_string()));
            if token == "good" {
                Ok(())
            } else {
                Err(ReviewError::Denied("wrong token".into()))
            }
        }
    }

    fn request(token: Option<&str>, identity: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(i) = identity {
            r.metadata_mut()
                .insert("x-remora-identity", i.parse().unwrap());
        }
        r
    }

    #[tokio::test]
    async fn discovery_token_is_reviewed_for_the_identity_it_claims() {
        let reviewer = Arc::new(Recording::default());
        let auth = DiscoveryAuth {
            reviewer: Some(reviewer.clone()),
        };
        let hello = Hello {
            node_id: "api-1".into(),
            service: "shop/api".into(),
            ..Default::default()
        };
        let claimed = request(Some("good"), Some("shop/api-sa"));
        assert_eq!(
            auth.check(&claimed, &hello).await.unwrap(),
            "bootstrap token"
        );
        // Without a claim, the Service's namespace and name.
        let unclaimed = request(Some("good"), None);
        assert!(auth.check(&unclaimed, &hello).await.is_ok());
        assert_eq!(
            *reviewer.0.lock().unwrap(),
            [
                ("shop".to_string(), "api-sa".to_string()),
                ("shop".to_string(), "api".to_string())
            ]
        );
        let bad = request(Some("bad"), None);
        let refused = auth.check(&bad, &hello).await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
        let none = request(None, None);
        let anonymous = auth.check(&none, &hello).await;
        assert_eq!(anonymous.unwrap_err().code(), tonic::Code::Unauthenticated);
    }
}
