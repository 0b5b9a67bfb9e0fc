//! The pool's decisions under random event sequences: calls, finishes, give-ups, boots that
//! succeed, fail or hang up, runners lost, idle, recycled or stopped by their platform,
//! resizes and shutdown. A small world carries out every action the state returns, as the
//! pool would, and the pool's invariants are checked after each event.

use std::collections::{HashMap, HashSet, VecDeque};

use proptest::prelude::*;

use super::*;

/// The line of waiting calls: ids, those given up, and those failed.
#[derive(Default)]
struct Line {
    calls: VecDeque<u32>,
    given_up: HashSet<u32>,
    failed: Vec<(u32, ErrorKind)>,
}

impl Waiting for Line {
    type Call = u32;
    fn push(&mut self, call: u32) {
        self.calls.push_back(call);
    }
    fn push_front(&mut self, call: u32) {
        self.calls.push_front(call);
    }
    fn pop(&mut self) -> Option<u32> {
        while let Some(call) = self.calls.pop_front() {
            if !self.given_up.contains(&call) {
                return Some(call);
            }
        }
        None
    }
    fn has_waiters(&mut self) -> bool {
        self.calls.iter().any(|c| !self.given_up.contains(c))
    }
    fn more_than(&self, n: usize) -> bool {
        self.calls
            .iter()
            .filter(|c| !self.given_up.contains(c))
            .nth(n)
            .is_some()
    }
    fn len(&mut self) -> usize {
        self.calls
            .iter()
            .filter(|c| !self.given_up.contains(c))
            .count()
    }
    fn fail_all(&mut self, error: &Error) {
        for call in self.calls.drain(..) {
            if !self.given_up.contains(&call) {
                self.failed.push((call, error.kind()));
            }
        }
    }
}

/// Runners are their keys: the connection and the handle.
type Pool = State<Line, u64, u64>;
type Acts = Vec<Action<u32, u64, u64>>;

#[derive(Debug, Clone)]
enum Event {
    Submit,
    /// The next call to be started turns out given up.
    GiveUpNextStart,
    /// A waiting call's caller gives up.
    GiveUp(usize),
    Finish(usize),
    BootOk,
    /// A boot fails; hopelessly (rejected) when set.
    BootFail(bool),
    BootHungUp,
    Exited,
    RetryDue,
    Lost(usize, bool),
    Idle(usize, u8),
    Stopping(usize),
    Recycle(usize),
    SetMax(usize),
    SetMin(usize),
    Drain,
    Close,
}

fn event() -> impl Strategy<Value = Event> {
    let i = any::<usize>();
    prop_oneof![
        8 => Just(Event::Submit),
        1 => Just(Event::GiveUpNextStart),
        1 => i.prop_map(Event::GiveUp),
        8 => i.prop_map(Event::Finish),
        4 => Just(Event::BootOk),
        1 => any::<bool>().prop_map(Event::BootFail),
        1 => Just(Event::BootHungUp),
        2 => Just(Event::Exited),
        1 => Just(Event::RetryDue),
        1 => (i, any::<bool>()).prop_map(|(i, main_failed)| Event::Lost(i, main_failed)),
        2 => (i, 0u8..4).prop_map(|(i, secs)| Event::Idle(i, secs)),
        1 => i.prop_map(Event::Stopping),
        1 => i.prop_map(Event::Recycle),
        1 => (1usize..5).prop_map(Event::SetMax),
        1 => (0usize..3).prop_map(Event::SetMin),
        1 => prop_oneof![39 => Just(Event::Submit), 1 => Just(Event::Drain)],
        1 => prop_oneof![79 => Just(Event::Submit), 1 => Just(Event::Close)],
    ]
}

fn rules() -> impl Strategy<Value = (Rules, usize, usize)> {
    let idle = prop_oneof![
        Just(None),
        (1u64..3).prop_map(|s| Some(Duration::from_secs(s)))
    ];
    (
        1usize..4,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(0.5)), Just(Some(1.0))],
        idle.clone(),
        idle,
        0usize..3,
        1usize..5,
    )
        .prop_map(
            |(mc, pack, single_use, prewarm_at, idle, min_idle, min, max)| {
                let rules = Rules {
                    max_concurrency: if single_use { 1 } else { mc },
                    placement: if pack {
                        Placement::Pack
                    } else {
                        Placement::LeastLoaded
                    },
                    single_use,
                    prewarm_at,
                    idle_shutdown_after: idle,
                    min_idle_shutdown_after: min_idle,
                    shutdown_timeout: Duration::from_secs(30),
                };
                (rules, min, max.max(min).max(1))
            },
        )
}

/// What the pool around the state would see: calls running, boots and destroys pending.
#[derive(Default)]
struct World {
    next_call: u32,
    next_key: u64,
    submitted: u32,
    running: Vec<(u32, u64)>,
    /// Calls whose start found them given up.
    abandoned: u32,
    abandon_next: bool,
    /// Calls that ended: finished, or failed with their runner.
    ended: u32,
    boots: usize,
    retiring: usize,
    retry_timer: bool,
    connected: HashSet<u64>,
    told_to_stop: HashSet<u64>,
    /// Events after which the pool must have closed.
    closed: bool,
}

