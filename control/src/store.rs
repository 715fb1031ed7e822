//! Where the control plane keeps config: every committed version, behind a
//! trait shaped for a shared backend (etcd next): read the current version
//! at start, read one older version or a range of versions' metadata when
//! `history`, `diff` or `rollback` need them, commit with compare-and-swap
//! on the version, and prune what the retention no longer keeps. The
//! control plane holds only the current config in memory.
//!
//! The embedded `FileStore` writes one file per version into a data
//! directory, atomically (temp file, fsync, link, fsync the directory), so
//! a crash mid-write never leaves half a config and a restart finds the same
//! versions. `etcd::EtcdStore` keeps them in etcd, shared by several
//! control-plane replicas; `Backend` is whichever the flags chose.

pub mod etcd;

use bytes::Bytes;
use prost::Message;
use remora_proto::model::Config;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::{BufRead, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use tracing::info;

/// What `history` shows of a version: everything but its config.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RevisionInfo {
    pub version: u64,
    pub unix_time: i64,
    pub author: String,
    pub summary: String,
}

/// One committed version of the config.
#[derive(Clone, Debug, PartialEq)]
pub struct Revision {
    pub info: RevisionInfo,
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
    /// Compare-and-swap failed: another commit came first.
    #[error("version {found} is current, not {expected}: another change was committed first")]
    Conflict { expected: u64, found: u64 },
    /// The store cannot be reached (etcd down or without quorum): nothing
    /// was read or written.
    #[error("the config store is unavailable, nothing was changed: {0}")]
    Unavailable(String),
    /// The store answered, refusing the request (permissions, size).
    #[error("the config store refused the request: {0}")]
    Refused(String),
}

/// A versioned config history. Versions are consecutive from the oldest
/// one kept to the current one.
pub trait Store: Send + Sync + 'static {
    /// The newest revision, if any.
    fn load_current(&self) -> impl Future<Output = Result<Option<Revision>, StoreError>> + Send;
    /// One revision; `None` if it never existed or was pruned.
    fn get(
        &self,
        version: u64,
    ) -> impl Future<Output = Result<Option<Revision>, StoreError>> + Send;
    /// The metadata of the revisions kept within `versions`, oldest first.
    fn list(
        &self,
        versions: RangeInclusive<u64>,
    ) -> impl Future<Output = Result<Vec<RevisionInfo>, StoreError>> + Send;
    /// Adds `rev` if the current version is still `expected_prev` (0: none)
    /// and `rev` is the next one: two writers can never both commit it.
    fn commit(
        &self,
        expected_prev: u64,
        rev: &Revision,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Deletes every revision older than `below`; returns how many went.
    /// The caller never asks for the current one or the one before it.
    fn prune(&self, below: u64) -> impl Future<Output = Result<usize, StoreError>> + Send;
    /// The newest version committed to the store, by anyone, as it
    /// changes: how a replica learns of versions other replicas commit.
    /// `None` when this process is the store's only writer.
    fn follow(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The store the flags chose: the embedded one, or etcd.
pub enum Backend {
    File(FileStore),
    Etcd(etcd::EtcdStore),
}

impl Store for Backend {
    async fn load_current(&self) -> Result<Option<Revision>, StoreError> {
        match self {
            Backend::File(s) => s.load_current().await,
            Backend::Etcd(s) => s.load_current().await,
        }
    }

    async fn get(&self, version: u64) -> Result<Option<Revision>, StoreError> {
        match self {
            Backend::File(s) => s.get(version).await,
            Backend::Etcd(s) => s.get(version).await,
        }
    }

    async fn list(&self, versions: RangeInclusive<u64>) -> Result<Vec<RevisionInfo>, StoreError> {
        match self {
            Backend::File(s) => s.list(versions).await,
            Backend::Etcd(s) => s.list(versions).await,
        }
    }

    async fn commit(&self, expected_prev: u64, rev: &Revision) -> Result<(), StoreError> {
        match self {
            Backend::File(s) => s.commit(expected_prev, rev).await,
            Backend::Etcd(s) => s.commit(expected_prev, rev).await,
        }
    }

    async fn prune(&self, below: u64) -> Result<usize, StoreError> {
        match self {
            Backend::File(s) => s.prune(below).await,
            Backend::Etcd(s) => s.prune(below).await,
        }
    }

    fn follow(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Backend::File(s) => s.follow(),
            Backend::Etcd(s) => s.follow(),
        }
    }
}

/// The embedded store: `<dir>/revisions/<version>.rev`, each a line of JSON
/// metadata (`head -1` shows it; `history` reads only that line) followed
/// by the config, protobuf-encoded.
pub struct FileStore {
    dir: PathBuf,
    /// The newest committed version (0: none): the compare in
    /// compare-and-swap. One process owns a data directory.
    latest: tokio::sync::Mutex<u64>,
}

const EXT: &str = "rev";
/// Longest metadata line read (authors and summaries are short).
const MAX_INFO_LINE: u64 = 1 << 20;

impl FileStore {
    /// Opens (or creates) the store in `dir`. Revisions written by earlier
    /// releases (`<version>.json`, config as JSON) are converted once.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        let revs = dir.join("revisions");
        std::fs::create_dir_all(&revs).map_err(|e| io(&revs, e))?;
        migrate_json(&revs)?;
        let latest = versions(&revs)?.last().copied().unwrap_or(0);
        Ok(FileStore {
            dir: revs,
            latest: tokio::sync::Mutex::new(latest),
        })
    }
}

