//! A call's life on both backends: results, errors, panics, local awaits, cast and detach.
//! Every behaviour runs on real runner processes and on in-process runners, through the same
//! encoding, handshake and cancellation.

use std::time::Duration;

use flame::{ErrorKind, LocalBackend, Pool, ProcessBackend};
use flame_tests::*;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Process,
    Local,
}

async fn pool(kind: Kind, name: &str) -> Pool {
    let builder = Pool::builder(name).max(1).max_concurrency(8);
    let builder = match kind {
        Kind::Process => builder.backend(ProcessBackend::new().program(RUNNER)),
        Kind::Local => builder.backend(LocalBackend::new()),
    };
    builder.start().await.expect("pool starts")
}

/// Runs a test body for both backends with a bound, so nothing can hang.
macro_rules! both {
    ($name:ident, |$kind:ident| $body:block) => {
        mod $name {
            use super::*;
            async fn body($kind: Kind) $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn process() {
                bounded(BOUND, body(Kind::Process)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn local() {
                bounded(BOUND, body(Kind::Local)).await;
            }
        }
    };
}

both!(result_comes_back_from_a_runner, |kind| {
    let pool = pool(kind, "results").await;
    assert_eq!(flame::call(&pool, add(2, 40)).await.unwrap(), 42);
    let there = flame::call(&pool, whereabouts()).await.unwrap();
    let runner = there.runner.expect("the task ran in a runner");
    assert!(runner.starts_with("results-"), "{runner}");
    match kind {
        Kind::Process => assert_ne!(there.pid, std::process::id(), "ran in another process"),
        Kind::Local => assert_eq!(there.pid, std::process::id(), "ran in this process"),
    }
    assert!(flame::parent().is_none(), "the test is the parent");
    pool.shutdown().await;
});

both!(task_errors_stay_inside_the_result, |kind| {
    let pool = pool(kind, "errors").await;
    assert_eq!(flame::call(&pool, checked_div(9, 3)).await.unwrap(), Ok(3));
    assert_eq!(
        flame::call(&pool, checked_div(9, 0)).await.unwrap(),
        Err("cannot divide 9 by zero".to_string())
    );
    pool.shutdown().await;
});

both!(a_panic_is_reported_and_the_runner_keeps_serving, |kind| {
    let pool = pool(kind, "panics").await;
    let before = flame::call(&pool, whereabouts()).await.unwrap();
    let err = flame::call(&pool, panic_with("the disk is on fire".into()))
        .await
        .unwrap_err();
    assert!(err.is_panic(), "{err:?}");
    assert_eq!(err.panic_message(), Some("the disk is on fire"));
    let after = flame::call(&pool, whereabouts()).await.unwrap();
    assert_eq!(before, after, "the same runner served the next call");
    pool.shutdown().await;
});

both!(many_calls_in_flight_all_resolve, |kind| {
    let pool = pool(kind, "fanout").await;
    let handles: Vec<_> = (0..200u64)
        .map(|i| flame::spawn_on(&pool, add(i, 1)))
        .collect();
    let mut sum = 0;
    for h in handles {
        sum += h.await.unwrap();
    }
    assert_eq!(sum, (1..=200).sum::<u64>());
    let stats = pool.stats();
    assert_eq!((stats.in_flight, stats.queued), (0, 0), "{stats:?}");
    pool.shutdown().await;
});

both!(large_arguments_round_trip, |kind| {
    let pool = pool(kind, "bulk").await;
    let data: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let back = flame::call(&pool, echo(data.clone())).await.unwrap();
    assert_eq!(back, data);
    pool.shutdown().await;
});

both!(an_unserializable_argument_is_a_codec_error, |kind| {
    let pool = pool(kind, "codec").await;
    let err = flame::call(&pool, take_unserializable(Unserializable))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    assert!(err.message().contains("take_unserializable"), "{err}");
    assert!(
        err.message().contains("argument `value: Unserializable`"),
        "{err}"
    );
    // Nothing was lost: the pool still works.
    assert_eq!(flame::call(&pool, add(1, 1)).await.unwrap(), 2);
    pool.shutdown().await;
});

both!(the_runner_enforces_the_deadline, |kind| {
    let pool = pool(kind, "deadline").await;
    let err = flame::call(&pool, sleep_ms(60_000).timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // The slot comes back once the runner has dropped the task.
    assert_eq!(
        flame::call(&pool, add(1, 2).timeout(Duration::from_secs(10)))
            .await
            .unwrap(),
        3
    );
    pool.shutdown().await;
});

both!(detach_lets_the_call_finish, |kind| {
    let pool = pool(kind, "detach").await;
    let dir = scratch_dir(&format!("detach-{kind:?}"));
    let marker = dir.join("done");
    flame::spawn_on(&pool, write_after(200, marker.clone())).detach();
    assert_eq!(
        wait_for_file(&marker, Duration::from_secs(20))
            .await
            .as_deref(),
        Some("done")
    );
    pool.shutdown().await;
});

both!(cast_runs_the_call, |kind| {
    let pool = pool(kind, "cast").await;
    let dir = scratch_dir(&format!("cast-{kind:?}"));
    let marker = dir.join("done");
    flame::cast(&pool, write_after(0, marker.clone()));
    assert_eq!(
        wait_for_file(&marker, Duration::from_secs(20))
            .await
            .as_deref(),
        Some("done")
    );
    pool.shutdown().await;
});

both!(shutdown_rejects_new_calls, |kind| {
    let pool = pool(kind, "closing").await;
    assert_eq!(flame::call(&pool, add(1, 1)).await.unwrap(), 2);
    pool.shutdown().await;
    let err = flame::call(&pool, add(1, 1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PoolClosed, "{err}");
    assert_eq!(pool.stats().runners, 0);
});

both!(a_pool_inside_a_runner_runs_calls_in_that_runner, |kind| {
    let pool = pool(kind, "outer").await;
    let runner = flame::call(&pool, whereabouts()).await.unwrap();
    let (sum, pid) = flame::call(&pool, nested_add(40, 2)).await.unwrap();
    assert_eq!(sum, 42);
    assert_eq!(
        pid, runner.pid,
        "the nested call ran in the runner itself: no recursive booting"
    );
    pool.shutdown().await;
});

#[test]
fn handles_are_shareable() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    fn sendable<T: Send + 'static>() {}
    shareable::<Pool>();
    sendable::<flame::JoinHandle<Vec<u8>>>();
    sendable::<flame::Call<Vec<u8>>>();
    shareable::<flame::Error>();
}

#[tokio::test]
async fn awaiting_a_call_runs_it_in_process() {
    assert_eq!(add(20, 22).await, 42);
    let here = whereabouts().await;
    assert_eq!(here.pid, std::process::id());
    assert_eq!(here.runner, None);
}

#[tokio::test]
async fn shutdown_stops_every_runner_process() {
    let pool = Pool::builder("reaped")
        .backend(ProcessBackend::new().program(RUNNER))
        .min(2)
        .max(2)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        flame::call(&pool, sleep_ms(100)),
        flame::call(&pool, sleep_ms(100))
    );
    let pids = [a.unwrap().pid, b.unwrap().pid];
    assert_ne!(pids[0], pids[1], "two runners served two concurrent calls");
    pool.shutdown().await;
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(10)).await,
            "runner {pid} outlived shutdown"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_too_long_to_add_to_now_mean_never_and_panic_nothing() {
    bounded(BOUND, async {
        // What a user writes for "no limit": every duration the pool and a call take, at MAX.
        let pool = Pool::builder("forever")
            .backend(ProcessBackend::new().program(RUNNER))
            .max(1)
            .max_concurrency(2)
            .timeout(Duration::MAX)
            .boot_timeout(Duration::MAX)
            .shutdown_timeout(Duration::MAX)
            .cancel_grace(Duration::MAX)
            .heartbeat_interval(Duration::MAX)
            .heartbeat_miss_limit(u32::MAX)
            .start()
            .await
            .unwrap();
        let call = add(2, 3).timeout(Duration::MAX);
        assert_eq!(flame::spawn_on(&pool, call).await.unwrap(), 5);
        // A cancel with an endless grace still goes through: the runner acknowledges it.
        let held = flame::spawn_on(&pool, sleep_ms(60_000));
        let there = flame::call(&pool, whereabouts()).await.unwrap();
        drop(held);
        assert_eq!(flame::call(&pool, add(1, 1)).await.unwrap(), 2);
        assert_eq!(
            flame::call(&pool, whereabouts()).await.unwrap().pid,
            there.pid
        );
        pool.shutdown().await;
    })
    .await;
}
