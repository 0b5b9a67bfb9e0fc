//! The pool's decisions as plain data: which runners it has and how busy each is, who waits,
//! when to boot another, where a call goes, which runner stops.
//!
//! Nothing here spawns, locks, sleeps or does I/O. Each event (a call submitted, a slot
//! released, a boot that ended, a runner gone...) changes the state and returns what must be
//! done as [`Action`]s, which the pool carries out after letting its lock go (`shared.rs`). So
//! every rule is tested directly, over thousands of random event sequences, without a process
//! (`tests.rs`). The invariant everything else leans on: `runners + booting + exiting` never
//! passes `max` through a boot this decides, however events interleave (Elixir FLAME issue #64).

use std::time::Duration;

use super::builder::Placement;
pub(crate) use super::decisions::{Action, Booted, Rules, Seat, Submitted, Waiting};
use crate::error::{Error, ErrorKind};
use crate::hooks::{GrowReason, ShrinkReason};

/// Boots tried for waiting callers before they are told the pool cannot boot.
const BOOT_ATTEMPTS: u32 = 3;

/// The pause before boot attempt `failures + 1`: 100 ms, 400 ms, 1.6 s, then 5 s.
pub(crate) fn retry_pause(failures: u32) -> Duration {
    let ms = 100u64.saturating_mul(4u64.saturating_pow(failures.saturating_sub(1)));
    Duration::from_millis(ms.min(5_000))
}

struct Runner<C, H> {
    key: u64,
    conn: C,
    in_flight: usize,
    /// Why it was told to stop: it gets no new calls and stops when its calls are done.
    drain: Option<ShrinkReason>,
    handle: Option<H>,
}

/// The counts [`Pool::stats`](super::Pool::stats) reports.
pub(crate) struct Counts {
    pub(crate) runners: usize,
    pub(crate) booting: usize,
    pub(crate) in_flight: usize,
    pub(crate) queued: usize,
    pub(crate) booted: u64,
    pub(crate) failed_boots: u64,
    pub(crate) recycled: u64,
    pub(crate) min: usize,
    pub(crate) max: usize,
}

pub(crate) struct State<Q: Waiting, C, H> {
    rules: Rules,
    /// `Some(why)` once the pool takes no more calls.
    closed: Option<Error>,
    min: usize,
    max: usize,
    runners: Vec<Runner<C, H>>,
    booting: usize,
    /// Runners that left the pool but are not yet confirmed gone: they still count against `max`.
    exiting: usize,
    queue: Q,
    /// Set when a `min` runner stopped for idleness; cleared by the next call.
    min_suspended: bool,
    last_boot_error: Option<Error>,
    /// Boots failed in a row; reset by a successful one.
    boot_failures: u32,
    /// A boot will be tried again after a pause: no other boot starts meanwhile.
    retry_pending: bool,
    booted: u64,
    failed_boots: u64,
    recycled: u64,
}

type Actions<Q, C, H> = Vec<Action<<Q as Waiting>::Call, C, H>>;

impl<Q: Waiting + Default, C: Clone, H> State<Q, C, H> {
    pub(crate) fn new(rules: Rules, min: usize, max: usize) -> Self {
        State {
            rules,
            closed: None,
            min,
            max,
            runners: Vec::new(),
            booting: 0,
            exiting: 0,
            queue: Q::default(),
            min_suspended: false,
            last_boot_error: None,
            boot_failures: 0,
            retry_pending: false,
            booted: 0,
            failed_boots: 0,
            recycled: 0,
        }
    }
}

impl<Q: Waiting, C: Clone, H> State<Q, C, H> {
    pub(crate) fn counts(&mut self) -> Counts {
        Counts {
            runners: self.runners.len(),
            booting: self.booting,
            in_flight: self.runners.iter().map(|r| r.in_flight).sum(),
            queued: self.queue.len(),
            booted: self.booted,
            failed_boots: self.failed_boots,
            recycled: self.recycled,
            min: self.min,
            max: self.max,
        }
    }

    /// No runner can be added now.
    pub(crate) fn at_max(&self) -> bool {
        self.runners.len() + self.booting + self.exiting >= self.max
    }

    fn active(&self) -> usize {
        self.runners.iter().filter(|r| r.drain.is_none()).count()
    }

    fn runner(&mut self, key: u64) -> Option<&mut Runner<C, H>> {
        self.runners.iter_mut().find(|r| r.key == key)
    }

