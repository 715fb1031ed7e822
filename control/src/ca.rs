//! The mesh's certificate authority: it signs the short-lived certificates
//! proxies present to each other. The CA is either a root generated at first
//! start and kept in the data directory (`<data-dir>/ca/root.pem` and
//! `root-key.pem`, so every restart signs with the same root), or an
//! operator's CA read from files: a root, or an intermediate with the chain
//! above it up to the root.
//!
//! A leaf names its workload by exactly one URI SAN, the SPIFFE ID
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. Only the
//! CSR's public key is used: whatever names or extensions it asks for are
//! ignored.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// Certificates start this long before they are issued, so a peer whose
/// clock is a little behind still accepts them.
const BACKDATE_SECS: i64 = 30;
/// Validity of a root generated at first start.
const ROOT_VALIDITY_SECS: i64 = 10 * 365 * 24 * 3600;
/// Largest CSR accepted, PEM bytes (a P-256 CSR is about 500).
const MAX_CSR_BYTES: usize = 16 * 1024;

const ROOT_FILE: &str = "root.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";

/// What the CA puts in the certificates it issues.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `cluster.local` in `spiffe://cluster.local/ns/shop/sa/api`.
    pub trust_domain: String,
    /// How long an issued certificate is valid (whole seconds).
    pub lifetime: Duration,
}

impl Settings {
    /// Checks the trust domain (SPIFFE: lowercase letters, digits, `.`, `-`,
    /// `_`) and the lifetime (at least one second).
    pub fn check(&self) -> Result<(), CaError> {
        let td = &self.trust_domain;
        let ok_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b);
        if td.is_empty() || td.len() > 255 || !td.bytes().all(ok_char) {
            return Err(CaError::Config(format!(
                "--trust-domain {td:?}: expected lowercase letters, digits, '.', '-' or '_'"
            )));
        }
        if self.lifetime.as_secs() == 0 {
            return Err(CaError::Config(
                "--cert-lifetime must be at least 1s".to_string(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("generating the root CA: {0}")]
    Generate(rcgen::Error),
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("{field} {value:?} is not a DNS label (1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit)")]
    Name { field: &'static str, value: String },
    #[error("invalid CSR: {0}")]
    Csr(String),
    #[error("the CA certificate has expired")]
    CaExpired,
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
}

/// A certificate just issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub spiffe_id: String,
    /// PEM: the leaf, then the intermediates up to (not including) the root.
    pub cert_chain_pem: String,
    pub not_after_unix: i64,
    /// Hex, for logs.
    pub serial: String,
}

/// The signing CA, its chain and the trust bundle.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// No leaf outlives a certificate of its chain.
    chain_not_after: i64,
    /// PEM of what follows the leaf in an issued chain: the signing CA when
    /// it is an intermediate, and the intermediates above it.
    chain_pem: String,
    trust_bundle_pem: String,
    settings: Settings,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("settings", &self.settings)
            .field("chain_not_after", &self.chain_not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the root kept in `dir`, or generates one and keeps it there
    /// (the key written with mode 0600). `root.pem` is written last, so a
    /// crash mid-way leaves no half CA behind: it is generated again.
    pub fn open_or_create(dir: &Path, settings: Settings) -> Result<Ca, CaError> {
        settings.check()?;
        let (cert_path, key_path) = (dir.join(ROOT_FILE), dir.join(ROOT_KEY_FILE));
        // Half a CA is damage, not a first start: a fresh root would
        // silently split the mesh (every proxy's certificate stops
        // verifying), so the operator decides.
        match (cert_path.exists(), key_path.exists()) {
            (true, false) | (false, true) => {
                let (present, missing) = if cert_path.exists() {
                    (&cert_path, &key_path)
                } else {
                    (&key_path, &cert_path)
                };
                return Err(CaError::Config(format!(
                    "{} is there but {} is missing: the CA is incomplete. Restore the missing file (a backup of the data directory), or remove {} to start a new CA (every workload certificate of the old one stops verifying)",
                    present.display(),
                    missing.display(),
                    present.display()
                )));
            }
            _ => {}
        }
        if !cert_path.exists() {
            create_new_root(dir)?;
            info!(path = %cert_path.display(), "generated the root CA");
        }
        warn_if_readable_by_others(&key_path);
        Ca::from_files(&cert_path, &key_path, None, settings)
    }

    /// Loads an operator's CA: `cert` signs leaves with `key`; when it is an
    /// intermediate, `chain` holds the certificates above it up to and
    /// including the root (more roots there join the trust bundle).
    pub fn from_files(
        cert: &Path,
        key: &Path,
        chain: Option<&Path>,
        settings: Settings,
    ) -> Result<Ca, CaError> {
        settings.check()?;
        let mut ders = read_certs(cert)?;
        let chain_start = ders.len();
        if let Some(c) = chain {
            ders.extend(read_certs(c)?);
        }
        let key_pem = std::fs::read_to_string(key).map_err(|e| io(key, e))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key, e))?;
        let from = |i: usize| -> PathBuf {
            match chain {
                Some(c) if i >= chain_start => c.to_path_buf(),
                _ => cert.to_path_buf(),
            }
        };
        assemble(ders, key_pair, settings, &from)
    }

