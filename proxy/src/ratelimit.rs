//! Rate limits: GCRA (governor) over keyed buckets, compiled from
//! RateLimitPolicy resources.
//!
//! A `Limit` is one `limits[]` entry of a policy: a key (total, client
//! identity, a header, the source address, or a combination), a rate and a
//! burst, and per-value overrides. Per-key state lives in a sharded map;
//! idle keys are evicted (`gc`), and past `max_keys` live keys new keys
//! share one overflow bucket, so memory stays bounded whatever callers send.
//!
//! Mesh-wide limits make no network call per request: every replica of the
//! Service enforces an equal share (quota / live replicas), and the share
//! changes whenever the control plane's snapshot says replicas came or went.

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tracing::info;

type Keyed<C> = RateLimiter<String, DashMapStateStore<String>, C, StateInformationMiddleware>;

/// One part of a limit's key.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyPart {
    Total,
    /// The caller's mTLS identity; its source address until it has one.
    ClientIdentity,
    Header(HeaderName),
    SourceAddress,
}

/// Everything that defines a limit's buckets: equal parameters keep the
/// buckets across a config swap.
#[derive(Clone, Debug, PartialEq)]
pub struct LimitParams {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
    pub key: Vec<KeyPart>,
    /// (value, requests, burst)
    pub overrides: Vec<(String, u32, u32)>,
    /// Replicas sharing a mesh-wide limit (1 for a local one).
    pub share: u32,
    pub max_keys: usize,
}

/// What the request needs to know about one limit's decision.
pub struct Verdict {
    pub limited: bool,
    pub retry_after: Duration,
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    pub headers: Option<(HeaderValue, HeaderValue)>,
}

/// Decision counters of one limit: allowed, limited, dry-run would-limit.
#[derive(Clone, Default)]
pub struct Decisions {
    pub allowed: Counter,
    pub limited: Counter,
    pub dry_run: Counter,
}

pub struct Limit<C: Clock = DefaultClock> {
    /// `namespace/policy`
    pub policy: String,
    pub name: String,
    pub params: LimitParams,
    pub dry_run: bool,
    pub headers: bool,
    limiter: Keyed<C>,
    overrides: HashMap<String, Keyed<C>>,
    clock: C,
    period: Duration,
    metrics: Decisions,
    last_log_ms: AtomicU64,
    unlogged: AtomicU64,
}

/// Divides `n` by the share, rounding up, at least 1.
fn share_of(n: u32, share: u32) -> NonZeroU32 {
    NonZeroU32::new(n.div_ceil(share.max(1)).max(1)).unwrap_or(NonZeroU32::MIN)
}

fn quota(requests: u32, burst: u32, per: Duration, share: u32) -> (Quota, Duration) {
    let r = share_of(requests, share);
    let period = per / r.get();
    let q = Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or(Quota::per_second(r))
        .allow_burst(share_of(burst, share));
    (q, period)
}

impl<C: Clock + Clone> Limit<C> {
    pub fn new(
        policy: &str,
        name: &str,
        params: LimitParams,
        dry_run: bool,
        headers: bool,
        metrics: Decisions,
        clock: C,
    ) -> Limit<C> {
        let (q, period) = quota(params.requests, params.burst, params.per, params.share);
        let keyed = |q: Quota| {
            RateLimiter::dashmap_with_clock(q, clock.clone())
                .with_middleware::<StateInformationMiddleware>()
        };
        let overrides = params
            .overrides
            .iter()
            .map(|(v, r, b)| (v.clone(), keyed(quota(*r, *b, params.per, params.share).0)))
            .collect();
        Limit {
            policy: policy.to_string(),
            name: name.to_string(),
            dry_run,
            headers,
            limiter: keyed(q),
            overrides,
            clock,
            period,
            metrics,
            last_log_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
            params,
        }
    }