    /// A call arrives: it gets a slot at once when nobody waits ahead of it and a runner has
    /// one free (returned, to start); else it waits, and the pool may grow. On a closed pool it
    /// comes back with why.
    pub(crate) fn submit(
        &mut self,
        call: Q::Call,
        acts: &mut Actions<Q, C, H>,
    ) -> Submitted<Q::Call, C> {
        if let Some(error) = &self.closed {
            return Submitted::Refused(call, error.clone());
        }
        // Demand lifts a pause of `min` taken for idleness: the pool tops back up to it, even
        // when this call finds a seat at once.
        let resumed = std::mem::take(&mut self.min_suspended);
        let seat = match self.queue.has_waiters() {
            true => None,
            false => self.take_seat(),
        };
        let Some(seat) = seat else {
            self.queue.push(call);
            self.grow(None, acts);
            return Submitted::Waits;
        };
        // A busy pool may want its next runner before it is full.
        if resumed || self.rules.prewarm_at.is_some() {
            self.grow(None, acts);
        }
        Submitted::Start(call, seat)
    }

    /// Whether calls wait, for the log line of one that joins them.
    pub(crate) fn has_waiters(&mut self) -> bool {
        self.queue.has_waiters()
    }

    /// A free slot on the runner the placement picks, if any.
    fn take_seat(&mut self) -> Option<Seat<C>> {
        let max_concurrency = self.rules.max_concurrency;
        let free = self
            .runners
            .iter_mut()
            .filter(|r| r.drain.is_none() && r.in_flight < max_concurrency);
        let runner = match self.rules.placement {
            Placement::LeastLoaded => free.min_by_key(|r| r.in_flight),
            Placement::Pack => free.min_by_key(|r| std::cmp::Reverse(r.in_flight)),
        }?;
        runner.in_flight += 1;
        if self.rules.single_use {
            runner.drain = Some(ShrinkReason::SingleUse);
        }
        Some(Seat {
            key: runner.key,
            conn: runner.conn.clone(),
        })
    }

    /// Gives waiting calls free slots, oldest first.
    fn hand_out(&mut self, acts: &mut Actions<Q, C, H>) {
        while self.queue.has_waiters() {
            let Some(seat) = self.take_seat() else {
                return;
            };
            let Some(call) = self.queue.pop() else {
                // Every call left had run out of time: the slot stays free.
                return self.give_back(seat.key);
            };
            acts.push(Action::Start(call, seat));
        }
    }

    fn give_back(&mut self, key: u64) {
        let single_use = self.rules.single_use;
        if let Some(runner) = self.runner(key) {
            runner.in_flight -= 1;
            if single_use {
                runner.drain = None;
            }
        }
    }

    /// A slot was taken for a call that was given up before it started: it is free again, as
    /// if never taken (a single-use runner stays usable).
    pub(crate) fn unused(&mut self, key: u64, acts: &mut Actions<Q, C, H>) {
        self.give_back(key);
        self.hand_out(acts);
    }

    /// A call that got a slot could not start because its runner's connection had just ended:
    /// it goes back to the head of the line.
    pub(crate) fn requeue(&mut self, call: Q::Call, acts: &mut Actions<Q, C, H>) {
        if let Some(error) = &self.closed {
            let error = error.clone();
            self.queue.push_front(call);
            return self.queue.fail_all(&error);
        }
        self.queue.push_front(call);
        self.hand_out(acts);
        self.grow(None, acts);
    }

    /// A call's runner reported it over: its slot is free.
    pub(crate) fn release(&mut self, key: u64, acts: &mut Actions<Q, C, H>) {
        let Some(runner) = self.runner(key) else {
            return;
        };
        runner.in_flight -= 1;
        match runner.drain {
            Some(_) if runner.in_flight == 0 => {
                acts.push(Action::Stop(runner.conn.clone(), Duration::ZERO))
            }
            Some(_) => {}
            None => self.hand_out(acts),
        }
    }

    /// Boots runners while the pool is below `min`, while callers wait that the runners booting
    /// will not cover, or to prewarm; never past `max`, and not while a failed boot pauses.
    /// `retry` names the reason of the first boot when a paused retry calls this.
    fn grow(&mut self, mut retry: Option<GrowReason>, acts: &mut Actions<Q, C, H>) {
        if self.closed.is_some() || self.retry_pending {
            return;
        }
        while !self.at_max() {
            let reason = if !self.min_suspended && self.active() + self.booting < self.min {
                GrowReason::Min
            } else if self
                .queue
                .more_than(self.booting * self.rules.max_concurrency)
            {
                GrowReason::Demand
            } else if let Some(threshold) = self.rules.prewarm_at
                && self.wants_prewarm(threshold)
            {
                GrowReason::Prewarm
            } else {
                return;
            };
            self.booting += 1;
            acts.push(Action::Boot(retry.take().unwrap_or(reason)));
        }
    }

    /// Nothing boots and the active runners are at least `threshold` busy.
    fn wants_prewarm(&self, threshold: f64) -> bool {
        let capacity = self.active() * self.rules.max_concurrency;
        let busy: usize = (self.runners.iter())
            .filter(|r| r.drain.is_none())
            .map(|r| r.in_flight)
            .sum();
        self.booting == 0 && capacity > 0 && busy as f64 >= threshold * capacity as f64
    }

