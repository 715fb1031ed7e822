//! The proxy's workload identity. At start the proxy makes its own key pair
//! (ECDSA P-256; the private key never leaves the pod), sends a CSR with
//! its bootstrap token to the control plane's Identity service, and keeps
//! the certificate chain, key and trust bundle in a `CertStore`. It renews
//! at about 70% of the certificate's lifetime with a fresh key pair each
//! time, authenticated by the current certificate (the token is needed only
//! for the first one, or after the certificate expired); while the control
//! plane is unreachable it retries with backoff and keeps the current
//! certificate until it expires. Each request tries the control plane's
//! replicas in turn (the one that answered last first) until one answers,
//! and backs off only when none did.
//!
//! The certificate and key are also kept in the state directory (owner-only,
//! written atomically) next to the last-known-good snapshot, so a proxy
//! restarted while the control plane is down serves mTLS again at once,
//! until that certificate expires.
//!
//! `CertStore` is what rustls asks for a certificate (`ResolvesServerCert`,
//! `ResolvesClientCert`): each new handshake gets the newest certificate,
//! and connections already open are untouched by a renewal.

use crate::control_plane::Replica;
use crate::metrics::{Metrics, ResultLabels};
use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use remora_proto::control::identity_client::IdentityClient;
use remora_proto::control::{IssueRequest, IssueResponse};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{info, warn};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Renew at this fraction of the remaining lifetime, give or take
/// `RENEW_JITTER`, so proxies started together do not renew together.
const RENEW_AT: f64 = 0.7;
const RENEW_JITTER: f64 = 0.05;
/// Never renew sooner than this after an issuance.
const MIN_RENEW_WAIT: Duration = Duration::from_millis(250);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Where to get a certificate and for whom.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// The control plane's replicas (Identity is served next to Discovery).
    pub control_plane: Arc<crate::control_plane::ControlPlane>,
    pub namespace: String,
    pub service_account: String,
    /// Read before each request: a projected token may be rotated.
    pub token_file: PathBuf,
    /// Longest wait between failed requests.
    pub max_backoff: Duration,
    /// Roots (PEM) that verify an https control plane.
    pub ca_pem: Option<String>,
    /// Where the current certificate and key are kept across restarts.
    pub state_dir: Option<PathBuf>,
}

/// The file in the state directory that holds the certificate and key.
const IDENTITY_FILE: &str = "identity.json";

