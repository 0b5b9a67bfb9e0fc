//! The pool: which runners exist, where each call goes (the least-loaded runner with a free
//! slot), when to boot more, and when to let them go.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

use crate::backend::{Backend, BootSpec, LocalBackend, ProcessBackend, RunnerHandle};
use crate::cancel::CancelOnDrop;
use crate::connection::{self, Cmd, RunnerConn};
use crate::deadline::Deadline;
use crate::error::{Error, ErrorKind};
use crate::handshake::new_token;
use crate::listener::{Listener, listener_for};
use crate::parent::{Handoff, parent};
use crate::queue::Queue;
use crate::task::{TaskDef, registry};
use crate::wire::{MAX_FRAME, Welcome};

/// A pool of runners that calls are sent to. Cheap to clone; every clone is the same pool.
///
/// Dropping the last clone stops the pool at once: waiting calls fail with
/// [`ErrorKind::PoolClosed`] and runners are killed. Call [`shutdown`](Pool::shutdown) to let
/// in-flight calls finish first.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    _close_on_drop: Arc<CloseOnDrop>,
}

struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let runners = self.0.close(Error::new(
            ErrorKind::PoolClosed,
            format!("pool {} was dropped", self.0.name),
        ));
        // Dropping the handles kills the runners: nobody is left to wait for them.
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
    /// Calls running on runners.
    pub in_flight: usize,
    /// Calls waiting for a slot.
    pub queued: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) max_concurrency: usize,
    pub(crate) idle_shutdown_after: Option<Duration>,
    pub(crate) boot_timeout: Duration,
    pub(crate) timeout: Option<Duration>,
    pub(crate) single_use: bool,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_miss_limit: u32,
}

/// Configures and starts a [`Pool`]; from [`Pool::builder`].
#[must_use = "a PoolBuilder does nothing until .start().await"]
pub struct PoolBuilder {
    name: String,
    backend: Option<Arc<dyn Backend>>,
    max_concurrency_set: bool,
    config: Config,
}

impl Pool {
    /// Starts configuring a pool named `name` (letters, digits, `-`, `_`, `.`; it names the
    /// runners in logs).
    ///
    /// Defaults: [`ProcessBackend`], `min(0)`, `max(1)`, `max_concurrency(100)`,
    /// `idle_shutdown_after(30 s)`, `boot_timeout(30 s)`, no call timeout, `shutdown_timeout(30 s)`.
    pub fn builder(name: impl Into<String>) -> PoolBuilder {
        PoolBuilder {
            name: name.into(),
            backend: None,
            max_concurrency_set: false,
            config: Config {
                min: 0,
                max: 1,
                max_concurrency: 100,
                idle_shutdown_after: Some(Duration::from_secs(30)),
                boot_timeout: Duration::from_secs(30),
                timeout: None,
                single_use: false,
                shutdown_timeout: Duration::from_secs(30),
                heartbeat_interval: Duration::from_secs(1),
                heartbeat_miss_limit: 5,
            },
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// How many runners and calls the pool has right now.
    pub fn stats(&self) -> PoolStats {
        let mut state = self.shared.lock();
        PoolStats {
            runners: state.runners.len(),
            booting: state.booting,
            in_flight: state.runners.iter().map(|r| r.in_flight).sum(),
            queued: state.queue.len(),
        }
    }

    /// Stops the pool gracefully: new and queued calls fail with [`ErrorKind::PoolClosed`],
    /// calls in flight get up to the pool's `shutdown_timeout` to finish, then every runner is
    /// told to stop and is reaped.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
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
        }
        let deadline = tokio::time::Instant::now() + shared.config.shutdown_timeout;
        loop {
            let changed = shared.changed.notified();
            if shared.lock().runners.iter().all(|r| r.in_flight == 0) {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let runners = shared.close(Error::new(
            ErrorKind::PoolClosed,
            format!("pool {} is shut down", shared.name),
        ));
        let reaps = runners.into_iter().map(|mut handle| async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), handle.exited()).await;
            handle.destroy().await;
        });
        futures::future::join_all(reaps).await;
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

impl PoolBuilder {
    /// The backend that boots runners. Default: [`ProcessBackend::new()`].
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// Runners kept alive at all times; booted by [`start`](PoolBuilder::start). Default 0.
    pub fn min(mut self, min: usize) -> Self {
        self.config.min = min;
        self
    }