fn path_of(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("{version:012}.{EXT}"))
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Every kept version, ascending. Temp files left by a crash mid-write
/// are not revisions.
fn versions(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let p = entry.map_err(|e| io(dir, e))?.path();
        if p.extension().and_then(|e| e.to_str()) != Some(EXT) {
            continue;
        }
        if let Some(v) = p
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
        {
            out.push(v);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn encode(rev: &Revision) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = serde_json::to_vec(&rev.info)?;
    out.push(b'\n');
    rev.config.encode(&mut out).expect("a Vec grows as needed");
    Ok(out)
}

fn decode(path: &Path, bytes: Vec<u8>) -> Result<Revision, StoreError> {
    let bytes = Bytes::from(bytes);
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt(path, "no metadata line"))?;
    let info: RevisionInfo = serde_json::from_slice(&bytes[..nl]).map_err(|e| corrupt(path, e))?;
    let config = Config::decode(bytes.slice(nl + 1..)).map_err(|e| corrupt(path, e))?;
    Ok(Revision { info, config })
}

fn read_info(path: &Path) -> Result<RevisionInfo, StoreError> {
    let f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut line = Vec::new();
    std::io::BufReader::with_capacity(4096, std::io::Read::take(f, MAX_INFO_LINE))
        .read_until(b'\n', &mut line)
        .map_err(|e| io(path, e))?;
    serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(&line)).map_err(|e| corrupt(path, e))
}

fn read(path: &Path) -> Result<Option<Revision>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// Blocking file work off the async threads (a commit's fsync, reading a
/// big revision).
async fn blocking<T: Send + 'static>(
    dir: &Path,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io(dir, std::io::Error::other(e)))?
}

impl Store for FileStore {
    async fn load_current(&self) -> Result<Option<Revision>, StoreError> {
        let latest = *self.latest.lock().await;
        if latest == 0 {
            return Ok(None);
        }
        self.get(latest).await
    }

    async fn get(&self, version: u64) -> Result<Option<Revision>, StoreError> {
        let path = path_of(&self.dir, version);
        blocking(&self.dir, move || read(&path)).await
    }

    async fn list(&self, range: RangeInclusive<u64>) -> Result<Vec<RevisionInfo>, StoreError> {
        let dir = self.dir.clone();
        blocking(&self.dir, move || {
            versions(&dir)?
                .into_iter()
                .filter(|v| range.contains(v))
                .map(|v| read_info(&path_of(&dir, v)))
                .collect()
        })
        .await
    }

