//! Metrics through the `metrics` crate's facade (feature `metrics`): whatever recorder the app
//! installs (Prometheus, StatsD...) gets them. Without the feature these are empty and vanish.
//! Install it globally: calls are resolved, and runners lost, on the protocol's own thread
//! (`io_runtime`), which a thread-local recorder does not reach.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `flame_calls_total` | counter | `pool`, `task`, `outcome` (`ok` or the error kind) |
//! | `flame_call_duration_seconds` | histogram | `pool`, `task`: from `spawn_on` to the result |
//! | `flame_queue_wait_seconds` | histogram | `pool`: calls that waited for a slot |
//! | `flame_boots_total` | counter | `pool`, `outcome` (`ok`, `failed`) |
//! | `flame_boot_duration_seconds` | histogram | `pool` |
//! | `flame_runners` | gauge | `pool`: runners up |
//! | `flame_runners_recycled_total` | counter | `pool`: runners stopped because a cancelled call on them did not stop (`cancel_grace`) |

#[cfg(feature = "metrics")]
use crate::error::{Error, ErrorKind};
use std::time::Duration;

/// A call's result was delivered. (Only with the feature: the ticket then knows its pool.)
#[cfg(feature = "metrics")]
pub(crate) fn call_done(
    pool: &std::sync::Arc<str>,
    task: &'static str,
    outcome: Result<(), &Error>,
    took: Duration,
) {
    let outcome = match outcome {
        Ok(()) => "ok",
        Err(e) => kind_label(e.kind()),
    };
    let pool = pool.to_string();
    metrics::counter!("flame_calls_total", "pool" => pool.clone(), "task" => task, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("flame_call_duration_seconds", "pool" => pool, "task" => task)
        .record(took.as_secs_f64());
}

/// A call that waited for a slot got one.
#[inline]
pub(crate) fn queue_wait(pool: &str, waited: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("flame_queue_wait_seconds", "pool" => pool.to_string())
        .record(waited.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (pool, waited);
}

/// A boot ended, well or not.
pub(crate) fn boot(pool: &str, ok: bool, took: Duration) {
    #[cfg(feature = "metrics")]
    {
        let outcome = if ok { "ok" } else { "failed" };
        metrics::counter!("flame_boots_total", "pool" => pool.to_string(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("flame_boot_duration_seconds", "pool" => pool.to_string())
            .record(took.as_secs_f64());
        if ok {
            metrics::gauge!("flame_runners", "pool" => pool.to_string()).increment(1.0);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (pool, ok, took);
}

/// A runner was recycled: a cancelled call on it did not stop within `cancel_grace`.
pub(crate) fn runner_recycled(pool: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("flame_runners_recycled_total", "pool" => pool.to_string()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = pool;
}

/// A runner that booted left the pool.
pub(crate) fn runner_left(pool: &str) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("flame_runners", "pool" => pool.to_string()).decrement(1.0);
    #[cfg(not(feature = "metrics"))]
    let _ = pool;
}

#[cfg(feature = "metrics")]
fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Panicked => "panicked",
        ErrorKind::TimedOut => "timed_out",
        ErrorKind::RunnerLost => "runner_lost",
        ErrorKind::BootFailed => "boot_failed",
        ErrorKind::Rejected => "rejected",
        ErrorKind::UnknownTask => "unknown_task",
        ErrorKind::Codec => "codec",
        ErrorKind::PoolClosed => "pool_closed",
        ErrorKind::Config => "config",
        ErrorKind::Io => "io",
        ErrorKind::Protocol => "protocol",
        ErrorKind::ChannelClosed => "channel_closed",
        ErrorKind::StateMissing => "state_missing",
    }
}
