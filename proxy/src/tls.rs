//! Mutual TLS between proxies: TLS 1.3 only, rustls, certificates from the
//! `CertStore` (each handshake takes the newest), peers verified against
//! the current trust bundle.
//!
//! - Inbound, the server demands a client certificate that chains to the
//!   bundle and names a SPIFFE ID in our trust domain; that ID is the
//!   caller's identity for authorization, rate limits and the app header.
//! - Outbound, the client checks that the server's certificate chains to
//!   the bundle and names exactly the SPIFFE ID the destination Service
//!   should have (DNS names play no part).
//!
//! No session resumption either way: a resumed session carries the
//! identities of the handshake it resumes, which would outlive a renewal or
//! a root rotation. Connections between proxies are long-lived HTTP/2, so
//! full handshakes are rare anyway.

use crate::identity::{leaf_identity, CertStore};
use crate::metrics::{HandshakeLabels, Metrics};
use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// How the local Service's inbound side treats plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    /// mTLS only (the default for meshed Services).
    Strict,
    /// mTLS and plaintext, for migrating a Service into the mesh.
    Permissive,
    /// Plaintext only.
    Disabled,
}

impl MtlsMode {
    pub fn parse(s: &str) -> MtlsMode {
        match s {
            "Permissive" => MtlsMode::Permissive,
            "Disabled" => MtlsMode::Disabled,
            _ => MtlsMode::Strict,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "Strict",
            MtlsMode::Permissive => "Permissive",
            MtlsMode::Disabled => "Disabled",
        }
    }
}

/// Longest a handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection to a peer proxy offers in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2: every request between two proxies, multiplexed.
    H2,
    /// HTTP/1.1: Upgrade requests (a WebSocket needs an HTTP/1.1 connection).
    Http1,
    /// Nothing: opaque bytes follow the transport header.
    None,
}

/// The server config for the current roots, rebuilt when they change.
struct ServerCache {
    roots: Arc<RootCertStore>,
    config: Arc<ServerConfig>,
}

pub struct MeshTls {
    store: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
    server: ArcSwapOption<ServerCache>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls").finish_non_exhaustive()
    }
}

impl MeshTls {
    pub fn new(store: Arc<CertStore>, metrics: Arc<Metrics>) -> Arc<MeshTls> {
        Arc::new(MeshTls {
            store,
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            server: ArcSwapOption::empty(),
            metrics,
        })
    }

    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// Our trust domain, from our certificate (none before the first).
    pub fn trust_domain(&self) -> Option<String> {
        let c = self.store.current()?;
        trust_domain(&c.spiffe_id).map(str::to_string)
    }

    /// The SPIFFE ID a workload of `namespace`/`service_account` holds.
    pub fn expected_id(&self, namespace: &str, service_account: &str) -> Option<String> {
        let td = self.trust_domain()?;
        Some(format!("spiffe://{td}/ns/{namespace}/sa/{service_account}"))
    }

    fn count(&self, direction: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.metrics
            .tls_handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    fn server_config(&self) -> Result<Arc<ServerConfig>, io::Error> {
        let (Some(roots), Some(_)) = (self.store.roots(), self.store.current()) else {
            return Err(io::Error::other("no workload certificate yet"));
        };
        if let Some(c) = &*self.server.load() {
            if Arc::ptr_eq(&c.roots, &roots) {
                return Ok(c.config.clone());
            }
        }
        let inner =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
                .build()
                .map_err(io::Error::other)?;
        let verifier = Arc::new(MeshClientVerifier {
            inner,
            store: self.store.clone(),
        });
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.store.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        let config = Arc::new(cfg);
        self.server.store(Some(Arc::new(ServerCache {
            roots,
            config: config.clone(),
        })));
        Ok(config)
    }

    /// Terminates mTLS on an accepted connection; returns the stream and
    /// who is calling.
    pub async fn accept(
        &self,
        io: TcpStream,
    ) -> Result<(server::TlsStream<TcpStream>, Peer), io::Error> {
        let result = async {
            let cfg = self.server_config()?;
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(cfg).accept(io))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
            let (id, theirs) = {
                let (_, conn) = tls.get_ref();
                let leaf = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .ok_or_else(|| io::Error::other("no client certificate"))?;
                leaf_identity(leaf).map_err(io::Error::other)?
            };
            let ours = self.store.current().map_or(theirs, |c| c.not_after);
            let peer = Peer {
                id: Arc::from(id),
                expires: theirs.min(ours),
            };
            Ok((tls, peer))
        }
        .await;
        self.count("inbound", result.is_ok());
        result
    }