    async fn commit(&self, expected_prev: u64, rev: &Revision) -> Result<(), StoreError> {
        let mut latest = self.latest.lock().await;
        if *latest != expected_prev || rev.info.version != expected_prev + 1 {
            return Err(StoreError::Conflict {
                expected: expected_prev,
                found: *latest,
            });
        }
        let version = rev.info.version;
        let dst = path_of(&self.dir, version);
        let bytes = encode(rev).map_err(|e| corrupt(&dst, e))?;
        let tmp = self.dir.join(format!(".{version:012}.tmp"));
        blocking(&self.dir, move || {
            create_atomic(&tmp, &dst, &bytes).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::Conflict {
                    expected: expected_prev,
                    found: version,
                },
                _ => io(&dst, e),
            })
        })
        .await?;
        *latest = version;
        Ok(())
    }

    async fn prune(&self, below: u64) -> Result<usize, StoreError> {
        let dir = self.dir.clone();
        blocking(&self.dir, move || {
            let mut n = 0;
            for v in versions(&dir)?.into_iter().take_while(|v| *v < below) {
                let p = path_of(&dir, v);
                std::fs::remove_file(&p).map_err(|e| io(&p, e))?;
                n += 1;
            }
            if n > 0 {
                std::fs::File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io(&dir, e))?;
            }
            Ok(n)
        })
        .await
    }
}

