//! Who may call the admin port's privileged endpoints: `/config` (the
//! running config: routes, backends, policies) and `POST /shutdown`. A
//! client on loopback (the pod's own containers) may; anyone else must
//! present the admin token. Probes and metrics stay open to all.

use http::{header, HeaderMap};
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use tracing::warn;

/// A token file larger than this is a mistake (or /dev/zero), not a token.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// The admin token's file (`--admin-token-file`), read at each check so
/// that replacing the file rotates the token.
#[derive(Clone, Debug, Default)]
pub struct AdminAccess {
    token_file: Option<PathBuf>,
}

/// How a privileged call was let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granted {
    Loopback,
    Token,
}

/// Why a privileged call was refused; its text is the 403's one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("only loopback may call this: no admin token is configured (--admin-token-file)")]
    NoTokenConfigured,
    /// Empty or unreadable: never taken as "no token needed".
    #[error("the admin token cannot be checked: its file is empty or unreadable")]
    TokenUnavailable,
    #[error("not on loopback: send Authorization: Bearer <admin token>")]
    NoToken,
    #[error("wrong admin token")]
    WrongToken,
}

impl AdminAccess {
    pub fn new(token_file: Option<PathBuf>) -> AdminAccess {
        AdminAccess { token_file }
    }

    /// Whether a client at `peer` sending `headers` may call a privileged
    /// endpoint.
    pub fn check(&self, peer: IpAddr, headers: &HeaderMap) -> Result<Granted, Refusal> {
        // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d.
        if peer.to_canonical().is_loopback() {
            return Ok(Granted::Loopback);
        }
        let want = self.token()?;
        let got = bearer(headers).ok_or(Refusal::NoToken)?;
        if same_secret(got.as_bytes(), want.as_bytes()) {
            Ok(Granted::Token)
        } else {
            Err(Refusal::WrongToken)
        }
    }

    /// Checks the token file once at start, so a mistake shows in the logs
    /// before the first refused call.
    pub fn warn_if_unusable(&self) {
        let _ = self.token();
    }

    /// The expected token, read from its file now.
    fn token(&self) -> Result<String, Refusal> {
        let path = self.token_file.as_ref().ok_or(Refusal::NoTokenConfigured)?;
        let mut text = String::new();
        let read = std::fs::File::open(path)
            .and_then(|f| f.take(MAX_TOKEN_FILE_BYTES + 1).read_to_string(&mut text));
        let problem = match read {
            Err(e) => e.to_string(),
            Ok(n) if n as u64 > MAX_TOKEN_FILE_BYTES => {
                format!("larger than {MAX_TOKEN_FILE_BYTES} bytes")
            }
            Ok(_) if text.trim().is_empty() => "empty".to_string(),
            Ok(_) => return Ok(text.trim().to_string()),
        };
        warn!(
            path = %path.display(),
            problem,
            "admin token file unusable: /config and /shutdown answer only on loopback"
        );
        Err(Refusal::TokenUnavailable)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares two secrets in time that does not depend on where they differ:
/// both are hashed first (so their lengths do not matter either), then the
/// digests are compared without an early exit.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (Some(a), Some(b)) = (sha256(a), sha256(b)) else {
        return false;
    };
    let diff = a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// SHA-256 from the crypto provider rustls already carries (aws-lc-rs),
/// which exposes its hash only through a cipher suite that uses it.
fn sha256(data: &[u8]) -> Option<[u8; 32]> {
    use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    use rustls::crypto::hash::HashAlgorithm;
    let hash = TLS13_AES_128_GCM_SHA256.tls13()?.common.hash_provider;
    if hash.algorithm() != HashAlgorithm::SHA256 {
        return None;
    }
    hash.hash(data).as_ref().try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn token_file(tag: &str, contents: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("remora-admin-token-{tag}-{}", std::process::id()));
        std::fs::write(&p, contents).unwrap();
        p
    }

    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));

    #[test]
    fn sha256_is_sha256() {
        let d = sha256(b"abc").unwrap();
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(!same_secret(b"s3cret", b"s3cret-and-more"));
        assert!(!same_secret(b"", b"x"));
    }

    #[test]
    fn loopback_needs_no_token() {
        let access = AdminAccess::new(None);
        for ip in ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                access.check(ip, &HeaderMap::new()),
                Ok(Granted::Loopback),
                "{ip}"
            );
        }
    }

    #[test]
    fn without_a_token_file_only_loopback_may_call() {
        let access = AdminAccess::new(None);
        assert_eq!(
            access.check(REMOTE, &with_auth("Bearer anything")),
            Err(Refusal::NoTokenConfigured)
        );
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(
            access.check(mapped, &HeaderMap::new()),
            Err(Refusal::NoTokenConfigured)
        );
    }

    #[test]
    fn the_token_from_the_file_lets_a_remote_client_in() {
        let path = token_file("right", "tok-1\n");
        let access = AdminAccess::new(Some(path.clone()));
        assert_eq!(
            access.check(REMOTE, &with_auth("Bearer tok-1")),
            Ok(Granted::Token)
        );
        assert_eq!(
            access.check(REMOTE, &with_auth("bearer  tok-1 ")),
            Ok(Granted::Token)
        );
        assert_eq!(
            access.check(REMOTE, &with_auth("Bearer tok-2")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            access.check(REMOTE, &with_auth("Basic tok-1")),
            Err(Refusal::NoToken)
        );
        assert_eq!(
            access.check(REMOTE, &with_auth("Bearer ")),
            Err(Refusal::NoToken)
        );
        assert_eq!(
            access.check(REMOTE, &HeaderMap::new()),
            Err(Refusal::NoToken)
        );
        // Read at each call: replacing the file rotates the token.
        std::fs::write(&path, "tok-2").unwrap();
        assert_eq!(
            access.check(REMOTE, &with_auth("Bearer tok-1")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            access.check(REMOTE, &with_auth("Bearer tok-2")),
            Ok(Granted::Token)
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn an_empty_unreadable_or_huge_token_file_refuses_every_remote_call() {
        let empty = token_file("empty", " \n");
        let huge = token_file("huge", &"x".repeat(MAX_TOKEN_FILE_BYTES as usize + 1));
        let missing = std::env::temp_dir().join("remora-admin-token-does-not-exist");
        for path in [&empty, &huge, &missing] {
            let access = AdminAccess::new(Some(path.clone()));
            for auth in ["Bearer ", "Bearer x", "Bearer  "] {
                assert_eq!(
                    access.check(REMOTE, &with_auth(auth)),
                    Err(Refusal::TokenUnavailable),
                    "{path:?} {auth:?}"
                );
            }
            assert_eq!(
                access.check(REMOTE, &HeaderMap::new()),
                Err(Refusal::TokenUnavailable)
            );
            // Loopback is still served.
            let lo = IpAddr::from([127, 0, 0, 1]);
            assert_eq!(access.check(lo, &HeaderMap::new()), Ok(Granted::Loopback));
        }
        let _ = std::fs::remove_file(empty);
        let _ = std::fs::remove_file(huge);
    }
}
