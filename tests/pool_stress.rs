//! A randomised stress test: calls, cancellations and runner kills in a seeded random order
//! against a pool of real runner processes, checking the pool's invariants throughout.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use flame::{JoinHandle, Pool, ProcessBackend};
use flame_tests::*;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");

/// xorshift64*: reproducible without a dependency; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    }
}

async fn run(seed: u64) {
    const MAX: usize = 3;
    const PER_RUNNER: usize = 4;
    let mut rng = Rng(seed);
    let backend = Counting::new(ProcessBackend::new().program(RUNNER));
    let (alive, peak) = (backend.alive.clone(), backend.peak.clone());
    let pool = Pool::builder("stress")
        .backend(backend)
        .max(MAX)
        .max_concurrency(PER_RUNNER)
        .start()
        .await
        .unwrap();

    let mut pending: Vec<JoinHandle<(usize, u32)>> = Vec::new();
    let mut pids = HashSet::new();
    let (mut spawned, mut cancelled, mut kills) = (0, 0, 0);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut record = |result: Result<(usize, u32), flame::Error>, pids: &mut HashSet<u32>| {
        let key = match result {
            Ok((seen, pid)) => {
                assert!(
                    seen <= PER_RUNNER,
                    "seed {seed}: {seen} calls ran at once on one runner"
                );
                pids.insert(pid);
                "ok".to_string()
            }
            Err(e) => format!("{:?}", e.kind()),
        };
        *outcomes.entry(key).or_default() += 1;
    };
    for _ in 0..400 {
        match rng.next(100) {
            0..=64 => {
                pending.push(flame::spawn_on(&pool, located_probe(rng.next(30))));
                spawned += 1;
            }
            65..=79 if !pending.is_empty() => {
                let i = rng.next(pending.len() as u64) as usize;
                drop(pending.swap_remove(i));
                cancelled += 1;
            }
            80..=84 if !pids.is_empty() => {
                let victims: Vec<u32> = pids.iter().copied().collect();
                let victim = victims[rng.next(victims.len() as u64) as usize];
                kill(victim);
                pids.remove(&victim);
                kills += 1;
            }
            85..=94 if !pending.is_empty() => {
                // Collect the oldest result: the caller side of a steady stream.
                let handle = pending.remove(0);
                record(handle.await, &mut pids);
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.next(4))).await,
        }
        assert!(
            peak.load(SeqCst) <= MAX,
            "seed {seed}: more than max runners alive"
        );
        let stats = pool.stats();
        assert!(
            stats.runners + stats.booting <= MAX,
            "seed {seed}: {stats:?}"
        );
    }
    for handle in pending.drain(..) {
        record(handle.await, &mut pids);
    }
    let resolved: usize = outcomes.values().sum();
    println!(
        "seed {seed}: {spawned} calls, {cancelled} cancelled, {kills} runners killed, outcomes {outcomes:?}, \
         peak runners {}, boots {}",
        peak.load(SeqCst),
        pool.stats().booted
    );
    assert_eq!(
        resolved + cancelled,
        spawned,
        "seed {seed}: every call resolved exactly once or was cancelled"
    );
    let allowed: HashSet<&str> = ["ok", "RunnerLost"].into();
    assert!(
        outcomes.keys().all(|k| allowed.contains(k.as_str())),
        "seed {seed}: {outcomes:?}"
    );
    let stats = pool.stats();
    assert_eq!(
        (stats.in_flight, stats.queued),
        (0, 0),
        "seed {seed}: nothing leaked: {stats:?}"
    );
    assert!(peak.load(SeqCst) <= MAX);

    pool.shutdown().await;
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while alive.load(SeqCst) > 0 && tokio::time::Instant::now() < until {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        alive.load(SeqCst),
        0,
        "seed {seed}: runner processes outlived the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_calls_cancels_and_kills_keep_the_invariants() {
    bounded(Duration::from_secs(120), async {
        for seed in [0x5eed, 0xf1a3e, 42] {
            run(seed).await;
        }
    })
    .await;
}
