//! Pool lifecycle hooks: callbacks the app registers on the builder to see the pool grow and
//! shrink (for metrics, logs, or tests that await an event instead of sleeping).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;

/// Why the pool boots a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrowReason {
    /// The pool is below `min`.
    Min,
    /// Callers are waiting and the runners booting would not cover them.
    Demand,
    /// Utilisation crossed [`prewarm_at`](crate::PoolBuilder::prewarm_at).
    Prewarm,
    /// A boot failed and is tried again after a pause.
    Retry,
}

/// Why a runner left the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShrinkReason {
    /// It had no work for its idle period.
    Idle,
    /// It was single-use and served its call.
    SingleUse,
    /// The pool's `max` was lowered.
    Resized,
    /// The pool shut down.
    Shutdown,
    /// It died, its connection ended, or its `main` failed.
    Lost,
    /// A cancelled call on it did not stop within `cancel_grace`: it was stopped and replaced.
    Recycled,
    /// Its platform stopped it (SIGTERM: `docker stop`, a pod deleted, a Machine stopped, a spot
    /// eviction): it finished the calls it had, within the grace it was given, taking no more.
    Stopped,
}

/// A runner boot has started: passed to [`on_grow_start`](crate::PoolBuilder::on_grow_start).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrowStart {
    /// The pool's name.
    pub pool: String,
    /// The id the new runner will have.
    pub runner_id: String,
    /// Why it boots.
    pub reason: GrowReason,
}

/// A runner boot has ended: passed to [`on_grow_end`](crate::PoolBuilder::on_grow_end).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrowEnd {
    /// The pool's name.
    pub pool: String,
    /// The runner's id.
    pub runner_id: String,
    /// Why it booted.
    pub reason: GrowReason,
    /// From the start of the boot until the runner's handshake completed (or the boot failed).
    pub duration: Duration,
    /// Why the boot failed, if it did.
    pub error: Option<Error>,
}

/// A runner left the pool: passed to [`on_shrink`](crate::PoolBuilder::on_shrink).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Shrink {
    /// The pool's name.
    pub pool: String,
    /// The runner's id.
    pub runner_id: String,
    /// Why it left.
    pub reason: ShrinkReason,
}

type Hook<E> = Option<Arc<dyn Fn(&E) + Send + Sync>>;

/// The callbacks registered on a pool. They run on the pool's tasks, never under its lock, so a
/// hook may call [`Pool::stats`](crate::Pool::stats); it should return quickly.
#[derive(Default, Clone)]
pub(crate) struct Hooks {
    pub(crate) grow_start: Hook<GrowStart>,
    pub(crate) grow_end: Hook<GrowEnd>,
    pub(crate) shrink: Hook<Shrink>,
}

impl Hooks {
    pub(crate) fn grow_start(&self, event: GrowStart) {
        tracing::debug!(pool = %event.pool, runner = %event.runner_id, reason = ?event.reason, "flame: booting a runner");
        if let Some(hook) = &self.grow_start {
            hook(&event);
        }
    }

    pub(crate) fn grow_end(&self, event: GrowEnd) {
        crate::metrics::boot(&event.pool, event.error.is_none(), event.duration);
        match &event.error {
            None => tracing::info!(
                pool = %event.pool,
                runner = %event.runner_id,
                reason = ?event.reason,
                duration_ms = event.duration.as_secs_f64() * 1e3,
                "flame: runner booted"
            ),
            Some(error) => tracing::warn!(
                pool = %event.pool,
                runner = %event.runner_id,
                reason = ?event.reason,
                duration_ms = event.duration.as_secs_f64() * 1e3,
                %error,
                "flame: runner boot failed"
            ),
        }
        if let Some(hook) = &self.grow_end {
            hook(&event);
        }
    }

    pub(crate) fn shrink(&self, event: Shrink) {
        crate::metrics::runner_left(&event.pool);
        tracing::info!(pool = %event.pool, runner = %event.runner_id, reason = ?event.reason, "flame: runner left the pool");
        if let Some(hook) = &self.shrink {
            hook(&event);
        }
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("grow_start", &self.grow_start.is_some())
            .field("grow_end", &self.grow_end.is_some())
            .field("shrink", &self.shrink.is_some())
            .finish()
    }
}