fn pick<T: Copy>(items: impl IntoIterator<Item = T>, i: usize) -> Option<T> {
    let items: Vec<T> = items.into_iter().collect();
    (!items.is_empty()).then(|| items[i % items.len()])
}

impl World {
    /// Carries out what the state decided, as `shared.rs` does, feeding back what that
    /// reports at once (a start that found its call given up).
    fn apply(&mut self, pool: &mut Pool, acts: Acts) -> Result<(), TestCaseError> {
        let mut acts = VecDeque::from(acts);
        while let Some(act) = acts.pop_front() {
            let mut more = Vec::new();
            match act {
                Action::Boot(_) => {
                    prop_assert!(!self.closed, "a closed pool boots");
                    self.boots += 1;
                }
                Action::Start(call, seat) => {
                    prop_assert!(!self.closed, "a closed pool starts call {}", call);
                    prop_assert!(self.connected.contains(&seat.key));
                    prop_assert_eq!(seat.key, seat.conn);
                    if std::mem::take(&mut self.abandon_next) {
                        self.abandoned += 1;
                        pool.unused(seat.key, &mut more);
                    } else {
                        self.running.push((call, seat.key));
                    }
                }
                Action::Stop(conn, _) => {
                    self.told_to_stop.insert(conn);
                }
                Action::Retire { conn, handle, .. } => {
                    prop_assert_eq!(handle, Some(conn));
                    self.retiring += 1;
                }
                Action::RetryAfter(pause) => {
                    prop_assert!(!self.retry_timer, "two retry timers");
                    prop_assert!(pause >= Duration::from_millis(100));
                    self.retry_timer = true;
                }
            }
            acts.extend(more);
        }
        Ok(())
    }

    fn submit(&mut self, pool: &mut Pool) -> Result<Acts, TestCaseError> {
        let mut acts = Vec::new();
        let call = self.next_call;
        self.next_call += 1;
        self.submitted += 1;
        match pool.submit(call, &mut acts) {
            Submitted::Start(call, seat) => acts.insert(0, Action::Start(call, seat)),
            Submitted::Waits => {}
            Submitted::Refused(call, error) => {
                prop_assert!(self.closed);
                pool.queue().failed.push((call, error.kind()));
            }
        }
        Ok(acts)
    }

    fn event(&mut self, pool: &mut Pool, event: &Event) -> Result<bool, TestCaseError> {
        let mut acts = Vec::new();
        let err = |kind| Error::new(kind, "test");
        match *event {
            Event::Submit => acts = self.submit(pool)?,
            Event::GiveUpNextStart => self.abandon_next = true,
            Event::GiveUp(i) => {
                let line = pool.queue();
                if let Some(call) = pick(line.calls.iter().copied(), i) {
                    line.given_up.insert(call);
                }
            }
            Event::Finish(i) => {
                if self.running.is_empty() {
                    return Ok(false);
                }
                let (_, key) = self.running.swap_remove(i % self.running.len());
                self.ended += 1;
                pool.release(key, &mut acts);
            }
            Event::BootOk | Event::BootFail(_) | Event::BootHungUp if self.boots > 0 => {
                self.boot_ended(pool, event, &mut acts);
            }
            Event::Exited if self.retiring > 0 => {
                self.retiring -= 1;
                pool.exited(&mut acts);
            }
            Event::RetryDue if self.retry_timer => {
                self.retry_timer = false;
                pool.retry_due(&mut acts);
            }
            Event::Lost(i, main_failed) => {
                if !self.lose(pool, i, main_failed, &mut acts)? {
                    return Ok(false);
                }
            }
            Event::Idle(i, secs) => {
                if let Some(key) = pick(self.connected.iter().copied(), i) {
                    pool.idle(key, Duration::from_secs(secs.into()), &mut acts);
                }
            }
            Event::Stopping(i) => {
                if let Some(key) = pick(self.connected.iter().copied(), i) {
                    prop_assert_eq!(pool.stopping(key, &mut acts), Some(key));
                }
            }
            Event::Recycle(i) => {
                if let Some(key) = pick(self.connected.iter().copied(), i) {
                    let _ = pool.recycle(key, &mut acts);
                }
            }
            Event::SetMax(max) => {
                let _ = pool.set_max(max, &mut acts);
            }
            Event::SetMin(min) => {
                let _ = pool.set_min(min, &mut acts);
            }
            Event::Drain => {
                self.closed = true;
                pool.drain(
                    err(ErrorKind::PoolClosed),
                    Duration::from_secs(1),
                    &mut acts,
                );
            }
            Event::Close => {
                self.closed = true;
                for (conn, handle) in pool.close(err(ErrorKind::PoolClosed)) {
                    prop_assert_eq!(handle, Some(conn));
                    self.connected.remove(&conn);
                }
                // Their calls are failed by their connections as they end.
                self.ended += self.running.len() as u32;
                self.running.clear();
            }
            _ => return Ok(false),
        }
        let booted_now = acts.iter().any(|a| matches!(a, Action::Boot(_)));
        self.apply(pool, acts)?;
        Ok(booted_now)
    }

