//! The pool knobs this release honours: `max`, `max_concurrency`, `min`, `single_use`,
//! idle shutdown, queue bounds, and configuration mistakes.

use std::collections::HashSet;
use std::time::Duration;

use flame::{ErrorKind, Pool, ProcessBackend};
use flame_tests::*;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(60);

fn runner() -> ProcessBackend {
    ProcessBackend::new().program(RUNNER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_and_max_concurrency_are_never_exceeded() {
    bounded(BOUND, async {
        let pool = Pool::builder("limits")
            .backend(runner())
            .max(2)
            .max_concurrency(3)
            .start()
            .await
            .unwrap();
        // 12 calls, 6 slots: the probes see at most 3 at once per runner, and some see 3.
        let handles: Vec<_> = (0..12)
            .map(|_| flame::spawn_on(&pool, concurrency_probe(150)))
            .collect();
        let mut peak = 0;
        for h in handles {
            peak = peak.max(h.await.unwrap());
        }
        assert_eq!(peak, 3, "max_concurrency 3 was reached but never exceeded");
        let runners: HashSet<u32> =
            futures::future::join_all((0..6).map(|_| flame::call(&pool, sleep_ms(100))))
                .await
                .into_iter()
                .map(|w| w.unwrap().pid)
                .collect();
        assert_eq!(
            runners.len(),
            2,
            "six concurrent calls spread over exactly max = 2 runners"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_past_its_timeout_says_so() {
    bounded(BOUND, async {
        let pool = Pool::builder("full")
            .backend(runner())
            .max(1)
            .max_concurrency(1)
            .start()
            .await
            .unwrap();
        let busy = flame::spawn_on(&pool, sleep_ms(60_000));
        while pool.stats().in_flight == 0 {
            tokio::task::yield_now().await;
        }
        let err = flame::call(&pool, add(1, 1).timeout(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(err.message().contains("waited"), "{err}");
        assert!(err.message().contains("free runner slot"), "{err}");
        assert_eq!(
            pool.stats().queued,
            0,
            "the timed-out caller left the queue"
        );
        drop(busy);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_runners_boot_at_start_and_idle_ones_above_min_go_away() {
    bounded(BOUND, async {
        let pool = Pool::builder("idle")
            .backend(runner())
            .min(1)
            .max(2)
            .max_concurrency(1)
            .idle_shutdown_after(Duration::from_millis(300))
            .start()
            .await
            .unwrap();
        assert_eq!(
            pool.stats().runners,
            1,
            "start() returns with min runners connected"
        );
        let (a, b) = tokio::join!(
            flame::call(&pool, sleep_ms(200)),
            flame::call(&pool, sleep_ms(200))
        );
        let (a, b) = (a.unwrap().pid, b.unwrap().pid);
        assert_ne!(a, b, "the pool grew to two runners");
        // One of them idles away; the min runner stays.
        let gone = tokio::select! {
            true = wait_gone(a, Duration::from_secs(20)) => a,
            true = wait_gone(b, Duration::from_secs(20)) => b,
        };
        let kept = if gone == a { b } else { a };
        while pool.stats().runners != 1 {
            tokio::task::yield_now().await;
        }
        assert!(!is_gone(kept), "the min runner stays");
        assert_eq!(flame::call(&pool, whereabouts()).await.unwrap().pid, kept);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_runners_serve_one_call_each() {
    bounded(BOUND, async {
        let pool = Pool::builder("once")
            .backend(runner())
            .max(2)
            .single_use(true)
            .start()
            .await
            .unwrap();
        let mut pids = Vec::new();
        for _ in 0..3 {
            pids.push(flame::call(&pool, whereabouts()).await.unwrap().pid);
        }
        let distinct: HashSet<u32> = pids.iter().copied().collect();
        assert_eq!(distinct.len(), 3, "each call got a fresh runner: {pids:?}");
        for pid in pids {
            assert!(
                wait_gone(pid, Duration::from_secs(10)).await,
                "single-use runner {pid} exits"
            );
        }
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn configuration_mistakes_are_reported_before_anything_boots() {
    let cases = [
        (
            Pool::builder("a").min(3).max(2),
            "min (3) is larger than max (2)",
        ),
        (Pool::builder("b").max(0), "at least 1"),
        (
            Pool::builder("c").single_use(true).max_concurrency(4),
            "max_concurrency(1)",
        ),
        (Pool::builder("bad name!"), "pool name"),
    ];
    for (builder, expected) in cases {
        let err = builder.start().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.message().contains(expected), "{err}");
    }
}
