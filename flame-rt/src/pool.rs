//! The pool: which runners exist, where each call goes (the least-loaded runner with a free
//! slot), when to boot more, when to try a failed boot again, and when to let runners go.
//!
//! All of it is decided under one short lock, so `runners + booting + exiting` can never pass
//! `max`, however many callers race (Elixir FLAME issue #64).

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BootSpec, RunnerHandle};
use crate::builder::Placement;
use crate::builder::{Config, PoolBuilder};
use crate::connection::{self, RunnerConn, Unstarted};
use crate::error::{Error, ErrorKind};
use crate::hooks::{GrowEnd, GrowReason, GrowStart, Hooks, Shrink, ShrinkReason};
use crate::listener::{Listener, listener_for};
use crate::parent::Handoff;
use crate::protocol::Welcome;
use crate::protocol::handshake::new_token;
use crate::queue::{Queue, QueuedCall};
use crate::task::{TaskDef, registry};

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
        if crate::shutdown::drains_on_exit()
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
        crate::shutdown::register(&shared);
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
        let mut state = self.shared.lock();
        PoolStats {
            runners: state.runners.len(),
            booting: state.booting,
            in_flight: state.runners.iter().map(|r| r.in_flight).sum(),
            queued: state.queue.len(),
            booted: state.booted,
            failed_boots: state.failed_boots,
            served: self.shared.served.load(Ordering::Relaxed),
            recycled: state.recycled,
            min: state.min,
            max: state.max,
        }
    }

    /// Changes `max` at run time. Lowering it stops the excess runners once their calls are done
    /// (idle ones first); raising it lets waiting callers get runners at once.
    pub fn set_max(&self, max: usize) -> Result<(), Error> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if max == 0 || max < state.min {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "pool {}: max must be at least 1 and at least min ({})",
                    shared.name, state.min
                ),
            ));
        }
        state.max = max;
        let active = state.runners.iter().filter(|r| r.drain.is_none()).count() + state.booting;
        let mut excess = active.saturating_sub(max);
        // Idle runners go first, then the least busy.
        let mut order: Vec<usize> = (0..state.runners.len())
            .filter(|&i| state.runners[i].drain.is_none())
            .collect();
        order.sort_by_key(|&i| state.runners[i].in_flight);
        for i in order {
            if excess == 0 {
                break;
            }
            state.runners[i].stop(ShrinkReason::Resized);
            excess -= 1;
        }
        shared.grow(&mut state, None);
        Ok(())
    }

    /// Changes `min` at run time. Raising it boots runners in the background; lowering it lets
    /// idle runners above the new `min` stop at their next idle period.
    pub fn set_min(&self, min: usize) -> Result<(), Error> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if min > state.max {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "pool {}: min ({min}) is larger than max ({})",
                    shared.name, state.max
                ),
            ));
        }
        state.min = min;
        state.min_suspended = false;
        shared.grow(&mut state, None);
        Ok(())
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

/// The pool's state, shared by the `Pool` handles, the calls and the runner connections.
pub(crate) struct Shared {
    /// Shared with each call's ticket, for its metrics.
    pub(crate) name: Arc<str>,
    pub(crate) config: Config,
    backend: Arc<dyn Backend>,
    /// The listener runners dial, and the address they are told, bound on the first boot: a
    /// pool that never boots (one started inside a runner, say) costs no socket and no thread.
    listener: OnceLock<(Arc<Listener>, String)>,
    hooks: Hooks,
    state: Mutex<State>,
    /// Woken when runners come or go and when calls finish, if anyone watches.
    changed: Notify,
    /// Cancelled when the pool closes: boots in flight stop waiting for their runner, and
    /// destroy it (a container or machine would otherwise outlive a shut-down pool).
    closing: CancellationToken,
    /// Set when the pool was started in a `#[flame::test]` (see `BootSpec`).
    test_runner_args: Option<Vec<String>>,
    /// How many are waiting on `changed`: a finished call wakes nobody when nobody waits.
    watchers: AtomicUsize,
    served: AtomicU64,
    /// The app's runtime the pool was started on: its own work (boots, destroys, retries,
    /// hooks) runs there, also when a runner connection on the protocol's runtime triggers it.
    runtime: tokio::runtime::Handle,
}

