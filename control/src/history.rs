//! The config history: the running config in memory, every version in the
//! store. Changes (apply, delete, rollback) are validated as a whole and
//! committed all or nothing, one at a time; older versions are read from
//! the store only when `history` or `rollback` need them, and the retention
//! prunes them there, never the current version or the one before it.
//!
//! With a store shared by several replicas, another replica may commit
//! first: a change based on a version that is no longer current is refused
//! by the store's compare-and-swap, and is then made again on the version
//! the store holds (`catch_up`), up to `ATTEMPTS` times, so concurrent
//! applies land one after the other. Versions other replicas commit are
//! taken in by `catch_up` too (the mesh's follower calls it).

use crate::error::MeshError;
use crate::resources::{self, Action, Change};
use crate::store::{Revision, RevisionInfo, Store, StoreError};
use remora_proto::model::Config;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::info;

/// Which old versions the store keeps.
#[derive(Clone, Debug, Default)]
pub struct Retention {
    /// Keep at most this many versions (0: no limit).
    pub keep: u64,
    /// Prune versions committed longer ago than this.
    pub max_age: Option<Duration>,
}

/// The running config.
#[derive(Debug, Default)]
pub struct Current {
    /// 0 before the first commit.
    pub version: u64,
    pub config: Config,
    /// When this process committed it (None: loaded at start).
    pub committed_at: Option<Instant>,
    /// `namespace/name` of the Services that list `calls`: their proxies
    /// get scoped snapshots.
    pub calling: HashSet<String>,
}

impl Current {
    fn new(version: u64, config: Config, committed_at: Option<Instant>) -> Current {
        let calling = config
            .services
            .iter()
            .filter(|s| s.spec.as_ref().is_some_and(|sp| !sp.calls.is_empty()))
            .filter_map(|s| s.metadata.as_ref())
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .collect();
        Current {
            version,
            config,
            committed_at,
            calling,
        }
    }
}

/// What a change did.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The new version, or the current one when nothing changed.
    pub version: u64,
    pub changed: bool,
    pub summary: String,
}

pub struct History<S> {
    store: S,
    retention: Retention,
    /// Serializes changes (apply, delete, rollback).
    write: tokio::sync::Mutex<()>,
    current: Mutex<Arc<Current>>,
}

/// Defaults and validation of a whole config, in canonical order.
fn validate(cfg: Config) -> Result<Config, MeshError> {
    let mut cfg = remora_proto::prepare(cfg).map_err(|e| MeshError::Invalid(e.to_string()))?;
    resources::canonicalize(&mut cfg);
    Ok(cfg)
}

