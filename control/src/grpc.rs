//! The gRPC services: Discovery (one stream per proxy) and Admin (what
//! remoractl calls). Thin: the state and its rules live in `mesh.rs`.

use crate::admission::Caller;
use crate::mesh::Mesh;
use crate::review::{ReviewError, TokenReviewer, Workload};
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
    /// Longest a proxy may take to send its Hello once the stream is open.
    pub hello_timeout: std::time::Duration,
}

/// A proxy opens its Discovery stream with its workload certificate (a TLS
/// client certificate the CA issued, verified in the handshake) once it has
/// one, and with its bootstrap token before that.
pub struct DiscoveryAuth {
    pub reviewer: Option<Arc<dyn TokenReviewer>>,
    /// Certificates must name identities in this trust domain.
    pub trust_domain: String,
}

/// Largest message a proxy may send on its stream (a Hello, an ACK or a
/// NACK's reason): before authentication nothing big is read.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

impl DiscoveryAuth {
    /// Who is calling: the identity its certificate names, or the one its
    /// bootstrap token was reviewed for.
    async fn check<T>(&self, req: &Request<T>) -> Result<(Caller, &'static str), Status> {
        if let Some(certs) = req.peer_certs() {
            if let Some(leaf) = certs.first() {
                let id = spiffe_id(leaf.as_ref()).unwrap_or_default();
                let caller = Caller::from_spiffe_id(&id, &self.trust_domain).ok_or_else(|| {
                    Status::unauthenticated(format!(
                        "the client certificate names {id:?}, not a workload of trust domain {}",
                        self.trust_domain
                    ))
                })?;
                return Ok((caller, "certificate"));
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
        // The identity the token claims is sent with it.
        let claimed = req
            .metadata()
            .get("x-remora-identity")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once('/'))
            .filter(|(ns, sa)| {
                crate::ca::check_label("namespace", ns).is_ok()
                    && crate::ca::check_label("service_account", sa).is_ok()
            });
        let Some((ns, sa)) = claimed else {
            return Err(Status::unauthenticated(
                "a bootstrap token must come with the identity it claims (x-remora-identity: namespace/serviceAccount)",
            ));
        };
        let workload = Workload {
            namespace: ns,
            service_account: sa,
        };
        reviewer
            .review(token, workload)
            .await
            .map_err(|e| match e {
                ReviewError::Denied(m) => {
                    Status::unauthenticated(format!("bootstrap token refused: {m}"))
                }
                ReviewError::Unavailable(m) => {
                    Status::unavailable(format!("the bootstrap token cannot be checked now: {m}"))
                }
            })?;
        let caller = Caller {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        };
        Ok((caller, reviewer.kind()))
    }
}

/// The SPIFFE ID (URI SAN) of a DER certificate.
pub fn spiffe_id(der: &[u8]) -> Option<String> {
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
            warn!(path = %path.display(), error = %e, "admin token file unreadable: every Admin call is refused");
            Status::unavailable("the admin token cannot be checked")
        })?;
        // An emptied file is a mistake, never "no token needed".
        if want.trim().is_empty() {
            warn!(path = %path.display(), "admin token file is empty: every Admin call is refused");
            return Err(Status::unavailable("the admin token cannot be checked"));
        }
        match bearer(&req) {
            Some(got) if crate::review::same_secret(got.as_bytes(), want.trim().as_bytes()) => {
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
        let peer = request_head
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let limit = self.hello_timeout;
        let first = tokio::time::timeout(limit, incoming.message())
            .await
            .map_err(|_| {
                warn!(peer, "Discovery stream refused: no Hello within {limit:?}");
                Status::deadline_exceeded(format!("no Hello within {limit:?}"))
            })?;
        let hello = match first {
            Ok(Some(DiscoveryRequest {
                kind: Some(Kind::Hello(h)),
            })) => h,
            Ok(_) => return Err(Status::invalid_argument("the first message must be Hello")),
            Err(e) => {
                warn!(peer, error = %e.message(), "Discovery stream refused before its Hello");
                return Err(e);
            }
        };
        let node = hello.node_id.chars().take(253).collect::<String>();
        let (caller, credential) = match &self.auth {
            Some(auth) => match auth.check(&request_head).await {
                Ok((c, how)) => (Some(c), how),
                Err(e) => {
                    warn!(node, peer, service = %hello.service, error = %e.message(), "Discovery stream refused");
                    return Err(e);
                }
            },
            None => (None, "none"),
        };
        if let Err(refused) = self.mesh.admit(
            caller.as_ref(),
            &hello.node_id,
            &hello.service,
            hello.instance.as_ref(),
        ) {
            let who = caller.as_ref().map(|c| c.to_string()).unwrap_or_default();
            warn!(node, peer, identity = %who, service = %hello.service, reason = %refused, "Discovery stream refused");
            return Err(refused.into());
        }
        let identity = caller.map(|c| c.to_string()).unwrap_or_default();
        info!(node, service = %hello.service, last_version = %hello.last_version, %credential, %identity, "proxy connected");
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
                    Ok(Some(DiscoveryRequest {
                        kind: Some(Kind::Register(r)),
                    })) => {
                        let Some(instance) = r.instance else { continue };
                        if let Err(refused) = mesh.register(&n, conn, instance) {
                            warn!(node = n, reason = %refused, "registration refused");
                        }
                    }
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

        async fn still_granted(&self, _: Workload<'_>) -> Result<(), ReviewError> {
            Ok(())
        }

        fn kind(&self) -> &'static str {
            "recording"
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
            trust_domain: "mesh.test".into(),
        };
        let claimed = request(Some("good"), Some("shop/api-sa"));
        let (caller, how) = auth.check(&claimed).await.unwrap();
        assert_eq!(caller.to_string(), "shop/api-sa");
        assert_eq!(how, "recording");
        assert_eq!(
            *reviewer.0.lock().unwrap(),
            [("shop".to_string(), "api-sa".to_string())]
        );
        // A token must say whom it is for, in a well-formed way.
        for (token, identity) in [
            (Some("good"), None),
            (Some("good"), Some("Shop/api")),
            (Some("good"), Some("no-slash")),
            (Some("bad"), Some("shop/api")),
            (None, None),
        ] {
            let refused = auth.check(&request(token, identity)).await;
            assert_eq!(
                refused.unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{token:?} {identity:?}"
            );
        }
    }
}
