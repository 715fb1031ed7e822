//! Config sources. Whatever brings a config (a file today, the control
//! plane tomorrow) hands it to `apply`: validate, compile, swap. A config
//! that fails any step is logged and counted, and the running one stays.

use crate::config::check_rule_count;
use crate::metrics::{ResultLabels, VersionLabels};
use crate::proxy::Proxy;
use crate::runtime::{compile, PrepareError, Runtime, Settings, Validated};
use remora_proto::model::Config;
use remora_proto::RawConfig;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::{error, info};

/// What a source hands to `apply`.
pub enum Input {
    /// Parsed from a file: validated whole.
    Config(Config),
    /// A snapshot's encoded config: decoded and validated incrementally
    /// against the running one (`snapshot.rs`).
    Encoded(bytes::Bytes),
}

/// Validates, compiles and publishes a config. On error nothing changes.
/// Runs on a blocking thread: only the final `ArcSwap` store is visible to
/// the data plane.
pub fn apply(
    proxy: &Proxy,
    settings: &Settings,
    input: Input,
    version: String,
) -> Result<(), String> {
    let t0 = Instant::now();
    let prev = proxy.runtime.load_full();
    let result = match input {
        // The size bound first: validating a config that is too big anyway
        // would waste the time it bounds.
        Input::Config(cfg) => {
            let rules = cfg
                .http_routes
                .iter()
                .map(|r| r.spec.as_ref().map_or(0, |s| s.rules.len()))
                .sum();
            check_rule_count(rules, settings)
                .map_err(PrepareError::from)
                .and_then(|()| Ok(Validated::prepare(cfg)?.adopt(&prev.config)))
        }
        Input::Encoded(bytes) => Validated::from_snapshot(&bytes, &prev.decode_cache, settings),
    }
    .map_err(|e| e.to_string());
    let prepared = t0.elapsed();
    let result = result.and_then(|cfg| {
        compile(cfg, version.clone(), &prev, settings, &proxy.metrics).map_err(|e| e.to_string())
    });
    drop(prev);
    let m = &proxy.metrics;
    match result {
        Ok(rt) => {
            let (services, routes) = (rt.config.services.len(), rt.config.http_routes.len());
            let compiled = t0.elapsed() - prepared;
            retire(proxy.runtime.swap(Arc::new(rt)));
            m.config_reloads
                .get_or_create(&ResultLabels { result: "applied" })
                .inc();
            m.config_apply_seconds.observe(t0.elapsed().as_secs_f64());
            m.config_info.clear();
            m.config_info
                .get_or_create(&VersionLabels {
                    version: version.clone(),
                })
                .set(1);
            info!(
                %version,
                services,
                routes,
                prepare_micros = prepared.as_micros() as u64,
                compile_micros = compiled.as_micros() as u64,
                "config applied"
            );
            Ok(())
        }
        Err(e) => {
            m.config_reloads
                .get_or_create(&ResultLabels { result: "rejected" })
                .inc();
            let running = proxy.runtime.load().version.clone();
            error!(%version, running_version = %running, error = %e, "config rejected; the running config stays");
            Err(e)
        }
    }
}

/// Hands a replaced runtime to the one retire thread, which drops it once
/// the requests still running on it are done. Freeing a big runtime
/// (thousands of routes and clusters) takes milliseconds; on the data-plane
/// thread that would be a latency spike for every request behind it. One
/// thread for all swaps (not one per swap) so that memory is returned as
/// soon as the last request lets go, however often configs arrive.
fn retire(old: Arc<Runtime>) {
    static RETIRE: OnceLock<Option<Mutex<mpsc::Sender<Arc<Runtime>>>>> = OnceLock::new();
    let tx = RETIRE.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        match std::thread::Builder::new()
            .name("remora-retire".into())
            .spawn(move || retire_loop(rx))
        {
            Ok(_) => Some(Mutex::new(tx)),
            Err(e) => {
                tracing::warn!(error = %e, "no thread to free old configs; they are freed in place");
                None
            }
        }
    });
    if let Some(tx) = tx {
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(old);
        }
    }
}

/// Holds retired runtimes until nothing else does (or a minute has passed:
/// a stuck stream must not pin memory forever; then its last holder frees
/// it), checking every few milliseconds while any are held.
fn retire_loop(rx: mpsc::Receiver<Arc<Runtime>>) {
    const MAX_HOLD: Duration = Duration::from_secs(60);
    let mut held: Vec<(Instant, Arc<Runtime>)> = Vec::new();
    loop {
        let next = if held.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(Duration::from_millis(5))
        };
        match next {
            Ok(rt) => held.push((Instant::now(), rt)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        held.retain(|(since, rt)| Arc::strong_count(rt) > 1 && since.elapsed() < MAX_HOLD);
    }
}

/// Reads a config file or directory: its fingerprint and parsed content
/// (for the first config, at boot).
pub fn read(path: &std::path::Path) -> Result<(u64, Config), String> {
    let raw = RawConfig::read(path).map_err(|e| e.to_string())?;
    let cfg = raw.parse().map_err(|e| e.to_string())?;
    Ok((raw.fingerprint(), cfg))
}

/// The version a file config is known by: a fingerprint of its bytes.
pub fn file_version(fingerprint: u64) -> String {
    format!("file-{fingerprint:016x}")
}

/// Polls a config path and applies each change. Polling (rather than
/// inotify) also sees Kubernetes ConfigMap symlink swaps and costs one small
/// read per interval. SIGHUP forces a check at once.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    proxy: Arc<Proxy>,
    settings: Settings,
    ready: Arc<AtomicBool>,
    mut last: Option<u64>,
) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // Fingerprint of the last bad content, so a broken file is reported
    // once, not every interval.
    let mut last_bad: Option<u64> = None;
    loop {
        #[cfg(unix)]
        {
            let hup_fut = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = hup_fut => info!("SIGHUP: checking config now"),
            }
        }
        #[cfg(not(unix))]
        tokio::time::sleep(interval).await;

        // Read and fingerprint off the data-plane thread; parse only what
        // changed.
        let p = path.clone();
        let raw = tokio::task::spawn_blocking(move || RawConfig::read(&p)).await;
        let Ok(raw) = raw else { continue };
        let fp = match &raw {
            Ok(raw) => raw.fingerprint(),
            Err(e) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                e.to_string().hash(&mut h);
                h.finish()
            }
        };
        if last == Some(fp) || last_bad == Some(fp) {
            continue;
        }
        // Parse, validate, compile and swap off the data-plane thread.
        let (p, s, at) = (proxy.clone(), settings.clone(), path.clone());
        let applied = tokio::task::spawn_blocking(move || {
            let cfg = raw.and_then(|r| r.parse()).map_err(|e| {
                p.metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "rejected" })
                    .inc();
                error!(path = %at.display(), error = %e, "config unreadable; the running config stays");
                e.to_string()
            })?;
            apply(&p, &s, Input::Config(cfg), file_version(fp))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match applied {
            Ok(()) => {
                last = Some(fp);
                last_bad = None;
                ready.store(true, Relaxed);
            }
            Err(_) => last_bad = Some(fp),
        }
    }
}
