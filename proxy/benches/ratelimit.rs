//! Rate-limit decision cost: one keyed check with 1,000,000 keys live, and
//! the memory those keys take.
//!
//!   cargo bench -p remora-proxy --bench ratelimit
use criterion::{criterion_group, criterion_main, Criterion};
use remora_proxy::ratelimit::{Decisions, KeyPart, Limit, LimitParams};
use std::time::Duration;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn limit() -> Limit {
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
            max_keys: 2_000_000,
        },
        false,
        true,
        Decisions::default(),
        governor::clock::DefaultClock::default(),
    )
}

fn keyed_check(c: &mut Criterion) {
    const KEYS: usize = 1_000_000;
    let before = rss_kib();
    let limit = limit();
    let keys: Vec<String> = (0..KEYS)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    for k in &keys {
        limit.check(k);
    }
    let after = rss_kib();
    println!(
        "{} live keys: RSS grew {} MiB ({} bytes per key, key strings included)",
        limit.live_keys(),
        (after - before) / 1024,
        (after - before) * 1024 / KEYS as u64
    );
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
    let limit = limit();
    let keys: Vec<String> = (0..1000)
        .map(|i| format!("10.0.{}.{}", i >> 8, i & 255))
        .collect();
    let mut i = 0usize;
    c.bench_function("keyed check, 1k keys live", |b| {
        b.iter(|| {
            i = (i + 7) % keys.len();
            limit.check(&keys[i])
        })
    });
}

criterion_group!(benches, keyed_check, keyed_check_small);
criterion_main!(benches);