impl IdentityConfig {
    /// Fails fast on what no retry would fix: names that are not DNS labels,
    /// a token file that cannot be read or is empty.
    pub fn check(&self) -> Result<(), String> {
        for (flag, v) in [
            ("--identity-namespace", &self.namespace),
            ("--identity-service-account", &self.service_account),
        ] {
            if !is_dns_label(v) {
                return Err(format!(
                    "{flag} {v:?}: expected a DNS label (lowercase letters, digits and '-', at most 63)"
                ));
            }
        }
        match std::fs::read_to_string(&self.token_file) {
            Ok(t) if !t.trim().is_empty() => Ok(()),
            Ok(_) => Err(format!(
                "{}: the bootstrap token file is empty",
                self.token_file.display()
            )),
            Err(e) => Err(format!("{}: {e}", self.token_file.display())),
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("bootstrap token {path}: {message}")]
    Token { path: String, message: String },
    #[error("making a key pair: {0}")]
    Key(#[from] rcgen::Error),
    #[error("connecting to the control plane: {}", with_sources(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("control plane refused: {}: {}", code_name(.0.code()), .0.message())]
    Refused(#[from] tonic::Status),
    #[error("unusable certificate from the control plane: {0}")]
    Invalid(String),
    #[error("no address of --control-plane {0} resolved")]
    NoReplica(String),
}

/// The certificate this proxy presents and the roots it trusts now.
#[derive(Debug)]
pub struct Credentials {
    /// The chain (leaf first) and our private key, as rustls wants them.
    pub key: Arc<CertifiedKey>,
    /// The trust bundle that came with the certificate.
    pub bundle: Arc<Bundle>,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`
    pub spiffe_id: String,
    pub not_after: SystemTime,
    /// The chain and key as PEM, for the control-plane connection (tonic's
    /// TLS takes PEM). Never printed.
    pub pem: Secret<(String, String)>,
}

/// The trust bundle: every root the mesh trusts now, parsed for rustls and
/// as PEM (it also verifies the control plane, through tonic).
#[derive(Debug)]
pub struct Bundle {
    pub roots: Arc<RootCertStore>,
    pub pem: String,
}

impl Bundle {
    /// Every root of a PEM bundle; an empty bundle is an error.
    pub fn parse(pem: &str) -> Result<Bundle, String> {
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let root = root.map_err(|e| format!("trust bundle: {e}"))?;
            roots.add(root).map_err(|e| format!("trust bundle: {e}"))?;
        }
        if roots.is_empty() {
            return Err("empty trust bundle".into());
        }
        Ok(Bundle {
            roots: Arc::new(roots),
            pem: pem.to_string(),
        })
    }
}

/// Hides a value from Debug output.
pub struct Secret<T>(pub T);

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The current credentials, swapped whole on renewal, and the trust
/// bundle: set by each issuance and by the config stream, the latest wins
/// (the control plane sends the same bundle both ways).
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwapOption<Credentials>,
    bundle: ArcSwapOption<Bundle>,
}

impl CertStore {
    pub fn new() -> Arc<CertStore> {
        Arc::new(CertStore::default())
    }

    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    pub fn install(&self, c: Credentials) {
        self.bundle.store(Some(c.bundle.clone()));
        self.current.store(Some(Arc::new(c)));
    }

    /// The roots peers are verified against now.
    pub fn roots(&self) -> Option<Arc<RootCertStore>> {
        self.bundle.load().as_ref().map(|b| b.roots.clone())
    }

    /// The trust bundle, once one arrived.
    pub fn bundle(&self) -> Option<Arc<Bundle>> {
        self.bundle.load_full()
    }

    /// Installs a trust bundle (PEM) from the config stream. Returns how
    /// many roots it holds and whether it changed anything; a bundle that
    /// does not parse changes nothing.
    pub fn set_bundle(&self, pem: &str) -> Result<(usize, bool), String> {
        let bundle = Bundle::parse(pem)?;
        let n = bundle.roots.len();
        let same = self.bundle.load().as_ref().is_some_and(|b| b.pem == pem);
        if !same {
            self.bundle.store(Some(Arc::new(bundle)));
        }
        Ok((n, !same))
    }

    pub fn clear(&self) {
        self.current.store(None);
    }

    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified_key()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certified_key()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

/// A fresh ECDSA P-256 key pair and a CSR for it. The CSR names nothing:
/// the control plane decides the name.
pub fn new_key() -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// Checks what the control plane sent and turns it into credentials: the
/// leaf certifies `key`, the chain leads to the trust bundle, and the leaf
/// names the workload that was asked for.
pub fn credentials(
    key: &KeyPair,
    resp: &IssueResponse,
    namespace: &str,
    service_account: &str,
) -> Result<Credentials, IdentityError> {
    let bad = |m: String| IdentityError::Invalid(m);
    let chain = CertificateDer::pem_slice_iter(resp.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("certificate chain: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(bad("no certificate in the chain".into()));
    };
    let bundle = Bundle::parse(&resp.trust_bundle_pem).map_err(bad)?;

    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| bad(e.to_string()))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &bundle.roots,
        &chain[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| bad(format!("does not chain to the trust bundle: {e}")))?;

    let (spiffe_id, not_after) = leaf_identity(leaf).map_err(bad)?;
    // The trust domain is the control plane's to choose; the path is ours.
    let path = spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, path)| path);
    if path != Some(&format!("ns/{namespace}/sa/{service_account}")) {
        return Err(bad(format!(
            "names {spiffe_id}, not spiffe://*/ns/{namespace}/sa/{service_account}"
        )));
    }

    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| bad(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| bad(format!("not for our key: {e}")))?;
    Ok(Credentials {
        key: Arc::new(certified),
        bundle: Arc::new(bundle),
        spiffe_id,
        not_after,
        pem: Secret((resp.cert_chain_pem.clone(), key.serialize_pem())),
    })
}

/// The SPIFFE ID (the one URI SAN) and expiry of a certificate.
pub fn leaf_identity(der: &CertificateDer<'_>) -> Result<(String, SystemTime), String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .map(|s| s.value.general_names.clone())
        .unwrap_or_default();
    let uris: Vec<&str> = sans
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris[..] else {
        return Err(format!("{} URI SANs, expected one SPIFFE ID", uris.len()));
    };
    if !uri.starts_with("spiffe://") {
        return Err(format!("URI SAN {uri:?} is not a SPIFFE ID"));
    }
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok((uri.to_string(), UNIX_EPOCH + Duration::from_secs(secs)))
}

/// A certificate, and the replica that issued it.
pub struct Issued {
    pub credentials: Credentials,
    pub replica: Replica,
    /// Replicas that failed before this one answered.
    pub failed_before: usize,
}

/// One request: a fresh key pair, its CSR, the checked answer, from the
/// first replica that answers. `bundle`: the current trust bundle, which
/// also verifies the control plane (next to `--control-plane-ca`). With
/// `current` (unexpired) and an https control plane, the request is
/// authenticated by that certificate and the bootstrap token is not read.
/// A replica that cannot be reached, or answers with anything but a
/// refusal of this proxy's credentials, passes the request to the next;
/// the last error is returned when none answered.
pub async fn fetch(
    cfg: &IdentityConfig,
    bundle: Option<&str>,
    current: Option<&Credentials>,
) -> Result<Issued, IdentityError> {
    let https = cfg.control_plane.https();
    let current = current.filter(|c| https && c.not_after > SystemTime::now());
    let token = match current {
        Some(_) => String::new(),
        None => {
            let token_err = |message: String| IdentityError::Token {
                path: cfg.token_file.display().to_string(),
                message,
            };
            let t = tokio::fs::read_to_string(&cfg.token_file)
                .await
                .map_err(|e| token_err(e.to_string()))?;
            t.trim().to_string()
        }
    };
    let (key, csr_pem) = new_key()?;
    let request = IssueRequest {
        csr_pem,
        namespace: cfg.namespace.clone(),
        service_account: cfg.service_account.clone(),
        bootstrap_token: token,
    };
    let roots: Vec<&str> = cfg.ca_pem.as_deref().into_iter().chain(bundle).collect();
    let client = current.map(|c| (c.pem.0 .0.as_str(), c.pem.0 .1.as_str()));
    let replicas = cfg.control_plane.replicas(None).await;
    let mut last_err = IdentityError::NoReplica(cfg.control_plane.describe());
    for (i, replica) in replicas.iter().enumerate() {
        match issue(replica, &roots, client, request.clone()).await {
            Ok(resp) => {
                cfg.control_plane.answered(replica);
                let credentials = credentials(&key, &resp, &cfg.namespace, &cfg.service_account)?;
                return Ok(Issued {
                    credentials,
                    replica: replica.clone(),
                    failed_before: i,
                });
            }
            Err(e) => {
                cfg.control_plane.failed(replica);
                let definitive = matches!(&e, IdentityError::Refused(s) if crate::control_plane::is_definitive(s.code()));
                if definitive {
                    return Err(e);
                }
                if let Some(next) = replicas.get(i + 1) {
                    info!(replica = %replica, url = %replica.url, error = %e, next = %next,
                        "identity request failed at a control-plane replica; trying the next");
                }
                last_err = e;
            }
        }
    }
    Err(last_err)
}

/// Identity.Issue at one replica.
async fn issue(
    replica: &Replica,
    roots: &[&str],
    client: Option<(&str, &str)>,
    request: IssueRequest,
) -> Result<IssueResponse, IdentityError> {
    let channel = crate::control_plane::endpoint(replica, roots, client)?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(IdentityClient::new(channel)
        .issue(request)
        .await?
        .into_inner())
}

/// What the identity file holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    chain_pem: String,
    key_pem: String,
    bundle_pem: String,
}

/// Keeps the credentials in the state directory: a temp file created
/// owner-only, fsynced, renamed over the old one.
fn persist(dir: &std::path::Path, c: &Credentials) -> std::io::Result<()> {
    use std::io::Write;
    let body = serde_json::to_vec(&Persisted {
        chain_pem: c.pem.0 .0.clone(),
        key_pem: c.pem.0 .1.clone(),
        bundle_pem: c.bundle.pem.clone(),
    })?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{IDENTITY_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(IDENTITY_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The credentials kept by an earlier run, if they are still good: the
/// chain leads to the bundle kept with them, names this proxy's identity,
/// certifies the key, and has not expired.
pub fn restore(cfg: &IdentityConfig) -> Option<Credentials> {
    let path = cfg.state_dir.as_ref()?.join(IDENTITY_FILE);
    let bytes = std::fs::read(&path).ok()?;
    let checked = serde_json::from_slice::<Persisted>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|p| {
            let key = KeyPair::from_pem(&p.key_pem).map_err(|e| e.to_string())?;
            let resp = IssueResponse {
                cert_chain_pem: p.chain_pem,
                trust_bundle_pem: p.bundle_pem,
                not_after_unix: 0,
            };
            credentials(&key, &resp, &cfg.namespace, &cfg.service_account)
                .map_err(|e| e.to_string())
        });
    match checked {
        Ok(c) if c.not_after > SystemTime::now() => {
            info!(identity = %c.spiffe_id, not_after_unix = unix(c.not_after), path = %path.display(),
                "restored the workload certificate kept on disk");
            Some(c)
        }
        Ok(_) => {
            info!(path = %path.display(), "the kept workload certificate has expired");
            None
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "the kept workload certificate is unusable; ignoring it");
            None
        }
    }
}

/// Runs until shutdown: get a certificate, renew it at about 70% of its
/// lifetime, retry with backoff and jitter on failure.
pub async fn run(
    cfg: IdentityConfig,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let counter = |result| {
        metrics
            .identity_rotations
            .get_or_create_owned(&ResultLabels { result })
    };
    let (ok, failed) = (counter("ok"), counter("error"));
    let failovers = metrics.control_plane_failovers("identity");
    let expiry = metrics.identity_cert_expiry.clone();
    let mut backoff = FIRST_BACKOFF;
    // A certificate restored from disk: renew it when it is due.
    let mut first_wait = store.current().map(|c| renew_after(c.not_after));
    loop {
        if let Some(wait) = first_wait.take() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
        let bundle = store.bundle();
        let current = store.current();
        let fetched = fetch(
            &cfg,
            bundle.as_ref().map(|b| b.pem.as_str()),
            current.as_deref(),
        )
        .await;
        let wait = match fetched {
            Ok(Issued {
                credentials: creds,
                replica,
                failed_before,
            }) => {
                ok.inc();
                if failed_before > 0 {
                    failovers.inc();
                }
                backoff = FIRST_BACKOFF;
                let renew_in = renew_after(creds.not_after);
                info!(
                    identity = %creds.spiffe_id,
                    not_after_unix = unix(creds.not_after),
                    renew_in = ?renew_in,
                    replica = %replica,
                    url = %replica.url,
                    "identity certificate installed"
                );
                expiry.set(creds.not_after);
                metrics
                    .identity_trust_roots
                    .set(creds.bundle.roots.len() as i64);
                if let Some(dir) = cfg.state_dir.clone() {
                    let kept = Credentials {
                        key: creds.key.clone(),
                        bundle: creds.bundle.clone(),
                        spiffe_id: creds.spiffe_id.clone(),
                        not_after: creds.not_after,
                        pem: Secret(creds.pem.0.clone()),
                    };
                    // Off the data-plane thread: a file write and fsyncs.
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = persist(&dir, &kept) {
                            warn!(dir = %dir.display(), error = %e, "could not keep the workload certificate on disk");
                        }
                    });
                }
                store.install(creds);
                renew_in
            }
            Err(e) => {
                failed.inc();
                let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                backoff = (backoff * 2).min(cfg.max_backoff);
                let now = SystemTime::now();
                match store.current() {
                    Some(c) if c.not_after > now => {
                        let left = c.not_after.duration_since(now).unwrap_or_default();
                        warn!(error = %e, control_plane = %cfg.control_plane.describe(), identity = %c.spiffe_id, expires_in = ?left,
                            "identity certificate renewal failed; keeping the current certificate");
                        // Wake at expiry at the latest, to drop it on time.
                        wait.min(left)
                    }
                    Some(c) => {
                        store.clear();
                        expiry.clear();
                        warn!(error = %e, control_plane = %cfg.control_plane.describe(), identity = %c.spiffe_id,
                            "identity certificate expired and could not be renewed: no identity until the control plane issues one");
                        wait
                    }
                    None => {
                        warn!(error = %e, control_plane = %cfg.control_plane.describe(), "identity certificate request failed");
                        wait
                    }
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// When to renew a certificate expiring at `not_after`: at about 70% of
/// what is left, with jitter.
fn renew_after(not_after: SystemTime) -> Duration {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let share = RENEW_AT + RENEW_JITTER * (2.0 * fastrand::f64() - 1.0);
    left.mul_f64(share).max(MIN_RENEW_WAIT)
}

/// An error and its causes on one line ("transport error" alone says little).
pub(crate) fn with_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The canonical gRPC name of a status code, as it appears in logs.
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateSigningRequestParams, CertifiedIssuer,
        ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    };
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::ServerName;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, ClientConnection, ServerConfig};
    use rustls::{ServerConnection, StreamOwned};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A CA like the control plane's, made here so the proxy's tests need
    /// no control plane.
    struct TestCa(CertifiedIssuer<'static, KeyPair>);

    impl TestCa {
        fn new() -> TestCa {
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            TestCa(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
        }

        /// Signs the CSR's key for `spiffe_id`, as Identity.Issue does.
        fn sign(&self, csr_pem: &str, spiffe_id: &str) -> IssueResponse {
            let csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let leaf = p.signed_by(&csr.public_key, &self.0).unwrap();
            IssueResponse {
                cert_chain_pem: leaf.pem(),
                trust_bundle_pem: self.0.pem(),
                not_after_unix: 0,
            }
        }

        /// Credentials for `ns`/`sa` through the proxy's own checks.
        fn issue(&self, ns: &str, sa: &str) -> Credentials {
            let (key, csr) = new_key().unwrap();
            let resp = self.sign(&csr, &format!("spiffe://mesh.test/ns/{ns}/sa/{sa}"));
            credentials(&key, &resp, ns, sa).unwrap()
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn server_config(store: Arc<CertStore>, roots: Arc<RootCertStore>) -> Arc<ServerConfig> {
        let clients = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(clients)
            .with_cert_resolver(store);
        Arc::new(cfg)
    }

    fn client_config(
        store: Arc<CertStore>,
        roots: Arc<RootCertStore>,
        expect: &str,
    ) -> Arc<ClientConfig> {
        let p = provider();
        let verifier = crate::tls::SpiffeServerVerifier::new(roots, expect.to_string());
        let mut cfg = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(store);
        // Full handshakes only: a resumed session sends no certificate and
        // keeps the identities of the handshake it resumes.
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }

    struct Handshake {
        /// The leaf the client saw.
        server_leaf: CertificateDer<'static>,
        /// The SPIFFE ID the server saw in the client's certificate.
        client_id: String,
        version: Option<rustls::ProtocolVersion>,
    }

    /// One connection over loopback: mutual TLS, then a byte each way.
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<Handshake, String> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_side = std::thread::spawn(move || -> Result<String, String> {
            let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn = ServerConnection::new(server).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, sock);
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).map_err(|e| e.to_string())?;
            tls.write_all(b"!").map_err(|e| e.to_string())?;
            tls.flush().map_err(|e| e.to_string())?;
            let peer = tls
                .conn
                .peer_certificates()
                .ok_or("no client certificate")?;
            leaf_identity(&peer[0]).map(|(id, _)| id)
        });
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let name = ServerName::try_from("shop.mesh.test").unwrap();
        let conn = ClientConnection::new(client, name).unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        let client_result = (|| {
            tls.write_all(b"?")?;
            tls.flush()?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b)
        })();
        let server_leaf = tls
            .conn
            .peer_certificates()
            .map(|c| c[0].clone().into_owned());
        let version = tls.conn.protocol_version();
        drop(tls);
        let client_id = server_side.join().unwrap();
        client_result.map_err(|e| e.to_string())?;
        Ok(Handshake {
            server_leaf: server_leaf.ok_or("no server certificate")?,
            client_id: client_id?,
            version,
        })
    }

    #[test]
    fn mtls_handshake_uses_the_newest_certificate_and_checks_spiffe_ids() {
        let ca = TestCa::new();
        let (server_store, client_store) = (CertStore::new(), CertStore::new());
        let first = ca.issue("shop", "api");
        let roots = first.bundle.roots.clone();
        let first_leaf = first.key.cert[0].clone();
        server_store.install(first);
        client_store.install(ca.issue("shop", "web"));
        let server = server_config(server_store.clone(), roots.clone());
        let client = client_config(
            client_store.clone(),
            roots.clone(),
            "spiffe://mesh.test/ns/shop/sa/api",
        );

        let h = handshake(server.clone(), client.clone()).unwrap();
        assert_eq!(h.version, Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(h.server_leaf, first_leaf);
        assert_eq!(h.client_id, "spiffe://mesh.test/ns/shop/sa/web");

        // A renewal: the same configs, and the next handshake presents the new certificate.
        let renewed = ca.issue("shop", "api");
        let renewed_leaf = renewed.key.cert[0].clone();
        assert_ne!(renewed_leaf, first_leaf);
        server_store.install(renewed);
        let h = handshake(server.clone(), client).unwrap();
        assert_eq!(h.server_leaf, renewed_leaf);

        // A client expecting another workload refuses this one.
        let wrong = client_config(
            client_store.clone(),
            roots,
            "spiffe://mesh.test/ns/shop/sa/db",
        );
        assert!(handshake(server.clone(), wrong).is_err());
        // So does a client trusting another CA.
        let other = TestCa::new().issue("x", "y").bundle.roots.clone();
        let stranger = client_config(client_store, other, "spiffe://mesh.test/ns/shop/sa/api");
        assert!(handshake(server, stranger).is_err());
    }

    #[test]
    fn credentials_refuse_what_was_not_asked_for() {
        let ca = TestCa::new();
        let (key, csr) = new_key().unwrap();
        let ok = ca.sign(&csr, "spiffe://mesh.test/ns/shop/sa/api");
        let creds = credentials(&key, &ok, "shop", "api").unwrap();
        assert_eq!(creds.spiffe_id, "spiffe://mesh.test/ns/shop/sa/api");

        let other_name = ca.sign(&csr, "spiffe://mesh.test/ns/shop/sa/admin");
        assert!(credentials(&key, &other_name, "shop", "api").is_err());
        let nested = ca.sign(&csr, "spiffe://mesh.test/x/ns/shop/sa/api");
        assert!(credentials(&key, &nested, "shop", "api").is_err());
        let (other_key, _) = new_key().unwrap();
        assert!(
            credentials(&other_key, &ok, "shop", "api").is_err(),
            "a certificate for another key"
        );
        let mut foreign = ok.clone();
        foreign.trust_bundle_pem = TestCa::new().0.pem();
        assert!(
            credentials(&key, &foreign, "shop", "api").is_err(),
            "another CA"
        );
        let mut empty = ok;
        empty.trust_bundle_pem.clear();
        assert!(credentials(&key, &empty, "shop", "api").is_err());
    }

    #[test]
    fn store_resolves_nothing_until_installed_and_after_clear() {
        let store = CertStore::new();
        assert!(!store.has_certs());
        assert!(ResolvesClientCert::resolve(&*store, &[], &[]).is_none());
        store.install(TestCa::new().issue("default", "default"));
        assert!(store.has_certs());
        assert!(ResolvesClientCert::resolve(&*store, &[], &[]).is_some());
        store.clear();
        assert!(!store.has_certs());
    }

    #[test]
    fn kept_credentials_come_back_only_for_this_identity() {
        let dir = std::env::temp_dir().join(format!("remora-identity-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = |sa: &str| IdentityConfig {
            control_plane: Arc::new(
                crate::control_plane::ControlPlane::parse("https://127.0.0.1:1").unwrap(),
            ),
            namespace: "shop".into(),
            service_account: sa.into(),
            token_file: dir.join("token"),
            max_backoff: Duration::from_secs(1),
            ca_pem: None,
            state_dir: Some(dir.clone()),
        };
        assert!(restore(&cfg("api")).is_none(), "nothing kept yet");
        let ca = TestCa::new();
        let creds = ca.issue("shop", "api");
        persist(&dir, &creds).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "owner-only");
        }
        let back = restore(&cfg("api")).expect("restored");
        assert_eq!(back.spiffe_id, "spiffe://mesh.test/ns/shop/sa/api");
        assert_eq!(back.not_after, creds.not_after);
        back.key.keys_match().unwrap();
        // Another identity's proxy does not take it.
        assert!(restore(&cfg("web")).is_none());
        // A damaged file is ignored.
        std::fs::write(dir.join(IDENTITY_FILE), "{").unwrap();
        assert!(restore(&cfg("api")).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_check_fails_fast() {
        let dir = std::env::temp_dir().join(format!("remora-identity-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "t\n").unwrap();
        let cfg = |ns: &str, sa: &str, f: &std::path::Path| IdentityConfig {
            control_plane: Arc::new(
                crate::control_plane::ControlPlane::parse("http://127.0.0.1:1").unwrap(),
            ),
            namespace: ns.into(),
            service_account: sa.into(),
            token_file: f.to_path_buf(),
            max_backoff: Duration::from_secs(1),
            ca_pem: None,
            state_dir: None,
        };
        assert!(cfg("shop", "api", &token).check().is_ok());
        assert!(cfg("Shop", "api", &token).check().is_err());
        assert!(cfg("shop", "", &token).check().is_err());
        assert!(cfg("shop", "api", &dir.join("absent")).check().is_err());
        std::fs::write(&token, "\n").unwrap();
        assert!(cfg("shop", "api", &token).check().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
