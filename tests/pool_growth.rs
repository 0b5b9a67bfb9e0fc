//! Elastic pools on real runner processes: placement, growth, the queue, boot failures,
//! idle shutdown and `min`, prewarm and resizing. Waits are on pool events, never sleeps.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use flame::{
    Backend, BootSpec, ErrorKind, GrowReason, Pool, ProcessBackend, RunnerHandle, ShrinkReason,
};
use flame_tests::*;
use futures::future::BoxFuture;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(60);

fn runner() -> ProcessBackend {
    ProcessBackend::new().program(RUNNER)
}

/// Spawns `sleep_ms(ms)` calls one at a time, each placed before the next is spawned, and
/// returns their handles.
async fn place_one_by_one(pool: &Pool, n: usize, ms: u64) -> Vec<flame::JoinHandle<Whereabouts>> {
    let mut handles = Vec::new();
    for i in 0..n {
        handles.push(flame::spawn_on(pool, sleep_ms(ms)));
        while pool.stats().in_flight < i + 1 {
            tokio::task::yield_now().await;
        }
    }
    handles
}

/// How many of the calls each runner served, fewest first.
async fn calls_per_runner(handles: Vec<flame::JoinHandle<Whereabouts>>) -> Vec<usize> {
    let mut per_runner: HashMap<u32, usize> = HashMap::new();
    for h in handles {
        *per_runner.entry(h.await.unwrap().pid).or_default() += 1;
    }
    let mut counts: Vec<usize> = per_runner.into_values().collect();
    counts.sort();
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_to_the_least_loaded_runner() {
    bounded(BOUND, async {
        let pool = Pool::builder("leastloaded")
            .backend(runner())
            .min(2)
            .max(2)
            .max_concurrency(10)
            .start()
            .await
            .unwrap();
        let counts = calls_per_runner(place_one_by_one(&pool, 6, 1_000).await).await;
        assert_eq!(
            counts,
            vec![3, 3],
            "six calls placed one by one alternate between two runners"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_fills_the_busiest_runner_first() {
    bounded(BOUND, async {
        let pool = Pool::builder("pack")
            .backend(runner())
            .min(2)
            .max(2)
            .max_concurrency(4)
            .placement(flame::Placement::Pack)
            .start()
            .await
            .unwrap();
        let counts = calls_per_runner(place_one_by_one(&pool, 6, 1_000).await).await;
        assert_eq!(
            counts,
            vec![2, 4],
            "one runner filled before the other is used"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_steady_trickle_pack_lets_all_but_one_runner_idle_out() {
    bounded(BOUND, async {
        let events = EventLog::default();
        let pool = events
            .attach(
                Pool::builder("trickle")
                    .backend(runner())
                    .max(3)
                    .max_concurrency(4)
                    .idle_shutdown_after(Duration::from_millis(400))
                    .placement(flame::Placement::Pack),
            )
            .start()
            .await
            .unwrap();
        // A burst grows the pool to three runners.
        let burst: Vec<_> = (0..12)
            .map(|_| flame::spawn_on(&pool, sleep_ms(300)))
            .collect();
        for h in burst {
            h.await.unwrap();
        }
        assert_eq!(pool.stats().booted, 3);
        // Then a trickle that always has a call or two in flight: spread out, it would keep
        // two runners busy for ever; packed, two idle out.
        let mut calls = Vec::new();
        let mut pids = HashSet::new();
        while events.shrinks().len() < 2 {
            calls.push(flame::spawn_on(&pool, sleep_ms(120)));
            tokio::time::sleep(Duration::from_millis(50)).await;
            if calls.len() > 3 {
                pids.insert(calls.remove(0).await.unwrap().pid);
            }
        }
        for h in calls {
            pids.insert(h.await.unwrap().pid);
        }
        let shrinks = events.shrinks();
        assert!(
            shrinks.iter().all(|s| s.reason == ShrinkReason::Idle),
            "{shrinks:?}"
        );
        assert_eq!(pool.stats().runners, 1);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pool_reports_its_runners_leaving() {
    bounded(BOUND, async {
        let events = EventLog::default();
        let pool = events
            .attach(Pool::builder("dropped").backend(runner()).max(2).min(2))
            .start()
            .await
            .unwrap();
        let pid = flame::call(&pool, whereabouts()).await.unwrap().pid;
        drop(pool);
        let shrinks = events.shrinks();
        assert_eq!(shrinks.len(), 2, "{shrinks:?}");
        assert!(
            shrinks.iter().all(|s| s.reason == ShrinkReason::Shutdown),
            "{shrinks:?}"
        );
        assert!(
            wait_gone(pid, Duration::from_secs(10)).await,
            "the runner was let go"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shutdown_after_none_keeps_runners() {
    bounded(BOUND, async {
        let control = EventLog::default();
        let short = control
            .attach(
                Pool::builder("idle-short")
                    .backend(runner())
                    .idle_shutdown_after(Duration::from_millis(300)),
            )
            .start()
            .await
            .unwrap();
        let never = Pool::builder("idle-never")
            .backend(runner())
            .idle_shutdown_after(None)
            .start()
            .await
            .unwrap();
        flame::call(&never, add(1, 1)).await.unwrap();
        flame::call(&short, add(1, 1)).await.unwrap();
        // The control pool's runner, idle as long, stops...
        while control.shrinks().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(control.shrinks()[0].reason, ShrinkReason::Idle);
        // ...and the one that never idles out is still there.
        assert_eq!(never.stats().runners, 1);
        short.shutdown().await;
        never.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_grows_the_pool_to_max_concurrently_and_never_past_it() {
    bounded(BOUND, async {
        let log = EventLog::default();
        let backend = Counting::new(runner());
        let peak = backend.peak.clone();
        let (max, per_runner) = (3, 2);
        let pool = log
            .attach(
                Pool::builder("burst")
                    .backend(backend)
                    .max(max)
                    .max_concurrency(per_runner),
            )
            .start()
            .await
            .unwrap();
        let burst = max * per_runner * 3;
        let handles: Vec<_> = (0..burst)
            .map(|_| flame::spawn_on(&pool, concurrency_probe(150)))
            .collect();
        let mut seen_max = 0;
        for h in handles {
            seen_max = seen_max.max(h.await.unwrap());
        }
        assert_eq!(
            seen_max, per_runner,
            "max_concurrency was reached and never exceeded"
        );
        let boots = log.grow_ends();
        assert_eq!(
            boots.len(),
            max,
            "the burst booted exactly max runners: {boots:#?}"
        );
        assert!(
            boots
                .iter()
                .all(|b| b.error.is_none() && b.reason == GrowReason::Demand)
        );
        assert_eq!(
            peak.load(std::sync::atomic::Ordering::SeqCst),
            max,
            "never more than max runners alive"
        );
        // The boots overlapped: all three started before the first one ended.
        let events = log.events();
        let first_end = events
            .iter()
            .position(|e| matches!(e, PoolEvent::GrowEnd(_)))
            .unwrap();
        let starts_before = events[..first_end]
            .iter()
            .filter(|e| matches!(e, PoolEvent::GrowStart(_)))
            .count();
        assert_eq!(
            starts_before, max,
            "runners booted concurrently, not one at a time"
        );
        let stats = pool.stats();
        assert_eq!(
            (stats.runners, stats.booted, stats.served),
            (max, max as u64, burst as u64),
            "{stats:?}"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_callers_are_served_in_fifo_order() {
    bounded(BOUND, async {
        let pool = Pool::builder("fifo")
            .backend(runner())
            .max(1)
            .max_concurrency(1)
            .start()
            .await
            .unwrap();
        let dir = scratch_dir("fifo");
        let busy = flame::spawn_on(&pool, hold_child(dir.clone()));
        held_pids(&dir).await;
        let order = dir.join("order");
        let mut queued = Vec::new();
        for i in 0..6 {
            queued.push(flame::spawn_on(
                &pool,
                append_line(order.clone(), i.to_string()),
            ));
            while pool.stats().queued < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(busy);
        for h in queued {
            h.await.unwrap();
        }
        let lines = std::fs::read_to_string(&order).unwrap();
        assert_eq!(
            lines, "0\n1\n2\n3\n4\n5\n",
            "callers ran in the order they queued"
        );
        pool.shutdown().await;
    })
    .await;
}

/// Fails its first `failures` boots with a backend error, then boots real runners.
struct Flaky {
    inner: ProcessBackend,
    failures: std::sync::atomic::AtomicUsize,
}

impl Backend for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    fn boot(
        &self,
        spec: BootSpec,
    ) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, flame::Error>> {
        let left = self.failures.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.failures
                .store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Box::pin(async {
                Err(flame::Error::new(
                    ErrorKind::BootFailed,
                    "no capacity in region ams",
                ))
            });
        }
        self.inner.boot(spec)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_boots_are_retried_while_callers_wait() {
    bounded(BOUND, async {
        let log = EventLog::default();
        let flaky = Flaky {
            inner: runner(),
            failures: 2.into(),
        };
        let pool = log
            .attach(Pool::builder("flaky").backend(flaky).max(1))
            .start()
            .await
            .unwrap();
        assert_eq!(
            flame::call(&pool, add(1, 2)).await.unwrap(),
            3,
            "the third boot served the call"
        );
        let boots = log.grow_ends();
        let outcomes: Vec<(GrowReason, bool)> = boots
            .iter()
            .map(|b| (b.reason, b.error.is_none()))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                (GrowReason::Demand, false),
                (GrowReason::Retry, false),
                (GrowReason::Retry, true)
            ]
        );
        assert_eq!(pool.stats().failed_boots, 2);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_nothing_can_boot_callers_get_the_backends_reason() {
    bounded(BOUND, async {
        let flaky = Flaky {
            inner: runner(),
            failures: usize::MAX.into(),
        };
        let pool = Pool::builder("noboot")
            .backend(flaky)
            .max(2)
            .boot_timeout(Duration::from_secs(50))
            .start()
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let err = flame::call(&pool, add(1, 2)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(err.message().contains("no capacity in region ams"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the caller was not left to time out"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_min_runner_is_replaced() {
    bounded(BOUND, async {
        let log = EventLog::default();
        let pool = log
            .attach(
                Pool::builder("keepmin")
                    .backend(runner())
                    .min(2)
                    .max(2)
                    .max_concurrency(1),
            )
            .start()
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            flame::call(&pool, sleep_ms(100)),
            flame::call(&pool, sleep_ms(100))
        );
        let (a, b) = (a.unwrap().pid, b.unwrap().pid);
        assert_ne!(a, b);
        kill(a);
        log.wait_for(BOUND, |log| {
            log.shrinks()
                .iter()
                .any(|s| s.reason == ShrinkReason::Lost)
                .then_some(())
        })
        .await;
        let booted = log
            .wait_for(BOUND, |log| {
                let ends = log.grow_ends();
                (ends.len() == 3).then(|| ends[2].clone())
            })
            .await;
        assert_eq!(
            (booted.reason, booted.error.is_none()),
            (GrowReason::Min, true)
        );
        let (c, d) = tokio::join!(
            flame::call(&pool, sleep_ms(100)),
            flame::call(&pool, sleep_ms(100))
        );
        let now: HashSet<u32> = [c.unwrap().pid, d.unwrap().pid].into();
        assert!(
            now.contains(&b) && !now.contains(&a) && now.len() == 2,
            "{now:?}"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_runners_stop_after_min_idle_shutdown_after_and_come_back_on_demand() {
    bounded(BOUND, async {
        let log = EventLog::default();
        let pool = log
            .attach(
                Pool::builder("minidle")
                    .backend(runner())
                    .min(1)
                    .max(1)
                    .idle_shutdown_after(Duration::from_millis(100))
                    .min_idle_shutdown_after(Some(Duration::from_millis(400))),
            )
            .start()
            .await
            .unwrap();
        let first = flame::call(&pool, whereabouts()).await.unwrap().pid;
        let shrink = log
            .wait_for(BOUND, |log| log.shrinks().first().cloned())
            .await;
        assert_eq!(shrink.reason, ShrinkReason::Idle);
        assert!(
            wait_gone(first, Duration::from_secs(10)).await,
            "the idle min runner exited"
        );
        while pool.stats().runners > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            log.grow_ends().len(),
            1,
            "the pool did not boot it again by itself"
        );
        let second = flame::call(&pool, whereabouts()).await.unwrap().pid;
        assert_ne!(first, second, "a call boots a runner again");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_calls_in_flight_finish() {
    bounded(BOUND, async {
        let pool = Pool::builder("draining")
            .backend(runner())
            .max(1)
            .start()
            .await
            .unwrap();
        let running = flame::spawn_on(&pool, sleep_ms(400));
        while pool.stats().in_flight == 0 {
            tokio::task::yield_now().await;
        }
        let shutdown = tokio::spawn({
            let pool = pool.clone();
            async move { pool.shutdown().await }
        });
        // Calls made once shutdown has begun are rejected, while the one in flight goes on.
        let rejected = loop {
            match flame::call(&pool, add(1, 1)).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(e) => break e,
            }
        };
        assert_eq!(rejected.kind(), ErrorKind::PoolClosed, "{rejected}");
        assert!(
            !running.is_finished(),
            "the rejection came while the call was still in flight"
        );
        let there = running
            .await
            .expect("the call in flight finished during shutdown");
        shutdown.await.unwrap();
        assert!(
            wait_gone(there.pid, Duration::from_secs(10)).await,
            "the runner stopped after"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarm_boots_the_next_runner_before_the_pool_is_full() {
    bounded(BOUND, async {
        let log = EventLog::default();
        let pool = log
            .attach(
                Pool::builder("prewarm")
                    .backend(runner())
                    .min(1)
                    .max(2)
                    .max_concurrency(2)
                    .prewarm_at(0.5),
            )
            .start()
            .await
            .unwrap();
        let busy = flame::spawn_on(&pool, sleep_ms(2_000));
        let warmed = log
            .wait_for(BOUND, |log| {
                log.grow_ends()
                    .into_iter()
                    .find(|e| e.reason == GrowReason::Prewarm)
            })
            .await;
        assert!(warmed.error.is_none(), "{warmed:?}");
        let stats = pool.stats();
        assert_eq!(
            (stats.runners, stats.queued),
            (2, 0),
            "a second runner is up while nobody waits: {stats:?}"
        );
        drop(busy);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_resize_at_run_time() {
    bounded(BOUND, async {
        let log = EventLog::default();
        let pool = log
            .attach(
                Pool::builder("resize")
                    .backend(runner())
                    .max(1)
                    .max_concurrency(1)
                    .idle_shutdown_after(Duration::from_secs(60)),
            )
            .start()
            .await
            .unwrap();
        assert!(pool.set_min(2).is_err(), "min above max is refused");
        pool.set_max(3).unwrap();
        pool.set_min(2).unwrap();
        log.wait_for(BOUND, |log| {
            (log.grow_ends().iter().filter(|e| e.error.is_none()).count() == 2).then_some(())
        })
        .await;
        let stats = pool.stats();
        assert_eq!(
            (stats.runners, stats.min, stats.max),
            (2, 2, 3),
            "{stats:?}"
        );

        pool.set_min(0).unwrap();
        pool.set_max(1).unwrap();
        let shrink = log
            .wait_for(BOUND, |log| log.shrinks().first().cloned())
            .await;
        assert_eq!(shrink.reason, ShrinkReason::Resized);
        while pool.stats().runners > 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(flame::call(&pool, add(2, 2)).await.unwrap(), 4);
        pool.shutdown().await;
    })
    .await;
}

/// Models an API backend (a machine or container per runner): what it booted exists at the
/// "provider" until its handle is destroyed; dropping a handle deletes nothing. Boot `n`
/// returns `delays[n]` (or at once) after its runner was started. Tests watch `existing`.
struct Provider {
    inner: ProcessBackend,
    delays: Vec<Duration>,
    boots: std::sync::atomic::AtomicUsize,
    existing: std::sync::Arc<tokio::sync::watch::Sender<HashSet<String>>>,
}

impl Provider {
    fn new(inner: ProcessBackend, delays: Vec<Duration>) -> Provider {
        Provider {
            inner,
            delays,
            boots: Default::default(),
            existing: std::sync::Arc::new(tokio::sync::watch::Sender::new(HashSet::new())),
        }
    }
}

struct Provisioned {
    inner: Box<dyn RunnerHandle>,
    id: String,
    existing: std::sync::Arc<tokio::sync::watch::Sender<HashSet<String>>>,
}

impl RunnerHandle for Provisioned {
    fn describe(&self) -> String {
        self.id.clone()
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        self.inner.exited()
    }

    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.inner.destroy().await;
            self.existing.send_modify(|existing| {
                existing.remove(&self.id);
            });
        })
    }
}

impl Backend for Provider {
    fn name(&self) -> &str {
        "provider"
    }

    fn boot(
        &self,
        spec: BootSpec,
    ) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, flame::Error>> {
        let boot = self.inner.boot(spec);
        let n = self.boots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let delay = self.delays.get(n).copied().unwrap_or_default();
        let existing = self.existing.clone();
        Box::pin(async move {
            let inner = boot.await?;
            let id = inner.describe();
            existing.send_modify(|existing| {
                existing.insert(id.clone());
            });
            tokio::time::sleep(delay).await;
            let handle: Box<dyn RunnerHandle> = Box::new(Provisioned {
                inner,
                id,
                existing,
            });
            Ok(handle)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_that_returns_after_its_deadline_is_destroyed() {
    bounded(BOUND, async {
        let provider = Provider::new(runner(), vec![Duration::from_millis(2500)]);
        let mut existing = provider.existing.subscribe();
        let pool = Pool::builder("late")
            .backend(provider)
            .boot_timeout(Duration::from_secs(2))
            .start()
            .await
            .unwrap();
        let err = flame::call(&pool, add(1, 2)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        let late = existing.borrow().clone();
        assert_eq!(late.len(), 1, "the late boot's runner was started");
        // The late runner holds the only place (max 1) until it is destroyed; then the pool
        // boots for the caller waiting meanwhile.
        let waiting = flame::spawn_on(&pool, add(2, 3));
        assert_eq!(waiting.await.unwrap(), 5);
        // The boot's own future was past its deadline: the runner it returns late is destroyed.
        let destroyed = tokio::time::timeout(
            Duration::from_secs(10),
            existing.wait_for(|now| !late.iter().any(|id| now.contains(id))),
        )
        .await
        .is_ok();
        assert!(
            destroyed,
            "a runner booted past its deadline was never destroyed: {:?}",
            *existing.borrow()
        );
        pool.shutdown().await;
    })
    .await;
}

/// Shuts the pool down while its one runner boots, `delay` after the backend started it, and
/// checks that it is destroyed by the time `shutdown` returns.
async fn shut_down_while_booting(delay: Duration) {
    // `sleep` never dials back: its boot would wait for the whole (long) boot window.
    let provider = Provider::new(
        ProcessBackend::new().program("sleep").args(["600"]),
        vec![delay],
    );
    let mut existing = provider.existing.subscribe();
    let pool = Pool::builder("booting")
        .backend(provider)
        .boot_timeout(Duration::from_secs(120))
        .start()
        .await
        .unwrap();
    let call = flame::spawn_on(&pool, add(1, 2));
    existing.wait_for(|now| !now.is_empty()).await.unwrap();
    pool.shutdown().await;
    assert!(
        existing.borrow().is_empty(),
        "shutdown returned with a runner still booting: {:?}",
        *existing.borrow()
    );
    assert_eq!(call.await.unwrap_err().kind(), ErrorKind::PoolClosed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_destroys_a_runner_still_booting() {
    bounded(
        Duration::from_secs(30),
        shut_down_while_booting(Duration::ZERO),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_destroys_a_runner_whose_backend_boot_is_still_running() {
    bounded(
        Duration::from_secs(30),
        shut_down_while_booting(Duration::from_secs(1)),
    )
    .await;
}
