//! Config sources. Whatever brings a config (a file today, the control
//! plane tomorrow) hands it to `apply`: validate, compile, swap. A config
//! that fails any step is logged and counted, and the running one stays.

use crate::metrics::{ResultLabels, VersionLabels};
use crate::proxy::Proxy;
use crate::runtime::{compile, Settings};
use remora_proto::model::Config;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info};

/// Validates, compiles and publishes a config. On error nothing changes.
pub fn apply(
    proxy: &Proxy,
    settings: &Settings,
    cfg: Config,
    version: String,
) -> Result<(), String> {
    let t0 = Instant::now();
    let rules: usize = cfg
        .http_routes
        .iter()
        .map(|r| r.spec.as_ref().map_or(0, |s| s.rules.len()))
        .sum();
    let result = if rules > settings.max_route_rules {
        Err(format!(
            "config has {rules} route rules; this proxy allows at most {} (--max-route-rules)",
            settings.max_route_rules
        ))
    } else {
        Ok(cfg)
    };
    let result = result
        .and_then(|cfg| remora_proto::prepare(cfg).map_err(|e| e.to_string()))
        .and_then(|cfg| {
            compile(
                cfg,
                version.clone(),
                &proxy.runtime.load(),
                settings,
                &proxy.metrics,
            )
        });
    let m = &proxy.metrics;
    match result {
        Ok(rt) => {
            let (services, routes) = (rt.config.services.len(), rt.config.http_routes.len());
            retire(proxy.runtime.swap(Arc::new(rt)));
            m.config_reloads
                .get_or_create(&ResultLabels { result: "applied" })
                .inc();
            m.config_info.clear();
            m.config_info
                .get_or_create(&VersionLabels {
                    version: version.clone(),
                })
                .set(1);
            info!(%version, services, routes, micros = t0.elapsed().as_micros() as u64, "config applied");
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

/// Drops a replaced runtime on a thread of its own once the requests still
/// running on it are done. Freeing a big runtime (thousands of routes and
/// clusters) takes milliseconds; on the data-plane thread that would be a
/// latency spike for every request behind it.
fn retire(old: Arc<crate::runtime::Runtime>) {
    let wait = move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(old);
    };
    if let Err(e) = std::thread::Builder::new()
        .name("remora-retire".into())
        .spawn(wait)
    {
        tracing::warn!(error = %e, "could not start a thread to free the old config");
    }
}

/// Reads a config file or directory: its fingerprint and parsed content.
pub fn read(path: &std::path::Path) -> Result<(u64, Config), String> {
    let (raw, cfg) = remora_proto::load_path(path).map_err(|e| e.to_string())?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    raw.hash(&mut h);
    Ok((h.finish(), cfg))
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

        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || read(&p)).await;
        let (fp, cfg) = match read {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                e.hash(&mut h);
                let fp = h.finish();
                if last_bad != Some(fp) {
                    last_bad = Some(fp);
                    proxy
                        .metrics
                        .config_reloads
                        .get_or_create(&ResultLabels { result: "rejected" })
                        .inc();
                    error!(path = %path.display(), error = %e, "config unreadable; the running config stays");
                }
                continue;
            }
            Err(_) => continue,
        };
        if last == Some(fp) || last_bad == Some(fp) {
            continue;
        }
        // Validate, compile and swap off the data-plane thread.
        let (p, s) = (proxy.clone(), settings.clone());
        let applied = tokio::task::spawn_blocking(move || apply(&p, &s, cfg, file_version(fp)))
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
