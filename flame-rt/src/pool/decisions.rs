//! The words the pool's decisions are made in: what a decision reads (its [`Rules`], the
//! line of [`Waiting`] calls) and what it returns ([`Action`]s to carry out, a [`Seat`] for a
//! call, what became of a [`Submitted`] call), and how a boot ended ([`Booted`]), as the pool
//! reports it. The decisions themselves are in `state.rs`.

use std::time::Duration;

use super::builder::{Config, Placement};
use crate::error::Error;
use crate::hooks::{GrowReason, ShrinkReason};

/// The line of waiting calls, as the decisions see it: the pool's [`Queue`](crate::pool::queue::Queue)
/// in production, a plain list in the tests. Calls whose callers gave up are skipped.
pub(crate) trait Waiting {
    type Call;
    fn push(&mut self, call: Self::Call);
    /// Puts a call back at the head of the line.
    fn push_front(&mut self, call: Self::Call);
    /// The oldest call still waiting.
    fn pop(&mut self) -> Option<Self::Call>;
    fn has_waiters(&mut self) -> bool;
    /// Whether more than `n` calls still wait.
    fn more_than(&self, n: usize) -> bool;
    fn len(&mut self) -> usize;
    /// Fails every waiting call with `error` (but those it gives another try).
    fn fail_all(&mut self, error: &Error);
}

/// The pool's knobs that its decisions read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) max_concurrency: usize,
    pub(crate) placement: Placement,
    pub(crate) single_use: bool,
    pub(crate) prewarm_at: Option<f64>,
    pub(crate) idle_shutdown_after: Option<Duration>,
    pub(crate) min_idle_shutdown_after: Option<Duration>,
    /// The grace a recycled runner's other calls get.
    pub(crate) shutdown_timeout: Duration,
}

impl From<&Config> for Rules {
    fn from(config: &Config) -> Rules {
        Rules {
            max_concurrency: config.max_concurrency,
            placement: config.placement,
            single_use: config.single_use,
            prewarm_at: config.prewarm_at,
            idle_shutdown_after: config.idle_shutdown_after,
            min_idle_shutdown_after: config.min_idle_shutdown_after,
            shutdown_timeout: config.shutdown_timeout,
        }
    }
}

/// What the pool must do after an event, once its lock is let go.
#[must_use]
#[derive(Debug)]
pub(crate) enum Action<Call, C, H> {
    /// Boot one runner (already counted in `booting`); report how it went with
    /// [`State::booted`].
    Boot(GrowReason),
    /// Start the call on the seat's runner, whose slot it holds. If the call was given up
    /// meanwhile, give the slot back with [`State::unused`].
    Start(Call, Seat<C>),
    /// Tell the runner to stop once its calls are done, giving them `grace`.
    Stop(C, Duration),
    /// The runner left the pool: destroy it. It counts as exiting (against `max`) until
    /// [`State::exited`] says its destroy is done. `shrink` is `None` for a runner that
    /// never joined (booted after the pool closed, or hung up at once): it is stopped first
    /// and no shrink is reported.
    Retire {
        conn: C,
        handle: Option<H>,
        shrink: Option<ShrinkReason>,
    },
    /// Call [`State::retry_due`] after the pause.
    RetryAfter(Duration),
}

/// A slot taken on a runner: the call placed there holds it until its runner says it is over.
#[derive(Debug)]
pub(crate) struct Seat<C> {
    pub(crate) key: u64,
    pub(crate) conn: C,
}

/// What became of a submitted call.
pub(crate) enum Submitted<Call, C> {
    /// It has a slot: start it there.
    Start(Call, Seat<C>),
    /// It waits in line.
    Waits,
    /// The pool is closed, for this reason.
    Refused(Call, Error),
}

/// How a boot ended, as the pool tells it to [`State::booted`].
pub(crate) enum Booted<C, H> {
    /// Connected and welcomed.
    Ready {
        key: u64,
        conn: C,
        handle: H,
    },
    /// Connected, then hung up before it could join: it failed to boot.
    HungUp {
        conn: C,
        handle: H,
        error: Error,
    },
    Failed(Error),
}