pub(crate) struct State {
    /// `Some(why)` once the pool takes no more calls.
    pub(crate) closed: Option<Error>,
    min: usize,
    max: usize,
    runners: Vec<Runner>,
    booting: usize,
    /// Runners that left the pool but are not yet confirmed gone: they still count against `max`.
    exiting: usize,
    pub(crate) queue: Queue,
    /// Set when a `min` runner stopped for idleness; cleared by the next call.
    pub(crate) min_suspended: bool,
    last_boot_error: Option<Error>,
    /// Boots failed in a row; reset by a successful one.
    boot_failures: u32,
    /// A boot will be tried again after a pause: no other boot starts meanwhile.
    retry_pending: bool,
    booted: u64,
    failed_boots: u64,
    recycled: u64,
}

impl State {
    /// No runner can be added now.
    pub(crate) fn at_max(&self) -> bool {
        self.runners.len() + self.booting + self.exiting >= self.max
    }

    fn active(&self) -> usize {
        self.runners.iter().filter(|r| r.drain.is_none()).count()
    }
}

struct Runner {
    key: u64,
    conn: Arc<RunnerConn>,
    in_flight: usize,
    /// Why it was told to stop: it gets no new calls and stops when its calls are done.
    drain: Option<ShrinkReason>,
    handle: Option<Box<dyn RunnerHandle>>,
}

impl Runner {
    fn stop(&mut self, reason: ShrinkReason) {
        self.drain = Some(reason);
        if self.in_flight == 0 {
            self.conn.shutdown(Duration::ZERO);
        }
    }
}

/// A runner on its way out, counted in `exiting` (so against `max`, and waited for by
/// shutdown) from when this is made until it is dropped — its destroy done, or panicked — when
/// the pool may grow into the room.
struct Exiting(Arc<Shared>);

impl Exiting {
    fn new(shared: &Arc<Shared>, state: &mut State) -> Exiting {
        state.exiting += 1;
        Exiting(shared.clone())
    }
}

impl Drop for Exiting {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.exiting -= 1;
        self.0.grow(&mut state, None);
        drop(state);
        self.0.changed.notify_waiters();
    }
}

/// One call's claim on one runner. Released when dropped, which the runner connection does
/// when the runner reports the call over.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    key: u64,
    pub(crate) conn: Arc<RunnerConn>,
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.shared.release(self.key);
        }
    }
}

static NEXT_RUNNER: AtomicU64 = AtomicU64::new(1);

/// What became of a call given a slot.
enum Start {
    Started,
    /// Cancelled meanwhile: the slot was not used.
    Cancelled(Slot),
    /// Its runner's connection has just ended: the call goes back to waiting.
    Closed(QueuedCall, Slot),
}

/// Starts `call` on the runner of `slot`, unless it was cancelled meanwhile. Takes the
/// ticket's and the connection's locks (in that order), never the pool's.
fn start_call(call: QueuedCall, slot: Slot) -> Start {
    let ticket = call.ticket.clone();
    let conn = slot.conn.clone();
    let mut parts = Some((call, slot));
    let started = ticket.start(|args| {
        let (call, slot) = parts.take().expect("started once");
        conn.start(call, args, slot)
    });
    match started {
        Some(Ok(())) => Start::Started,
        Some(Err(unstarted)) => {
            let Unstarted { call, slot, .. } = *unstarted;
            Start::Closed(call, slot)
        }
        None => Start::Cancelled(parts.take().expect("not started").1),
    }
}

/// Boots tried for waiting callers before they are told the pool cannot boot.
const BOOT_ATTEMPTS: u32 = 3;

