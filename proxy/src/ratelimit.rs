//! Rate limits: GCRA (governor) over keyed buckets, compiled from
//! RateLimitPolicy resources.
//!
//! A `Limit` is one `limits[]` entry of a policy: a key (total, client
//! identity, a header, the source address, or a combination), a rate and a
//! burst, and per-value overrides. Per-key buckets live in a bounded
//! `KeyTable`: at most `max_keys` tracked keys, each with its own bucket.
//! While the table is full, a key not yet tracked shares one overflow bucket
//! and tracked keys keep theirs, so a flood of new keys costs no memory and
//! throttles no client already known. Idle keys are evicted (`gc`), which
//! makes room again.
//!
//! Mesh-wide limits make no network call per request: every replica of the
//! Service enforces an equal share (quota / live replicas), and the share
//! changes whenever the control plane's snapshot says replicas came or went.

pub mod compile;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tracing::{info, warn};

/// Tracked keys per limit unless `--ratelimit-max-keys` says otherwise: a
/// full limit's key table takes about 4.3 MiB, so a proxy with several full
/// limits stays well inside a 64 MiB sidecar.
///
/// A tracked key is one hash-table entry: the key's 64-bit hash and its
/// bucket (16 bytes) plus a control byte, in tables kept at most 7/8 full
/// and grown by doubling, so 19 to 39 bytes a key depending on where the
/// count falls. Measured with `cargo bench -p remora-proxy --bench
/// ratelimit`, which fills a table with a counting allocator installed:
/// 200,000 keys hold 4.25 MiB (22.3 bytes a key; RSS grew 4.6 MiB, 24 bytes
/// a key); 1,000,000 keys, the old default, hold 34 MiB (35.7 bytes a key).
/// 200,000 is 13% under the count at which the tables double (229,376,
/// whatever the shard count), which leaves room for uneven shards. Evicted
/// keys can leave tombstones that make a shard's table double before the
/// next `gc` shrinks it again: at worst about 8.5 MiB.
pub const DEFAULT_MAX_KEYS: usize = 200_000;

/// How long a key's bucket stays tracked once it is full again (the key
/// idle): a client that calls at least this often keeps its own bucket
/// while a flood of new keys fills the table. The same as the cadence of
/// `gc`.
pub const IDLE_GRACE: Duration = Duration::from_secs(10);

/// Buckets are keyed by a 64-bit hash of the key, seeded per limit (so
/// callers cannot aim collisions): no allocation per check, and a key costs
/// the same memory whatever its length.
type Keyed<C> = RateLimiter<u64, KeyTable, C, StateInformationMiddleware>;

/// A limit's buckets: one per tracked key, at most `max_keys` of them, and
/// one overflow bucket shared by the keys that come while the table is full.
///
/// A tracked key always finds its own bucket, full table or not; only a key
/// not yet tracked can land in the overflow bucket. Eviction (`gc`) makes
/// room, and the next new keys get their own buckets again.
pub struct KeyTable {
    cells: DashMapStateStore<u64, PassThrough>,
    /// Tracked keys. A slot is reserved before a key is inserted, so this
    /// never exceeds `max_keys`, however many checks race.
    tracked: AtomicUsize,
    max_keys: usize,
    overflow: InMemoryState,
    /// Checks answered by the overflow bucket.
    overflowed: Counter,
}

impl KeyTable {
    fn new(max_keys: usize, overflowed: Counter) -> KeyTable {
        KeyTable {
            cells: DashMapStateStore::with_hasher(PassThrough),
            tracked: AtomicUsize::new(0),
            max_keys,
            overflow: InMemoryState::default(),
            overflowed,
        }
    }

    /// Takes a slot for a new key, if the table has one.
    fn reserve(&self) -> bool {
        self.tracked
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max_keys).then_some(n + 1))
            .is_ok()
    }
}

/// The theoretical arrival time a bucket holds (None: a fresh bucket), read
/// through the public `StateStore` update with a closure that declines to
/// update.
fn arrival(cell: &InMemoryState) -> Option<Nanos> {
    cell.measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
        .err()
        .flatten()
}

