//! Per-endpoint load state: a peak-EWMA latency estimate, the requests in
//! flight, and outlier detection. All atomics: the request path never takes
//! a lock to pick an endpoint, and races only blur an estimate slightly.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds since the process started (monotonic).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Decay time of the latency estimate (Linkerd uses 10 s too).
const EWMA_DECAY_MS: f64 = 10_000.0;
/// Estimate for an endpoint with no history, in nanoseconds.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;

/// Outlier detection settings.
#[derive(Clone, Copy, Debug)]
pub struct OutlierConfig {
    /// Failures in a row (5xx or connection error) that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection period; doubled on every ejection in a row.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

/// The load and health of one endpoint.
pub struct EndpointLoad {
    ewma_ns: AtomicU64, // f64 bits
    stamp_ms: AtomicU64,
    inflight: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections_in_a_row: AtomicU32,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        EndpointLoad {
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            stamp_ms: AtomicU64::new(now_ms()),
            inflight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections_in_a_row: AtomicU32::new(0),
        }
    }
}

impl EndpointLoad {
    fn decayed(&self, now: u64) -> f64 {
        let est = f64::from_bits(self.ewma_ns.load(Relaxed));
        let elapsed = now.saturating_sub(self.stamp_ms.load(Relaxed)) as f64;
        est * (-elapsed / EWMA_DECAY_MS).exp()
    }

    /// Peak-EWMA cost: the latency estimate scaled by the load in flight.
    pub fn cost(&self, now: u64) -> f64 {
        let rtt = self.decayed(now).max(1.0);
        rtt * (self.inflight.load(Relaxed) + 1) as f64
    }

    /// Folds in one observed latency. A peak replaces the estimate at once;
    /// a faster answer moves it gradually.
    pub fn observe(&self, rtt: Duration) {
        let now = now_ms();
        let rtt = rtt.as_nanos() as f64;
        let est = self.decayed(now);
        let next = if rtt > est {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.stamp_ms.load(Relaxed)) as f64;
            let w = (-elapsed.max(1.0) / EWMA_DECAY_MS).exp();
            est * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Relaxed);
        self.stamp_ms.store(now, Relaxed);
    }

    pub fn start(&self) -> InflightGuard<'_> {
        self.inflight.fetch_add(1, Relaxed);
        InflightGuard(&self.inflight)
    }

    /// Like `start`, for a connection that outlives the borrow (opaque
    /// TCP counts as in flight until it closes).
    pub fn start_owned(self: &Arc<Self>) -> OwnedInflight {
        self.inflight.fetch_add(1, Relaxed);
        OwnedInflight(self.clone())
    }

    pub fn available(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) <= now
    }

    pub fn succeeded(&self) {
        self.consecutive_failures.store(0, Relaxed);
        if self.ejections_in_a_row.load(Relaxed) != 0 && self.available(now_ms()) {
            // A probe after an ejection came back healthy.
            self.ejections_in_a_row.store(0, Relaxed);
        }
    }

    /// Records a failure; `refused` (the endpoint refused the connection)
    /// ejects at once. Returns true when this failure ejected the endpoint.
    pub fn failed(&self, cfg: &OutlierConfig, refused: bool) -> bool {
        let now = now_ms();
        if !self.available(now) {
            return false; // already ejected
        }
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if !refused && n < cfg.consecutive_failures {
            return false;
        }
        let k = self.ejections_in_a_row.fetch_add(1, Relaxed).min(10);
        let period = cfg
            .base_ejection
            .saturating_mul(1 << k)
            .min(cfg.max_ejection.max(cfg.base_ejection));
        self.ejected_until_ms
            .store(now + period.as_millis() as u64, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        true
    }
}

/// Counts a request in flight until dropped.
pub struct InflightGuard<'a>(&'a AtomicUsize);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// `InflightGuard` holding its endpoint's load.
pub struct OwnedInflight(Arc<EndpointLoad>);

impl Drop for OwnedInflight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

/// Power of two choices: sample two endpoints, take the cheaper. Ejected
/// endpoints are skipped while any other is available; if every endpoint is
/// ejected, all are used (better a likely failure than a certain one).
pub fn pick_p2c<T>(items: &[T], load: impl Fn(&T) -> &EndpointLoad) -> Option<usize> {
    let n = items.len();
    if n <= 1 {
        return (n == 1).then_some(0);
    }
    let now = now_ms();
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    let (la, lb) = (load(&items[a]), load(&items[b]));
    match (la.available(now), lb.available(now)) {
        (true, true) => Some(if la.cost(now) <= lb.cost(now) { a } else { b }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => {
            let start = fastrand::usize(..n);
            let any = (0..n)
                .map(|i| (start + i) % n)
                .find(|&i| load(&items[i]).available(now));
            Some(any.unwrap_or(a))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
        }
    }

    #[test]
    fn p2c_prefers_the_faster_endpoint() {
        let eps: Vec<EndpointLoad> = (0..2).map(|_| EndpointLoad::default()).collect();
        eps[0].observe(Duration::from_millis(50));
        eps[1].observe(Duration::from_micros(100));
        let fast = (0..1000)
            .filter(|_| pick_p2c(&eps, |e| e) == Some(1))
            .count();
        assert_eq!(fast, 1000, "with two endpoints P2C always compares both");
    }

    #[test]
    fn consecutive_failures_eject_and_refusal_ejects_at_once() {
        let e = EndpointLoad::default();
        assert!(!e.failed(&cfg(), false));
        assert!(!e.failed(&cfg(), false));
        assert!(e.failed(&cfg(), false));
        assert!(!e.available(now_ms()));

        let r = EndpointLoad::default();
        assert!(r.failed(&cfg(), true));
        assert!(!r.available(now_ms()));
    }

    #[test]
    fn ejected_endpoints_are_skipped_unless_all_are() {
        let eps: Vec<EndpointLoad> = (0..3).map(|_| EndpointLoad::default()).collect();
        eps[0].failed(&cfg(), true);
        eps[1].failed(&cfg(), true);
        for _ in 0..200 {
            assert_eq!(pick_p2c(&eps, |e| e), Some(2));
        }
        eps[2].failed(&cfg(), true);
        assert!(pick_p2c(&eps, |e| e).is_some());
    }

    #[test]
    fn success_resets_failure_count() {
        let e = EndpointLoad::default();
        e.failed(&cfg(), false);
        e.failed(&cfg(), false);
        e.succeeded();
        assert!(!e.failed(&cfg(), false));
        assert!(e.available(now_ms()));
    }
}