    /// A CA held as PEM text rather than in files (a root kept in etcd);
    /// `source` says where, in errors.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        source: &str,
        settings: Settings,
    ) -> Result<Ca, CaError> {
        settings.check()?;
        let at = Path::new(source);
        let ders = parse_certs(at, cert_pem.as_bytes())?;
        let key_pair = KeyPair::from_pem(key_pem).map_err(|e| invalid(at, e))?;
        assemble(ders, key_pair, settings, &|_| at.to_path_buf())
    }

    /// A new root CA: its certificate and its key, as PEM.
    pub fn generate_root_pem() -> Result<(String, String), CaError> {
        generate_root()
    }

    /// Signs the public key of `csr_pem` for `namespace`/`service_account`.
    pub fn issue(
        &self,
        csr_pem: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Issued, IssueError> {
        check_label("namespace", namespace)?;
        check_label("service_account", service_account)?;
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(IssueError::Csr(format!(
                "larger than {MAX_CSR_BYTES} bytes"
            )));
        }
        // Parsing checks the CSR's signature: the caller holds the key.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IssueError::Csr(e.to_string()))?;
        let spiffe_id = self.spiffe_id(namespace, service_account);

        let now = unix_now();
        let lifetime = i64::try_from(self.settings.lifetime.as_secs()).unwrap_or(i64::MAX);
        let not_after = now.saturating_add(lifetime).min(self.chain_not_after);
        if not_after <= now {
            return Err(IssueError::CaExpired);
        }
        let mut params = CertificateParams::default();
        // An empty subject: the SPIFFE ID is the name (the SAN is then critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id
                .clone()
                .try_into()
                .map_err(|e: rcgen::Error| IssueError::Csr(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = datetime(now - BACKDATE_SECS);
        params.not_after = datetime(not_after);
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(IssueError::Sign)?;
        Ok(Issued {
            spiffe_id,
            cert_chain_pem: leaf.pem() + &self.chain_pem,
            not_after_unix: not_after,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// A serving certificate for the control plane itself (gRPC over TLS):
    /// DNS and IP names, server auth only, valid for `lifetime` (or until
    /// the CA's chain ends). Returns (chain PEM, key PEM).
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        lifetime: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "remora-control");
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for n in dns_names {
            sans.push(SanType::DnsName(
                n.clone().try_into().map_err(CaError::Generate)?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = unix_now();
        let secs = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        params.not_before = datetime(now - BACKDATE_SECS);
        params.not_after = datetime(now.saturating_add(secs).min(self.chain_not_after));
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        Ok((cert.pem() + &self.chain_pem, key.serialize_pem()))
    }

    /// PEM of every root trusted now.
    /// Publishes more roots (PEM, each self-signed) in the trust bundle, next
    /// to the CA's own: how a root rotation starts (old and new trusted
    /// together) and ends (the old root kept until its leaves expire).
    pub fn with_extra_roots(mut self, path: &Path) -> Result<Ca, CaError> {
        for der in read_certs(path)? {
            let (_, cert) = X509Certificate::from_der(&der).map_err(|e| invalid(path, e))?;
            if !self_signed(&cert) {
                return Err(invalid(
                    path,
                    format!("{:?} is not a self-signed root", cert.subject().to_string()),
                ));
            }
            let pem = encode_pem(&der);
            if !self.trust_bundle_pem.contains(&pem) {
                info!(subject = %cert.subject(), "extra root joins the trust bundle");
                self.trust_bundle_pem.push_str(&pem);
            }
        }
        Ok(self)
    }

    pub fn trust_bundle_pem(&self) -> &str {
        &self.trust_bundle_pem
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The SPIFFE ID this CA gives `namespace`/`service_account`.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.settings.trust_domain
        )
    }
}

/// Checks the signing certificate (first of `ders`) against its key, walks
/// from it to a root through the rest, and builds the CA.
fn assemble(
    ders: Vec<Vec<u8>>,
    key: KeyPair,
    settings: Settings,
    from: &dyn Fn(usize) -> PathBuf,
) -> Result<Ca, CaError> {
    let mut certs = Vec::with_capacity(ders.len());
    for (i, der) in ders.iter().enumerate() {
        let (_, c) = X509Certificate::from_der(der).map_err(|e| invalid(&from(i), e))?;
        certs.push(c);
    }
    let Some(signer) = certs.first() else {
        return Err(invalid(&from(0), "no certificate"));
    };
    let bad = |m: &str| invalid(&from(0), m);
    if !signer.is_ca() {
        return Err(bad("not a CA certificate (basicConstraints CA:true)"));
    }
    if let Ok(Some(ku)) = signer.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(bad("its key usage does not allow signing certificates"));
        }
    }
    if key.public_key_raw() != &*signer.public_key().subject_public_key.data {
        return Err(bad("the key does not belong to this certificate"));
    }

    // From the signer up to a root, each certificate signed by the next.
    let mut path = vec![0];
    let mut cur = 0;
    while !self_signed(&certs[cur]) {
        let next = (1..certs.len()).find(|&i| {
            !path.contains(&i)
                && certs[i].subject().as_raw() == certs[cur].issuer().as_raw()
                && certs[cur]
                    .verify_signature(Some(certs[i].public_key()))
                    .is_ok()
        });
        let Some(next) = next else {
            return Err(invalid(
                &from(cur),
                format!(
                    "no certificate here or in --ca-chain issued {:?}: give the chain up to the root",
                    certs[cur].subject().to_string()
                ),
            ));
        };
        path.push(next);
        cur = next;
    }
    let root = cur;
    for (i, c) in certs.iter().enumerate().skip(1) {
        if !path.contains(&i) && !self_signed(c) {
            return Err(invalid(
                &from(i),
                format!(
                    "{:?} is not on the path from the CA certificate to its root",
                    c.subject().to_string()
                ),
            ));
        }
    }
    let now = unix_now();
    let mut chain_not_after = i64::MAX;
    for &i in &path {
        let v = certs[i].validity();
        if v.not_after.timestamp() <= now {
            return Err(invalid(
                &from(i),
                format!("{:?} has expired", certs[i].subject().to_string()),
            ));
        }
        chain_not_after = chain_not_after.min(v.not_after.timestamp());
    }

    let pem_of = |i: usize| encode_pem(&ders[i]);
    let chain_pem: String = path[..path.len() - 1].iter().map(|&i| pem_of(i)).collect();
    // The path's root first, then any other roots given (a root rotation).
    let mut trust_bundle_pem = pem_of(root);
    for (i, c) in certs.iter().enumerate() {
        if i != root && self_signed(c) {
            trust_bundle_pem.push_str(&pem_of(i));
        }
    }
    let issuer = Issuer::from_ca_cert_der(&ders[0].as_slice().into(), key)
        .map_err(|e| bad(&e.to_string()))?;
    info!(
        subject = %signer.subject(),
        intermediate = path.len() > 1,
        trust_domain = %settings.trust_domain,
        lifetime = ?settings.lifetime,
        "CA loaded"
    );
    Ok(Ca {
        issuer,
        chain_not_after,
        chain_pem,
        trust_bundle_pem,
        settings,
    })
}

fn generate_root() -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "remora");
    dn.push(DnType::CommonName, "remora root CA");
    params.distinguished_name = dn;
    // Signs leaves directly: no intermediates below it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = unix_now();
    params.not_before = datetime(now - 3600);
    params.not_after = datetime(now + ROOT_VALIDITY_SECS);
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Checks a Kubernetes-style name: an RFC 1123 DNS label.
pub fn check_label(field: &'static str, value: &str) -> Result<(), IssueError> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(IssueError::Name {
            field,
            value: value.chars().take(100).collect(),
        })
    }
}

