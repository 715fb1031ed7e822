//! The gRPC channel to the control plane, shared by the two clients that
//! use it: `identity` (certificates) and `discovery` (config). Neither
//! depends on the other.

/// The control plane's endpoint: for an https URL, TLS verified against
/// `roots` (PEM: `--control-plane-ca`, and the mesh's current trust bundle,
/// so a root rotation carries over) and, when given, a client certificate
/// (chain PEM, key PEM).
pub fn endpoint(
    url: &str,
    roots: &[&str],
    client: Option<(&str, &str)>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let mut e = tonic::transport::Endpoint::from_shared(url.to_string())?;
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        for ca in roots {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((chain, key)) = client {
            tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
        }
        e = e.tls_config(tls)?;
    }
    Ok(e)
}
