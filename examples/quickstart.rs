//! Fans CPU-bound work out to runner processes booted on demand from this same binary.
//!
//! Run it with `cargo run --release --example quickstart`. It needs nothing but Rust.

use std::time::{Duration, Instant};

use flame::{Pool, ProcessBackend};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// What a runner reports back about one piece of work.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    primes: u64,
    pid: u32,
    runner: String,
    millis: f64,
}

/// Counts the primes in `lo..hi` by trial division: deliberately CPU-bound.
#[flame::task]
async fn count_primes(lo: u64, hi: u64) -> Report {
    let started = Instant::now();
    let primes = (lo..hi).filter(|&n| is_prime(n)).count() as u64;
    Report {
        primes,
        pid: std::process::id(),
        runner: flame::parent().map_or_else(|| "parent".into(), |p| p.runner_id().to_string()),
        millis: started.elapsed().as_secs_f64() * 1e3,
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[flame::main]
async fn main() -> anyhow::Result<()> {
    // This runs in the parent and in every runner: runners are copies of this app.
    let pool = Pool::builder("primes")
        .backend(ProcessBackend::new())
        .min(0)
        .max(2)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_secs(5))
        .start()
        .await?;
    if flame::parent().is_some() {
        return Ok(()); // a runner: nothing parent-only to do, it keeps serving calls
    }

    println!(
        "parent pid {}: counting primes below 4,000,000 in 8 chunks",
        std::process::id()
    );
    let started = Instant::now();
    let chunk = 500_000;
    // One call per chunk, as many at once as the pool has slots, results in chunk order.
    let mut reports = flame::map(&pool, 0..8, move |i| {
        count_primes(i * chunk, (i + 1) * chunk)
    })
    .enumerate();
    let mut total = 0;
    while let Some((i, report)) = reports.next().await {
        let report = report?;
        total += report.primes;
        println!(
            "  chunk {i}: {:>6} primes  on {} (pid {}) in {:>7.1} ms",
            report.primes, report.runner, report.pid, report.millis
        );
    }
    println!(
        "{total} primes in {:.1} ms on {} runner processes (max 2)",
        started.elapsed().as_secs_f64() * 1e3,
        2
    );
    let fanned_out = started.elapsed();
    // The same work in this process, one chunk after another: `.await` on a call runs its body
    // right here.
    let started = Instant::now();
    let mut local = 0;
    for i in 0..8 {
        local += count_primes(i * chunk, (i + 1) * chunk).await.primes;
    }
    let sequential = started.elapsed();
    println!(
        "the same {local} primes in-process, one chunk after another: {:.1} ms ({:.1}x slower)",
        sequential.as_secs_f64() * 1e3,
        sequential.as_secs_f64() / fanned_out.as_secs_f64()
    );
    pool.shutdown().await;
    Ok(())
}
