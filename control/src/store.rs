//! Where the control plane keeps config: a versioned history behind a
//! trait. The embedded `FileStore` writes one file per version into a data
//! directory, atomically (temp file, fsync, rename, fsync the directory), so
//! a crash mid-write never leaves half a config and a restart finds the same
//! versions and history. A distributed backend (etcd) implements the same
//! trait so that several control-plane replicas can share one history.

use remora_proto::model::Config;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One committed version of the config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Revision {
    pub version: u64,
    pub unix_time: i64,
    pub author: String,
    pub summary: String,
    pub config: Config,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: corrupt revision: {message}")]
    Corrupt { path: String, message: String },
    #[error("version {0} already exists")]
    Conflict(u64),
}

/// A versioned config history.
pub trait Store: Send + Sync + 'static {
    /// Every revision, oldest first.
    fn load(&self) -> impl Future<Output = Result<Vec<Revision>, StoreError>> + Send;
    /// Adds a revision; its version must be new (compare-and-swap on the
    /// version, so two replicas cannot both commit version N).
    fn commit(&self, rev: &Revision) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The embedded store: `<dir>/revisions/<version>.json`.
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        let revs = dir.join("revisions");
        std::fs::create_dir_all(&revs).map_err(|e| io(&revs, e))?;
        Ok(FileStore { dir: revs })
    }

    fn path(&self, version: u64) -> PathBuf {
        self.dir.join(format!("{version:012}.json"))
    }
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Store for FileStore {
    async fn load(&self) -> Result<Vec<Revision>, StoreError> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let p = entry.map_err(|e| io(&self.dir, e))?.path();
            // Leftover temp files from a crash mid-write are not revisions.
            if p.extension().and_then(|e| e.to_str()) == Some("json") {
                files.push(p);
            }
        }
        files.sort();
        let mut revs = Vec::with_capacity(files.len());
        for p in files {
            let bytes = std::fs::read(&p).map_err(|e| io(&p, e))?;
            let rev: Revision =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?;
            revs.push(rev);
        }
        revs.sort_by_key(|r| r.version);
        Ok(revs)
    }

    async fn commit(&self, rev: &Revision) -> Result<(), StoreError> {
        let dst = self.path(rev.version);
        if dst.exists() {
            return Err(StoreError::Conflict(rev.version));
        }
        let tmp = self.dir.join(format!(".{:012}.tmp", rev.version));
        let json = serde_json::to_vec(rev).map_err(|e| StoreError::Corrupt {
            path: dst.display().to_string(),
            message: e.to_string(),
        })?;
        write_atomic(&tmp, &dst, &json).map_err(|e| io(&dst, e))
    }
}

/// Writes `bytes` to `tmp`, fsyncs, renames over `dst`, fsyncs the
/// directory: after a crash, `dst` is either absent or complete.
pub fn write_atomic(tmp: &Path, dst: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, dst)?;
    if let Some(dir) = dst.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(v: u64) -> Revision {
        Revision {
            version: v,
            unix_time: 1_700_000_000 + v as i64,
            author: "test".into(),
            summary: format!("v{v}"),
            config: Config::default(),
        }
    }

    #[tokio::test]
    async fn revisions_survive_reopen_and_ignore_torn_writes() {
        let dir = std::env::temp_dir().join(format!("remora-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = FileStore::open(&dir).unwrap();
        s.commit(&rev(1)).await.unwrap();
        s.commit(&rev(2)).await.unwrap();
        assert!(matches!(
            s.commit(&rev(2)).await,
            Err(StoreError::Conflict(2))
        ));
        // A crash mid-write leaves only a temp file behind.
        std::fs::write(
            dir.join("revisions/.000000000003.tmp"),
            b"{\"version\": 3, \"trunc",
        )
        .unwrap();
        let reopened = FileStore::open(&dir).unwrap();
        let revs = reopened.load().await.unwrap();
        assert_eq!(revs, vec![rev(1), rev(2)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
