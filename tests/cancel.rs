//! Cancel on drop: a dropped or aborted JoinHandle makes the runner drop the task's future, and
//! the task's `kill_on_drop` child process dies with it. A task that can't be dropped (it never
//! reaches an `.await`) gets its runner recycled after `cancel_grace`.

use std::time::{Duration, Instant};

use flame::{ErrorKind, JoinHandle, LocalBackend, Pool, ProcessBackend};
use flame_tests::*;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");

/// Counts what the parent holds for queued calls.
#[global_allocator]
static HEAP: flame::__private::fuzz::HeapCounter = flame::__private::fuzz::HeapCounter;

/// The counter counts the whole process, so the test that measures runs alone: every other
/// test of this file holds a read guard.
static MEASURING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
const BOUND: Duration = Duration::from_secs(30);

async fn process_pool(name: &str) -> Pool {
    Pool::builder(name)
        .backend(ProcessBackend::new().program(RUNNER))
        .max(1)
        .max_concurrency(4)
        .start()
        .await
        .expect("pool starts")
}

/// Waits until the runner has acknowledged that no call is running any more: the slot of a
/// cancelled call is released only on the runner's acknowledgement that the future was dropped.
async fn until_idle(pool: &Pool) -> Duration {
    let started = Instant::now();
    while pool.stats().in_flight > 0 {
        assert!(
            started.elapsed() < BOUND,
            "the runner never acknowledged the cancel"
        );
        tokio::task::yield_now().await;
    }
    started.elapsed()
}

/// Starts `hold_child`, waits until its `sleep` child runs, cancels with `cancel`, and checks
/// that the runner dropped the future within 100 ms and the child is gone.
async fn cancel_kills_the_child(
    pool: &Pool,
    name: &str,
    cancel: impl FnOnce(JoinHandle<()>) -> Option<JoinHandle<()>>,
) {
    let dir = scratch_dir(name);
    let handle = flame::spawn_on(pool, hold_child(dir.clone()));
    let (runner_pid, child_pid) = held_pids(&dir).await;
    assert!(!is_gone(child_pid), "the sleep child is running");
    assert_eq!(pool.stats().in_flight, 1);

    let kept = cancel(handle);
    let dropped_after = until_idle(pool).await;
    println!("{name}: the runner acknowledged the cancel after {dropped_after:?}");
    assert!(
        dropped_after < Duration::from_millis(100),
        "the runner took {dropped_after:?} to drop the cancelled task"
    );
    assert!(
        dir.join("dropped").exists(),
        "the task's future was dropped on the runner"
    );
    assert!(
        wait_gone(child_pid, Duration::from_secs(5)).await,
        "the kill_on_drop child {child_pid} survived the cancel"
    );
    assert!(!is_gone(runner_pid), "the runner itself keeps running");
    if let Some(handle) = kept {
        let err = handle.await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
        assert!(err.is_cancelled());
    }
    // The runner still serves.
    assert_eq!(flame::call(pool, add(1, 1)).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_cancels_the_running_task() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        let pool = process_pool("dropcancel").await;
        cancel_kills_the_child(&pool, "drop", |handle| {
            drop(handle);
            None
        })
        .await;
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_cancels_the_running_task() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        let pool = process_pool("abort").await;
        cancel_kills_the_child(&pool, "abort", |handle| {
            handle.abort();
            Some(handle)
        })
        .await;
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_backend_cancels_too() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        let pool = Pool::builder("localcancel")
            .backend(LocalBackend::new())
            .max(1)
            .start()
            .await
            .unwrap();
        cancel_kills_the_child(&pool, "local", |handle| {
            drop(handle);
            None
        })
        .await;
        pool.shutdown().await;
    })
    .await;
}

