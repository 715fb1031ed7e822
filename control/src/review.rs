//! Who may hold which identity. A proxy without a certificate proves who it
//! is with a bootstrap credential; a `TokenReviewer` decides whether that
//! credential entitles it to the identity it claims. Renewals are
//! authenticated by the current certificate, and the reviewer then only
//! says whether the identity is still granted (a revoked one is not).
//!
//! - `TokenFileReviewer` (`--bootstrap-tokens`): one token per identity,
//!   stored as a SHA-256 hash, re-read when the file changes. A token never
//!   yields any other identity.
//! - `kube::KubernetesReviewer` (`--kubernetes-token-review`): the pod's
//!   projected service-account token, checked with the TokenReview API.
//! - `SharedTokenReviewer` (`--insecure-shared-bootstrap-token-file`): one
//!   token for every identity. Whoever holds it may claim any identity, so
//!   it is never a default and its flag says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tracing::{info, warn};

/// The identity a caller asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
}

impl std::fmt::Display for Workload<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The credential does not entitle its bearer to the identity.
    #[error("{0}")]
    Denied(String),
    /// The credential could not be checked (the reviewer's backend failed).
    #[error("{0}")]
    Unavailable(String),
}

/// Decides whether a bootstrap credential entitles its bearer to an
/// identity.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    /// Ok when `token` proves `claimed`.
    async fn review(&self, token: &str, claimed: Workload<'_>) -> Result<(), ReviewError>;

    /// For a renewal authenticated by a certificate of `workload`: Ok while
    /// the identity is still granted.
    async fn still_granted(&self, workload: Workload<'_>) -> Result<(), ReviewError>;

    /// What kind of credential this is, for logs.
    fn kind(&self) -> &'static str;
}

/// Compares two secrets in constant time. Both are hashed first, so not
/// even their lengths leak through timing.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use aws_lc_rs::digest::{digest, SHA256};
    let (a, b) = (digest(&SHA256, a), digest(&SHA256, b));
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_ref(), b.as_ref()).is_ok()
}

/// `sha256:<hex>` of a token, as the tokens file stores it.
pub fn token_hash(token: &str) -> String {
    use aws_lc_rs::digest::{digest, SHA256};
    let d = digest(&SHA256, token.as_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

// ------------------------------------------------------------ per identity

/// The tokens file: one line per token, `namespace/serviceAccount
/// sha256:<hex of SHA-256 of the token>`; `#` starts a comment. Several
/// tokens may name one identity (a rotation), but one token names one
/// identity only.
pub struct TokenFileReviewer {
    inner: Arc<TokenFile>,
}

struct TokenFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

struct Loaded {
    /// What the file looked like when read: (modified, length).
    stamp: Option<(SystemTime, u64)>,
    /// Token hash → `namespace/serviceAccount`.
    tokens: HashMap<String, String>,
}

/// Most lines a tokens file may hold (a bound on memory and parse time).
const MAX_TOKENS: usize = 100_000;

/// Parses a tokens file; errors name the line.
pub fn parse_tokens(text: &str, origin: &str) -> Result<HashMap<String, String>, String> {
    let mut tokens = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{origin}:{}", i + 1);
        let mut parts = line.split_whitespace();
        let (Some(identity), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "{}: expected `namespace/serviceAccount sha256:<hex>`",
                at()
            ));
        };
        let Some((ns, sa)) = identity.split_once('/') else {
            return Err(format!(
                "{}: {identity:?} is not namespace/serviceAccount",
                at()
            ));
        };
        for (field, v) in [("namespace", ns), ("service_account", sa)] {
            crate::ca::check_label(field, v).map_err(|e| format!("{}: {e}", at()))?;
        }
        let hex = hash.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{}: {hash:?} is not sha256:<64 hex digits> (the SHA-256 of the token: `printf %s TOKEN | sha256sum`)",
                at()
            ));
        }
        let hash = format!("sha256:{}", hex.to_ascii_lowercase());
        match tokens.get(&hash) {
            Some(other) if other != identity => {
                return Err(format!(
                    "{}: this token already belongs to {other}: a token names one identity",
                    at()
                ))
            }
            _ => {
                tokens.insert(hash, identity.to_string());
            }
        }
        if tokens.len() > MAX_TOKENS {
            return Err(format!("{origin}: more than {MAX_TOKENS} tokens"));
        }
    }
    Ok(tokens)
}

