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

/// Buckets are keyed by a 64-bit hash of the key, seeded per limit (so
/// callers cannot aim collisions): no allocation per check, and a key costs
/// the same memory whatever its length.
type Keyed<C> =
    RateLimiter<u64, DashMapStateStore<u64, PassThrough>, C, StateInformationMiddleware>;

/// The map's hasher: the key already is a seeded 64-bit hash, so hashing it
/// again (SipHash, the default) would only cost time.
#[derive(Clone, Copy, Default)]
pub struct PassThrough;

impl std::hash::BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

#[derive(Default)]
pub struct PassThroughHasher(u64);

impl std::hash::Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys reach this map; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Checks between two looks at the live key count (counting locks every
/// shard, too slow to do per request).
const KEY_COUNT_EVERY: u64 = 1024;

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
    /// Requests left in the bucket, and time until it is full again: what
    /// the `RateLimit` header says (formatted only if it is sent).
    pub remaining: u32,
    pub reset: Duration,
    /// The quota that answered when it was an override's.
    pub quota: Option<Quota>,
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
    seed: std::collections::hash_map::RandomState,
    checks: AtomicU64,
    over_capacity: std::sync::atomic::AtomicBool,
    /// `RateLimit-Policy` never changes for a limit: built once.
    policy_header: HeaderValue,
    /// `"name";r=` prefix of the `RateLimit` header.
    state_prefix: String,
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
            RateLimiter::dashmap_with_clock_and_hasher(q, clock.clone(), PassThrough)
                .with_middleware::<StateInformationMiddleware>()
        };
        let overrides = params
            .overrides
            .iter()
            .map(|(v, r, b)| (v.clone(), keyed(quota(*r, *b, params.per, params.share).0)))
            .collect();
        let q_units = share_of(params.requests, params.share).get();
        let w = params.per.as_secs().max(1);
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
            seed: Default::default(),
            checks: AtomicU64::new(0),
            over_capacity: Default::default(),
            policy_header: HeaderValue::from_str(&format!("\"{name}\";q={q_units};w={w}"))
                .unwrap_or(HeaderValue::from_static("")),
            state_prefix: format!("\"{name}\";r="),
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
        use std::hash::BuildHasher;
        let (limiter, is_override) = match self.overrides.get(key) {
            Some(l) => (l, true),
            None => (&self.limiter, false),
        };
        // Past max_keys live keys, new keys share one bucket until idle keys
        // are evicted: memory stays bounded under a flood of keys.
        if self
            .checks
            .fetch_add(1, Relaxed)
            .is_multiple_of(KEY_COUNT_EVERY)
        {
            self.over_capacity
                .store(self.limiter.len() >= self.params.max_keys, Relaxed);
        }
        let hashed = if self.over_capacity.load(Relaxed) {
            0
        } else {
            self.seed.hash_one(key) | 1
        };
        match limiter.check_key(&hashed) {
            Ok(state) => {
                self.metrics.allowed.inc();
                let remaining = state.remaining_burst_capacity();
                let burst = state.quota().burst_size().get();
                let reset = self.period * burst.saturating_sub(remaining);
                Verdict {
                    limited: false,
                    retry_after: Duration::ZERO,
                    remaining,
                    reset,
                    quota: is_override.then(|| state.quota()),
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
                    remaining: 0,
                    reset: wait,
                    quota: is_override.then(|| not_until.quota()),
                }
            }
        }
    }

    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers)
    /// for one of this limit's verdicts.
    pub fn header_values(&self, v: &Verdict) -> (HeaderValue, HeaderValue) {
        let (remaining, reset) = (v.remaining, v.reset);
        let t = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        let policy = match v.quota {
            None => self.policy_header.clone(),
            Some(quota) => {
                // An override's quota: rare, built when used.
                let per = self.params.per;
                let q = (per.as_nanos() / quota.replenish_interval().as_nanos().max(1)) as u64;
                let v = format!("\"{}\";q={q};w={}", self.name, per.as_secs().max(1));
                HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static(""))
            }
        };
        let mut buf = itoa::Buffer::new();
        let mut state = String::with_capacity(self.state_prefix.len() + 16);
        state.push_str(&self.state_prefix);
        state.push_str(buf.format(remaining));
        state.push_str(";t=");
        state.push_str(buf.format(t));
        (
            policy,
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
        let mut limited: Option<Duration> = None;
        // The verdict whose headers the response carries: the refusing one,
        // else the limit closest to refusing. Formatted once, at the end.
        let mut shown: Option<(&Limit, Verdict)> = None;
        for l in &self.limits {
            let v = l.check(&l.key(headers, peer, identity));
            if v.limited {
                limited = Some(limited.unwrap_or_default().max(v.retry_after));
                if l.headers {
                    shown = Some((l, v));
                }
            } else if l.headers
                && limited.is_none()
                && shown
                    .as_ref()
                    .is_none_or(|(_, s)| v.remaining < s.remaining)
            {
                shown = Some((l, v));
            }
        }
        Outcome {
            limited,
            headers: shown.map(|(l, v)| l.header_values(&v)),
        }
    }
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
        let (policy, state) = l.header_values(&ok);
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
        // The count is sampled every KEY_COUNT_EVERY checks: the bound holds
        // to within one interval.
        let bound = 1000 + KEY_COUNT_EVERY as usize + 1;
        assert!(l.live_keys() <= bound, "{}", l.live_keys());
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
