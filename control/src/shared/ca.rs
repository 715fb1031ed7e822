//! The CA every replica issues under, when the operator gives none
//! (`--ca-cert`/`--ca-key`, e.g. from a Kubernetes Secret) with etcd: the
//! first replica to start generates a root and stores it at `ca/root` in a
//! create-only transaction; every other replica, then and later, loads
//! that one. Two replicas starting at once both generate, one wins, and
//! the other discards its own and loads the winner's: never a second root.
//!
//! The root's key is then in etcd: whoever can read `<prefix>ca/` can issue
//! any workload identity. ARCHITECTURE.md says how to protect it, and why
//! files or a Secret are the better choice in production.

use crate::ca::{Ca, CaError, Settings};
use crate::etcd::{self, Etcd, EtcdError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct StoredRoot {
    cert_pem: String,
    key_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedCaError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("{key}: not a stored CA: {message}")]
    Corrupt { key: String, message: String },
}

/// The mesh's root from etcd, made there first if there is none.
pub async fn load_or_create(
    etcd: &Etcd,
    prefix: &str,
    settings: Settings,
) -> Result<Ca, SharedCaError> {
    let key = format!("{prefix}ca/root");
    let (found, _) = etcd.get(key.as_bytes()).await?;
    let stored = match found {
        Some(kv) => kv.value,
        None => {
            let (cert_pem, key_pem) = Ca::generate_root_pem()?;
            let mine = serde_json::to_vec(&StoredRoot { cert_pem, key_pem })
                .expect("two strings serialize");
            let r = etcd
                .txn(
                    vec![etcd::absent(key.as_bytes())],
                    vec![etcd::put(key.as_bytes(), mine.clone(), 0)],
                    vec![etcd::get(key.as_bytes())],
                )
                .await?;
            if r.succeeded {
                tracing::info!(key, "generated the mesh's root CA and stored it in etcd");
                mine
            } else {
                tracing::info!(key, "another replica stored the root CA first; using it");
                etcd::range_result(&r, 0)
                    .pop()
                    .map(|kv| kv.value)
                    .unwrap_or_default()
            }
        }
    };
    let root: StoredRoot = serde_json::from_slice(&stored).map_err(|e| SharedCaError::Corrupt {
        key: key.clone(),
        message: e.to_string(),
    })?;
    Ok(Ca::from_pem(
        &root.cert_pem,
        &root.key_pem,
        &format!("etcd:{key}"),
        settings,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn replicas_starting_together_share_one_root() {
        let Some(e) = crate::etcd::testing::TestEtcd::start("shared_ca").await else {
            return;
        };
        let settings = || Settings {
            trust_domain: "cluster.local".into(),
            lifetime: Duration::from_secs(3600),
        };
        let (a, b) = (e.client(), e.client());
        let (ca_a, ca_b) = tokio::join!(
            load_or_create(&a, "/t/", settings()),
            load_or_create(&b, "/t/", settings())
        );
        let (ca_a, ca_b) = (ca_a.unwrap(), ca_b.unwrap());
        assert_eq!(ca_a.trust_bundle_pem(), ca_b.trust_bundle_pem());
        let later = load_or_create(&e.client(), "/t/", settings())
            .await
            .unwrap();
        assert_eq!(later.trust_bundle_pem(), ca_a.trust_bundle_pem());
        // Another mesh (prefix), another root.
        let other = load_or_create(&e.client(), "/other/", settings())
            .await
            .unwrap();
        assert_ne!(other.trust_bundle_pem(), ca_a.trust_bundle_pem());
    }
}
