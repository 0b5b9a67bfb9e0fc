//! The `metrics` feature: what a pool's calls, waits and boots add up to in a recorder.

use std::time::Duration;

use flame::{ErrorKind, Pool, ProcessBackend};
use flame_tests::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(60);

type Snapshot = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn matches(key: &metrics_util::CompositeKey, name: &str, labels: &[(&str, &str)]) -> bool {
    let key = key.key();
    key.name() == name
        && labels.iter().all(|(k, v)| {
            key.labels()
                .any(|label| label.key() == *k && label.value() == *v)
        })
}

/// The value of the one metric `name` whose labels include all of `labels`.
fn value<'a>(
    snapshot: &'a Snapshot,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    let mut found = snapshot
        .iter()
        .filter(|(key, _, _, _)| matches(key, name, labels))
        .map(|(_, _, _, value)| value);
    let first = found.next();
    assert!(found.next().is_none(), "more than one {name} {labels:?}");
    first
}

/// The sum of the counters `name` whose labels include all of `labels`.
fn counter(snapshot: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|(key, _, _, _)| matches(key, name, labels))
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn samples(snapshot: &Snapshot, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    match value(snapshot, name, labels) {
        Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.into_inner()).collect(),
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

#[test]
fn calls_waits_boots_and_runners_add_up() {
    // Global, as an app installs its exporter: outcomes are recorded on the thread that
    // resolves a call (the connection's), not the caller's. This binary has no other test.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bounded(BOUND, async {
        let pool = Pool::builder("metered")
            .backend(ProcessBackend::new().program(RUNNER))
            .max(1)
            .max_concurrency(1)
            .start()
            .await
            .unwrap();
        for i in 0..5 {
            assert_eq!(flame::call(&pool, add(i, 1)).await.unwrap(), i + 1);
        }
        let err = flame::call(&pool, panic_with("on purpose".into()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Panicked);
        // One call waits for the slot the other holds.
        let busy = flame::spawn_on(&pool, sleep_ms(100));
        let waiting = flame::spawn_on(&pool, add(1, 1));
        busy.await.unwrap();
        assert_eq!(waiting.await.unwrap(), 2);
        pool.shutdown().await;
    }));

    // One snapshot: taking one resets every value.
    let snapshot = snapshotter.snapshot().into_vec();
    let pool = ("pool", "metered");
    let ok = counter(&snapshot, "flame_calls_total", &[pool, ("outcome", "ok")]);
    let add_ok = counter(
        &snapshot,
        "flame_calls_total",
        &[pool, ("task", "flame_tests::add"), ("outcome", "ok")],
    );
    assert_eq!(add_ok, 6, "five adds and the one that waited");
    assert_eq!(ok, 7, "the six adds and the sleep");
    let panicked = counter(
        &snapshot,
        "flame_calls_total",
        &[pool, ("outcome", "panicked")],
    );
    assert_eq!(panicked, 1);
    let durations = samples(
        &snapshot,
        "flame_call_duration_seconds",
        &[pool, ("task", "flame_tests::add")],
    );
    assert_eq!(durations.len(), 6, "one duration per add");
    assert!(durations.iter().all(|d| *d > 0.0));
    let waits = samples(&snapshot, "flame_queue_wait_seconds", &[pool]);
    assert!(
        waits.iter().any(|w| *w >= 0.05),
        "the add behind the 100 ms call waited: {waits:?}"
    );
    assert_eq!(
        counter(&snapshot, "flame_boots_total", &[pool, ("outcome", "ok")]),
        1
    );
    assert_eq!(
        samples(&snapshot, "flame_boot_duration_seconds", &[pool]).len(),
        1
    );
    assert_eq!(
        value(&snapshot, "flame_runners", &[pool]),
        Some(&DebugValue::Gauge(0.0.into())),
        "up once (the key exists), then gone at shutdown"
    );
}
