//! Subscription-trie benchmarks: matching a publish against 10k and 100k
//! filters, and subscribe/unsubscribe churn.
//!
//! The filter set mimics a fleet deployment: mostly exact per-device
//! filters, plus per-tenant `+` (all devices of a tenant) and `#`
//! (per-device and per-tenant catch-alls) subscriptions, and a few global
//! monitoring filters.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fleetmq_protocol::trie::TopicTrie;

const TENANTS: u64 = 100;
const MEASUREMENTS: [&str; 4] = ["temperature", "humidity", "location", "battery"];

/// Deterministic xorshift so runs are comparable without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` filters: ~80% exact, ~10% `+`, ~10% `#`.
fn filters(n: usize) -> Vec<String> {
    let devices_per_tenant = (n as u64 / TENANTS).max(1);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = vec!["$SYS/#".to_string(), "+/+/alarm".to_string()];
    while out.len() < n {
        let t = rng.next() % TENANTS;
        let d = rng.next() % devices_per_tenant;
        let m = MEASUREMENTS[(rng.next() % 4) as usize];
        let f = match rng.next() % 10 {
            0 => format!("t{t}/+/{m}"),
            1 => format!("t{t}/d{d}/#"),
            _ => format!("t{t}/d{d}/{m}"),
        };
        out.push(f);
    }
    out
}

fn build(filters: &[String]) -> TopicTrie<u64, u8> {
    let mut trie = TopicTrie::new();
    for (i, f) in filters.iter().enumerate() {
        trie.insert(f, i as u64, 1);
    }
    trie
}

/// Publish topics spread over tenants and devices, so the bench does not
/// measure one hot cache line.
fn topics(n_filters: usize) -> Vec<String> {
    let devices_per_tenant = (n_filters as u64 / TENANTS).max(1);
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    (0..1024)
        .map(|_| {
            let t = rng.next() % TENANTS;
            let d = rng.next() % devices_per_tenant;
            let m = MEASUREMENTS[(rng.next() % 4) as usize];
            format!("t{t}/d{d}/{m}")
        })
        .collect()
}

fn bench_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("trie_match");
    group.throughput(Throughput::Elements(1));
    for n in [10_000usize, 100_000] {
        let trie = build(&filters(n));
        let topics = topics(n);
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &trie, |b, trie| {
            b.iter(|| {
                i = (i + 1) % topics.len();
                let mut hits = 0usize;
                trie.for_each_match(black_box(&topics[i]), |_, _, _| hits += 1);
                hits
            })
        });
    }
    group.finish();
}

fn bench_churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("trie_churn");
    for n in [10_000usize, 100_000] {
        let base = filters(n);
        let mut trie = build(&base);
        // A subscribe/unsubscribe pair into an existing populated trie, the
        // shape of a device reconnecting with a clean session.
        // Each is a valid filter not in the base set: '#' is replaced rather
        // than extended, since "a/#/x" would be an invalid filter.
        let churn: Vec<String> = filters(2048)
            .into_iter()
            .map(|f| match f.strip_suffix("/#") {
                Some(prefix) => format!("{prefix}/x"),
                None => format!("{f}/x"),
            })
            .collect();
        let mut i = 0usize;
        group.bench_function(BenchmarkId::new("insert_remove", n), |b| {
            b.iter(|| {
                i = (i + 1) % churn.len();
                let f = &churn[i];
                trie.insert(black_box(f), u64::MAX, 1);
                trie.remove(black_box(f), &u64::MAX)
            })
        });
    }
    // Building from scratch measures insert including node creation.
    let base = filters(10_000);
    group.sample_size(20);
    group.bench_function("build_10000", |b| b.iter(|| build(black_box(&base)).len()));
    group.finish();
}

criterion_group!(benches, bench_match, bench_churn);
criterion_main!(benches);
