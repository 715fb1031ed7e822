//! How long pushes take: from the commit of a version to each proxy's ACK
//! of it. Every first ACK of a pushed version is one observation of
//! `remora_control_push_seconds`; the latest version's ACKs are also kept
//! for `remoractl status` (p50, p99, last ACK) and the
//! `remora_control_push_last_ack_seconds` gauge.

use crate::metrics::Metrics;
use remora_proto::control::PushSummary;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub struct Pushes {
    latest: Mutex<Push>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Push {
    version: Arc<str>,
    committed_unix_ms: i64,
    /// Commit → ACK, seconds, in arrival order.
    acks: Vec<f64>,
}

impl Pushes {
    pub fn new(metrics: Arc<Metrics>) -> Pushes {
        Pushes {
            latest: Mutex::default(),
            metrics,
        }
    }

    /// A new snapshot version went out, committed `ago`.
    pub fn start(&self, version: Arc<str>, ago: Duration) {
        let committed = SystemTime::now() - ago;
        let ms = committed
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Push {
            version,
            committed_unix_ms: ms,
            acks: Vec::new(),
        };
        self.metrics.push_last_ack.set(0.0);
    }

    /// A proxy ACKed `version`, pushed to it `latency` after its commit.
    pub fn acked(&self, version: &str, latency: Duration) {
        let secs = latency.as_secs_f64();
        self.metrics.push.observe(secs);
        let mut p = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if *p.version == *version {
            p.acks.push(secs);
            if secs > self.metrics.push_last_ack.get() {
                self.metrics.push_last_ack.set(secs);
            }
        }
    }

    /// The latest push so far.
    pub fn summary(&self) -> PushSummary {
        let (version, committed_unix_ms, mut acks) = {
            let p = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            (p.version.to_string(), p.committed_unix_ms, p.acks.clone())
        };
        acks.sort_by(f64::total_cmp);
        PushSummary {
            snapshot_version: version,
            committed_unix_ms,
            acks: acks.len() as u32,
            p50_seconds: percentile(&acks, 50.0),
            p99_seconds: percentile(&acks, 99.0),
            last_ack_seconds: acks.last().copied().unwrap_or(0.0),
        }
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_push_summarizes_its_acks() {
        let metrics = Arc::new(Metrics::new(None));
        let pushes = Pushes::new(metrics.clone());
        pushes.start(Arc::from("1.0"), Duration::ZERO);
        for ms in [30, 10, 20, 40] {
            pushes.acked("1.0", Duration::from_millis(ms));
        }
        // An ACK of an older version counts in the histogram only.
        pushes.acked("0.0", Duration::from_millis(900));
        let s = pushes.summary();
        assert_eq!((s.snapshot_version.as_str(), s.acks), ("1.0", 4));
        assert_eq!((s.p50_seconds, s.p99_seconds), (0.02, 0.04));
        assert_eq!(s.last_ack_seconds, 0.04);
        assert_eq!(metrics.push_last_ack.get(), 0.04);
        let text = metrics.render();
        assert!(
            text.contains("remora_control_push_seconds_count 5"),
            "{text}"
        );
        // The next push starts from nothing.
        pushes.start(Arc::from("2.0"), Duration::ZERO);
        assert_eq!(pushes.summary().acks, 0);
        assert_eq!(metrics.push_last_ack.get(), 0.0);
    }
}