    /// The key of a request for this limit.
    pub fn key(&self, headers: &HeaderMap, peer: Option<IpAddr>, identity: Option<&str>) -> String {
        let mut key = String::new();
        for (i, part) in self.params.key.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            match part {
                KeyPart::Total => {}
                KeyPart::ClientIdentity => match identity {
                    Some(id) => key.push_str(id),
                    None => push_ip(&mut key, peer),
                },
                KeyPart::SourceAddress => push_ip(&mut key, peer),
                KeyPart::Header(h) => {
                    if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
                        key.push_str(v);
                    }
                }
            }
        }
        key
    }

    /// Takes one request from `key`'s bucket.
    pub fn check(&self, key: &str) -> Verdict {
        let (limiter, requests) = match self.overrides.get(key) {
            Some(l) => (
                l,
                self.params
                    .overrides
                    .iter()
                    .find(|o| o.0 == key)
                    .map_or(self.params.requests, |o| o.1),
            ),
            None => (&self.limiter, self.params.requests),
        };
        // Past max_keys live keys, new keys share one bucket until idle keys
        // are evicted: memory stays bounded under a flood of keys.
        let overflow = limiter.len() >= self.params.max_keys;
        let result = if overflow {
            limiter.check_key(&"\u{0}overflow".to_string())
        } else {
            limiter.check_key(&key.to_string())
        };
        let q = share_of(requests, self.params.share).get();
        let w = self.params.per.as_secs().max(1);
        match result {
            Ok(state) => {
                self.metrics.allowed.inc();
                let remaining = state.remaining_burst_capacity();
                let burst = state.quota().burst_size().get();
                let reset = self.period * burst.saturating_sub(remaining);
                Verdict {
                    limited: false,
                    retry_after: Duration::ZERO,
                    headers: self
                        .headers
                        .then(|| self.header_values(q, w, remaining, reset)),
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                if self.dry_run {
                    self.metrics.dry_run.inc();
                    self.log("dry run: would limit", key);
                } else {
                    self.metrics.limited.inc();
                    self.log("limited", key);
                }
                Verdict {
                    limited: !self.dry_run,
                    retry_after: wait,
                    headers: self.headers.then(|| self.header_values(q, w, 0, wait)),
                }
            }
        }
    }

    fn header_values(
        &self,
        q: u32,
        w: u64,
        remaining: u32,
        reset: Duration,
    ) -> (HeaderValue, HeaderValue) {
        let t = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        let policy = format!("\"{}\";q={q};w={w}", self.name);
        let state = format!("\"{}\";r={remaining};t={t}", self.name);
        (
            HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("")),
            HeaderValue::from_str(&state).unwrap_or(HeaderValue::from_static("")),
        )
    }

    /// Logs a decision at most once a second per limit, with the count of
    /// the ones not logged.
    fn log(&self, what: &str, key: &str) {
        let now = crate::balance::now_ms();
        let last = self.last_log_ms.load(Relaxed);
        if now.saturating_sub(last) < 1000 && last != 0 {
            self.unlogged.fetch_add(1, Relaxed);
            return;
        }
        self.last_log_ms.store(now.max(1), Relaxed);
        let since = self.unlogged.swap(0, Relaxed);
        info!(policy = %self.policy, limit = %self.name, key, more_since_last_log = since, "{what}");
    }

    /// Evicts idle keys (their buckets are full again: nothing is lost).
    pub fn gc(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        for l in self.overrides.values() {
            l.retain_recent();
        }
    }

    pub fn live_keys(&self) -> usize {
        self.limiter.len()
    }
}

fn push_ip(key: &mut String, ip: Option<IpAddr>) {
    use std::fmt::Write;
    if let Some(ip) = ip {
        let _ = write!(key, "{ip}");
    }
}

/// The limits that apply at one point (a Service's inbound side, or a
/// route). Every limit sees the request; the strictest answer wins.
#[derive(Default)]
pub struct LimiterSet {
    pub limits: Vec<std::sync::Arc<Limit>>,
}

/// The outcome for a request.
pub struct Outcome {
    /// Some when the request is refused: how long to wait.
    pub limited: Option<Duration>,
    /// Headers for the response (from the tightest limit).
    pub headers: Option<(HeaderValue, HeaderValue)>,
}

impl LimiterSet {
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    pub fn check(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
        identity: Option<&str>,
    ) -> Outcome {
        let mut out = Outcome {
            limited: None,
            headers: None,
        };
        let mut tightest = u64::MAX;
        for l in &self.limits {
            let v = l.check(&l.key(headers, peer, identity));
            if v.limited {
                let wait = out.limited.unwrap_or_default().max(v.retry_after);
                out.limited = Some(wait);
                out.headers = v.headers.or(out.headers);
                tightest = 0;
            } else if let Some(h) = v.headers {
                // Prefer the limit closest to refusing.
                let r = remaining_of(&h.1);
                if r < tightest {
                    tightest = r;
                    out.headers = Some(h);
                }
            }
        }
        out
    }
}

