//! gRPC over TLS for the control plane, with a serving certificate its own
//! CA issues and renews in place (at about 70% of its lifetime), so a
//! long-running control plane never serves an expired certificate and no
//! restart is needed. Clients may present a certificate (proxies present
//! their workload certificate); it is verified against the trust bundle and
//! handed to the services as tonic's `TlsConnectInfo`.
//!
//! tonic's own `ServerTlsConfig` takes a fixed certificate, hence this
//! small acceptor: TCP accept, handshake on its own task (a slow client
//! never holds up the others), then the stream goes to tonic.

use crate::ca::{Ca, CaError};
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const RENEW_AT: f64 = 0.7;

/// The control plane's serving certificate and how to make the next one.
pub struct ServingTls {
    ca: Arc<Ca>,
    names: Vec<String>,
    ips: Vec<IpAddr>,
    lifetime: Duration,
    current: Arc<ArcSwap<CertifiedKey>>,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingTls")
            .field("names", &self.names)
            .field("ips", &self.ips)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("issuing the control plane's certificate: {0}")]
    Issue(#[from] CaError),
    #[error("the control plane's certificate: {0}")]
    Cert(String),
    #[error("the trust bundle for client certificates: {0}")]
    Roots(String),
}

fn certified(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let bad = |e: &dyn std::fmt::Display| TlsError::Cert(e.to_string());
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(&e))?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| bad(&e))?;
    Ok(CertifiedKey::new(chain, signer))
}

impl ServingTls {
    /// Issues the first certificate and builds the TLS config. Client
    /// certificates are optional and, when presented, must chain to
    /// `client_roots_pem`.
    pub fn new(
        ca: Arc<Ca>,
        names: Vec<String>,
        ips: Vec<IpAddr>,
        lifetime: Duration,
        client_roots_pem: &str,
    ) -> Result<Arc<ServingTls>, TlsError> {
        let (chain, key) = ca.issue_server(&names, &ips, lifetime)?;
        let first = certified(&chain, &key)?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(client_roots_pem.as_bytes()) {
            let c = c.map_err(|e| TlsError::Roots(e.to_string()))?;
            roots.add(c).map_err(|e| TlsError::Roots(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Roots(e.to_string()))?;
        let current = Arc::new(ArcSwap::from_pointee(first));
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Cert(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(current.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(ServingTls {
            ca,
            names,
            ips,
            lifetime,
            current,
            config: Arc::new(cfg),
        }))
    }

    /// Renews the certificate at about 70% of its lifetime, until the
    /// process ends; a failure is retried a minute later.
    pub fn spawn_renewal(self: &Arc<Self>) {
        let me = self.clone();
        let lifetime = self.lifetime;
        tokio::spawn(async move {
            let mut wait = lifetime.mul_f64(RENEW_AT);
            loop {
                tokio::time::sleep(wait).await;
                let renewed = me
                    .ca
                    .issue_server(&me.names, &me.ips, me.lifetime)
                    .map_err(TlsError::from)
                    .and_then(|(chain, key)| certified(&chain, &key));
                wait = match renewed {
                    Ok(c) => {
                        me.current.store(Arc::new(c));
                        info!(lifetime = ?me.lifetime, "renewed the control plane's certificate");
                        lifetime.mul_f64(RENEW_AT)
                    }
                    Err(e) => {
                        warn!(error = %e, "could not renew the control plane's certificate; retrying in a minute");
                        Duration::from_secs(60)
                    }
                };
            }
        });
    }
}

/// Hands rustls the newest certificate at every handshake.
#[derive(Debug)]
struct Resolver(Arc<ArcSwap<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// TLS connections accepted on `listener`, handshakes done concurrently,
/// at most `max` open at once.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServingTls>,
    max: usize,
) -> ReceiverStream<Result<crate::accept::Capped<TlsStream<TcpStream>>, std::io::Error>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let permits = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    crate::accept::accept_loop(listener, permits, move |tcp, peer| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => Some(s),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    None
                }
            }
        }
    })
}
