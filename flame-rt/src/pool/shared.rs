//! The pool's one lock, around its decisions (`state.rs`), and the hands that carry them out:
//! starting calls, booting, stopping and destroying runners, telling hooks and watchers.
//!
//! Every change goes through [`Shared::decide`]: decide under the lock, act after it. So the
//! pool's lock is never held while a call starts, a hook runs, a runner is told to stop or a
//! task is spawned. The lock order is pool, then ticket, then connection: under the pool's lock
//! only tickets' locks are taken (the queue asks whether a call still waits, and fails calls);
//! a call starts under its ticket's lock, which takes its connection's.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::builder::Config;
use super::state::{Action, Rules, Seat, State, Submitted, Waiting};
use crate::backend::{Backend, RunnerHandle};
use crate::error::{Error, ErrorKind};
use crate::hooks::{Hooks, Shrink, ShrinkReason};
use crate::pool::connection::{Owner, RunnerConn, Slot, Unstarted};
use crate::pool::listener::Listener;
use crate::pool::queue::{Queue, QueuedCall};
use crate::task::{TaskDef, registry};
use crate::ticket::Remote;

pub(super) type PoolState = State<Queue, Arc<RunnerConn>, Box<dyn RunnerHandle>>;
pub(super) type Actions = Vec<Action<QueuedCall, Arc<RunnerConn>, Box<dyn RunnerHandle>>>;

/// The pool's state, shared by the `Pool` handles, the calls and the runner connections.
pub(crate) struct Shared {
    /// Shared with each call's ticket, for its metrics.
    pub(crate) name: Arc<str>,
    pub(crate) config: Config,
    pub(super) backend: Arc<dyn Backend>,
    /// The listener runners dial, and the address they are told, bound on the first boot: a
    /// pool that never boots (one started inside a runner, say) costs no socket and no thread.
    pub(super) listener: OnceLock<(Arc<Listener>, String)>,
    pub(super) hooks: Hooks,
    state: Mutex<PoolState>,
    /// Woken when runners come or go and when calls finish, if anyone watches.
    pub(super) changed: Notify,
    /// Cancelled when the pool closes: boots in flight stop waiting for their runner, and
    /// destroy it (a container or machine would otherwise outlive a shut-down pool).
    pub(super) closing: CancellationToken,
    /// Set when the pool was started in a `#[flame::test]` (see `BootSpec`).
    pub(super) test_runner_args: Option<Vec<String>>,
    /// How many are waiting on `changed`: a finished call wakes nobody when nobody waits.
    watchers: AtomicUsize,
    pub(super) served: AtomicU64,
    /// The app's runtime the pool was started on: its own work (boots, destroys, retries,
    /// hooks) runs there, also when a runner connection on the protocol's runtime triggers it.
    runtime: tokio::runtime::Handle,
}

impl Waiting for Queue {
    type Call = QueuedCall;
    fn push(&mut self, call: QueuedCall) {
        Queue::push(self, call);
    }
    fn push_front(&mut self, call: QueuedCall) {
        Queue::push_front(self, call);
    }
    fn pop(&mut self) -> Option<QueuedCall> {
        Queue::pop(self)
    }
    fn has_waiters(&mut self) -> bool {
        Queue::has_waiters(self)
    }
    fn more_than(&self, n: usize) -> bool {
        Queue::more_than(self, n)
    }
    fn len(&mut self) -> usize {
        Queue::len(self)
    }
    fn fail_all(&mut self, error: &Error) {
        Queue::fail_all(self, error);
    }
}

/// A runner on its way out, counted in `exiting` (so against `max`, and waited for by
/// shutdown) by the decision that made this until it is dropped — its destroy done, or
/// panicked — when the pool may grow into the room.
pub(super) struct Exiting(pub(super) Arc<Shared>);

impl Drop for Exiting {
    fn drop(&mut self) {
        self.0.decide(|state, acts| state.exited(acts));
        self.0.changed.notify_waiters();
    }
}

/// What became of a call given a slot.
enum Start {
    Started,
    /// Cancelled meanwhile: the slot was not used.
    Cancelled(Slot),
    /// Its runner's connection has just ended: the call goes back to waiting.
    Closed(QueuedCall, Slot),
}