/// A pool of one slot, taken by a call that holds it until its handle is dropped: the next
/// calls wait in the queue.
async fn one_busy_slot(name: &str) -> (Pool, JoinHandle<()>) {
    let pool = Pool::builder(name)
        .backend(ProcessBackend::new().program(RUNNER))
        .max(1)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let busy_dir = scratch_dir(&format!("{name}-busy"));
    let busy = flame::spawn_on(&pool, hold_child(busy_dir.clone()));
    held_pids(&busy_dir).await;
    (pool, busy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_call_dropped_never_starts() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        let (pool, busy) = one_busy_slot("queued").await;

        let queued_dir = scratch_dir("queued-waiting");
        let marker = queued_dir.join("ran");
        let queued = flame::spawn_on(&pool, write_after(0, marker.clone()));
        while pool.stats().queued == 0 {
            tokio::task::yield_now().await;
        }
        drop(queued);
        while pool.stats().queued > 0 {
            tokio::task::yield_now().await;
        }
        // Free the runner; if the dropped call were still queued it would run now.
        drop(busy);
        until_idle(&pool).await;
        assert_eq!(
            flame::call(&pool, add(2, 2)).await.unwrap(),
            4,
            "the next call runs"
        );
        assert!(!marker.exists(), "the dropped queued call ran anyway");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_dropped_behind_a_busy_runner_free_their_arguments_at_once() {
    let _alone = MEASURING.write().await;
    bounded(BOUND, async {
        let (pool, busy) = one_busy_slot("queued-mib").await;

        flame::__private::fuzz::HeapCounter::counting(true);
        let before = flame::__private::fuzz::HeapCounter::net();
        let queued: Vec<_> = (0..200)
            .map(|_| flame::spawn_on(&pool, echo(vec![7; 1 << 20])))
            .collect();
        let held = flame::__private::fuzz::HeapCounter::net() - before;
        drop(queued);
        // Nothing else looks at the queue meanwhile: the runner is busy, nobody asks for stats.
        let left = flame::__private::fuzz::HeapCounter::net() - before;
        flame::__private::fuzz::HeapCounter::counting(false);
        assert!(held > 190 << 20, "200 MiB of arguments wait: {held} B held");
        assert!(
            left < 4 << 20,
            "the dropped calls still hold {} MiB of arguments",
            left >> 20
        );

        drop(busy);
        until_idle(&pool).await;
        assert_eq!(pool.stats().queued, 0);
        assert_eq!(flame::call(&pool, echo(vec![1, 2])).await.unwrap(), [1, 2]);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awaiting_a_mutable_reference_is_cancel_safe() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        let pool = process_pool("cancelsafe").await;
        let mut handle = flame::spawn_on(&pool, sleep_ms(300));
        // A select that gives up on the handle first must not cancel the call.
        tokio::select! {
            _ = &mut handle => panic!("the call cannot be done yet"),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        assert!(!handle.is_finished());
        let there = handle.await.expect("the call survived the dropped await");
        assert!(there.runner.is_some());
        pool.shutdown().await;
    })
    .await;
}

const GRACE: Duration = Duration::from_millis(500);

async fn recycling_pool(name: &str) -> Pool {
    Pool::builder(name)
        .backend(ProcessBackend::new().program(RUNNER))
        .max(1)
        .max_concurrency(3)
        .cancel_grace(GRACE)
        // An overdue cancel is noticed within a heartbeat interval.
        .heartbeat_interval(Duration::from_millis(100))
        .start()
        .await
        .expect("pool starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_tasks_that_never_yield_get_their_runner_recycled() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        let pool = recycling_pool("recycled").await;
        let runner = flame::call(&pool, whereabouts()).await.unwrap().pid;
        // One spins, one sleeps its thread: neither reaches an `.await` for an hour.
        let marker = scratch_dir("recycled").join("spinning");
        let spinning = flame::spawn_on(&pool, spin_after_marking(marker.clone(), 3_600_000));
        let blocked =
            flame::spawn_on(&pool, block_thread_ms(3_600_000).timeout(Duration::from_secs(1)));
        wait_for_file(&marker, BOUND).await.expect("the task spins");
        drop(spinning);
        let err = blocked.await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        let last_cancel = Instant::now();

        // Meanwhile the pool serves: this call gets the replacement runner.
        let next = flame::call(&pool, whereabouts()).await.unwrap();
        assert_ne!(next.pid, runner, "a call went to the recycled runner");
        assert!(
            wait_gone(runner, GRACE + Duration::from_secs(1)).await,
            "the recycled runner still runs"
        );
        println!(
            "a runner whose cancelled calls never stopped was gone {:?} after the last cancel (grace {GRACE:?})",
            last_cancel.elapsed()
        );
        let stats = pool.stats();
        assert_eq!((stats.recycled, stats.in_flight, stats.booted), (1, 0, 2));
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_runners_other_calls_finish_before_it_stops() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        let pool = recycling_pool("recycled-others").await;
        let marker = scratch_dir("recycled-others").join("spinning");
        let stuck = flame::spawn_on(&pool, spin_after_marking(marker.clone(), 3_600_000));
        let other = flame::spawn_on(&pool, sleep_ms(2_000));
        wait_for_file(&marker, BOUND).await.expect("the task spins");
        drop(stuck);
        // The other call outlives the grace: it finishes (within `shutdown_timeout`) on the
        // runner being recycled, which then stops.
        let there = other.await.unwrap();
        assert!(wait_gone(there.pid, Duration::from_secs(2)).await);
        assert_eq!(pool.stats().recycled, 1);
        pool.shutdown().await;
    })
    .await;
}