fn self_signed(c: &X509Certificate<'_>) -> bool {
    c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
}

/// 16 random bytes, positive as a DER integer.
fn random_serial() -> [u8; 16] {
    let mut s = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut s).is_err() {
        // Practically unreachable; still unique enough for our own CA.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        s = t.to_be_bytes();
    }
    s[0] &= 0x7f;
    s[0] |= 0x01;
    s
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn datetime(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn encode_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Every CERTIFICATE block of a PEM file, as DER.
fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    parse_certs(path, &bytes)
}

/// Every CERTIFICATE block of PEM text read from `path`, as DER.
fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<Vec<u8>>, CaError> {
    let blocks = pem::parse_many(bytes).map_err(|e| invalid(path, e))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(invalid(path, "no PEM CERTIFICATE in the file"));
    }
    Ok(certs)
}

fn io(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, message: impl ToString) -> CaError {
    CaError::Invalid {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Generates a root into `dir` all at once: both files are written in a
/// staging directory that then takes `dir`'s place, so a crash leaves
/// either no CA (and the next start makes one) or a whole one.
fn create_new_root(dir: &Path) -> Result<(), CaError> {
    let staging = dir.with_extension("new");
    let _ = std::fs::remove_dir_all(&staging);
    create_dir_private(&staging).map_err(|e| io(&staging, e))?;
    let (cert_pem, key_pem) = generate_root()?;
    write_atomic(&staging, ROOT_KEY_FILE, key_pem.as_bytes(), 0o600)
        .map_err(|e| io(&staging, e))?;
    write_atomic(&staging, ROOT_FILE, cert_pem.as_bytes(), 0o644).map_err(|e| io(&staging, e))?;
    // An empty directory (made by hand, or a mount point) gives way.
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| io(dir, e))?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(parent, e))?;
    }
    Ok(())
}

