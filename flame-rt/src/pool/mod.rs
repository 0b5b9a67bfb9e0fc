//! The pool: which runners exist, where each call goes (the least-loaded runner with a free
//! slot), when to boot more, when to try a failed boot again, and when to let runners go.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | [`Pool`], the handle callers hold |
//! | `builder.rs` | [`PoolBuilder`]: every knob, checked, and starting the pool |
//! | `state.rs` | the decisions, as plain data: no lock, no I/O (`tests.rs`: their invariants over random event sequences) |
//! | `decisions.rs` | what a decision reads and returns: rules, the waiting line, actions |
//! | `shared.rs` | the one lock around the state, and carrying out what it decides |
//! | `boot.rs` | booting one runner, up to its welcome |
//! | `queue.rs` | where a call waits for a slot |
//! | `listener.rs` | where runners dial back, and the hello checks that admit them |
//! | `connection/` | one runner connection: calls out (`mod.rs`), results in (`read.rs`) |
//! | `shutdown.rs` | every pool of the process, drained on SIGTERM/SIGINT |

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::{Error, ErrorKind};
use crate::hooks::{Shrink, ShrinkReason};

mod boot;
pub(crate) mod builder;
pub(crate) mod connection;
mod decisions;
pub(crate) mod listener;
pub(crate) mod queue;
mod shared;
pub(crate) mod shutdown;
mod state;

pub use builder::{Placement, PoolBuilder};
pub(crate) use shared::Shared;

/// A pool of runners that calls are sent to. Cheap to clone; every clone is the same pool.
///
/// Dropping the last clone closes the pool: new and waiting calls fail with
/// [`ErrorKind::PoolClosed`]. Under `#[flame::main]` the calls in flight (detached ones and
/// casts included) still finish within `shutdown_timeout`, in the background, and the process
/// waits for them before it exits. Elsewhere the pool lets its runners go at once: process
/// runners are killed, remote ones (containers, Machines) exit through their failsafe as their
/// connection ends and their platform removes them. Call
/// [`shutdown`](Pool::shutdown) to wait for in-flight calls yourself.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    _close_on_drop: Arc<CloseOnDrop>,
}

struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        // Under `#[flame::main]` the work still in flight (a detached call, a cast) finishes:
        // the pool drains as `shutdown` does, and the process waits for it before exiting.
        if shutdown::drains_on_exit()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let shared = self.0.clone();
            runtime.spawn(async move { shared.shutdown().await });
            return;
        }
        let runners = self.0.close(Error::new(
            ErrorKind::PoolClosed,
            format!("pool {} was dropped", self.0.name),
        ));
        // They leave the pool's count and hooks as they would with `shutdown`.
        for (runner_id, _) in &runners {
            self.0.hooks.shrink(Shrink {
                pool: self.0.name.to_string(),
                runner_id: runner_id.clone(),
                reason: ShrinkReason::Shutdown,
            });
        }
        // Dropping the handles lets the runners go: nobody is left to wait for them.
        drop(runners);
    }
}

/// A snapshot of a pool's state, from [`Pool::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PoolStats {
    /// Runners connected (including ones finishing their last calls before stopping).
    pub runners: usize,
    /// Runners booting.
    pub booting: usize,
    /// Busy slots: calls running on runners.
    pub in_flight: usize,
    /// Calls waiting for a slot.
    pub queued: usize,
    /// Runners booted successfully since the pool started.
    pub booted: u64,
    /// Boots that failed since the pool started.
    pub failed_boots: u64,
    /// Calls that got an outcome from a runner since the pool started.
    pub served: u64,
    /// Runners recycled because a cancelled call on them did not stop (see
    /// [`PoolBuilder::cancel_grace`]).
    pub recycled: u64,
    /// The current `min`.
    pub min: usize,
    /// The current `max`.
    pub max: usize,
}

impl Pool {
    /// Starts configuring a pool named `name` (letters, digits, `-`, `_`, `.`; it names the
    /// runners in logs). See [`PoolBuilder`] for every knob and its default.
    pub fn builder(name: impl Into<String>) -> PoolBuilder {
        PoolBuilder::new(name.into())
    }

    pub(crate) fn new(shared: Arc<Shared>) -> Pool {
        shutdown::register(&shared);
        Pool {
            _close_on_drop: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// How many runners and calls the pool has right now, and totals since it started.
    pub fn stats(&self) -> PoolStats {
        let counts = self.shared.lock().counts();
        PoolStats {
            runners: counts.runners,
            booting: counts.booting,
            in_flight: counts.in_flight,
            queued: counts.queued,
            booted: counts.booted,
            failed_boots: counts.failed_boots,
            served: self.shared.served.load(Ordering::Relaxed),
            recycled: counts.recycled,
            min: counts.min,
            max: counts.max,
        }
    }

    /// Changes `max` at run time. Lowering it stops the excess runners once their calls are done
    /// (idle ones first); raising it lets waiting callers get runners at once.
    pub fn set_max(&self, max: usize) -> Result<(), Error> {
        let name = &self.shared.name;
        self.shared
            .decide(|state, acts| state.set_max(max, acts))
            .map_err(|min| {
                Error::new(
                    ErrorKind::Config,
                    format!("pool {name}: max must be at least 1 and at least min ({min})"),
                )
            })
    }

    /// Changes `min` at run time. Raising it boots runners in the background; lowering it lets
    /// idle runners above the new `min` stop at their next idle period.
    pub fn set_min(&self, min: usize) -> Result<(), Error> {
        let name = &self.shared.name;
        self.shared
            .decide(|state, acts| state.set_min(min, acts))
            .map_err(|max| {
                Error::new(
                    ErrorKind::Config,
                    format!("pool {name}: min ({min}) is larger than max ({max})"),
                )
            })
    }

    /// Stops the pool gracefully: new and queued calls fail with [`ErrorKind::PoolClosed`],
    /// calls in flight get up to the pool's `shutdown_timeout` to finish, then every runner is
    /// stopped and reaped. Returns when no runner of the pool is left.
    ///
    /// Runners are told the grace up front, so they finish their calls within it even if this
    /// process goes away meanwhile.
    pub async fn shutdown(&self) {
        self.shared.shutdown().await;
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared.name)
            .field("backend", &self.shared.backend.name())
            .field("stats", &self.stats())
            .finish()
    }
}