/// Writes `bytes` to `tmp`, fsyncs, links it as `dst` (which must not
/// exist: the link fails rather than replace it), fsyncs the directory:
/// after a crash, `dst` is either absent or complete.
fn create_atomic(tmp: &Path, dst: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    let linked = std::fs::hard_link(tmp, dst);
    let _ = std::fs::remove_file(tmp);
    linked?;
    if let Some(dir) = dst.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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

/// A revision as earlier releases wrote it: one JSON document.
#[derive(Deserialize)]
struct JsonRevision {
    version: u64,
    unix_time: i64,
    author: String,
    summary: String,
    config: Config,
}

/// Converts `<version>.json` revisions to `.rev` files (each written
/// atomically before its JSON file goes), once.
fn migrate_json(dir: &Path) -> Result<(), StoreError> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let p = entry.map_err(|e| io(dir, e))?.path();
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let bytes = std::fs::read(&p).map_err(|e| io(&p, e))?;
        let old: JsonRevision = serde_json::from_slice(&bytes).map_err(|e| corrupt(&p, e))?;
        let rev = Revision {
            info: RevisionInfo {
                version: old.version,
                unix_time: old.unix_time,
                author: old.author,
                summary: old.summary,
            },
            config: old.config,
        };
        let dst = path_of(dir, rev.info.version);
        let bytes = encode(&rev).map_err(|e| corrupt(&dst, e))?;
        write_atomic(&dir.join(".migrate.tmp"), &dst, &bytes).map_err(|e| io(&dst, e))?;
        std::fs::remove_file(&p).map_err(|e| io(&p, e))?;
        n += 1;
    }
    if n > 0 {
        info!(revisions = n, dir = %dir.display(), "converted revisions to the .rev format");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rev(v: u64) -> Revision {
        Revision {
            info: RevisionInfo {
                version: v,
                unix_time: 1_700_000_000 + v as i64,
                author: "test".into(),
                summary: format!("v{v}"),
            },
            config: remora_proto::parse_yaml(
                &format!(
                    "kind: Service\nmetadata: {{name: s{v}}}\nspec: {{ports: [{{port: 80}}]}}\n"
                ),
                "t",
            )
            .unwrap(),
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("remora-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn revisions_survive_reopen_and_ignore_torn_writes() {
        let dir = temp("reopen");
        let s = FileStore::open(&dir).unwrap();
        assert_eq!(s.load_current().await.unwrap(), None);
        s.commit(0, &rev(1)).await.unwrap();
        s.commit(1, &rev(2)).await.unwrap();
        // Compare-and-swap: version 2 exists, and 1 is no longer current.
        assert!(matches!(
            s.commit(1, &rev(2)).await,
            Err(StoreError::Conflict {
                expected: 1,
                found: 2
            })
        ));
        // A crash mid-write leaves only a temp file behind.
        std::fs::write(dir.join("revisions/.000000000003.tmp"), b"{\"version\": 3").unwrap();
        let reopened = FileStore::open(&dir).unwrap();
        assert_eq!(reopened.load_current().await.unwrap(), Some(rev(2)));
        assert_eq!(reopened.get(1).await.unwrap(), Some(rev(1)));
        assert_eq!(reopened.get(3).await.unwrap(), None);
        let infos = reopened.list(0..=u64::MAX).await.unwrap();
        assert_eq!(infos, vec![rev(1).info, rev(2).info]);
        assert_eq!(reopened.list(2..=2).await.unwrap(), vec![rev(2).info]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What every backend must do: compare-and-swap commits, reads of
    /// one version and of ranges, from this handle and from `again`, a
    /// second handle on the same store (a reopen, or another replica).
    async fn keeps_versions_with_compare_and_swap(s: &impl Store, again: &impl Store) {
        assert_eq!(s.load_current().await.unwrap(), None);
        s.commit(0, &rev(1)).await.unwrap();
        // The first commit is compare-and-swap too: version 1 exists.
        assert!(matches!(
            again.commit(0, &rev(1)).await,
            Err(StoreError::Conflict {
                expected: 0,
                found: 1
            })
        ));
        s.commit(1, &rev(2)).await.unwrap();
        assert!(matches!(
            again.commit(1, &rev(2)).await,
            Err(StoreError::Conflict {
                expected: 1,
                found: 2
            })
        ));
        // Not the next version: refused as well.
        assert!(matches!(
            s.commit(2, &rev(4)).await,
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(again.load_current().await.unwrap(), Some(rev(2)));
        assert_eq!(again.get(1).await.unwrap(), Some(rev(1)));
        assert_eq!(again.get(3).await.unwrap(), None);
        let infos = again.list(0..=u64::MAX).await.unwrap();
        assert_eq!(infos, vec![rev(1).info, rev(2).info]);
        assert_eq!(again.list(2..=2).await.unwrap(), vec![rev(2).info]);
        assert_eq!(again.list(3..=9).await.unwrap(), vec![]);
    }

    /// Prune deletes exactly the older versions, and commits go on.
    async fn prunes_only_older_versions(s: &impl Store) {
        for v in 1..=5 {
            s.commit(v - 1, &rev(v)).await.unwrap();
        }
        assert_eq!(s.prune(4).await.unwrap(), 3);
        assert_eq!(s.prune(4).await.unwrap(), 0);
        let kept: Vec<u64> = s
            .list(0..=99)
            .await
            .unwrap()
            .iter()
            .map(|i| i.version)
            .collect();
        assert_eq!(kept, [4, 5]);
        assert_eq!(s.get(2).await.unwrap(), None);
        // The next commit follows the current one, pruned or not.
        s.commit(5, &rev(6)).await.unwrap();
        assert_eq!(s.load_current().await.unwrap(), Some(rev(6)));
    }

    #[tokio::test]
    async fn file_store_keeps_versions_with_compare_and_swap() {
        let dir = temp("cas");
        let s = FileStore::open(&dir).unwrap();
        // One process owns a data directory: the second handle is a reopen
        // after the fact, so it sees the first's commits as it opens.
        keeps_versions_with_compare_and_swap(&s, &Reopen(dir.clone())).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A FileStore opened anew for each call: what a restart sees.
    struct Reopen(PathBuf);

    impl Store for Reopen {
        async fn load_current(&self) -> Result<Option<Revision>, StoreError> {
            FileStore::open(&self.0)?.load_current().await
        }
        async fn get(&self, version: u64) -> Result<Option<Revision>, StoreError> {
            FileStore::open(&self.0)?.get(version).await
        }
        async fn list(&self, v: RangeInclusive<u64>) -> Result<Vec<RevisionInfo>, StoreError> {
            FileStore::open(&self.0)?.list(v).await
        }
        async fn commit(&self, prev: u64, rev: &Revision) -> Result<(), StoreError> {
            FileStore::open(&self.0)?.commit(prev, rev).await
        }
        async fn prune(&self, below: u64) -> Result<usize, StoreError> {
            FileStore::open(&self.0)?.prune(below).await
        }
    }

    #[tokio::test]
    async fn file_store_prunes_only_older_versions() {
        let dir = temp("prune");
        prunes_only_older_versions(&FileStore::open(&dir).unwrap()).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn etcd_store_keeps_versions_with_compare_and_swap() {
        let Some(e) = crate::etcd::testing::TestEtcd::start("store_cas").await else {
            return;
        };
        let a = etcd::EtcdStore::open(e.client(), "/t/");
        let b = etcd::EtcdStore::open(e.client(), "/t/");
        keeps_versions_with_compare_and_swap(&a, &b).await;
        // Another prefix is another history.
        let other = etcd::EtcdStore::open(e.client(), "/other/");
        assert_eq!(other.load_current().await.unwrap(), None);
    }

    #[tokio::test]
    async fn etcd_store_prunes_only_older_versions() {
        let Some(e) = crate::etcd::testing::TestEtcd::start("store_prune").await else {
            return;
        };
        prunes_only_older_versions(&etcd::EtcdStore::open(e.client(), "/t/")).await;
    }

    #[tokio::test]
    async fn etcd_store_reports_versions_other_replicas_commit() {
        let Some(e) = crate::etcd::testing::TestEtcd::start("store_follow").await else {
            return;
        };
        let a = etcd::EtcdStore::open(e.client(), "/t/");
        let b = etcd::EtcdStore::open(e.client(), "/t/");
        let mut seen = b.follow().unwrap();
        for v in 1..=3 {
            a.commit(v - 1, &rev(v)).await.unwrap();
            let got = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                seen.wait_for(|s| *s == v),
            )
            .await;
            assert!(got.is_ok(), "replica b never saw version {v}");
        }
        // A replica that starts later starts from the current version.
        let c = etcd::EtcdStore::open(e.client(), "/t/");
        let mut late = c.follow().unwrap();
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            late.wait_for(|s| *s == 3),
        )
        .await;
        assert!(got.is_ok());
    }

    #[tokio::test]
    async fn etcd_store_unreachable_is_unavailable_and_writes_nothing() {
        let Some(e) = crate::etcd::testing::TestEtcd::start("store_down").await else {
            return;
        };
        let s = etcd::EtcdStore::open(e.client(), "/t/");
        s.commit(0, &rev(1)).await.unwrap();
        let endpoint = e.endpoint.clone();
        drop(e);
        let down = crate::etcd::Etcd::new(&crate::etcd::Options {
            endpoints: vec![endpoint],
            ..Default::default()
        })
        .unwrap();
        let s = etcd::EtcdStore::open(down, "/t/");
        let err = s.commit(1, &rev(2)).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(
            err.to_string().starts_with(
                "the config store is unavailable, nothing was changed: etcd is unavailable"
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn revisions_of_earlier_releases_are_converted() {
        let dir = temp("migrate");
        std::fs::create_dir_all(dir.join("revisions")).unwrap();
        let old = rev(7);
        let json = serde_json::json!({
            "version": 7,
            "unix_time": old.info.unix_time,
            "author": "test",
            "summary": "v7",
            "config": old.config,
        });
        std::fs::write(dir.join("revisions/000000000007.json"), json.to_string()).unwrap();
        let s = FileStore::open(&dir).unwrap();
        assert_eq!(s.load_current().await.unwrap(), Some(old));
        assert!(!dir.join("revisions/000000000007.json").exists());
        s.commit(7, &rev(8)).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