fn remaining_of(v: &HeaderValue) -> u64 {
    v.to_str()
        .ok()
        .and_then(|s| s.split(";r=").nth(1))
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limit(
        requests: u32,
        burst: u32,
        share: u32,
        clock: &FakeRelativeClock,
    ) -> Limit<FakeRelativeClock> {
        Limit::new(
            "default/p",
            "l",
            LimitParams {
                requests,
                per: Duration::from_secs(1),
                burst,
                key: vec![KeyPart::Header(HeaderName::from_static("x-user"))],
                overrides: vec![("vip".into(), requests * 10, burst * 10)],
                share,
                max_keys: 1000,
            },
            false,
            true,
            Decisions::default(),
            clock.clone(),
        )
    }

    fn admitted(l: &Limit<FakeRelativeClock>, key: &str, n: usize) -> usize {
        (0..n).filter(|_| !l.check(key).limited).count()
    }

    #[test]
    fn burst_is_exact_at_time_zero_then_the_rate_refills() {
        let clock = FakeRelativeClock::default();
        let l = limit(10, 5, 1, &clock);
        assert_eq!(admitted(&l, "a", 100), 5, "exactly the burst at t=0");
        clock.advance(Duration::from_millis(100));
        assert_eq!(admitted(&l, "a", 100), 1, "one request per 100 ms");
        clock.advance(Duration::from_secs(10));
        assert_eq!(
            admitted(&l, "a", 100),
            5,
            "refilled to the burst, not beyond"
        );
    }

    #[test]
    fn keys_are_isolated_and_overrides_apply() {
        let clock = FakeRelativeClock::default();
        let l = limit(10, 5, 1, &clock);
        assert_eq!(admitted(&l, "noisy", 50), 5);
        assert_eq!(admitted(&l, "quiet", 3), 3, "the quiet key is untouched");
        assert_eq!(admitted(&l, "vip", 100), 50, "the override's 10x burst");
    }

    #[test]
    fn mesh_share_divides_rate_and_burst() {
        let clock = FakeRelativeClock::default();
        let l = limit(30, 9, 3, &clock);
        assert_eq!(admitted(&l, "a", 100), 3);
        clock.advance(Duration::from_millis(100));
        assert_eq!(admitted(&l, "a", 100), 1, "10/s each: one per 100 ms");
    }

    #[test]
    fn limited_answers_carry_retry_after_and_headers() {
        let clock = FakeRelativeClock::default();
        let l = limit(1, 1, 1, &clock);
        let ok = l.check("a");
        assert!(!ok.limited);
        let (policy, state) = ok.headers.unwrap();
        assert_eq!(policy, "\"l\";q=1;w=1");
        assert_eq!(state, "\"l\";r=0;t=1");
        let no = l.check("a");
        assert!(no.limited);
        assert_eq!(no.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn a_flood_of_keys_is_bounded() {
        let clock = FakeRelativeClock::default();
        let l = limit(1, 1, 1, &clock);
        for i in 0..5000 {
            l.check(&format!("k{i}"));
        }
        assert!(l.live_keys() <= 1001, "{}", l.live_keys());
        clock.advance(Duration::from_secs(60));
        l.gc();
        assert_eq!(l.live_keys(), 0, "idle keys evicted");
    }

    #[test]
    fn keys_combine_parts() {
        let clock = FakeRelativeClock::default();
        let mut l = limit(1, 1, 1, &clock);
        l.params.key = vec![
            KeyPart::SourceAddress,
            KeyPart::Header(HeaderName::from_static("x-user")),
            KeyPart::ClientIdentity,
        ];
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("bob"));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(l.key(&h, Some(ip), None), "10.0.0.1,bob,10.0.0.1");
        assert_eq!(
            l.key(&h, Some(ip), Some("spiffe://td/ns/a/sa/b")),
            "10.0.0.1,bob,spiffe://td/ns/a/sa/b"
        );
    }
}