impl StateStore for KeyTable {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // Tracked keys: a read lock on one shard and a compare-and-swap.
        if let Some(cell) = self.cells.get(key) {
            return cell.measure_and_replace(&NotKeyed::NonKey, f);
        }
        if !self.reserve() {
            self.overflowed.inc();
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let mut inserted = false;
        let cell = self.cells.entry(*key).or_insert_with(|| {
            inserted = true;
            InMemoryState::default()
        });
        if !inserted {
            // Another check inserted the key since the lookup above.
            self.tracked.fetch_sub(1, Relaxed);
        }
        cell.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<u64> for KeyTable {
    /// Evicts the keys whose bucket has been full for `IDLE_GRACE` (governor
    /// passes the time before which a bucket is full again).
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.saturating_sub(IDLE_GRACE.into());
        let mut evicted = 0;
        self.cells.retain(|_, cell| {
            let keep = arrival(cell).is_some_and(|tat| tat > drop_below);
            evicted += usize::from(!keep);
            keep
        });
        self.tracked.fetch_sub(evicted, Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.cells.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.cells.len()
    }

    fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
}

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

pub use crate::metrics::Decisions;

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
    /// The overflow count at the last `gc`, to log what came since.
    overflow_seen: AtomicU64,
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
        let keyed = |q: Quota, table: KeyTable| Keyed::new(q, table, clock.clone());
        // An override's table only ever holds the override's own value.
        let overrides = params
            .overrides
            .iter()
            .map(|(v, r, b)| {
                let q = quota(*r, *b, params.per, params.share).0;
                (v.clone(), keyed(q, KeyTable::new(1, Counter::default())))
            })
            .collect();
        let table = KeyTable::new(params.max_keys, metrics.overflow.clone());
        let overflow_seen = AtomicU64::new(metrics.overflow.get());
        let q_units = share_of(params.requests, params.share).get();
        let w = params.per.as_secs().max(1);
        Limit {
            policy: policy.to_string(),
            name: name.to_string(),
            dry_run,
            headers,
            limiter: keyed(q, table),
            overrides,
            clock,
            period,
            metrics,
            last_log_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
            seed: Default::default(),
            overflow_seen,
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
        // A tracked key has its own bucket; a new one while the table is
        // full shares the overflow bucket (`KeyTable`).
        match limiter.check_key(&self.seed.hash_one(key)) {
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

    /// Evicts the keys idle for `IDLE_GRACE` (their buckets are full again:
    /// nothing is lost), and logs how many checks the full table sent to the
    /// overflow bucket since the last call. Run every 10 s.
    pub fn gc(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        for l in self.overrides.values() {
            l.retain_recent();
        }
        let total = self.metrics.overflow.get();
        let since = total.saturating_sub(self.overflow_seen.swap(total, Relaxed));
        if since > 0 {
            warn!(
                policy = %self.policy,
                limit = %self.name,
                max_keys = self.params.max_keys,
                overflowed = since,
                "key table full: new keys shared the overflow bucket"
            );
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
        assert_eq!(l.live_keys(), 1000, "exactly max_keys tracked");
        clock.advance(Duration::from_secs(60));
        l.gc();
        assert_eq!(l.live_keys(), 0, "idle keys evicted");
    }

    /// 10 a second, burst 5, keyed by `x-user`, at most `max_keys` tracked.
    fn with_table(
        max_keys: usize,
        clock: &FakeRelativeClock,
        decisions: &Decisions,
    ) -> Limit<FakeRelativeClock> {
        let params = LimitParams {
            requests: 10,
            per: Duration::from_secs(1),
            burst: 5,
            key: vec![KeyPart::Header(HeaderName::from_static("x-user"))],
            overrides: vec![],
            share: 1,
            max_keys,
        };
        let d = decisions.clone();
        Limit::new("default/p", "l", params, false, true, d, clock.clone())
    }

    /// Sends one request for each of `n` keys never seen before.
    fn new_keys(l: &Limit<FakeRelativeClock>, prefix: &str, n: usize) -> usize {
        (0..n)
            .map(|i| admitted(l, &format!("{prefix}{i}"), 1))
            .sum()
    }

    #[test]
    fn a_tracked_key_keeps_its_own_budget_when_the_table_is_full() {
        let (clock, d) = (FakeRelativeClock::default(), Decisions::default());
        let l = with_table(3, &clock, &d);
        assert_eq!(admitted(&l, "tracked", 1), 1);
        // Two keys fill the table, the rest drain the overflow bucket.
        new_keys(&l, "flood", 100);
        assert_eq!(l.live_keys(), 3);
        assert_eq!(
            admitted(&l, "another", 1),
            0,
            "the overflow bucket is empty"
        );
        assert_eq!(
            admitted(&l, "tracked", 100),
            4,
            "the rest of its own burst of 5"
        );
        clock.advance(Duration::from_millis(100));
        assert_eq!(
            admitted(&l, "tracked", 100),
            1,
            "its own rate: one per 100 ms"
        );
        assert_eq!(d.overflow.get(), 99, "only new keys were sent to overflow");
    }

    #[test]
    fn new_keys_share_the_overflow_bucket_when_the_table_is_full() {
        let (clock, d) = (FakeRelativeClock::default(), Decisions::default());
        let l = with_table(3, &clock, &d);
        assert_eq!(new_keys(&l, "own", 3), 3);
        assert_eq!(
            new_keys(&l, "new", 100),
            5,
            "100 new keys share one burst of 5"
        );
        assert_eq!(l.live_keys(), 3, "none of them is tracked");
        assert_eq!(d.overflow.get(), 100);
        clock.advance(Duration::from_millis(100));
        assert_eq!(new_keys(&l, "later", 10), 1, "the shared bucket's rate");
    }

    #[test]
    fn after_gc_evicts_idle_keys_new_keys_get_their_own_buckets() {
        let (clock, d) = (FakeRelativeClock::default(), Decisions::default());
        let l = with_table(3, &clock, &d);
        new_keys(&l, "old", 3);
        new_keys(&l, "flood", 10);
        clock.advance(Duration::from_secs(1));
        l.gc();
        assert_eq!(l.live_keys(), 3, "idle for less than IDLE_GRACE: kept");
        clock.advance(IDLE_GRACE);
        l.gc();
        assert_eq!(l.live_keys(), 0, "idle keys evicted");
        for k in ["a", "b", "c"] {
            assert_eq!(admitted(&l, k, 100), 5, "{k} has its own burst");
        }
        assert_eq!(l.live_keys(), 3);
        let before = d.overflow.get();
        assert_eq!(admitted(&l, "d", 100), 5, "the table is full again");
        assert_eq!(admitted(&l, "e", 100), 0, "d and e share the overflow");
        assert_eq!(d.overflow.get() - before, 200);
    }

    #[test]
    fn a_key_calling_within_the_idle_grace_stays_tracked_through_a_flood() {
        let (clock, d) = (FakeRelativeClock::default(), Decisions::default());
        let l = with_table(2, &clock, &d);
        assert_eq!(admitted(&l, "steady", 1), 1);
        for s in 1..=60 {
            clock.advance(Duration::from_secs(1));
            if s % 10 == 0 {
                l.gc();
            }
            // 20 new keys a second: one takes the free slot, the rest
            // drain the overflow bucket.
            new_keys(&l, &format!("flood{s}-"), 20);
            assert_eq!(l.live_keys(), 2);
            if s % 5 == 0 {
                // Its bucket has been full (idle) for 4.9 s, less than the
                // grace: still its own.
                assert_eq!(admitted(&l, "steady", 1), 1, "at {s} s");
            }
        }
    }

    #[test]
    fn racing_checks_never_track_more_than_max_keys() {
        let (clock, d) = (FakeRelativeClock::default(), Decisions::default());
        let l = with_table(100, &clock, &d);
        // Four threads with the same 1,000 keys: inserts of one key race.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| new_keys(&l, "k", 1000));
            }
        });
        assert_eq!(l.live_keys(), 100);
        new_keys(&l, "extra", 10);
        assert_eq!(l.live_keys(), 100, "no slot was counted twice");
        clock.advance(IDLE_GRACE * 2);
        l.gc();
        assert_eq!(l.live_keys(), 0);
        new_keys(&l, "again", 101);
        assert_eq!(l.live_keys(), 100, "every slot was given back");
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
