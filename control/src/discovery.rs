//! The Discovery service: one stream per proxy. The Hello within
//! `--hello-timeout`, then who the caller is (`DiscoveryAuth`), then
//! `Mesh::admit`; from there the proxy's scope's snapshots go out (written
//! by `fanout.rs`) and a task reads its ACKs, NACKs, Register and
//! Deregister.

use crate::admission::Caller;
use crate::mesh::Mesh;
use crate::proxies::Proxy;
use crate::review::{ReviewError, TokenReviewer, Workload};
use crate::snapshot::Published;
use crate::store::Store;
use bytes::Bytes;
use futures_util::Stream;
use hyper::body::Frame;
use remora_proto::control::discovery_request::Kind;
use remora_proto::control::DiscoveryRequest;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Request, Status, Streaming};
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

/// What a stream writes: snapshot frames, then (if the control plane stops
/// it) trailers.
pub type SnapshotFrames = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Status>> + Send>>;

impl DiscoveryAuth {
    /// Who is calling: the identity its certificate names, or the one its
    /// bootstrap token was reviewed for.
    pub async fn check<T>(&self, req: &Request<T>) -> Result<(Caller, &'static str), Status> {
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
        let Some(token) = crate::grpc::bearer(req) else {
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

impl<S: Store> DiscoveryService<S> {
    /// Opens a proxy's stream: everything up to its first snapshot.
    pub async fn open(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<SnapshotFrames, Status> {
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
            if let Some(info) = request
                .extensions()
                .get::<tonic::transport::server::TcpConnectInfo>()
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
        if let Err(refused) = self
            .mesh
            .admit(
                caller.as_ref(),
                &hello.node_id,
                &hello.service,
                hello.instance.as_ref(),
            )
            .await
        {
            let who = caller.as_ref().map(|c| c.to_string()).unwrap_or_default();
            warn!(node, peer, identity = %who, service = %hello.service, reason = %refused, "Discovery stream refused");
            return Err(refused.into());
        }
        let identity = caller.map(|c| c.to_string()).unwrap_or_default();
        info!(node, service = %hello.service, last_version = %hello.last_version, %credential, %identity, "proxy connected");
        let sub = self.mesh.connect(
            &node,
            &hello.service,
            &hello.last_version,
            hello.instance.clone(),
            &identity,
        );

        // ACKs, NACKs and deregistration arrive on the request stream.
        let (mesh, proxy) = (self.mesh.clone(), sub.proxy.clone());
        tokio::spawn(async move {
            loop {
                match incoming.message().await {
                    Ok(Some(DiscoveryRequest {
                        kind: Some(Kind::Ack(a)),
                    })) => mesh.answered(&proxy, &a.version, &a.error),
                    Ok(Some(DiscoveryRequest {
                        kind: Some(Kind::Deregister(_)),
                    })) => mesh.deregister(&proxy),
                    Ok(Some(DiscoveryRequest {
                        kind: Some(Kind::Register(r)),
                    })) => {
                        let Some(instance) = r.instance else { continue };
                        if let Err(refused) = mesh.register(&proxy, instance) {
                            warn!(node = %proxy.node, reason = %refused, "registration refused");
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            debug!(node = %proxy.node, "proxy stream ended");
            mesh.disconnected(&proxy);
        });

        let last = (!hello.last_version.is_empty()).then(|| Arc::from(hello.last_version));
        Ok(snapshots(sub.snapshots, sub.proxy, last))
    }
}

struct Sending {
    rx: watch::Receiver<Arc<Published>>,
    /// The version this proxy runs or was sent last.
    last: Option<Arc<str>>,
    first: bool,
    ended: bool,
    proxy: Arc<Proxy>,
}

/// The scope's snapshots as they come, the latest only, each written as
/// the scope's shared frame; then, if the control plane closes the scope,
/// OK trailers.
fn snapshots(
    rx: watch::Receiver<Arc<Published>>,
    proxy: Arc<Proxy>,
    last: Option<Arc<str>>,
) -> SnapshotFrames {
    let start = Sending {
        rx,
        last,
        first: true,
        ended: false,
        proxy,
    };
    Box::pin(futures_util::stream::unfold(start, |mut st| async move {
        loop {
            if st.ended {
                return None;
            }
            if !st.first && st.rx.changed().await.is_err() {
                st.ended = true;
                let mut trailers = http::HeaderMap::new();
                let _ = Status::ok("").add_header(&mut trailers);
                return Some((Ok(Frame::trailers(trailers)), st));
            }
            st.first = false;
            let snap = st.rx.borrow_and_update().clone();
            if snap.version.is_empty() || st.last.as_deref() == Some(&*snap.version) {
                continue;
            }
            if snap.frame.len() > crate::MAX_MESSAGE_BYTES {
                st.ended = true;
                let status = Status::resource_exhausted(format!(
                    "snapshot {} is {} bytes, over the {} byte limit",
                    snap.version,
                    snap.frame.len(),
                    crate::MAX_MESSAGE_BYTES
                ));
                warn!(node = %st.proxy.node, error = %status.message(), "snapshot not sent");
                let mut trailers = http::HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                return Some((Ok(Frame::trailers(trailers)), st));
            }
            st.last = Some(snap.version.clone());
            st.proxy.sent(&snap.version, snap.committed_at);
            return Some((Ok(Frame::data(snap.frame.clone())), st));
        }
    }))
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

    #[tokio::test]
    async fn a_stream_writes_the_shared_frame_and_skips_what_the_proxy_runs() {
        use futures_util::StreamExt;
        let proxies = crate::proxies::Proxies::default();
        let proxy = proxies.connect("p", "", "1.a");
        let publish = |v: &str| {
            Arc::new(Published {
                version: Arc::from(v),
                frame: Bytes::from(format!("frame {v}")),
                committed_at: std::time::Instant::now(),
            })
        };
        let (tx, rx) = watch::channel(publish("1.a"));
        let mut frames = snapshots(rx, proxy.clone(), Some(Arc::from("1.a")));
        let shared = publish("2.b");
        tx.send_replace(shared.clone());
        let f = frames.next().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(f, shared.frame);
        // The same allocation, not a copy.
        assert_eq!(f.as_ptr(), shared.frame.as_ptr());
        assert_eq!(proxy.status(String::new()).sent_version, "2.b");
        drop(tx);
        let t = frames
            .next()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert!(frames.next().await.is_none());
    }
}