/// Tries of one change when other replicas keep committing first.
const ATTEMPTS: usize = 4;

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl<S: Store> History<S> {
    /// Reads the current version from the store.
    pub async fn open(store: S, retention: Retention) -> Result<History<S>, MeshError> {
        let current = match store.load_current().await? {
            Some(rev) => {
                info!(version = rev.info.version, "config loaded");
                let mut config = rev.config;
                resources::canonicalize(&mut config);
                Current::new(rev.info.version, config, None)
            }
            None => Current::default(),
        };
        Ok(History {
            store,
            retention,
            write: tokio::sync::Mutex::new(()),
            current: Mutex::new(Arc::new(current)),
        })
    }

    /// The running config (a cheap handle; it never changes under you).
    pub fn current(&self) -> Arc<Current> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Upserts `add` into the running config and commits the result if
    /// it is valid and differs.
    pub async fn apply(&self, mut add: Config, author: &str) -> Result<Outcome, MeshError> {
        let _w = self.write.lock().await;
        remora_proto::validate::normalize(&mut add);
        self.change_current(author, None, |cur| {
            let mut next = cur.config.clone();
            resources::upsert(&mut next, add.clone());
            validate(next)
        })
        .await
    }

    /// What `apply(add)` would change.
    pub fn diff(&self, mut add: Config) -> Result<Vec<Change>, MeshError> {
        remora_proto::validate::normalize(&mut add);
        let cur = self.current();
        let mut next = cur.config.clone();
        resources::upsert(&mut next, add);
        Ok(resources::diff(&cur.config, &validate(next)?))
    }

    pub async fn delete(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        author: &str,
    ) -> Result<Outcome, MeshError> {
        let kind = resources::kind_name(kind).ok_or_else(|| {
            MeshError::Invalid(format!("unknown kind {kind:?} (Service or HTTPRoute)"))
        })?;
        let ns = if ns.is_empty() {
            remora_proto::DEFAULT_NAMESPACE
        } else {
            ns
        };
        let _w = self.write.lock().await;
        let key = (kind, ns.to_string(), name.to_string());
        self.change_current(author, None, |cur| {
            let mut next = cur.config.clone();
            if !resources::remove(&mut next, &key) {
                return Err(MeshError::NotFound(resources::describe(&key)));
            }
            validate(next)
        })
        .await
    }

    /// The running config's resources of `kind` (any if empty) in `ns`
    /// (any if empty) named `name` (any if empty).
    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Result<(u64, Config), MeshError> {
        let kind = match kind {
            "" => None,
            k => Some(resources::kind_name(k).ok_or_else(|| {
                MeshError::Invalid(format!("unknown kind {k:?} (Service or HTTPRoute)"))
            })?),
        };
        let cur = self.current();
        let found = resources::filter(&cur.config, |k, n, m| {
            kind.is_none_or(|x| k == x)
                && (ns.is_empty() || n == ns)
                && (name.is_empty() || m == name)
        });
        if remora_proto::resource_count(&found) == 0 && !name.is_empty() {
            return Err(MeshError::NotFound(format!(
                "{} {}/{}",
                kind.unwrap_or("resource"),
                if ns.is_empty() { "*" } else { ns },
                name
            )));
        }
        Ok((cur.version, found))
    }

    /// Every version the store keeps, oldest first, without configs.
    pub async fn list(&self) -> Result<Vec<RevisionInfo>, MeshError> {
        Ok(self.store.list(0..=u64::MAX).await?)
    }

    /// Commits version `version`'s config again, as a new version.
    pub async fn rollback(&self, version: u64, author: &str) -> Result<Outcome, MeshError> {
        let _w = self.write.lock().await;
        let Some(target) = self.store.get(version).await? else {
            return Err(MeshError::NotFound(format!("version {version}")));
        };
        let mut config = target.config;
        resources::canonicalize(&mut config);
        let prefix = format!("rollback to version {version}: ");
        self.change_current(author, Some(&prefix), |_| Ok(config.clone()))
            .await
    }

    /// Commits what `next` makes of the current config; when another
    /// replica committed first, takes in its version and makes the change
    /// again on it.
    async fn change_current(
        &self,
        author: &str,
        summary_prefix: Option<&str>,
        next: impl Fn(&Current) -> Result<Config, MeshError>,
    ) -> Result<Outcome, MeshError> {
        let mut attempt = 1;
        loop {
            let cur = self.current();
            let config = next(&cur)?;
            match self.change(&cur, config, author, summary_prefix).await {
                Err(MeshError::Store(StoreError::Conflict { found, .. })) if attempt < ATTEMPTS => {
                    info!(
                        based_on = cur.version,
                        current = found,
                        "another replica committed first; applying the change again on the current version"
                    );
                    self.catch_up().await?;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// Takes in the store's current version if it is newer than the
    /// running one (committed by another replica); returns it if so.
    pub async fn catch_up(&self) -> Result<Option<u64>, MeshError> {
        let Some(rev) = self.store.load_current().await? else {
            return Ok(None);
        };
        let version = rev.info.version;
        let mut config = rev.config;
        resources::canonicalize(&mut config);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if version <= current.version {
            return Ok(None);
        }
        info!(version, from = current.version, author = %rev.info.author, summary = %rev.info.summary, "config version committed by another replica taken in");
        *current = Arc::new(Current::new(version, config, Some(Instant::now())));
        Ok(Some(version))
    }

    /// The store (for the mesh's follower).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Commits `next` unless it equals the running config.
    async fn change(
        &self,
        cur: &Current,
        next: Config,
        author: &str,
        summary_prefix: Option<&str>,
    ) -> Result<Outcome, MeshError> {
        let changes = resources::diff(&cur.config, &next);
        if changes.iter().all(|c| c.action == Action::Unchanged) {
            return Ok(Outcome {
                version: cur.version,
                changed: false,
                summary: "no changes".into(),
            });
        }
        let summary = format!(
            "{}{}",
            summary_prefix.unwrap_or(""),
            resources::summary(&changes)
        );
        let rev = Revision {
            info: RevisionInfo {
                version: cur.version + 1,
                unix_time: now_unix(),
                author: if author.is_empty() {
                    "unknown".into()
                } else {
                    author.to_string()
                },
                summary,
            },
            config: next,
        };
        self.store.commit(cur.version, &rev).await?;
        let Revision { info, config } = rev;
        info!(version = info.version, author = %info.author, summary = %info.summary, "config committed");
        let now = Current::new(info.version, config, Some(Instant::now()));
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        // The follower cannot have taken in a newer one: this commit was
        // the store's next version.
        if current.version < info.version {
            *current = Arc::new(now);
        }
        drop(current);
        Ok(Outcome {
            version: info.version,
            changed: true,
            summary: info.summary,
        })
    }

    /// Deletes the versions the retention no longer keeps; never the
    /// current one or the one before it.
    pub async fn prune(&self) -> Result<usize, MeshError> {
        self.prune_at(now_unix()).await
    }

    /// `prune` as if it were `now` (Unix seconds).
    async fn prune_at(&self, now: i64) -> Result<usize, MeshError> {
        let current = self.current().version;
        // The current version and the one before it always stay.
        let mut below = current.saturating_sub(1);
        let Retention { keep, max_age } = self.retention.clone();
        if keep == 0 && max_age.is_none() {
            return Ok(0);
        }
        // Versions are consecutive: keeping `keep` means the newest ones.
        let by_count = match keep {
            0 => 0,
            k => (current + 1).saturating_sub(k),
        };
        let by_age = match max_age {
            None => 0,
            Some(age) => {
                let oldest_kept = now - age.as_secs() as i64;
                let candidates = self.store.list(0..=below.saturating_sub(1)).await?;
                candidates
                    .iter()
                    .find(|i| i.unix_time >= oldest_kept)
                    .map_or(below, |i| i.version)
            }
        };
        below = below.min(by_count.max(by_age));
        if below <= 1 {
            return Ok(0);
        }
        let n = self.store.prune(below).await?;
        if n > 0 {
            info!(
                pruned = n,
                kept_from = below,
                current,
                "old config versions pruned"
            );
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    const API: &str = "kind: Service\nmetadata: {name: api}\nspec: {ports: [{port: 80}]}\n";

    /// The route `r`, its match differing by `n`.
    fn route(n: u32) -> String {
        format!(
            "kind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /v{n}}}}}]\n    backendRefs: [{{name: api, port: 80}}]\n"
        )
    }

    fn yaml(y: &str) -> Config {
        remora_proto::parse_yaml(y, "t").unwrap()
    }

    async fn history(name: &str, retention: Retention) -> (History<FileStore>, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("remora-history-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = History::open(FileStore::open(&dir).unwrap(), retention)
            .await
            .unwrap();
        (h, dir)
    }

    async fn versions(h: &History<FileStore>) -> Vec<u64> {
        h.list().await.unwrap().iter().map(|i| i.version).collect()
    }

    #[tokio::test]
    async fn changes_are_all_or_nothing_and_only_real_changes_make_versions() {
        let (h, dir) = history("change", Retention::default()).await;
        let o = h.apply(yaml(API), "me").await.unwrap();
        assert_eq!((o.version, o.changed), (1, true));
        assert_eq!(o.summary, "created Service default/api");
        // The same again: no new version.
        assert!(!h.apply(yaml(API), "me").await.unwrap().changed);
        // A route to a Service that does not exist: refused, nothing changes.
        let bad = route(80).replace("{name: api, port: 80}", "{name: nope, port: 80}");
        let e = h.apply(yaml(&bad), "me").await.unwrap_err();
        assert!(matches!(e, MeshError::Invalid(_)), "{e}");
        assert_eq!(h.current().version, 1);
        h.apply(yaml(&route(80)), "me").await.unwrap();
        // A Service a route needs cannot go.
        let e = h.delete("svc", "", "api", "me").await.unwrap_err();
        assert!(matches!(e, MeshError::Invalid(_)), "{e}");
        let e = h.delete("route", "", "nope", "me").await.unwrap_err();
        assert_eq!(e.to_string(), "HTTPRoute default/nope not found");
        assert_eq!(h.delete("route", "", "r", "me").await.unwrap().version, 3);
        assert_eq!(versions(&h).await, [1, 2, 3]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn rollback_commits_an_old_config_read_from_the_store() {
        let (h, dir) = history("rollback", Retention::default()).await;
        h.apply(yaml(&format!("{API}---\n{}", route(80))), "me")
            .await
            .unwrap();
        h.apply(yaml(&route(81)), "me").await.unwrap();
        let o = h.rollback(1, "me").await.unwrap();
        assert_eq!(o.version, 3);
        assert_eq!(
            o.summary,
            "rollback to version 1: updated HTTPRoute default/r"
        );
        assert_eq!(
            h.get("", "", "").unwrap().1,
            h.store.get(1).await.unwrap().unwrap().config
        );
        assert!(matches!(
            h.rollback(9, "me").await,
            Err(MeshError::NotFound(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn retention_by_count_keeps_the_newest_and_never_the_last_two() {
        let (h, dir) = history(
            "count",
            Retention {
                keep: 3,
                max_age: None,
            },
        )
        .await;
        h.apply(yaml(API), "me").await.unwrap();
        for port in 0..5 {
            h.apply(yaml(&route(8000 + port)), "me").await.unwrap();
            h.prune().await.unwrap();
        }
        assert_eq!(versions(&h).await, [4, 5, 6]);
        // A pruned version cannot be rolled back to; a kept one can.
        assert!(matches!(
            h.rollback(2, "me").await,
            Err(MeshError::NotFound(_))
        ));
        assert_eq!(h.rollback(4, "me").await.unwrap().version, 7);
        // Even `keep: 1` keeps the version before the current one.
        let (h1, dir1) = history(
            "count1",
            Retention {
                keep: 1,
                max_age: None,
            },
        )
        .await;
        for port in 0..3 {
            h1.apply(yaml(&format!("{API}---\n{}", route(9000 + port))), "me")
                .await
                .unwrap();
        }
        h1.prune().await.unwrap();
        assert_eq!(versions(&h1).await, [2, 3]);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir1);
    }

    #[tokio::test]
    async fn retention_by_age_never_prunes_the_current_version_or_the_one_before() {
        let (h, dir) = history(
            "age",
            Retention {
                keep: 0,
                max_age: Some(Duration::from_secs(3600)),
            },
        )
        .await;
        h.apply(yaml(API), "me").await.unwrap();
        for port in 0..3 {
            h.apply(yaml(&route(8000 + port)), "me").await.unwrap();
        }
        // Everything is young: nothing goes.
        assert_eq!(h.prune().await.unwrap(), 0);
        assert_eq!(versions(&h).await, [1, 2, 3, 4]);
        // Two hours on, everything is old: all but the last two go.
        assert_eq!(h.prune_at(now_unix() + 7200).await.unwrap(), 2);
        assert_eq!(versions(&h).await, [3, 4]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
