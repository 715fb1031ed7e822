//! Retry policy and budget. The budget keeps retries to a share of the
//! request rate over a sliding window (Finagle/Linkerd style), with a floor
//! so low-traffic routes can still retry: a failing backend never sees a
//! retry storm, whatever the per-request attempt count says.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A compiled `retry` stanza.
pub struct RetryPolicy {
    pub codes: Vec<u16>,
    pub attempts: u32,
    pub backoff: Duration,
    pub non_idempotent: bool,
    pub budget: std::sync::Arc<RetryBudget>,
}

impl RetryPolicy {
    pub fn retries_status(&self, status: u16) -> bool {
        self.codes.contains(&status)
    }

    /// Exponential backoff with jitter: uniformly in [d/2, d] where
    /// d = backoff * 2^retry, capped at 64x the base.
    pub fn backoff(&self, retry: u32) -> Duration {
        let d = self.backoff.saturating_mul(1 << retry.min(6));
        let half = d / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

const BUCKETS: usize = 10;

/// Requests and retries over the last `window`, in ten buckets.
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    state: Mutex<Window>,
}

struct Window {
    started: Instant,
    /// Index of the bucket that `started` falls in, as an absolute count.
    head: u64,
    requests: [u32; BUCKETS],
    retries: [u32; BUCKETS],
}

/// Parameters that define a budget; equal parameters keep state on a swap.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetParams {
    pub percent: f64,
    pub min_per_sec: u32,
    pub window: Duration,
}

impl RetryBudget {
    pub fn new(p: BudgetParams) -> RetryBudget {
        RetryBudget {
            ratio: p.percent / 100.0,
            min_per_sec: p.min_per_sec as f64,
            window: p.window,
            state: Mutex::new(Window {
                started: Instant::now(),
                head: 0,
                requests: [0; BUCKETS],
                retries: [0; BUCKETS],
            }),
        }
    }

    pub fn params(&self) -> BudgetParams {
        BudgetParams {
            percent: self.ratio * 100.0,
            min_per_sec: self.min_per_sec as u32,
            window: self.window,
        }
    }

    fn with<R>(&self, now: Instant, f: impl FnOnce(&mut Window) -> R) -> R {
        let mut w = match self.state.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let bucket_len = self.window / BUCKETS as u32;
        let idx = (now.saturating_duration_since(w.started).as_nanos()
            / bucket_len.as_nanos().max(1)) as u64;
        // Clear the buckets that slid out of the window.
        let stale = (idx.saturating_sub(w.head)).min(BUCKETS as u64);
        for i in 1..=stale {
            let b = ((w.head + i) % BUCKETS as u64) as usize;
            w.requests[b] = 0;
            w.retries[b] = 0;
        }
        w.head = w.head.max(idx);
        f(&mut w)
    }

    /// Counts a request's first try.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now())
    }

    pub fn deposit_at(&self, now: Instant) {
        self.with(now, |w| {
            let b = (w.head % BUCKETS as u64) as usize;
            w.requests[b] = w.requests[b].saturating_add(1);
        })
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let (ratio, floor) = (self.ratio, self.min_per_sec * self.window.as_secs_f64());
        self.with(now, |w| {
            let requests: u64 = w.requests.iter().map(|&n| n as u64).sum();
            let retries: u64 = w.retries.iter().map(|&n| n as u64).sum();
            let allowed = (requests as f64 * ratio).max(floor);
            if (retries as f64) < allowed {
                let b = (w.head % BUCKETS as u64) as usize;
                w.retries[b] = w.retries[b].saturating_add(1);
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> RetryBudget {
        RetryBudget::new(BudgetParams {
            percent: 20.0,
            min_per_sec: 10,
            window: Duration::from_secs(10),
        })
    }

    #[test]
    fn floor_allows_min_retries_per_second_over_window() {
        let b = budget();
        let t = Instant::now();
        let granted = (0..1000).filter(|_| b.try_withdraw_at(t)).count();
        assert_eq!(granted, 100, "10/s over a 10 s window");
    }

    #[test]
    fn ratio_caps_retries_at_twenty_percent() {
        let b = budget();
        let t = Instant::now();
        for _ in 0..10_000 {
            b.deposit_at(t);
        }
        let granted = (0..10_000).filter(|_| b.try_withdraw_at(t)).count();
        assert_eq!(granted, 2000);
    }

    #[test]
    fn window_slides() {
        let b = budget();
        let t = Instant::now();
        assert_eq!((0..500).filter(|_| b.try_withdraw_at(t)).count(), 100);
        assert!(!b.try_withdraw_at(t + Duration::from_secs(5)));
        // After a whole window the old retries have slid out.
        assert!(b.try_withdraw_at(t + Duration::from_secs(11)));
    }

    #[test]
    fn backoff_grows_with_jitter() {
        let p = RetryPolicy {
            codes: vec![503],
            attempts: 3,
            backoff: Duration::from_millis(100),
            non_idempotent: false,
            budget: std::sync::Arc::new(budget()),
        };
        for _ in 0..100 {
            let d0 = p.backoff(0);
            let d2 = p.backoff(2);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            assert!(d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(400));
        }
    }
}