impl TokenFileReviewer {
    /// Reads the file now, so a bad one fails at start.
    pub fn open(path: &Path) -> Result<TokenFileReviewer, String> {
        let inner = Arc::new(TokenFile {
            path: path.to_path_buf(),
            loaded: Mutex::new(Loaded {
                stamp: None,
                tokens: HashMap::new(),
            }),
        });
        inner.refresh()?;
        Ok(TokenFileReviewer { inner })
    }

    /// The tokens as the file holds them now (a stat per review, on the
    /// blocking pool; a read only when it changed).
    async fn current(&self) -> Result<std::sync::MutexGuard<'_, Loaded>, ReviewError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.refresh())
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?
            .map_err(ReviewError::Unavailable)?;
        Ok(self.inner.loaded.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl TokenFile {
    /// Re-reads the file when it changed. A file that stopped parsing keeps
    /// the last good tokens (logged): an edit in progress never locks the
    /// whole mesh out.
    fn refresh(&self) -> Result<(), String> {
        let origin = self.path.display().to_string();
        let meta = std::fs::metadata(&self.path).map_err(|e| format!("{origin}: {e}"))?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if self.loaded.lock().unwrap_or_else(|e| e.into_inner()).stamp == Some(stamp) {
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| format!("{origin}: {e}"))?;
        let parsed = parse_tokens(&text, &origin);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        match parsed {
            Ok(tokens) => {
                info!(path = %origin, tokens = tokens.len(), "bootstrap tokens loaded");
                *loaded = Loaded {
                    stamp: Some(stamp),
                    tokens,
                };
                Ok(())
            }
            Err(e) if loaded.stamp.is_some() => {
                warn!(error = %e, "the bootstrap tokens file does not parse; keeping the tokens read before");
                loaded.stamp = Some(stamp);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[tonic::async_trait]
impl TokenReviewer for TokenFileReviewer {
    async fn review(&self, token: &str, claimed: Workload<'_>) -> Result<(), ReviewError> {
        if token.is_empty() {
            return Err(ReviewError::Denied("no bootstrap token".into()));
        }
        let hash = token_hash(token);
        let loaded = self.current().await?;
        match loaded.tokens.get(&hash) {
            Some(id) if *id == claimed.to_string() => Ok(()),
            Some(id) => Err(ReviewError::Denied(format!(
                "this token is for {id}, not {claimed}"
            ))),
            None => Err(ReviewError::Denied("bootstrap token not accepted".into())),
        }
    }

    async fn still_granted(&self, workload: Workload<'_>) -> Result<(), ReviewError> {
        let id = workload.to_string();
        let loaded = self.current().await?;
        if loaded.tokens.values().any(|v| *v == id) {
            Ok(())
        } else {
            Err(ReviewError::Denied(format!(
                "{workload} has no bootstrap token any more: its identity was revoked"
            )))
        }
    }

    fn kind(&self) -> &'static str {
        "bootstrap token"
    }
}

// ------------------------------------------------------------ shared

/// One token for every workload, kept in a file read on each review.
/// Insecure: whoever holds the token may claim any identity.
#[derive(Debug)]
pub struct SharedTokenReviewer {
    path: PathBuf,
}

impl SharedTokenReviewer {
    /// Checks now that the file holds a token, so a typo fails at start.
    pub fn open(path: &Path) -> Result<SharedTokenReviewer, String> {
        let token = read_token(path)?;
        if token.is_empty() {
            return Err(format!(
                "{}: the bootstrap token file is empty",
                path.display()
            ));
        }
        Ok(SharedTokenReviewer {
            path: path.to_path_buf(),
        })
    }
}

/// The file's contents without surrounding whitespace (a final newline).
fn read_token(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[tonic::async_trait]
impl TokenReviewer for SharedTokenReviewer {
    async fn review(&self, token: &str, _: Workload<'_>) -> Result<(), ReviewError> {
        let path = self.path.clone();
        let expected = tokio::task::spawn_blocking(move || read_token(&path))
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?
            .map_err(ReviewError::Unavailable)?;
        if token.is_empty() {
            return Err(ReviewError::Denied("no bootstrap token".into()));
        }
        if expected.is_empty() || !same_secret(token.as_bytes(), expected.as_bytes()) {
            return Err(ReviewError::Denied("bootstrap token not accepted".into()));
        }
        Ok(())
    }

    async fn still_granted(&self, _: Workload<'_>) -> Result<(), ReviewError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "shared bootstrap token (insecure)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("remora-review-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const API: Workload<'static> = Workload {
        namespace: "shop",
        service_account: "api",
    };
    const WEB: Workload<'static> = Workload {
        namespace: "shop",
        service_account: "web",
    };

    /// Rewrites a file so its stamp surely changes (length differs, or a
    /// later mtime).
    fn rewrite(path: &Path, text: &str) {
        let before = std::fs::metadata(path).ok();
        std::fs::write(path, text).unwrap();
        if let Some(b) = before {
            if b.len() == text.len() as u64 {
                let later = b.modified().unwrap() + std::time::Duration::from_secs(2);
                std::fs::File::options()
                    .write(true)
                    .open(path)
                    .unwrap()
                    .set_modified(later)
                    .unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_token_proves_its_own_identity_only_and_revocation_applies() {
        let dir = temp("tokens");
        let path = dir.join("tokens");
        let text = format!(
            "# identities\nshop/api {}\nshop/api {}  # rotation\nshop/web {}\n",
            token_hash("api-1"),
            token_hash("api-2"),
            token_hash("web-1")
        );
        std::fs::write(&path, &text).unwrap();
        let r = TokenFileReviewer::open(&path).unwrap();
        assert!(r.review("api-1", API).await.is_ok());
        assert!(r.review("api-2", API).await.is_ok());
        assert!(r.review("web-1", WEB).await.is_ok());
        let err = r.review("api-1", WEB).await.unwrap_err().to_string();
        assert_eq!(err, "this token is for shop/api, not shop/web");
        for wrong in ["", "api-3", "API-1"] {
            assert!(matches!(
                r.review(wrong, API).await,
                Err(ReviewError::Denied(_))
            ));
        }
        assert!(r.still_granted(API).await.is_ok());

        // Revoking web's only token: web is no longer granted; api is.
        rewrite(
            &path,
            &text.replace(&format!("shop/web {}\n", token_hash("web-1")), ""),
        );
        assert!(matches!(
            r.review("web-1", WEB).await,
            Err(ReviewError::Denied(_))
        ));
        let err = r.still_granted(WEB).await.unwrap_err().to_string();
        assert!(err.contains("revoked"), "{err}");
        assert!(r.still_granted(API).await.is_ok());

        // A broken edit keeps what was there; a missing file is an outage.
        rewrite(&path, "shop/api not-a-hash\n");
        assert!(r.review("api-1", API).await.is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            r.review("api-1", API).await,
            Err(ReviewError::Unavailable(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tokens_file_is_checked_line_by_line() {
        let h = token_hash("t");
        assert!(parse_tokens(&format!("a/b {h}\n\n# x\n"), "f").is_ok());
        let err = |text: &str| parse_tokens(text, "f").unwrap_err();
        assert!(err("a/b").contains("f:1: expected"));
        assert!(err(&format!("ab {h}")).contains("not namespace/serviceAccount"));
        assert!(err(&format!("A/b {h}")).contains("namespace"));
        assert!(err("a/b sha256:zz").contains("64 hex digits"));
        assert!(err(&format!("a/b {h} extra")).contains("expected"));
        let twice = err(&format!("a/b {h}\nc/d {h}\n"));
        assert!(
            twice.contains("f:2: this token already belongs to a/b"),
            "{twice}"
        );
        assert!(parse_tokens(&format!("a/b {h}\na/b {h}\n"), "f").is_ok());
        assert!(TokenFileReviewer::open(Path::new("/nonexistent/tokens")).is_err());
    }

    #[tokio::test]
    async fn shared_token_is_compared_exactly_and_reread() {
        let dir = temp("shared");
        let path = dir.join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let r = SharedTokenReviewer::open(&path).unwrap();
        assert!(r.review("s3cret", API).await.is_ok());
        for wrong in ["", "s3cre", "s3cret2", "S3CRET", "s3cret\n"] {
            assert!(
                matches!(r.review(wrong, API).await, Err(ReviewError::Denied(_))),
                "{wrong:?}"
            );
        }
        std::fs::write(&path, "n3w").unwrap();
        assert!(r.review("s3cret", API).await.is_err());
        assert!(r.review("n3w", API).await.is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            r.review("n3w", API).await,
            Err(ReviewError::Unavailable(_))
        ));
        std::fs::write(&path, " \n").unwrap();
        assert!(SharedTokenReviewer::open(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