/// The pause before boot attempt `failures + 1`: 100 ms, 400 ms, 1.6 s, then 5 s.
fn retry_pause(failures: u32) -> Duration {
    let ms = 100u64.saturating_mul(4u64.saturating_pow(failures.saturating_sub(1)));
    Duration::from_millis(ms.min(5_000))
}

impl Shared {
    pub(crate) fn new(
        name: String,
        config: Config,
        min: usize,
        max: usize,
        backend: Arc<dyn Backend>,
        hooks: Hooks,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            name: name.into(),
            config,
            backend,
            listener: OnceLock::new(),
            hooks,
            state: Mutex::new(State {
                closed: None,
                min,
                max,
                runners: Vec::new(),
                booting: 0,
                exiting: 0,
                queue: Queue::default(),
                min_suspended: false,
                last_boot_error: None,
                boot_failures: 0,
                retry_pending: false,
                booted: 0,
                failed_boots: 0,
                recycled: 0,
            }),
            changed: Notify::new(),
            closing: CancellationToken::new(),
            watchers: AtomicUsize::new(0),
            test_runner_args: crate::runtime::test_runner_args(),
            served: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(future)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a bug in flame-rt; the state is still consistent
        // enough to shut down, so keep going rather than poison every later call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What must hold before a call is sent: its arguments are within `max_payload`, and its
    /// task is in this binary's registry.
    pub(crate) fn check(&self, def: &'static TaskDef, args_len: usize) -> Result<(), Error> {
        if args_len > self.config.max_payload {
            return Err(Error::new(
                ErrorKind::Codec,
                format!(
                    "the arguments of {} are {} bytes encoded, more than the pool's max_payload \
                     of {} bytes; raise it with PoolBuilder::max_payload, or stream the data \
                     through a flame channel",
                    def.id, args_len, self.config.max_payload
                ),
            ));
        }
        if registry()?.get(def.id).is_none() {
            return Err(Error::new(
                ErrorKind::UnknownTask,
                format!(
                    "{} is not in this binary's task registry (its registration was dropped by the linker); \
                     add `use <the crate defining it> as _;` to the binary",
                    def.id
                ),
            ));
        }
        Ok(())
    }

    /// Sends a call on its way: straight to the least-loaded runner with a free slot when
    /// nobody waits ahead of it, else into the queue (asking the pool to grow).
    pub(crate) fn submit(self: &Arc<Self>, call: QueuedCall) {
        let (call, slot) = {
            let mut state = self.lock();
            if let Some(error) = &state.closed {
                call.ticket.resolve(Err(error.clone()));
                return;
            }
            // Demand lifts a pause of `min` taken for idleness.
            state.min_suspended = false;
            let slot = match state.queue.has_waiters() {
                true => None,
                false => self.take_slot(&mut state),
            };
            let Some(slot) = slot else {
                tracing::debug!(pool = %self.name, task = call.def.id, at_max = state.at_max(), "flame: call waits for a slot");
                state.queue.push(call);
                self.grow(&mut state, None);
                return;
            };
            // A busy pool may want its next runner before it is full.
            if self.config.prewarm_at.is_some() {
                self.grow(&mut state, None);
            }
            (call, slot)
        };
        // Outside the pool lock: starting the call takes its ticket's and connection's locks.
        match start_call(call, slot) {
            Start::Started => {}
            Start::Cancelled(slot) => drop(slot),
            Start::Closed(call, slot) => {
                drop(slot);
                self.submit(call);
            }
        }
    }

    /// Gives back a slot taken under the lock but not used (dropping it would take the lock).
    fn undo(&self, state: &mut State, mut slot: Slot) {
        slot.armed = false;
        if let Some(r) = state.runners.iter_mut().find(|r| r.key == slot.key) {
            r.in_flight -= 1;
            if self.config.single_use {
                r.drain = None;
            }
        }
    }

    /// A free slot on the runner the pool's placement picks, if any.
    pub(crate) fn take_slot(self: &Arc<Self>, state: &mut State) -> Option<Slot> {
        let free = state
            .runners
            .iter_mut()
            .filter(|r| r.drain.is_none() && r.in_flight < self.config.max_concurrency);
        let runner = match self.config.placement {
            Placement::LeastLoaded => free.min_by_key(|r| r.in_flight),
            Placement::Pack => free.min_by_key(|r| std::cmp::Reverse(r.in_flight)),
        }?;
        runner.in_flight += 1;
        if self.config.single_use {
            runner.drain = Some(ShrinkReason::SingleUse);
        }
        Some(Slot {
            shared: self.clone(),
            key: runner.key,
            conn: runner.conn.clone(),
            armed: true,
        })
    }

    /// Starts waiting calls on free slots, oldest first.
    fn hand_out(self: &Arc<Self>, state: &mut State) {
        while state.queue.has_waiters() {
            let Some(slot) = self.take_slot(state) else {
                return;
            };
            let Some(call) = state.queue.pop() else {
                return self.undo(state, slot);
            };
            let (task, waited) = (call.def.id, call.ticket.deadline.elapsed());
            match start_call(call, slot) {
                Start::Started => {
                    crate::metrics::queue_wait(&self.name, waited);
                    tracing::debug!(pool = %self.name, task, waited_ms = waited.as_secs_f64() * 1e3, "flame: a waiting call got a slot");
                }
                Start::Cancelled(slot) => self.undo(state, slot),
                Start::Closed(call, slot) => {
                    self.undo(state, slot);
                    state.queue.push_front(call);
                    return;
                }
            }
        }
    }

    /// Boots runners while the pool is below `min`, while callers wait that the runners booting
    /// will not cover, or to prewarm; never past `max`, and not while a failed boot pauses.
    /// `retry` names the reason of the first boot when a paused retry calls this.
    pub(crate) fn grow(self: &Arc<Self>, state: &mut State, mut retry: Option<GrowReason>) {
        if state.closed.is_some() || state.retry_pending {
            return;
        }
        while !state.at_max() {
            let prewarm = |state: &State, threshold: f64| {
                let capacity = state.active() * self.config.max_concurrency;
                let busy: usize = state
                    .runners
                    .iter()
                    .filter(|r| r.drain.is_none())
                    .map(|r| r.in_flight)
                    .sum();
                state.booting == 0 && capacity > 0 && busy as f64 >= threshold * capacity as f64
            };
            let reason = if !state.min_suspended && state.active() + state.booting < state.min {
                GrowReason::Min
            } else if state
                .queue
                .more_than(state.booting * self.config.max_concurrency)
            {
                GrowReason::Demand
            } else if let Some(threshold) = self.config.prewarm_at
                && prewarm(state, threshold)
            {
                GrowReason::Prewarm
            } else {
                return;
            };
            state.booting += 1;
            self.spawn(self.clone().boot_one(retry.take().unwrap_or(reason)));
        }
    }

    fn release(self: &Arc<Self>, key: u64) {
        {
            let mut state = self.lock();
            if let Some(runner) = state.runners.iter_mut().find(|r| r.key == key) {
                runner.in_flight -= 1;
                match runner.drain {
                    Some(_) if runner.in_flight == 0 => runner.conn.shutdown(Duration::ZERO),
                    Some(_) => {}
                    None => self.hand_out(&mut state),
                }
            }
        }
        if self.watchers.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    pub(crate) fn note_served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    async fn boot_one(self: Arc<Self>, reason: GrowReason) {
        let key = NEXT_RUNNER.fetch_add(1, Ordering::Relaxed);
        let runner_id = format!("{}-{key}", self.name);
        self.hooks.grow_start(GrowStart {
            pool: self.name.to_string(),
            runner_id: runner_id.clone(),
            reason,
        });
        let started = Instant::now();
        let booted = self.boot_runner(key, &runner_id).await;
        let mut error = booted.as_ref().err().cloned();
        let mut orphan = None;
        {
            let mut state = self.lock();
            state.booting -= 1;
            match booted {
                Ok(runner) if state.closed.is_some() => {
                    orphan = Some((runner, Exiting::new(&self, &mut state)));
                }
                // It hung up before this could add it, so nobody else will take it out: it
                // failed to boot.
                Ok(runner) if runner.conn.ended().is_some() => {
                    let why = runner.conn.ended().map(Error::message).unwrap_or_default();
                    let failed = Error::new(
                        ErrorKind::BootFailed,
                        format!("{why}, right after it connected"),
                    );
                    orphan = Some((runner, Exiting::new(&self, &mut state)));
                    error = Some(failed.clone());
                    self.boot_failed(&mut state, failed);
                }
                Ok(runner) => {
                    state.runners.push(runner);
                    state.booted += 1;
                    state.boot_failures = 0;
                    state.last_boot_error = None;
                    self.hand_out(&mut state);
                    // The waiters it could not take, or a prewarm, may call for more.
                    self.grow(&mut state, None);
                }
                // Cut short by the pool's closing: no failure of the backend's.
                Err(error) if error.kind() == ErrorKind::PoolClosed => {}
                Err(error) => self.boot_failed(&mut state, error),
            }
        }
        self.hooks.grow_end(GrowEnd {
            pool: self.name.to_string(),
            runner_id,
            reason,
            duration: started.elapsed(),
            error,
        });
        if let Some((runner, _exiting)) = orphan {
            runner.conn.shutdown(Duration::ZERO);
            if let Some(handle) = runner.handle {
                handle.destroy().await;
            }
        }
        self.changed.notify_waiters();
    }

    /// A boot failed (or a runner's `main` did): try again after a pause while callers wait or
    /// the pool is below `min`; tell waiting callers why once it is hopeless.
    fn boot_failed(self: &Arc<Self>, state: &mut State, error: Error) {
        state.failed_boots += 1;
        state.boot_failures += 1;
        let hopeless = matches!(error.kind(), ErrorKind::Rejected | ErrorKind::Config)
            || state.boot_failures >= BOOT_ATTEMPTS;
        if hopeless && state.runners.is_empty() && state.booting == 0 {
            // Failing the callers now beats letting them time out with no explanation.
            state.queue.fail_all(&error);
        }
        state.last_boot_error = Some(error);
        let below_min = !state.min_suspended && state.active() + state.booting < state.min;
        let waiting = state.queue.has_waiters();
        if state.closed.is_none() && !state.retry_pending && (below_min || waiting) {
            state.retry_pending = true;
            let pause = retry_pause(state.boot_failures);
            let shared = self.clone();
            self.spawn(async move {
                tokio::time::sleep(pause).await;
                let mut state = shared.lock();
                state.retry_pending = false;
                shared.grow(&mut state, Some(GrowReason::Retry));
            });
        }
    }

    async fn boot_runner(self: &Arc<Self>, key: u64, runner_id: &str) -> Result<Runner, Error> {
        let token = new_token().map_err(|e| Error::io("drawing a runner token", e))?;
        let tls = self.tls_fingerprint()?;
        let (listener, advertise) = self.listener()?;
        let mut expectation = listener.expect(runner_id, token, tls.is_some());
        let mut spec = BootSpec::new(Handoff {
            pool: self.name.to_string(),
            runner_id: runner_id.to_string(),
            addr: advertise.clone(),
            token,
            boot_timeout: self.config.boot_timeout,
            tls,
        });
        spec.test_runner_args = self.test_runner_args.clone();
        let backend = self.backend.name().to_string();
        let deadline = crate::deadline::after(self.config.boot_timeout);
        let timed_out = || {
            Error::new(
                ErrorKind::BootFailed,
                format!(
                    "runner {runner_id} did not connect back within the boot timeout of {:?} (backend {backend})",
                    self.config.boot_timeout
                ),
            )
        };
        let closed_while_booting = || {
            Error::new(
                ErrorKind::PoolClosed,
                format!(
                    "pool {} was shut down while runner {runner_id} was booting",
                    self.name
                ),
            )
        };
        let boot = async {
            // Spawned so that a boot past its deadline still hands its runner over, to be
            // destroyed: a create request cut off mid-flight would leave a container or machine
            // nobody knows of.
            let mut boot = self.spawn(self.backend.boot(spec));
            let first = tokio::select! {
                biased;
                () = self.closing.cancelled() => None,
                joined = tokio::time::timeout_at(deadline, &mut boot) => Some(joined),
            };
            let booted = match first {
                Some(Ok(Ok(booted))) => booted,
                Some(Ok(Err(panicked))) => Err(Error::new(
                    ErrorKind::BootFailed,
                    format!("backend {backend} panicked booting runner {runner_id}: {panicked}"),
                )),
                Some(Err(_)) => {
                    self.destroy_late(boot);
                    return Err(timed_out());
                }
                None => {
                    self.destroy_late(boot);
                    return Err(closed_while_booting());
                }
            };
            let mut handle = booted.map_err(|e| match e.kind() {
                ErrorKind::BootFailed => e,
                // A mistake in the setup stays one: no retry will fix it.
                ErrorKind::Config => Error::new(
                    ErrorKind::Config,
                    format!("backend {backend}: {}", e.message()),
                ),
                _ => Error::new(ErrorKind::BootFailed, format!("backend {backend}: {e}")),
            })?;
            let accepted = tokio::select! {
                biased;
                () = self.closing.cancelled() => Err(closed_while_booting()),
                accepted = expectation.accepted() => accepted,
                status = handle.exited() => Err(Error::new(
                    ErrorKind::BootFailed,
                    format!("runner {runner_id} ({}) exited before it connected back: {status}", handle.describe()),
                )),
                // Destroyed below: dropping a handle need not stop a machine (an API backend's
                // is just an id).
                () = tokio::time::sleep_until(deadline) => Err(timed_out()),
            };
            // A boot that failed while peers claiming its runner were refused most likely failed
            // because its runner could not prove itself (wrong token, TLS): say so.
            let accepted = accepted.map_err(|e| match expectation.refused_claims() {
                Some(claims) if e.kind() == ErrorKind::BootFailed => Error::new(
                    ErrorKind::Rejected,
                    format!(
                        "{}; the listener refused whoever claimed to be it: {claims}",
                        e.message()
                    ),
                ),
                _ => e,
            });
            match accepted {
                Ok(halves) => Ok((halves, handle)),
                Err(e) => {
                    handle.destroy().await;
                    Err(e)
                }
            }
        };
        let (halves, handle) = boot.await?;
        let idle = match (
            self.config.idle_shutdown_after,
            self.config.min_idle_shutdown_after,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let welcome = Welcome {
            heartbeat_ms: crate::deadline::millis(self.config.heartbeat_interval),
            miss_limit: self.config.heartbeat_miss_limit,
            idle_ms: idle.map(crate::deadline::millis),
            max_payload: self.config.max_payload as u64,
        };
        let conn = connection::start(self.clone(), key, runner_id.to_string(), halves, welcome);
        Ok(Runner {
            key,
            conn,
            in_flight: 0,
            drain: None,
            handle: Some(handle),
        })
    }

    fn listener(&self) -> Result<&(Arc<Listener>, String), Error> {
        if let Some(bound) = self.listener.get() {
            return Ok(bound);
        }
        let listener = listener_for(self.backend.listen_addr())?;
        let advertise = self.backend.advertise_addr(listener.addr());
        Ok(self.listener.get_or_init(|| (listener, advertise)))
    }

    /// The fingerprint runners of this pool must see on the parent's certificate, if it uses TLS.
    fn tls_fingerprint(&self) -> Result<Option<String>, Error> {
        #[cfg(feature = "tls")]
        if self.config.tls {
            return Ok(Some(
                crate::protocol::tls::parent_tls()?.fingerprint.clone(),
            ));
        }
        Ok(None)
    }

    /// The runner has had nothing to do for `idle`.
    pub(crate) fn runner_idle(&self, key: u64, idle: Duration) {
        let mut state = self.lock();
        let above_min = state.active() > state.min;
        let Some(runner) = state.runners.iter_mut().find(|r| r.key == key) else {
            return;
        };
        if runner.in_flight > 0 || runner.drain.is_some() {
            return;
        }
        let idle_past = |limit: Option<Duration>| limit.is_some_and(|limit| idle >= limit);
        if above_min && idle_past(self.config.idle_shutdown_after) {
            runner.stop(ShrinkReason::Idle);
        } else if idle_past(self.config.min_idle_shutdown_after) {
            runner.stop(ShrinkReason::Idle);
            state.min_suspended = true;
        }
    }

    /// The runner's platform is stopping it: no more calls go there, it finishes its own, and a
    /// replacement boots if `min` or waiting callers need one. It is not told to stop (that
    /// would replace the platform's grace with ours).
    pub(crate) fn runner_stopping(self: &Arc<Self>, key: u64) {
        let mut state = self.lock();
        let Some(runner) = state.runners.iter_mut().find(|r| r.key == key) else {
            return;
        };
        tracing::info!(pool = %self.name, runner = %runner.conn.id, "flame: runner stopped by its platform; it finishes its calls");
        runner.drain.get_or_insert(ShrinkReason::Stopped);
        self.grow(&mut state, None);
        drop(state);
        self.changed.notify_waiters();
    }

    /// A cancelled call on the runner did not stop within `cancel_grace`: no more calls go
    /// there, its others get the shutdown grace to finish, then it stops. The caller frees the
    /// stuck call's slot right after, which stops the runner at once if nothing else runs.
    pub(crate) fn recycle(&self, key: u64, task: &str, call: u64) {
        let mut state = self.lock();
        let Some(runner) = state.runners.iter_mut().find(|r| r.key == key) else {
            return;
        };
        if runner.drain.is_none() {
            tracing::warn!(
                pool = %self.name,
                runner = %runner.conn.id,
                task,
                call,
                grace = ?self.config.cancel_grace,
                "flame: runner recycled: a cancelled call did not stop within cancel_grace (it blocks \
                 its thread or never yields)"
            );
            runner.drain = Some(ShrinkReason::Recycled);
            runner.conn.shutdown(self.config.shutdown_timeout);
            state.recycled += 1;
            crate::metrics::runner_recycled(&self.name);
        }
    }

    /// The runner's connection ended, for `reason`.
    pub(crate) fn runner_gone(self: &Arc<Self>, key: u64, reason: &Error) {
        let (runner, shrink, exiting) = {
            let mut state = self.lock();
            let Some(at) = state.runners.iter().position(|r| r.key == key) else {
                return;
            };
            let runner = state.runners.swap_remove(at);
            let exiting = Exiting::new(self, &mut state);
            let shrink = runner.drain.unwrap_or(ShrinkReason::Lost);
            if shrink == ShrinkReason::Lost {
                tracing::warn!(pool = %self.name, runner = %runner.conn.id, %reason, "flame: runner lost");
            }
            if reason.kind() == ErrorKind::BootFailed {
                // The app's main failed there, and would on the next runner too.
                self.boot_failed(&mut state, reason.clone());
            } else {
                // Keep `min` alive and serve whoever is waiting.
                self.grow(&mut state, None);
            }
            (runner, shrink, exiting)
        };
        self.hooks.shrink(Shrink {
            pool: self.name.to_string(),
            runner_id: runner.conn.id.clone(),
            reason: shrink,
        });
        self.spawn(async move {
            let _exiting = exiting;
            if let Some(handle) = runner.handle {
                handle.destroy().await;
            }
        });
        self.changed.notify_waiters();
    }

    /// Takes over a backend boot that returned too late to be used (its window closed, or the
    /// pool did): destroys what it returns. It counts as exiting until then, so `max` and
    /// shutdown see it; a boot that has still not returned after another boot window is given
    /// up on.
    fn destroy_late(
        self: &Arc<Self>,
        boot: tokio::task::JoinHandle<Result<Box<dyn RunnerHandle>, Error>>,
    ) {
        let exiting = Exiting::new(self, &mut self.lock());
        let limit = self.config.boot_timeout;
        self.spawn(async move {
            match tokio::time::timeout(limit, boot).await {
                Ok(Ok(Ok(late))) => late.destroy().await,
                // It failed or panicked: nothing to destroy.
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    pool = %exiting.0.name,
                    "flame: a backend boot has not returned a boot window after it was given up; \
                     whatever it starts is left to the runner's own failsafe"
                ),
            }
        });
    }

    /// Marks the pool closed for `reason`, fails the queue, tells every runner to stop and
    /// returns their ids and handles.
    fn close(&self, reason: Error) -> Vec<(String, Box<dyn RunnerHandle>)> {
        let mut state = self.lock();
        state.queue.fail_all(&reason);
        state.closed.get_or_insert(reason);
        let runners = std::mem::take(&mut state.runners);
        drop(state);
        self.closing.cancel();
        self.changed.notify_waiters();
        runners
            .into_iter()
            .filter_map(|r| {
                r.conn.shutdown(Duration::ZERO);
                Some((r.conn.id.clone(), r.handle?))
            })
            .collect()
    }

    pub(crate) async fn shutdown(self: &Arc<Self>) {
        let shared = self;
        let grace = shared.config.shutdown_timeout;
        {
            let mut state = shared.lock();
            if state.closed.is_none() {
                let error = Error::new(
                    ErrorKind::PoolClosed,
                    format!("pool {} is shut down", shared.name),
                );
                state.queue.fail_all(&error);
                state.closed = Some(error);
            }
            self.closing.cancel();
            for runner in &mut state.runners {
                runner.drain.get_or_insert(ShrinkReason::Shutdown);
                runner.conn.shutdown(grace);
            }
        }
        let deadline = crate::deadline::after(grace);
        shared
            .wait_until(deadline, |state| {
                state.runners.iter().all(|r| r.in_flight == 0)
            })
            .await;
        let runners = shared.close(Error::new(
            ErrorKind::PoolClosed,
            format!("pool {} is shut down", shared.name),
        ));
        let reaps = runners
            .into_iter()
            .map(|(runner_id, mut handle)| async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), handle.exited()).await;
                handle.destroy().await;
                shared.hooks.shrink(Shrink {
                    pool: shared.name.to_string(),
                    runner_id,
                    reason: ShrinkReason::Shutdown,
                });
            });
        futures::future::join_all(reaps).await;
        // Runners that stopped by themselves during the grace are reaped by their own tasks, and
        // boots cut short by the close destroy what they started (a backend boot still in
        // flight is waited for up to a boot window).
        shared
            .wait_until(
                crate::deadline::after(
                    shared
                        .config
                        .boot_timeout
                        .saturating_add(Duration::from_secs(10)),
                ),
                |state| state.exiting == 0 && state.booting == 0,
            )
            .await;
    }

    /// Waits until `done` holds for the state, or `deadline`; returns whether it holds.
    async fn wait_until(&self, deadline: Instant, done: impl Fn(&State) -> bool) -> bool {
        struct Watching<'a>(&'a AtomicUsize);
        impl Drop for Watching<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.watchers.fetch_add(1, Ordering::SeqCst);
        let _watching = Watching(&self.watchers);
        loop {
            let changed = self.changed.notified();
            if done(&self.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return done(&self.lock());
            }
        }
    }

    /// Waits until `min` runners are connected, or fails with why one could not boot.
    pub(crate) async fn wait_for_min(self: &Arc<Self>) -> Result<(), Error> {
        self.grow(&mut self.lock(), None);
        // Each boot ends with a boot timeout, so "for ever" here is bounded by it.
        let forever = Instant::now() + Duration::from_secs(86400 * 365);
        self.wait_until(forever, |s| {
            s.active() >= s.min || s.last_boot_error.is_some()
        })
        .await;
        let state = self.lock();
        match &state.last_boot_error {
            Some(error) if state.active() < state.min => Err(error.clone()),
            _ => Ok(()),
        }
    }
}