    /// Asks for the runners `min` (or anyone waiting) needs.
    pub(crate) fn top_up(&mut self, acts: &mut Actions<Q, C, H>) {
        self.grow(None, acts);
    }

    /// A boot ended.
    pub(crate) fn booted(&mut self, booted: Booted<C, H>, acts: &mut Actions<Q, C, H>) {
        self.booting -= 1;
        match booted {
            Booted::Ready { conn, handle, .. } if self.closed.is_some() => {
                self.exiting += 1;
                acts.push(Action::Retire {
                    conn,
                    handle: Some(handle),
                    shrink: None,
                });
            }
            Booted::HungUp {
                conn,
                handle,
                error,
            } => {
                self.exiting += 1;
                acts.push(Action::Retire {
                    conn,
                    handle: Some(handle),
                    shrink: None,
                });
                self.boot_failed(error, acts);
            }
            Booted::Ready { key, conn, handle } => {
                self.runners.push(Runner {
                    key,
                    conn,
                    in_flight: 0,
                    drain: None,
                    handle: Some(handle),
                });
                self.booted += 1;
                self.boot_failures = 0;
                self.last_boot_error = None;
                self.hand_out(acts);
                // The waiters it could not take, or a prewarm, may call for more.
                self.grow(None, acts);
            }
            // Cut short by the pool's closing: no failure of the backend's.
            Booted::Failed(error) if error.kind() == ErrorKind::PoolClosed => {}
            Booted::Failed(error) => self.boot_failed(error, acts),
        }
    }

    /// A boot failed (or a runner's `main` did): try again after a pause while callers wait or
    /// the pool is below `min`; tell waiting callers why once it is hopeless.
    fn boot_failed(&mut self, error: Error, acts: &mut Actions<Q, C, H>) {
        self.failed_boots += 1;
        self.boot_failures += 1;
        let hopeless = matches!(error.kind(), ErrorKind::Rejected | ErrorKind::Config)
            || self.boot_failures >= BOOT_ATTEMPTS;
        if hopeless && self.runners.is_empty() && self.booting == 0 {
            // Failing the callers now beats letting them time out with no explanation.
            self.queue.fail_all(&error);
        }
        self.last_boot_error = Some(error);
        let below_min = !self.min_suspended && self.active() + self.booting < self.min;
        let waiting = self.queue.has_waiters();
        if self.closed.is_none() && !self.retry_pending && (below_min || waiting) {
            self.retry_pending = true;
            acts.push(Action::RetryAfter(retry_pause(self.boot_failures)));
        }
    }

    /// The pause after a failed boot is over.
    pub(crate) fn retry_due(&mut self, acts: &mut Actions<Q, C, H>) {
        self.retry_pending = false;
        self.grow(Some(GrowReason::Retry), acts);
    }

    /// Something the pool destroys outside a runner's lifetime (a boot that returned too late)
    /// counts against `max` until [`exited`](Self::exited).
    pub(crate) fn leaving(&mut self) {
        self.exiting += 1;
    }

    /// A runner that left is confirmed gone: the pool may grow into the room.
    pub(crate) fn exited(&mut self, acts: &mut Actions<Q, C, H>) {
        self.exiting -= 1;
        self.grow(None, acts);
    }

    /// The runner has had nothing to do for `idle`.
    pub(crate) fn idle(&mut self, key: u64, idle: Duration, acts: &mut Actions<Q, C, H>) {
        let above_min = self.active() > self.min;
        let rules = self.rules;
        let Some(runner) = self.runner(key) else {
            return;
        };
        if runner.in_flight > 0 || runner.drain.is_some() {
            return;
        }
        let idle_past = |limit: Option<Duration>| limit.is_some_and(|limit| idle >= limit);
        let suspends_min = if above_min && idle_past(rules.idle_shutdown_after) {
            false
        } else if idle_past(rules.min_idle_shutdown_after) {
            true
        } else {
            return;
        };
        runner.drain = Some(ShrinkReason::Idle);
        acts.push(Action::Stop(runner.conn.clone(), Duration::ZERO));
        self.min_suspended |= suspends_min;
    }

    /// The runner's platform is stopping it: no more calls go there, it finishes its own, and
    /// a replacement boots if `min` or waiting callers need one. It is not told to stop (that
    /// would replace the platform's grace with ours). Returns its connection, for the log.
    pub(crate) fn stopping(&mut self, key: u64, acts: &mut Actions<Q, C, H>) -> Option<C> {
        let runner = self.runner(key)?;
        runner.drain.get_or_insert(ShrinkReason::Stopped);
        let conn = runner.conn.clone();
        self.grow(None, acts);
        Some(conn)
    }