    /// The most runners the pool may have, booting included. Default 1.
    pub fn max(mut self, max: usize) -> Self {
        self.config.max = max;
        self
    }

    /// The most calls one runner runs at once. Default 100.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.config.max_concurrency = n;
        self.max_concurrency_set = true;
        self
    }

    /// A runner with no calls for this long stops, unless the pool is at `min`. Default 30 s.
    pub fn idle_shutdown_after(mut self, after: Duration) -> Self {
        self.config.idle_shutdown_after = Some(after);
        self
    }

    /// How long a runner may take from boot to a completed handshake; also how long a call
    /// without a timeout may wait for a slot. Default 30 s.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.config.boot_timeout = timeout;
        self
    }

    /// The default deadline of every call on this pool ([`Call::timeout`](crate::Call::timeout)
    /// overrides it). Default: none, as a Rust future has no implicit deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = Some(timeout);
        self
    }

    /// Each runner serves a single call and then exits. Needs `max_concurrency(1)`, which is
    /// implied when `max_concurrency` is not set.
    pub fn single_use(mut self, single_use: bool) -> Self {
        self.config.single_use = single_use;
        self
    }

    /// How long [`Pool::shutdown`] lets in-flight calls finish. Default 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// How often parent and runner tell each other they are alive. Default 1 s.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self
    }

    /// How many heartbeat intervals of silence declare the other side lost: the runner fails
    /// its calls with [`ErrorKind::RunnerLost`], the runner exits. Default 5.
    pub fn heartbeat_miss_limit(mut self, misses: u32) -> Self {
        self.config.heartbeat_miss_limit = misses;
        self
    }

    /// Starts the pool: boots `min` runners and returns once they are connected.
    ///
    /// Inside a runner, pools never boot runners of their own: a pool started there runs its
    /// calls in-process (through [`LocalBackend`]), with `min` 0.
    pub async fn start(self) -> Result<Pool, Error> {
        let PoolBuilder {
            name,
            backend,
            max_concurrency_set,
            mut config,
        } = self;
        let config_error = |msg: String| {
            Err(Error::new(
                ErrorKind::Config,
                format!("pool {name:?}: {msg}"),
            ))
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return config_error(
                "a pool name is made of ASCII letters, digits, '-', '_' and '.'".into(),
            );
        }
        if config.single_use && !max_concurrency_set {
            config.max_concurrency = 1;
        }
        if config.max == 0 || config.max_concurrency == 0 {
            return config_error("max and max_concurrency must be at least 1".into());
        }
        if config.min > config.max {
            return config_error(format!(
                "min ({}) is larger than max ({})",
                config.min, config.max
            ));
        }
        if config.single_use && config.max_concurrency != 1 {
            return config_error(
                "single_use(true) serves one call per runner: use max_concurrency(1)".into(),
            );
        }
        if config.heartbeat_interval.is_zero() || config.heartbeat_miss_limit == 0 {
            return config_error(
                "heartbeat_interval and heartbeat_miss_limit must be above zero".into(),
            );
        }
        let registry = registry()?;
        if registry.len() == 0 {
            return config_error(
                "no #[flame::task] is registered in this binary. Tasks defined in a library crate are \
                 dropped by the linker unless the binary references that crate: add `use my_tasks as _;` \
                 to the binary"
                    .into(),
            );
        }
        let backend: Arc<dyn Backend> = if parent().is_some() {
            config.min = 0;
            Arc::new(LocalBackend::new())
        } else {
            backend.unwrap_or_else(|| Arc::new(ProcessBackend::new()))
        };
        let listener = listener_for(backend.listen_addr())?;
        let advertise = backend.advertise_addr(listener.addr());
        let shared = Arc::new(Shared {
            name,
            config,
            backend,
            listener,
            advertise,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        });
        let pool = Pool {
            _close_on_drop: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        };
        pool.shared.wait_for_min().await?;
        Ok(pool)
    }
}

