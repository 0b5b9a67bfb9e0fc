//! Heavy work that never yields: tasks that hold their thread for much longer than the heartbeat
//! window must neither get their runner declared lost nor be lost themselves, and a parent whose
//! workers are all busy keeps its runners. (A runner that is truly frozen is still declared lost:
//! `faults.rs`.)

use std::time::{Duration, Instant};

use flame::{Pool, ProcessBackend};
use flame_tests::*;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
/// Six heartbeat windows of the pool defaults (a heartbeat a second, five missed = lost).
const HEAVY_MS: u64 = 30_000;
const BOUND: Duration = Duration::from_secs(120);

/// A pool with the default heartbeats and one runner of two slots; the runner program has the
/// default `#[flame::main]` runtime, two workers on this machine.
async fn heavy_pool(name: &str) -> Pool {
    pool_of_slots(name, 2).await
}

async fn pool_of_slots(name: &str, slots: usize) -> Pool {
    Pool::builder(name)
        .backend(ProcessBackend::new().program(RUNNER))
        .max(1)
        .max_concurrency(slots)
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_blocking_its_thread_for_30_s_completes() {
    bounded(BOUND, async {
        let pool = heavy_pool("blocked-30s").await;
        let started = Instant::now();
        let there = flame::call(&pool, block_thread_ms(HEAVY_MS)).await.unwrap();
        let took = started.elapsed();
        println!("a 30 s std::thread::sleep task came back after {took:?}");
        assert!(took >= Duration::from_millis(HEAVY_MS));
        assert_ne!(there.pid, std::process::id(), "it ran on a runner");
        // The runner that ran it is the one that serves next: it was never lost.
        let next = flame::call(&pool, whereabouts()).await.unwrap();
        assert_eq!(next.pid, there.pid);
        assert_eq!(pool.stats().runners, 1);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_spinning_on_the_cpu_for_30_s_completes() {
    bounded(BOUND, async {
        let pool = heavy_pool("spin-30s").await;
        let (rounds, there) = flame::call(&pool, spin_ms(HEAVY_MS)).await.unwrap();
        assert!(rounds > 0);
        let next = flame::call(&pool, whereabouts()).await.unwrap();
        assert_eq!(next.pid, there.pid, "the runner was replaced");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_heavy_tasks_at_once_hold_every_worker_and_all_complete() {
    bounded(BOUND, async {
        let pool = heavy_pool("all-workers-busy").await;
        // Two slots, two workers: one spins, one blocks, so no worker of the runner is free.
        let spin = flame::spawn_on(&pool, spin_ms(HEAVY_MS));
        let block = flame::spawn_on(&pool, block_thread_ms(HEAVY_MS));
        let ((_, spun_on), blocked_on) = (spin.await.unwrap(), block.await.unwrap());
        assert_eq!(spun_on.pid, blocked_on.pid, "both ran on the one runner");
        let next = flame::call(&pool, whereabouts()).await.unwrap();
        assert_eq!(next.pid, spun_on.pid, "the runner was replaced");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_whose_workers_are_all_blocked_for_10_s_keeps_its_runners() {
    bounded(BOUND, async {
        let pool = heavy_pool("parent-blocked").await;
        let before = flame::call(&pool, whereabouts()).await.unwrap();
        // A call in flight on the runner across the parent's freeze.
        let in_flight = flame::spawn_on(&pool, sleep_ms(2_000));

        // Both of the test runtime's workers block for 10 s (the test body runs on the main
        // thread, not on a worker). Each says when it started, to prove they overlapped.
        let block = || {
            tokio::spawn(async {
                let started = Instant::now();
                std::thread::sleep(Duration::from_secs(10));
                started
            })
        };
        let (a, b) = (block(), block());
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let overlap = if a > b { a - b } else { b - a };
        assert!(
            overlap < Duration::from_secs(5),
            "the two workers were not blocked at once"
        );

        let finished = in_flight.await.unwrap();
        assert_eq!(finished.pid, before.pid);
        let after = flame::call(&pool, whereabouts()).await.unwrap();
        assert_eq!(after.pid, before.pid, "the runner was lost and replaced");
        assert_eq!(pool.stats().runners, 1);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_tasks_leave_the_runners_workers_to_its_async_work() {
    bounded(BOUND, async {
        let pool = pool_of_slots("blocking-option", 3).await;
        // As many heavy bodies as the runner has workers; marked `blocking`, they hold none.
        let heavy: Vec<_> = (0..2)
            .map(|_| flame::spawn_on(&pool, spin_blocking_ms(5_000)))
            .collect();
        let light = flame::spawn_on(&pool, sleep_ms(10));
        let mut heavy = futures::future::try_join_all(heavy);
        tokio::select! {
            biased;
            light = light => assert_ne!(light.unwrap().pid, std::process::id()),
            _ = &mut heavy => panic!("the async call waited for the heavy ones: they held the workers"),
        }
        for (rounds, _) in heavy.await.unwrap() {
            assert!(rounds > 0);
        }
        pool.shutdown().await;
    })
    .await;
}