    /// A client config that accepts only `expect` as the server, offering
    /// `alpn`.
    pub fn client_config(
        &self,
        expect: String,
        alpn: Alpn,
    ) -> Result<Arc<ClientConfig>, io::Error> {
        let roots = self
            .store
            .roots()
            .ok_or_else(|| io::Error::other("no trust bundle yet"))?;
        let verifier = SpiffeServerVerifier {
            roots,
            expect,
            algs: self.provider.signature_verification_algorithms,
        };
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.store.clone());
        cfg.alpn_protocols = match alpn {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::None => vec![],
        };
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }

    /// Originates mTLS to a peer proxy that must present `expect`.
    pub async fn connect(
        &self,
        io: TcpStream,
        ip: IpAddr,
        expect: String,
        alpn: Alpn,
    ) -> Result<client::TlsStream<TcpStream>, io::Error> {
        let result = async {
            if self.store.current().is_none() {
                return Err(io::Error::other("no workload certificate yet"));
            }
            let cfg = self.client_config(expect.clone(), alpn)?;
            let conn = TlsConnector::from(cfg).connect(ServerName::IpAddress(ip.into()), io);
            tokio::time::timeout(HANDSHAKE_TIMEOUT, conn)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
        }
        .await;
        self.count("outbound", result.is_ok());
        if let Err(e) = &result {
            // Connections are long-lived, so this is rare unless something
            // is wrong (an impostor, a foreign CA, no certificate yet).
            tracing::warn!(peer = %ip, expected = %expect, error = %e, "mTLS handshake to a peer proxy failed");
        }
        result
    }
}

/// The caller on an mTLS connection.
pub struct Peer {
    /// Its SPIFFE ID.
    pub id: Arc<str>,
    /// When the first of the two certificates of the handshake expires: the
    /// connection is closed (gracefully) then, so no connection outlives
    /// the credentials it was authenticated with.
    pub expires: std::time::SystemTime,
}

/// `td` of `spiffe://td/...`.
pub fn trust_domain(spiffe_id: &str) -> Option<&str> {
    spiffe_id
        .strip_prefix("spiffe://")?
        .split_once('/')
        .map(|(td, _)| td)
}

/// The namespace of `spiffe://td/ns/<namespace>/sa/<account>`.
pub fn namespace(spiffe_id: &str) -> Option<&str> {
    let path = spiffe_id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let rest = path.strip_prefix("ns/")?;
    rest.split_once('/').map(|(ns, _)| ns)
}

fn rejected(why: String) -> rustls::Error {
    tracing::debug!(reason = %why, "peer certificate refused");
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        io::Error::other(why),
    ))))
}

/// WebPKI client verification (chain to the bundle, validity, clientAuth
/// usage), then: the certificate's SPIFFE ID is in our trust domain.
#[derive(Debug)]
struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    store: Arc<CertStore>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let (id, _) = leaf_identity(end_entity).map_err(rejected)?;
        let ours = self
            .store
            .current()
            .and_then(|c| trust_domain(&c.spiffe_id).map(str::to_string));
        match (trust_domain(&id), ours) {
            (Some(theirs), Some(ours)) if theirs == ours => Ok(ClientCertVerified::assertion()),
            (_, ours) => Err(rejected(format!(
                "client {id} is not in trust domain {}",
                ours.unwrap_or_default()
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The chain leads to the trust bundle and the leaf's one SPIFFE ID is
/// `expect`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expect: String,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expect: String) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            roots,
            expect,
            algs: rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        match leaf_identity(end_entity) {
            Ok((id, _)) if id == self.expect => Ok(ServerCertVerified::assertion()),
            Ok((id, _)) => Err(rejected(format!(
                "server is {id}, expected {}",
                self.expect
            ))),
            Err(e) => Err(rejected(e)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_parts() {
        let id = "spiffe://mesh.test/ns/shop/sa/api";
        assert_eq!(trust_domain(id), Some("mesh.test"));
        assert_eq!(namespace(id), Some("shop"));
        assert_eq!(trust_domain("https://x/y"), None);
        assert_eq!(namespace("spiffe://mesh.test/other/shop"), None);
    }
}
