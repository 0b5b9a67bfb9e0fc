//! `flame::map`: one call per item on real runner processes, results in input order (or as they
//! finish), never more in flight than asked, and dropping the stream cancels the rest.

use std::time::Duration;

use flame::{Pool, ProcessBackend};
use flame_tests::*;
use futures::StreamExt;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(60);

async fn pool(name: &str) -> Pool {
    Pool::builder(name)
        .max(1)
        .max_concurrency(16)
        .backend(ProcessBackend::new().program(RUNNER))
        .start()
        .await
        .expect("pool starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_come_in_input_order_or_as_they_finish() {
    bounded(BOUND, async {
        let pool = pool("map-order").await;
        // The first item takes longest: in order it still comes first.
        let delay = |x: u64| if x == 0 { 300 } else { x % 5 };
        let ordered: Vec<u64> = flame::map(&pool, 0..20u64, move |x| delayed_echo(x, delay(x)))
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(ordered, (0..20).collect::<Vec<_>>());
        let mut unordered: Vec<u64> =
            flame::map(&pool, 0..20u64, move |x| delayed_echo(x, delay(x)))
                .unordered()
                .map(|r| r.unwrap())
                .collect()
                .await;
        assert_ne!(
            unordered[0], 0,
            "the slowest call finished first: {unordered:?}"
        );
        unordered.sort();
        assert_eq!(unordered, (0..20).collect::<Vec<_>>());
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_in_flight_than_asked() {
    bounded(BOUND, async {
        let pool = pool("map-bound").await;
        let seen: Vec<usize> = flame::map(&pool, 0..12, |_| concurrency_probe(200))
            .buffered(3)
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(seen.len(), 12);
        assert_eq!(
            seen.iter().max(),
            Some(&3),
            "at most 3 at once, and 3 reached: {seen:?}"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_the_calls_in_flight_and_starts_no_more() {
    bounded(BOUND, async {
        let pool = pool("map-drop").await;
        let mut stream = flame::map(&pool, 0..10, |_| sleep_ms(600_000)).buffered(3);
        assert!(futures::poll!(stream.next()).is_pending());
        while pool.stats().in_flight < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(stream);
        while pool.stats().in_flight > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stats = pool.stats();
        assert_eq!((stats.queued, stats.served), (0, 0), "{stats:?}");
        // The runner dropped the three tasks and serves on.
        assert_eq!(flame::call(&pool, add(1, 1)).await.unwrap(), 2);
        assert_eq!(pool.stats().booted, 1);
        pool.shutdown().await;
    })
    .await;
}
