//! Tracing across the boundary and the pool's lifecycle events: what a user debugging a FLAME
//! app sees. Each test collects with its own subscriber, on its own thread.

use std::time::Duration;

use flame::{Pool, ProcessBackend};
use flame_tests::*;
use tracing::Instrument;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(60);

fn builder(name: &str) -> flame::PoolBuilder {
    Pool::builder(name).backend(ProcessBackend::new().program(RUNNER))
}

#[tokio::test(flavor = "current_thread")]
async fn the_runner_span_carries_the_callers_trace_id() {
    let _subscriber = tracing::subscriber::set_default(otel_subscriber(None));
    bounded(BOUND, async {
        let pool = builder("traced").max(1).start().await.unwrap();
        let request = tracing::info_span!("request");
        let caller = request
            .in_scope(current_trace_id)
            .expect("the caller's span has a trace id");

        let (runner_trace, span) = flame::call(&pool, trace_here())
            .instrument(request)
            .await
            .unwrap();
        assert_eq!(
            span.as_deref(),
            Some("flame.task"),
            "the task runs in flame's span"
        );
        assert_eq!(
            runner_trace.as_deref(),
            Some(caller.as_str()),
            "same trace on the runner"
        );

        // A call made outside any span starts a trace of its own on the runner.
        let (untraced, _) = flame::call(&pool, trace_here()).await.unwrap();
        let untraced = untraced.expect("the runner's span has a trace id");
        assert_ne!(untraced, caller);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn booting_a_runner_is_traced_with_its_duration() {
    let recorder = Recorder::default();
    let _subscriber = tracing::subscriber::set_default(otel_subscriber(Some(recorder.clone())));
    bounded(BOUND, async {
        let pool = builder("evboot").max(1).start().await.unwrap();
        flame::call(&pool, add(1, 2)).await.unwrap();
        let started = recorder.wait_for("flame: booting a runner", BOUND).await;
        assert_eq!(started.fields["pool"], "evboot");
        assert!(
            started.fields["runner"].starts_with("evboot-"),
            "{started:?}"
        );
        let booted = recorder.wait_for("flame: runner booted", BOUND).await;
        assert_eq!(booted.fields["runner"], started.fields["runner"]);
        let ms: f64 = booted.fields["duration_ms"].parse().unwrap();
        assert!(ms > 0.0, "{booted:?}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_boot_is_traced_with_its_reason() {
    let recorder = Recorder::default();
    let _subscriber = tracing::subscriber::set_default(otel_subscriber(Some(recorder.clone())));
    bounded(BOUND, async {
        let pool = Pool::builder("evfail")
            .backend(ProcessBackend::new().program("/nonexistent/flame-runner"))
            .max(1)
            .start()
            .await
            .unwrap();
        assert!(flame::call(&pool, add(1, 2)).await.is_err());
        let failed = recorder.wait_for("flame: runner boot failed", BOUND).await;
        assert!(
            failed.fields["error"].contains("/nonexistent/flame-runner"),
            "{failed:?}"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_lost_runner_is_traced_with_its_cause() {
    let recorder = Recorder::default();
    let _subscriber = tracing::subscriber::set_default(otel_subscriber(Some(recorder.clone())));
    bounded(BOUND, async {
        let pool = builder("evlost").max(1).start().await.unwrap();
        let runner = flame::call(&pool, whereabouts()).await.unwrap().pid;
        kill(runner);
        let lost = recorder.wait_for("flame: runner lost", BOUND).await;
        assert!(
            lost.fields["reason"].starts_with("runner lost: runner evlost-"),
            "{lost:?}"
        );
        assert!(wait_gone(runner, BOUND).await);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_shutdown_is_traced() {
    let recorder = Recorder::default();
    let _subscriber = tracing::subscriber::set_default(otel_subscriber(Some(recorder.clone())));
    bounded(BOUND, async {
        let pool = builder("evidle")
            .max(1)
            .idle_shutdown_after(Duration::from_millis(100))
            .start()
            .await
            .unwrap();
        flame::call(&pool, add(1, 2)).await.unwrap();
        let left = recorder
            .wait_for("flame: runner left the pool", BOUND)
            .await;
        assert_eq!(left.fields["reason"], "Idle", "{left:?}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_call_that_waited_for_a_slot_is_traced_with_its_wait() {
    let recorder = Recorder::default();
    let _subscriber = tracing::subscriber::set_default(otel_subscriber(Some(recorder.clone())));
    bounded(BOUND, async {
        let pool = builder("evwait")
            .max(1)
            .max_concurrency(1)
            .start()
            .await
            .unwrap();
        let busy = flame::spawn_on(&pool, sleep_ms(200));
        let waiting = flame::spawn_on(&pool, add(1, 2));
        let is_add = |e: &Recorded| e.fields["task"].ends_with("::add");
        let queued = recorder
            .wait_for_where("flame: call waits for a slot", is_add, BOUND)
            .await;
        assert_eq!(queued.fields["pool"], "evwait");
        busy.await.unwrap();
        assert_eq!(waiting.await.unwrap(), 3);
        let served = recorder
            .wait_for_where("flame: a waiting call got a slot", is_add, BOUND)
            .await;
        let waited: f64 = served.fields["waited_ms"].parse().unwrap();
        assert!(waited >= 100.0, "it waited for the 200 ms call: {served:?}");
        pool.shutdown().await;
    })
    .await;
}
