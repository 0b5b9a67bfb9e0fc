//! Integration tests on real runner processes: with `#[flame::test]` the test binary is its own
//! runner, so the default `ProcessBackend` needs no separate runner program.

use std::time::Duration;

use flame::Pool;
use flame_example_testing::{slow_square, whoami};

#[flame::test]
async fn calls_run_in_a_runner_process() {
    let pool = Pool::builder("procs").max(1).start().await.unwrap();
    let (pid, runner) = flame::call(&pool, whoami()).await.unwrap();
    assert_ne!(pid, std::process::id(), "the call ran in another process");
    assert!(runner.is_some_and(|r| r.starts_with("procs-")));
    pool.shutdown().await;
}

#[flame::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_fan_out_over_runners() {
    let pool = Pool::builder("fanout")
        .max(2)
        .max_concurrency(4)
        .start()
        .await
        .unwrap();
    let handles: Vec<_> = (1..=16)
        .map(|n| flame::spawn_on(&pool, slow_square(n, 20)))
        .collect();
    let mut sum = 0;
    for handle in handles {
        sum += handle.await.unwrap();
    }
    assert_eq!(sum, (1..=16u64).map(|n| n * n).sum::<u64>());
    assert!(pool.stats().booted >= 1);
    pool.shutdown().await;
}

#[flame::test]
async fn dropping_a_handle_cancels_on_the_runner() {
    let pool = Pool::builder("cancels").max(1).start().await.unwrap();
    let handle = flame::spawn_on(&pool, slow_square(3, 60_000));
    while pool.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    drop(handle);
    // The slot comes back only once the runner has dropped the call.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.stats().in_flight > 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "the runner never dropped the call"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(flame::call(&pool, slow_square(4, 0)).await.unwrap(), 16);
    pool.shutdown().await;
}

#[flame::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_started_off_the_test_thread_says_so() {
    // Started in a spawned task, the pool cannot know which test its runners should run.
    let pool = tokio::spawn(async { Pool::builder("offthread").max(1).start().await.unwrap() })
        .await
        .unwrap();
    let err = flame::call(&pool, whoami()).await.unwrap_err();
    assert_eq!(err.kind(), flame::ErrorKind::Config, "{err}");
    assert!(
        err.message().contains("#[flame::test]'s own thread"),
        "{err}"
    );
    pool.shutdown().await;
}
