//! remora-control: the control plane. It keeps the mesh config as a
//! versioned history in a store (`history`, `store`), applies changes all
//! or nothing, tracks registered instances (`registry`) and connected
//! proxies (`proxies`), and streams each proxy the snapshot its scope needs
//! (`snapshot`, `discovery`, `fanout`), encoded once per scope; `mesh` puts
//! these together for the gRPC services (`grpc`). It times pushes and
//! serves Prometheus metrics (`push`, `metrics`), and is the mesh's CA
//! (`ca`), issuing proxies their workload certificates (`identity`).
#![forbid(unsafe_code)]

pub mod accept;
pub mod admission;
pub mod ca;
pub mod discovery;
pub mod error;
pub mod etcd;
pub mod fanout;
pub mod grpc;
pub mod history;
pub mod identity;
pub mod kube;
pub mod mesh;
pub mod metrics;
pub mod proxies;
pub mod push;
pub mod registry;
pub mod resources;
pub mod review;
pub mod shared;
pub mod snapshot;
pub mod store;
pub mod tls;

use remora_proto::control::admin_server::AdminServer;
use remora_proto::control::identity_server::IdentityServer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Largest message accepted or sent (a big mesh's snapshot).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// HTTP/2 streams open at once on one client connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Reset streams tolerated per connection (rapid-reset floods).
pub const MAX_RESET_STREAMS: usize = 32;
/// Largest request header block.
pub const MAX_HEADER_BYTES: u32 = 16 << 10;

/// How the control plane guards its API. The default (no TLS, no admin
/// token) is for a laptop; production runs with both.
pub struct Security {
    /// Serve gRPC over TLS (a certificate from the CA, renewed in place;
    /// client certificates verified against the trust bundle).
    pub tls: Option<Arc<tls::ServingTls>>,
    /// With TLS: Discovery needs a workload certificate or a bootstrap
    /// token checked by this reviewer.
    pub discovery_reviewer: Option<Arc<dyn review::TokenReviewer>>,
    /// Admin calls need the token in this file.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Proxies' certificates must name identities in this trust domain.
    pub trust_domain: String,
    /// Most client connections open at once; past it, accepting pauses.
    pub max_connections: usize,
    /// Longest a proxy may take to send its Hello.
    pub hello_timeout: Duration,
}

/// Serves Discovery, Admin and Identity on one listener until `shutdown`
/// resolves.
pub async fn serve<S: store::Store>(
    mesh: Arc<mesh::Mesh<S>>,
    identity: identity::IdentityService,
    security: Security,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let auth = security.tls.is_some().then(|| discovery::DiscoveryAuth {
        reviewer: security.discovery_reviewer.clone(),
        trust_domain: security.trust_domain.clone(),
    });
    // What proxies send is small (Hello, ACK): nothing big is read from a
    // stream, authenticated or not (discovery::MAX_REQUEST_BYTES).
    // Snapshots going out may be big, and are written as encoded once.
    let discovery = fanout::DiscoveryServer::new(discovery::DiscoveryService {
        mesh: mesh.clone(),
        auth,
        hello_timeout: security.hello_timeout,
    });
    let admin = AdminServer::new(grpc::AdminService { mesh })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = tonic::service::interceptor::InterceptedService::new(
        admin,
        grpc::AdminAuth {
            token_file: security.admin_token_file.map(Arc::new),
        },
    );
    let identity =
        IdentityServer::new(identity).max_decoding_message_size(discovery::MAX_REQUEST_BYTES);
    let mut builder = tonic::transport::Server::builder()
        // Notice dead proxies (and let them notice us) without traffic.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        // TCP_NODELAY: set on every accepted socket by accept.rs (tonic
        // ignores Server::tcp_nodelay with an incoming stream of our own).
        // Bounds before anyone is authenticated (tonic's defaults leave
        // these unlimited): a proxy needs one stream, remoractl a few.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_pending_accept_reset_streams(Some(MAX_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_RESET_STREAMS))
        .http2_max_header_list_size(Some(MAX_HEADER_BYTES));
    let router = builder
        .add_service(discovery)
        .add_service(admin)
        .add_service(identity);
    match security.tls {
        Some(serving) => {
            let incoming = tls::incoming(listener, serving, security.max_connections);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            let incoming = accept::plaintext(listener, security.max_connections);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
}