fn create_dir_private(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Writes `dir/name` through a temp file created with `mode`, fsynced and
/// renamed, then fsyncs the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

fn warn_if_readable_by_others(key: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(key) {
            if m.permissions().mode() & 0o077 != 0 {
                warn!(path = %key.display(), mode = format!("{:o}", m.permissions().mode() & 0o777),
                    "the CA key is readable by other users");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = key;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::CertifiedIssuer;
    use x509_parser::extensions::GeneralName;

    fn settings(lifetime: u64) -> Settings {
        Settings {
            trust_domain: "mesh.test".into(),
            lifetime: Duration::from_secs(lifetime),
        }
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("remora-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A CSR from a fresh key that asks for names the CA must not grant.
    fn greedy_csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            "spiffe://other.domain/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    fn ders(pem_text: &str) -> Vec<Vec<u8>> {
        pem::parse_many(pem_text)
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect()
    }

    fn ca_params(not_after: i64) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.not_before = datetime(unix_now() - 60);
        p.not_after = datetime(not_after);
        p
    }

    #[test]
    fn half_a_ca_is_an_error_never_a_new_root() {
        let dir = temp("half");
        let first = Ca::open_or_create(&dir, settings(3600)).unwrap();
        let root = std::fs::read(dir.join(ROOT_FILE)).unwrap();
        drop(first);
        for (gone, kept) in [(ROOT_FILE, ROOT_KEY_FILE), (ROOT_KEY_FILE, ROOT_FILE)] {
            let saved = std::fs::read(dir.join(gone)).unwrap();
            std::fs::remove_file(dir.join(gone)).unwrap();
            let err = Ca::open_or_create(&dir, settings(3600))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(gone) && err.contains(kept), "{err}");
            assert!(err.contains("is missing"), "{err}");
            assert!(!dir.join(gone).exists(), "nothing was generated");
            std::fs::write(dir.join(gone), saved).unwrap();
        }
        Ca::open_or_create(&dir, settings(3600)).unwrap();
        assert_eq!(std::fs::read(dir.join(ROOT_FILE)).unwrap(), root);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn leaf_has_only_the_spiffe_id_and_the_requested_lifetime() {
        let dir = temp("leaf");
        let ca = Ca::open_or_create(&dir, settings(3600)).unwrap();
        let (key, csr) = greedy_csr();
        let issued = ca.issue(&csr, "shop", "api").unwrap();
        assert_eq!(issued.spiffe_id, "spiffe://mesh.test/ns/shop/sa/api");

        // Self-issued root: the chain is the leaf alone, the bundle the root.
        let chain = ders(&issued.cert_chain_pem);
        assert_eq!(chain.len(), 1);
        let roots = ders(ca.trust_bundle_pem());
        assert_eq!(roots.len(), 1);
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let (_, root) = X509Certificate::from_der(&roots[0]).unwrap();

        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "an empty subject makes the SAN critical");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://mesh.test/ns/shop/sa/api")]
        );
        let bc = leaf.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca, "asked to be a CA, must not be one");
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);

        let now = unix_now();
        let not_after = leaf.validity().not_after.timestamp();
        assert_eq!(not_after, issued.not_after_unix);
        assert!(
            (now + 3598..=now + 3600).contains(&not_after),
            "{not_after} vs {now}"
        );
        assert_eq!(
            leaf.validity().not_before.timestamp(),
            not_after - 3600 - BACKDATE_SECS
        );

        assert_eq!(
            &*leaf.public_key().subject_public_key.data,
            key.public_key_raw(),
            "the CSR's key is certified"
        );
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn generated_root_survives_a_restart_and_its_key_is_private() {
        let dir = temp("persist");
        let first = Ca::open_or_create(&dir, settings(60)).unwrap();
        let again = Ca::open_or_create(&dir, settings(60)).unwrap();
        assert_eq!(first.trust_bundle_pem(), again.trust_bundle_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(ROOT_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Leaves of the restarted CA chain to the first root.
        let (_, csr) = greedy_csr();
        let issued = again.issue(&csr, "default", "default").unwrap();
        let (leaf_der, root_der) = (
            &ders(&issued.cert_chain_pem)[0],
            &ders(first.trust_bundle_pem())[0],
        );
        let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
        let (_, root) = X509Certificate::from_der(root_der).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();

        // A staging directory left by a crash during a first start is
        // not a CA: the next start makes one in its place.
        let fresh_dir = temp("persist-staging");
        let ca_dir = fresh_dir.join("ca");
        std::fs::create_dir_all(ca_dir.with_extension("new")).unwrap();
        std::fs::write(ca_dir.with_extension("new").join(ROOT_KEY_FILE), "junk").unwrap();
        let fresh = Ca::open_or_create(&ca_dir, settings(60)).unwrap();
        assert_ne!(fresh.trust_bundle_pem(), first.trust_bundle_pem());
        assert!(!ca_dir.with_extension("new").exists());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&fresh_dir);
    }

    #[test]
    fn intermediate_signs_and_the_chain_goes_with_the_leaf() {
        let dir = temp("chain");
        let now = unix_now();
        let root =
            CertifiedIssuer::self_signed(ca_params(now + 86_400), KeyPair::generate().unwrap())
                .unwrap();
        let int_key = KeyPair::generate().unwrap();
        let mut int_params = ca_params(now + 100);
        int_params
            .distinguished_name
            .push(DnType::CommonName, "intermediate");
        let int = int_params.signed_by(&int_key, &root).unwrap();
        std::fs::write(dir.join("int.pem"), int.pem()).unwrap();
        std::fs::write(dir.join("int-key.pem"), int_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("root.pem"), root.pem()).unwrap();

        let ca = Ca::from_files(
            &dir.join("int.pem"),
            &dir.join("int-key.pem"),
            Some(&dir.join("root.pem")),
            settings(3600),
        )
        .unwrap();
        let (_, csr) = greedy_csr();
        let issued = ca.issue(&csr, "shop", "api").unwrap();
        let chain = ders(&issued.cert_chain_pem);
        assert_eq!(chain.len(), 2, "leaf then intermediate");
        assert_eq!(chain[1], int.der().to_vec());
        assert_eq!(ders(ca.trust_bundle_pem()), vec![root.der().to_vec()]);
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let (_, int_x) = X509Certificate::from_der(&chain[1]).unwrap();
        leaf.verify_signature(Some(int_x.public_key())).unwrap();
        // No leaf outlives its intermediate.
        assert_eq!(issued.not_after_unix, now + 100);

        // A chain file holding a certificate that leads nowhere.
        let stray_root =
            CertifiedIssuer::self_signed(ca_params(now + 86_400), KeyPair::generate().unwrap())
                .unwrap();
        let stray = ca_params(now + 86_400)
            .signed_by(&KeyPair::generate().unwrap(), &stray_root)
            .unwrap();
        std::fs::write(dir.join("chain.pem"), root.pem() + &stray.pem()).unwrap();
        let err = Ca::from_files(
            &dir.join("int.pem"),
            &dir.join("int-key.pem"),
            Some(&dir.join("chain.pem")),
            settings(60),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not on the path"), "{err}");
        // An intermediate alone has no root to trust.
        let err = Ca::from_files(
            &dir.join("int.pem"),
            &dir.join("int-key.pem"),
            None,
            settings(60),
        )
        .unwrap_err();
        assert!(err.to_string().contains("up to the root"), "{err}");
        // A key that is not the certificate's.
        std::fs::write(
            dir.join("other-key.pem"),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let err = Ca::from_files(
            &dir.join("root.pem"),
            &dir.join("other-key.pem"),
            None,
            settings(60),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_names_and_bad_csrs_are_refused() {
        let dir = temp("refuse");
        let ca = Ca::open_or_create(&dir, settings(60)).unwrap();
        let (_, csr) = greedy_csr();
        for (ns, sa) in [
            ("", "api"),
            ("Shop", "api"),
            ("shop", "-api"),
            ("shop", "a/b"),
            ("shop", &"a".repeat(64)),
        ] {
            assert!(
                matches!(ca.issue(&csr, ns, sa), Err(IssueError::Name { .. })),
                "{ns:?}/{sa:?}"
            );
        }
        assert!(matches!(
            ca.issue("not a csr", "shop", "api"),
            Err(IssueError::Csr(_))
        ));
        // A CSR whose signature does not match its key: no proof of possession.
        let mut tampered = ders(&csr).remove(0);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", tampered));
        assert!(matches!(
            ca.issue(&tampered, "shop", "api"),
            Err(IssueError::Csr(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn settings_are_checked() {
        assert!(settings(1).check().is_ok());
        assert!(settings(0).check().is_err());
        for td in ["", "Cluster.local", "a/b", "spiffe://x"] {
            let s = Settings {
                trust_domain: td.into(),
                lifetime: Duration::from_secs(60),
            };
            assert!(s.check().is_err(), "{td:?}");
        }
    }
}