/// The pool's state, shared by the `Pool` handles, the calls and the runner connections.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) config: Config,
    backend: Arc<dyn Backend>,
    listener: Arc<Listener>,
    advertise: String,
    state: Mutex<State>,
    /// Woken when runners come or go and when calls finish.
    changed: Notify,
}

#[derive(Default)]
pub(crate) struct State {
    /// `Some(why)` once the pool takes no more calls.
    pub(crate) closed: Option<Error>,
    runners: Vec<Runner>,
    booting: usize,
    pub(crate) queue: Queue,
    last_boot_error: Option<Error>,
}

struct Runner {
    key: u64,
    conn: Arc<RunnerConn>,
    in_flight: usize,
    /// Told to stop: gets no new calls, counts against `max` until it is gone.
    draining: bool,
    handle: Option<Box<dyn RunnerHandle>>,
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

/// How long the pool waits before booting again after a runner's `main` failed.
const BOOT_RETRY_PAUSE: Duration = Duration::from_secs(1);

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a bug in flame-rt; the state is still consistent
        // enough to shut down, so keep going rather than poison every later call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one call: waits for a slot, sends the call, waits for its outcome. Cancels the
    /// call on the runner if dropped on the way.
    pub(crate) async fn dispatch(
        self: Arc<Self>,
        def: &'static TaskDef,
        args: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, Error> {
        if args.len() > MAX_FRAME - 4096 {
            return Err(Error::new(
                ErrorKind::Codec,
                format!(
                    "the arguments of {} are {} bytes, more than the {MAX_FRAME}-byte frame limit; \
                     stream large data through a flame channel instead",
                    def.id,
                    args.len()
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
        let deadline = Deadline::starting_now(timeout.or(self.config.timeout));
        let slot = self.checkout(def.id, deadline).await?;
        let conn = slot.conn.clone();
        let call = conn.next_call();
        let (reply, outcome) = oneshot::channel();
        conn.send(Cmd::Run {
            call,
            task: def.id,
            args,
            deadline: deadline.at(),
            reply,
            slot,
        });
        let cancel = CancelOnDrop::new(&conn, call);
        let outcome = match deadline.at() {
            Some(at) => match tokio::time::timeout_at(at, outcome).await {
                Ok(outcome) => outcome,
                Err(_) => return Err(deadline.expired(def.id, false)),
            },
            None => outcome.await,
        };
        cancel.disarm();
        outcome.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::RunnerLost,
                format!("runner {} went away while running {}", conn.id, def.id),
            ))
        })
    }

    /// A free slot on the least-loaded runner, if any.
    pub(crate) fn take_slot(self: &Arc<Self>, state: &mut State) -> Option<Slot> {
        let runner = state
            .runners
            .iter_mut()
            .filter(|r| !r.draining && r.in_flight < self.config.max_concurrency)
            .min_by_key(|r| r.in_flight)?;
        runner.in_flight += 1;
        if self.config.single_use {
            runner.draining = true;
        }
        Some(Slot {
            shared: self.clone(),
            key: runner.key,
            conn: runner.conn.clone(),
            armed: true,
        })
    }

    /// Gives free slots to waiting callers, oldest first.
    fn hand_out(self: &Arc<Self>, state: &mut State) {
        while let Some(waiter) = state.queue.pop() {
            let Some(slot) = self.take_slot(state) else {
                // Nobody could be served: put the caller back at the head of the line.
                state.queue.push_front(waiter);
                return;
            };
            if let Err(Ok(mut slot)) = waiter.send(Ok(slot)) {
                // The caller gave up just now; the slot was never used. Undo it here (we hold
                // the lock that `Slot::drop` would take).
                slot.armed = false;
                if let Some(r) = state.runners.iter_mut().find(|r| r.key == slot.key) {
                    r.in_flight -= 1;
                    if self.config.single_use {
                        r.draining = false;
                    }
                }
            }
        }
    }

    /// Boots runners while the pool is below `min`, or callers wait that the runners booting
    /// will not cover, and `max` allows.
    pub(crate) fn grow(self: &Arc<Self>, state: &mut State) {
        if state.closed.is_some() {
            return;
        }
        loop {
            let total = state.runners.len() + state.booting;
            if total >= self.config.max {
                return;
            }
            let below_min = total < self.config.min;
            let uncovered = state.queue.len() > state.booting * self.config.max_concurrency;
            if !(below_min || uncovered) {
                return;
            }
            state.booting += 1;
            tokio::spawn(self.clone().boot_one());
        }
    }

    fn release(self: &Arc<Self>, key: u64) {
        {
            let mut state = self.lock();
            if let Some(runner) = state.runners.iter_mut().find(|r| r.key == key) {
                runner.in_flight -= 1;
                if runner.draining && runner.in_flight == 0 {
                    runner.conn.send(Cmd::Shutdown {
                        grace: Duration::ZERO,
                    });
                } else {
                    self.hand_out(&mut state);
                }
            }
        }
        self.changed.notify_waiters();
    }

    async fn boot_one(self: Arc<Self>) {
        let booted = self.boot_runner().await;
        let mut orphan = None;
        {
            let mut state = self.lock();
            state.booting -= 1;
            match booted {
                Ok(runner) if state.closed.is_some() => orphan = Some(runner),
                Ok(runner) => {
                    state.runners.push(runner);
                    state.last_boot_error = None;
                    self.hand_out(&mut state);
                }
                Err(error) => {
                    tracing::warn!(pool = %self.name, %error, "flame: runner boot failed");
                    if state.runners.is_empty() && state.booting == 0 {
                        state.queue.fail_all(&error);
                    }
                    state.last_boot_error = Some(error);
                }
            }
        }
        if let Some(runner) = orphan {
            runner.conn.send(Cmd::Shutdown {
                grace: Duration::ZERO,
            });
            if let Some(handle) = runner.handle {
                handle.destroy().await;
            }
        }
        self.changed.notify_waiters();
    }

    async fn boot_runner(self: &Arc<Self>) -> Result<Runner, Error> {
        let key = NEXT_RUNNER.fetch_add(1, Ordering::Relaxed);
        let runner_id = format!("{}-{key}", self.name);
        let token = new_token().map_err(|e| Error::io("drawing a runner token", e))?;
        let mut expectation = self.listener.expect(&runner_id, token);
        let spec = BootSpec::new(Handoff {
            pool: self.name.clone(),
            runner_id: runner_id.clone(),
            addr: self.advertise.clone(),
            token,
            boot_timeout: self.config.boot_timeout,
        });
        let backend = self.backend.name().to_string();
        let boot = async {
            let mut handle = self.backend.boot(spec).await.map_err(|e| match e.kind() {
                ErrorKind::BootFailed => e,
                _ => Error::new(ErrorKind::BootFailed, format!("backend {backend}: {e}")),
            })?;
            let accepted = tokio::select! {
                accepted = expectation.accepted() => accepted,
                status = handle.exited() => Err(Error::new(
                    ErrorKind::BootFailed,
                    format!("runner {runner_id} ({}) exited before it connected back: {status}", handle.describe()),
                )),
            };
            match accepted {
                Ok(accepted) => Ok((accepted, handle)),
                Err(e) => {
                    handle.destroy().await;
                    Err(e)
                }
            }
        };
        let (accepted, handle) = match tokio::time::timeout(self.config.boot_timeout, boot).await {
            Ok(booted) => booted?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::BootFailed,
                    format!(
                        "runner {runner_id} did not connect back within the boot timeout of {:?} (backend {backend})",
                        self.config.boot_timeout
                    ),
                ));
            }
        };
        let stream = TcpStream::from_std(accepted)
            .map_err(|e| Error::io("adopting a runner connection", e))?;
        let welcome = Welcome {
            heartbeat_ms: self.config.heartbeat_interval.as_millis() as u64,
            miss_limit: self.config.heartbeat_miss_limit,
            idle_ms: self
                .config
                .idle_shutdown_after
                .map(|d| d.as_millis() as u64),
        };
        tracing::debug!(pool = %self.name, runner = %runner_id, via = %handle.describe(), "flame: runner connected");
        let conn = connection::start(self.clone(), key, runner_id, stream, welcome);
        Ok(Runner {
            key,
            conn,
            in_flight: 0,
            draining: false,
            handle: Some(handle),
        })
    }

    /// The runner reported it had nothing to do for its idle period.
    pub(crate) fn runner_idle(&self, key: u64) {
        let mut state = self.lock();
        let active = state.runners.iter().filter(|r| !r.draining).count();
        if active <= self.config.min {
            return;
        }
        if let Some(runner) = state.runners.iter_mut().find(|r| r.key == key)
            && runner.in_flight == 0
            && !runner.draining
        {
            runner.draining = true;
            tracing::debug!(pool = %self.name, runner = %runner.conn.id, "flame: idle runner shutting down");
            runner.conn.send(Cmd::Shutdown {
                grace: Duration::ZERO,
            });
        }
    }

    /// The runner's connection ended, for `reason`.
    pub(crate) fn runner_gone(self: &Arc<Self>, key: u64, reason: &Error) {
        let handle = {
            let mut state = self.lock();
            let Some(at) = state.runners.iter().position(|r| r.key == key) else {
                return;
            };
            let runner = state.runners.swap_remove(at);
            if !runner.draining {
                tracing::warn!(pool = %self.name, runner = %runner.conn.id, %reason, "flame: runner lost");
            }
            if reason.kind() == ErrorKind::BootFailed {
                // The app's main failed on this runner and would fail on the next one too:
                // tell the waiting callers why, and try again only after a pause.
                if state.runners.is_empty() && state.booting == 0 {
                    state.queue.fail_all(reason);
                }
                state.last_boot_error = Some(reason.clone());
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(BOOT_RETRY_PAUSE).await;
                    shared.grow(&mut shared.lock());
                });
            } else {
                // Keep `min` alive and serve whoever is waiting.
                self.grow(&mut state);
            }
            runner.handle
        };
        if let Some(handle) = handle {
            tokio::spawn(handle.destroy());
        }
        self.changed.notify_waiters();
    }

    /// Marks the pool closed for `reason`, fails the queue, tells every runner to stop and
    /// returns their handles.
    fn close(&self, reason: Error) -> Vec<Box<dyn RunnerHandle>> {
        let mut state = self.lock();
        state.queue.fail_all(&reason);
        state.closed.get_or_insert(reason);
        let runners = std::mem::take(&mut state.runners);
        drop(state);
        self.changed.notify_waiters();
        runners
            .into_iter()
            .filter_map(|r| {
                r.conn.send(Cmd::Shutdown {
                    grace: Duration::ZERO,
                });
                r.handle
            })
            .collect()
    }

    /// Waits until `min` runners are connected, or fails with why they could not boot.
    async fn wait_for_min(self: &Arc<Self>) -> Result<(), Error> {
        self.grow(&mut self.lock());
        loop {
            let changed = self.changed.notified();
            {
                let state = self.lock();
                if state.runners.len() >= self.config.min {
                    return Ok(());
                }
                if state.booting == 0 {
                    return Err(state.last_boot_error.clone().unwrap_or_else(|| {
                        Error::new(
                            ErrorKind::BootFailed,
                            format!("pool {}: min runners did not boot", self.name),
                        )
                    }));
                }
            }
            changed.await;
        }
    }
}
