//! The config history in etcd, shared by every control-plane replica.
//!
//! Keys, under the prefix (`--etcd-prefix`, `/remora/`):
//!
//! - `config/current`: the current version, in decimal: the compare of
//!   compare-and-swap. A commit is one transaction: if `current` still holds
//!   the version the change was based on (or is absent, for the first),
//!   write the new revision, its metadata and `current`; else nothing.
//! - `config/revisions/<version, 20 digits>`: the revision (its metadata
//!   line and the protobuf config, as the file store writes it).
//! - `config/info/<version>`: its metadata alone, for `history`.
//!
//! `follow` reports each version another replica commits, from a watch of
//! `config/current` that resumes after a broken stream and starts over
//! after a compaction (`etcd::watch`).

use super::{decode, encode, Revision, RevisionInfo, Store, StoreError};
use crate::etcd::watch::{follow, Change};
use crate::etcd::{self, Etcd, EtcdError};
use std::ops::RangeInclusive;
use tokio::sync::watch;

pub struct EtcdStore {
    etcd: Etcd,
    prefix: String,
    /// The newest version committed, as etcd's watch reports it.
    latest: watch::Receiver<u64>,
}

impl From<EtcdError> for StoreError {
    fn from(e: EtcdError) -> StoreError {
        match e {
            EtcdError::Unavailable { .. } => StoreError::Unavailable(e.to_string()),
            e => StoreError::Refused(e.to_string()),
        }
    }
}

impl EtcdStore {
    /// The store under `prefix` (ending in `/`); starts following the
    /// current version.
    pub fn open(etcd: Etcd, prefix: &str) -> EtcdStore {
        let current = format!("{prefix}config/current").into_bytes();
        let mut changes = follow(etcd.clone(), current.clone(), etcd::next_key(&current));
        let (tx, latest) = watch::channel(0u64);
        tokio::spawn(async move {
            while let Some(batch) = changes.recv().await {
                for c in batch {
                    let v = match c {
                        Change::Reset(kvs) => kvs.first().and_then(|kv| version_of(&kv.value)),
                        Change::Put(kv) => version_of(&kv.value),
                        Change::Delete(_) => None,
                    };
                    if let Some(v) = v {
                        tx.send_if_modified(|cur| {
                            let newer = v > *cur;
                            if newer {
                                *cur = v;
                            }
                            newer
                        });
                    }
                }
            }
        });
        EtcdStore {
            etcd,
            prefix: prefix.to_string(),
            latest,
        }
    }

    fn current_key(&self) -> Vec<u8> {
        format!("{}config/current", self.prefix).into_bytes()
    }

    fn revision_key(&self, version: u64) -> Vec<u8> {
        format!("{}config/revisions/{version:020}", self.prefix).into_bytes()
    }

    fn info_key(&self, version: u64) -> Vec<u8> {
        format!("{}config/info/{version:020}", self.prefix).into_bytes()
    }

    fn path(&self, key: &[u8]) -> String {
        format!("etcd:{}", String::from_utf8_lossy(key))
    }

    async fn read_current(&self) -> Result<u64, StoreError> {
        let key = self.current_key();
        let (kv, _) = self.etcd.get(&key).await?;
        match kv {
            None => Ok(0),
            Some(kv) => version_of(&kv.value).ok_or_else(|| StoreError::Corrupt {
                path: self.path(&key),
                message: "not a version number".into(),
            }),
        }
    }
}

fn version_of(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

impl Store for EtcdStore {
    async fn load_current(&self) -> Result<Option<Revision>, StoreError> {
        match self.read_current().await? {
            0 => Ok(None),
            v => match self.get(v).await? {
                Some(rev) => Ok(Some(rev)),
                None => Err(StoreError::Corrupt {
                    path: self.path(&self.revision_key(v)),
                    message: format!("version {v} is current but its revision is missing"),
                }),
            },
        }
    }

    async fn get(&self, version: u64) -> Result<Option<Revision>, StoreError> {
        let key = self.revision_key(version);
        let (kv, _) = self.etcd.get(&key).await?;
        let path = self.path(&key);
        kv.map(|kv| decode(std::path::Path::new(&path), kv.value))
            .transpose()
    }

    async fn list(&self, versions: RangeInclusive<u64>) -> Result<Vec<RevisionInfo>, StoreError> {
        let (lo, hi) = (*versions.start(), *versions.end());
        if lo > hi {
            return Ok(vec![]);
        }
        let start = self.info_key(lo);
        let end = match hi.checked_add(1) {
            Some(h) => self.info_key(h),
            None => etcd::prefix_end(format!("{}config/info/", self.prefix).as_bytes()),
        };
        let (kvs, _) = self.etcd.range(&start, &end, 0).await?;
        kvs.iter()
            .map(|kv| {
                serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
                    path: self.path(&kv.key),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    async fn commit(&self, expected_prev: u64, rev: &Revision) -> Result<(), StoreError> {
        let version = rev.info.version;
        let current = self.current_key();
        if version != expected_prev + 1 {
            return Err(StoreError::Conflict {
                expected: expected_prev,
                found: self.read_current().await?,
            });
        }
        let bytes = encode(rev).map_err(|e| StoreError::Corrupt {
            path: self.path(&self.revision_key(version)),
            message: e.to_string(),
        })?;
        let info = serde_json::to_vec(&rev.info).map_err(|e| StoreError::Corrupt {
            path: self.path(&self.info_key(version)),
            message: e.to_string(),
        })?;
        let compare = match expected_prev {
            0 => etcd::absent(current.clone()),
            v => etcd::value_is(current.clone(), v.to_string()),
        };
        let r = self
            .etcd
            .txn(
                vec![compare],
                vec![
                    etcd::put(self.revision_key(version), bytes, 0),
                    etcd::put(self.info_key(version), info, 0),
                    etcd::put(current.clone(), version.to_string(), 0),
                ],
                vec![etcd::get(current)],
            )
            .await?;
        if r.succeeded {
            return Ok(());
        }
        let found = etcd::range_result(&r, 0)
            .first()
            .and_then(|kv| version_of(&kv.value))
            .unwrap_or(0);
        Err(StoreError::Conflict {
            expected: expected_prev,
            found,
        })
    }

    async fn prune(&self, below: u64) -> Result<usize, StoreError> {
        let r = self
            .etcd
            .txn(
                vec![],
                vec![
                    etcd::delete(self.info_key(0), self.info_key(below)),
                    etcd::delete(self.revision_key(0), self.revision_key(below)),
                ],
                vec![],
            )
            .await?;
        Ok(etcd::deleted(&r, 0) as usize)
    }

    fn follow(&self) -> Option<watch::Receiver<u64>> {
        Some(self.latest.clone())
    }
}
