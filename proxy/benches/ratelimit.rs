//! Rate-limit decision cost: one keyed check with 1,000,000 keys live and
//! with 1,000, and with a full key table (a tracked key, and a new key sent
//! to the overflow bucket). First it prints what a full key table costs in
//! memory at the default `--ratelimit-max-keys` and at 1,000,000 keys.
//!
//!   cargo bench -p remora-proxy --bench ratelimit
use criterion::{criterion_group, criterion_main, Criterion};
use remora_proxy::ratelimit::{Decisions, KeyPart, Limit, LimitParams, DEFAULT_MAX_KEYS};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// The system allocator, counting the bytes it holds: what a key table
/// costs, exactly, apart from the allocator's own slack.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn grew(n: usize) {
        let now = LIVE.fetch_add(n, Relaxed) + n;
        PEAK.fetch_max(now, Relaxed);
    }
}

// SAFETY: every call is passed unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            Counting::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            Counting::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            Counting::grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn limit(max_keys: usize) -> Limit {
    Limit::new(
        "default/p",
        "per-client",
        LimitParams {
            requests: 100,
            per: Duration::from_secs(1),
            burst: 100,
            key: vec![KeyPart::SourceAddress],
            overrides: vec![],
            share: 1,
            max_keys,
        },
        false,
        true,
        Decisions::default(),
        governor::clock::DefaultClock::default(),
    )
}

fn key(i: usize) -> String {
    format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)
}

/// Fills a table with `n` keys, made one at a time so that only the table
/// stays allocated, and prints what it holds.
fn table_memory(n: usize) {
    let (live, rss) = (LIVE.load(Relaxed), rss_kib());
    PEAK.store(live, Relaxed);
    let limit = limit(n);
    let mut k = String::with_capacity(16);
    for i in 0..n {
        k.clear();
        let _ = write!(k, "10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        limit.check(&k);
    }
    assert_eq!(limit.live_keys(), n);
    let table = LIVE.load(Relaxed) - live;
    let peak = PEAK.load(Relaxed) - live;
    let rss = rss_kib().saturating_sub(rss) * 1024;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "{n} keys: table {:.2} MiB, {:.1} bytes a key (peak {:.2} MiB while growing); RSS grew {:.2} MiB, {:.1} bytes a key",
        mib(table),
        table as f64 / n as f64,
        mib(peak),
        mib(rss),
        rss as f64 / n as f64,
    );
}

fn memory(_: &mut Criterion) {
    table_memory(DEFAULT_MAX_KEYS);
    table_memory(1_000_000);
}

fn keyed_check(c: &mut Criterion) {
    const KEYS: usize = 1_000_000;
    let limit = limit(2 * KEYS);
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    for k in &keys {
        limit.check(k);
    }
    let mut i = 0usize;
    c.bench_function("keyed check, 1M keys live", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            limit.check(&keys[i])
        })
    });
}

/// The same check with 1,000 keys live: the structural cost, without the
/// cache and TLB misses of a million-key working set.
fn keyed_check_small(c: &mut Criterion) {
    let limit = limit(2_000_000);
    let keys: Vec<String> = (0..1000).map(key).collect();
    let mut i = 0usize;
    c.bench_function("keyed check, 1k keys live", |b| {
        b.iter(|| {
            i = (i + 7) % keys.len();
            limit.check(&keys[i])
        })
    });
}

/// A full table of 1,000 keys: a tracked key keeps its own bucket (the
/// same cost as above), and a new key misses, finds no slot and is answered
/// by the overflow bucket (here limited, as in a flood).
fn keyed_check_full(c: &mut Criterion) {
    let limit = limit(1000);
    let tracked: Vec<String> = (0..1000).map(key).collect();
    for k in &tracked {
        limit.check(k);
    }
    let new: Vec<String> = (1000..2000).map(key).collect();
    let mut i = 0usize;
    c.bench_function("keyed check, table full, tracked key", |b| {
        b.iter(|| {
            i = (i + 7) % tracked.len();
            limit.check(&tracked[i])
        })
    });
    c.bench_function("keyed check, table full, new key", |b| {
        b.iter(|| {
            i = (i + 7) % new.len();
            limit.check(&new[i])
        })
    });
    assert_eq!(limit.live_keys(), 1000);
}

criterion_group!(
    benches,
    memory,
    keyed_check,
    keyed_check_small,
    keyed_check_full
);
criterion_main!(benches);