    /// A cancelled call on the runner did not stop within its grace: no more calls go there and
    /// its others get the shutdown grace. Returns its connection if this recycles it (it may
    /// have been draining already).
    pub(crate) fn recycle(&mut self, key: u64, acts: &mut Actions<Q, C, H>) -> Option<C> {
        let grace = self.rules.shutdown_timeout;
        let runner = self.runner(key)?;
        if runner.drain.is_some() {
            return None;
        }
        runner.drain = Some(ShrinkReason::Recycled);
        let conn = runner.conn.clone();
        acts.push(Action::Stop(conn.clone(), grace));
        self.recycled += 1;
        Some(conn)
    }

    /// The runner's connection ended, for `reason`. Returns why it left the pool.
    pub(crate) fn gone(
        &mut self,
        key: u64,
        reason: &Error,
        acts: &mut Actions<Q, C, H>,
    ) -> Option<ShrinkReason> {
        let at = self.runners.iter().position(|r| r.key == key)?;
        let runner = self.runners.swap_remove(at);
        self.exiting += 1;
        let shrink = runner.drain.unwrap_or(ShrinkReason::Lost);
        acts.push(Action::Retire {
            conn: runner.conn,
            handle: runner.handle,
            shrink: Some(shrink),
        });
        if reason.kind() == ErrorKind::BootFailed {
            // The app's main failed there, and would on the next runner too.
            self.boot_failed(reason.clone(), acts);
        } else {
            // Keep `min` alive and serve whoever is waiting.
            self.grow(None, acts);
        }
        Some(shrink)
    }

    /// Changes `max`. Lowering it stops the excess runners once their calls are done (idle
    /// ones first); raising it lets waiting callers get runners at once.
    pub(crate) fn set_max(&mut self, max: usize, acts: &mut Actions<Q, C, H>) -> Result<(), usize> {
        if max == 0 || max < self.min {
            return Err(self.min);
        }
        self.max = max;
        let active = self.active() + self.booting;
        let mut excess = active.saturating_sub(max);
        // Idle runners go first, then the least busy.
        let mut order: Vec<usize> = (0..self.runners.len())
            .filter(|&i| self.runners[i].drain.is_none())
            .collect();
        order.sort_by_key(|&i| self.runners[i].in_flight);
        for i in order {
            if excess == 0 {
                break;
            }
            let runner = &mut self.runners[i];
            runner.drain = Some(ShrinkReason::Resized);
            if runner.in_flight == 0 {
                acts.push(Action::Stop(runner.conn.clone(), Duration::ZERO));
            }
            excess -= 1;
        }
        self.grow(None, acts);
        Ok(())
    }

    /// Changes `min`: raising it boots runners, lowering it lets idle runners above it stop at
    /// their next idle period.
    pub(crate) fn set_min(&mut self, min: usize, acts: &mut Actions<Q, C, H>) -> Result<(), usize> {
        if min > self.max {
            return Err(self.max);
        }
        self.min = min;
        self.min_suspended = false;
        self.grow(None, acts);
        Ok(())
    }

    /// Stops taking calls, for `reason`: waiting ones fail, and every runner is told to stop
    /// once its calls are done, within `grace`.
    pub(crate) fn drain(&mut self, reason: Error, grace: Duration, acts: &mut Actions<Q, C, H>) {
        if self.closed.is_none() {
            self.queue.fail_all(&reason);
            self.closed = Some(reason);
        }
        for runner in &mut self.runners {
            runner.drain.get_or_insert(ShrinkReason::Shutdown);
            acts.push(Action::Stop(runner.conn.clone(), grace));
        }
    }

    /// Closes the pool for `reason` (unless it was already): waiting calls fail, and every
    /// runner leaves it at once, returned with its handle for the caller to stop and reap.
    pub(crate) fn close(&mut self, reason: Error) -> Vec<(C, Option<H>)> {
        self.queue.fail_all(&reason);
        self.closed.get_or_insert(reason);
        (self.runners.drain(..))
            .map(|r| (r.conn, r.handle))
            .collect()
    }

    /// No runner has a call running.
    pub(crate) fn all_idle(&self) -> bool {
        self.runners.iter().all(|r| r.in_flight == 0)
    }

    /// No runner is booting or on its way out.
    pub(crate) fn settled(&self) -> bool {
        self.exiting == 0 && self.booting == 0
    }

    /// `Some` once `min` runners are up or a boot has failed: with the boot's error if `min`
    /// is still not met.
    pub(crate) fn min_outcome(&self) -> Option<Result<(), Error>> {
        match &self.last_boot_error {
            _ if self.active() >= self.min => Some(Ok(())),
            Some(error) => Some(Err(error.clone())),
            None => None,
        }
    }

    #[cfg(test)]
    pub(crate) fn queue(&mut self) -> &mut Q {
        &mut self.queue
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