    /// A boot the pool started ends: ready, failed (hopelessly if rejected), or hung up.
    fn boot_ended(&mut self, pool: &mut Pool, event: &Event, acts: &mut Acts) {
        self.boots -= 1;
        self.next_key += 1;
        let key = self.next_key;
        let booted = match *event {
            Event::BootOk => {
                self.connected.insert(key);
                Booted::Ready {
                    key,
                    conn: key,
                    handle: key,
                }
            }
            Event::BootHungUp => Booted::HungUp {
                conn: key,
                handle: key,
                error: Error::new(ErrorKind::BootFailed, "test"),
            },
            Event::BootFail(true) => Booted::Failed(Error::new(ErrorKind::Rejected, "test")),
            _ => Booted::Failed(Error::new(ErrorKind::BootFailed, "test")),
        };
        pool.booted(booted, acts);
        // A runner that joins a closed pool leaves at once.
        if self.closed {
            self.connected.remove(&key);
        }
    }

    /// A connected runner's connection ends; `false` if none is connected.
    fn lose(
        &mut self,
        pool: &mut Pool,
        i: usize,
        main_failed: bool,
        acts: &mut Acts,
    ) -> Result<bool, TestCaseError> {
        let Some(key) = pick(self.connected.iter().copied(), i) else {
            return Ok(false);
        };
        self.connected.remove(&key);
        let kind = match main_failed {
            true => ErrorKind::BootFailed,
            false => ErrorKind::RunnerLost,
        };
        prop_assert!(pool.gone(key, &Error::new(kind, "test"), acts).is_some());
        // Its calls fail, and their slots are released to a pool that forgot it.
        let (lost, kept) = self.running.iter().partition(|(_, k)| *k == key);
        self.running = kept;
        for _ in lost {
            self.ended += 1;
            pool.release(key, acts);
        }
        Ok(true)
    }

    fn check(&mut self, pool: &mut Pool, booted_now: bool) -> Result<(), TestCaseError> {
        let mc = pool.rules.max_concurrency;
        let count = pool.runners.len() + pool.booting + pool.exiting;
        if booted_now {
            prop_assert!(count <= pool.max, "{} runners, max {}", count, pool.max);
        }
        prop_assert_eq!(pool.booting, self.boots);
        prop_assert_eq!(pool.exiting, self.retiring);
        prop_assert_eq!(pool.retry_pending, self.retry_timer);
        let keys: HashSet<u64> = pool.runners.iter().map(|r| r.key).collect();
        prop_assert_eq!(&keys, &self.connected);

        let mut held: HashMap<u64, usize> = HashMap::new();
        for (_, key) in &self.running {
            *held.entry(*key).or_default() += 1;
        }
        for runner in &pool.runners {
            prop_assert!(runner.in_flight <= mc);
            prop_assert_eq!(
                runner.in_flight,
                held.get(&runner.key).copied().unwrap_or(0)
            );
            let told = self.told_to_stop.contains(&runner.key);
            if runner.drain.is_some_and(|d| d != ShrinkReason::Stopped) && runner.in_flight == 0 {
                prop_assert!(
                    told,
                    "runner {} drains idle but was not told to stop",
                    runner.key
                );
            }
            if !told {
                prop_assert!(runner.drain.is_none_or(|d| d != ShrinkReason::Idle));
            }
        }

        let waiting = pool.queue.len();
        if waiting > 0 {
            prop_assert!(pool.closed.is_none(), "calls wait on a closed pool");
            let free = (pool.runners.iter()).any(|r| r.drain.is_none() && r.in_flight < mc);
            prop_assert!(!free, "{} calls wait beside a free slot", waiting);
            if !pool.retry_pending && !pool.at_max() {
                prop_assert!(
                    pool.booting * mc >= waiting,
                    "{} calls wait, {} runners boot",
                    waiting,
                    pool.booting
                );
            }
        }
        if pool.closed.is_none() && !pool.retry_pending && !pool.min_suspended && !pool.at_max() {
            // Draining runners count: each is replaced as it goes.
            prop_assert!(pool.runners.len() + pool.booting >= pool.min);
        }

        // Every call is accounted for.
        let line = pool.queue();
        let given_up = line.given_up.len() as u32;
        let failed = line.failed.len() as u32;
        let accounted = self.running.len() as u32 + waiting as u32 + given_up + failed;
        prop_assert_eq!(self.submitted, accounted + self.abandoned + self.ended);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_events_keep_the_pool_invariants(
        (rules, min, max) in rules(),
        events in proptest::collection::vec(event(), 1..120),
    ) {
        let mut pool = Pool::new(rules, min, max);
        let mut world = World::default();
        let mut acts = Vec::new();
        pool.top_up(&mut acts);
        world.apply(&mut pool, acts)?;
        world.check(&mut pool, true)?;
        for event in &events {
            let booted_now = world.event(&mut pool, event)?;
            world.check(&mut pool, booted_now)?;
        }
    }
}