/// Starts `call` on the runner of `slot`, unless it was cancelled meanwhile. Takes the
/// ticket's and the connection's locks (in that order).
fn start_call(call: QueuedCall, slot: Slot) -> Start {
    let ticket = call.ticket.clone();
    let conn = slot.conn().clone();
    let mut parts = Some((call, slot));
    let started = ticket.start(|args| {
        let (call, slot) = parts.take().expect("started once");
        match conn.start(call, args, slot) {
            Ok((conn, id)) => Ok((conn as Arc<dyn Remote>, id)),
            Err(mut unstarted) => Err((std::mem::take(&mut unstarted.args), unstarted)),
        }
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
            state: Mutex::new(State::new(Rules::from(&config), min, max)),
            config,
            backend,
            listener: OnceLock::new(),
            hooks,
            changed: Notify::new(),
            closing: CancellationToken::new(),
            watchers: AtomicUsize::new(0),
            test_runner_args: crate::parent::test_runner_args(),
            served: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    pub(super) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(future)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding this lock is a bug in flame-rt; the state is still consistent
        // enough to shut down, so keep going rather than poison every later call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides under the lock, then carries out the decision's actions after letting it go.
    pub(super) fn decide<T>(
        self: &Arc<Self>,
        decide: impl FnOnce(&mut PoolState, &mut Actions) -> T,
    ) -> T {
        let mut acts = Vec::new();
        let decided = decide(&mut self.lock(), &mut acts);
        self.apply(acts);
        decided
    }

    pub(super) fn apply(self: &Arc<Self>, acts: Actions) {
        for act in acts {
            match act {
                Action::Boot(reason) => drop(self.spawn(self.clone().boot_one(reason))),
                Action::Start(call, seat) => {
                    let (task, waited) = (call.def.id, call.ticket.deadline.elapsed());
                    if self.start_on(call, seat) {
                        crate::metrics::queue_wait(&self.name, waited);
                        tracing::debug!(pool = %self.name, task, waited_ms = waited.as_secs_f64() * 1e3, "flame: a waiting call got a slot");
                    }
                }
                Action::Stop(conn, grace) => conn.shutdown(grace),
                Action::Retire {
                    conn,
                    handle,
                    shrink,
                } => self.retire(&conn, handle, shrink),
                Action::RetryAfter(pause) => {
                    let shared = self.clone();
                    self.spawn(async move {
                        tokio::time::sleep(pause).await;
                        shared.decide(|state, acts| state.retry_due(acts));
                    });
                }
            }
        }
    }

    /// Starts a call on the slot it was given; whether it started. A call given up meanwhile
    /// gives the slot back; one whose runner has just hung up waits again.
    fn start_on(self: &Arc<Self>, call: QueuedCall, seat: Seat<Arc<RunnerConn>>) -> bool {
        match start_call(call, Slot::new(seat.conn)) {
            Start::Started => return true,
            Start::Cancelled(slot) => {
                slot.forget();
                self.decide(|state, acts| state.unused(seat.key, acts));
            }
            Start::Closed(call, slot) => {
                // Its runner has left the state already: releasing its slot frees nothing.
                drop(slot);
                self.decide(|state, acts| state.requeue(call, acts));
            }
        }
        false
    }

    /// A runner left the pool: tell the hooks and destroy it, counted as exiting till then.
    fn retire(
        self: &Arc<Self>,
        conn: &RunnerConn,
        handle: Option<Box<dyn RunnerHandle>>,
        shrink: Option<ShrinkReason>,
    ) {
        let exiting = Exiting(self.clone());
        match shrink {
            Some(reason) => {
                if reason == ShrinkReason::Lost
                    && let Some(reason) = conn.ended()
                {
                    tracing::warn!(pool = %self.name, runner = %conn.id, %reason, "flame: runner lost");
                }
                self.hooks.shrink(Shrink {
                    pool: self.name.to_string(),
                    runner_id: conn.id.clone(),
                    reason,
                });
            }
            // It never joined: it may still be up.
            None => conn.shutdown(Duration::ZERO),
        }
        self.spawn(async move {
            let _exiting = exiting;
            if let Some(handle) = handle {
                handle.destroy().await;
            }
        });
        self.changed.notify_waiters();
    }

    /// Counts something the pool destroys outside a runner's life (a boot that returned too
    /// late) as exiting, until the guard is dropped.
    pub(super) fn leaving(self: &Arc<Self>) -> Exiting {
        self.lock().leaving();
        Exiting(self.clone())
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
        let submitted = self.decide(|state, acts| {
            let (task, waits) = (call.def.id, state.has_waiters());
            let submitted = state.submit(call, acts);
            if let Submitted::Waits = submitted {
                tracing::debug!(pool = %self.name, task, at_max = state.at_max(), behind_others = waits, "flame: call waits for a slot");
            }
            submitted
        });
        match submitted {
            Submitted::Start(call, seat) => {
                self.start_on(call, seat);
            }
            Submitted::Waits => {}
            Submitted::Refused(call, error) => {
                call.ticket.resolve(Err(error));
            }
        }
    }

    pub(crate) fn note_served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the pool closed for `reason`, fails the queue, tells every runner to stop and
    /// returns their ids and handles.
    pub(super) fn close(&self, reason: Error) -> Vec<(String, Box<dyn RunnerHandle>)> {
        let runners = self.lock().close(reason);
        self.closing.cancel();
        self.changed.notify_waiters();
        runners
            .into_iter()
            .filter_map(|(conn, handle)| {
                conn.shutdown(Duration::ZERO);
                Some((conn.id.clone(), handle?))
            })
            .collect()
    }

    pub(crate) async fn shutdown(self: &Arc<Self>) {
        let shared = self;
        let grace = shared.config.shutdown_timeout;
        let closed = || {
            Error::new(
                ErrorKind::PoolClosed,
                format!("pool {} is shut down", shared.name),
            )
        };
        shared.decide(|state, acts| state.drain(closed(), grace, acts));
        self.closing.cancel();
        let deadline = crate::deadline::after(grace);
        shared.wait_until(deadline, PoolState::all_idle).await;
        let runners = shared.close(closed());
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
        let boot_window = (shared.config.boot_timeout).saturating_add(Duration::from_secs(10));
        shared
            .wait_until(crate::deadline::after(boot_window), PoolState::settled)
            .await;
    }

    /// Waits until `done` holds for the state, or `deadline`; returns whether it holds.
    async fn wait_until(&self, deadline: Instant, done: impl Fn(&PoolState) -> bool) -> bool {
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
        self.decide(|state, acts| state.top_up(acts));
        // Each boot ends with a boot timeout, so "for ever" here is bounded by it.
        let forever = Instant::now() + Duration::from_secs(86400 * 365);
        self.wait_until(forever, |s| s.min_outcome().is_some())
            .await;
        self.lock().min_outcome().unwrap_or(Ok(()))
    }
}

/// What a runner connection tells its pool.
impl Owner for Arc<Shared> {
    fn release(&self, key: u64) {
        self.decide(|state, acts| state.release(key, acts));
        if self.watchers.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    fn served(&self) {
        self.note_served();
    }

    fn idle(&self, key: u64, idle: Duration) {
        self.decide(|state, acts| state.idle(key, idle, acts));
    }

    fn stopping(&self, key: u64) {
        if let Some(conn) = self.decide(|state, acts| state.stopping(key, acts)) {
            tracing::info!(pool = %self.name, runner = %conn.id, "flame: runner stopped by its platform; it finishes its calls");
        }
        self.changed.notify_waiters();
    }

    fn recycle(&self, key: u64, task: &str, call: u64) {
        if let Some(conn) = self.decide(|state, acts| state.recycle(key, acts)) {
            tracing::warn!(
                pool = %self.name,
                runner = %conn.id,
                task,
                call,
                grace = ?self.config.cancel_grace,
                "flame: runner recycled: a cancelled call did not stop within cancel_grace (it blocks \
                 its thread or never yields)"
            );
            crate::metrics::runner_recycled(&self.name);
        }
    }

    fn gone(&self, key: u64, reason: &Error) {
        self.decide(|state, acts| state.gone(key, reason, acts));
    }

    fn resubmit(&self, call: QueuedCall) {
        self.submit(call);
    }
}
