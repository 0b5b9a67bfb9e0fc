//! The parent's side of one runner connection: every call to that runner goes through here.
//!
//! A caller starts its call directly: it registers the call and queues its frame for the
//! writer task, which flushes once per drained queue. One reader task per connection takes the
//! runner's answers, resolves the callers, and keeps the heartbeat. A call's pool slot is
//! released only when the runner reports the call over (done, or its future dropped after a
//! cancel), so a runner never runs more than `max_concurrency` calls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use tokio::time::Instant;

use crate::channel::{End, Port, Routes, Side};
use crate::error::Error;
use crate::payload::Encoded;
use crate::pool::queue::QueuedCall;
use crate::protocol::{
    self, BoxRead, BoxWrite, CallMap, HIGH_WATER, Outbox, PIECE, RunHead, ToRunner, Welcome,
};
use crate::ticket::Remote;

mod read;

/// What a runner connection tells the pool it belongs to: all the connection knows of it.
pub(crate) trait Owner: Send + Sync {
    /// A call's slot is free: the runner reported the call over, or it was given up.
    fn release(&self, key: u64);
    /// A call got its outcome from the runner.
    fn served(&self);
    /// The runner has had nothing to do for `idle`.
    fn idle(&self, key: u64, idle: Duration);
    /// The runner's platform is stopping it.
    fn stopping(&self, key: u64);
    /// A cancelled call did not stop within its grace (its slot is released right after).
    fn recycle(&self, key: u64, task: &str, call: u64);
    /// The connection ended, for `reason`.
    fn gone(&self, key: u64, reason: &Error);
    /// A call whose runner was lost, to try again.
    fn resubmit(&self, call: QueuedCall);
}

/// One call's claim on a slot of its runner. Released (to the pool) when dropped, which the
/// connection does when the runner reports the call over.
pub(crate) struct Slot {
    conn: Arc<RunnerConn>,
    armed: bool,
}

impl Slot {
    /// Holds a slot the pool took on `conn`'s runner.
    pub(crate) fn new(conn: Arc<RunnerConn>) -> Slot {
        Slot { conn, armed: true }
    }

    pub(crate) fn conn(&self) -> &Arc<RunnerConn> {
        &self.conn
    }

    /// Lets the slot go without releasing it: the pool takes it back as unused.
    pub(crate) fn forget(mut self) {
        self.armed = false;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.conn.owner.release(self.conn.key);
        }
    }
}

/// A handle to a runner connection, shared by the pool and the calls running on it.
pub(crate) struct RunnerConn {
    pub(crate) id: String,
    /// The pool's key for this runner, in what the connection tells it.
    key: u64,
    /// Its pool. It holds this connection until the connection ends or the pool closes, which
    /// breaks the reference cycle.
    owner: Arc<dyn Owner>,
    out: Arc<Outbox>,
    in_flight: Mutex<InFlight>,
    next_call: AtomicU64,
    /// The channels of the calls running here.
    routes: Routes,
    /// How long a cancelled call may go on running before the runner is recycled.
    cancel_grace: Duration,
    /// Cancelled calls to look at again once their grace is over, by the reader loop, which
    /// arms a timer for the first: a cancel wakes no thread for it.
    overdue: Mutex<std::collections::VecDeque<(Instant, u64)>>,
    any_overdue: std::sync::atomic::AtomicBool,
    /// Why the connection ended, set before the pool hears of it: a runner that hangs up before
    /// its boot has added it to the pool must not be added after.
    ended: std::sync::OnceLock<Error>,
    /// Wakes uploads waiting for their window: the runner took more, a call was cancelled, or
    /// the connection ended.
    progress: tokio::sync::Notify,
}

/// The calls running on this connection, and whether it still takes calls.
#[derive(Default)]
struct InFlight {
    /// Set when the connection ended: nothing may be registered any more.
    closed: bool,
    calls: CallMap<Running>,
}

struct Running {
    call: QueuedCall,
    /// Its arguments, kept until it ends if it asked for retries (else empty).
    args: Encoded,
    /// Taken early from a cancelled call that did not stop in time, whose runner is recycled.
    slot: Option<Slot>,
    /// How many channels the call carries.
    chans: u32,
    /// Set once its cancel is queued: an upload of its arguments stops there.
    cancelled: bool,
    /// How much of its arguments the runner has put together, as it last said.
    took: u64,
    /// The pieces of a big result received so far.
    result: Option<Vec<u8>>,
}

impl Remote for RunnerConn {
    fn cancel(&self, call: u64) {
        RunnerConn::cancel(self, call);
    }
}

/// A call that could not start on this connection because it has ended.
pub(crate) struct Unstarted {
    pub(crate) call: QueuedCall,
    pub(crate) slot: Slot,
    /// Taken back by the call's ticket.
    pub(crate) args: Encoded,
}

/// The head of a call's `Run` frame: its arguments follow as the frame's tail.
fn run_head(call: u64, queued: &QueuedCall, args_len: usize) -> RunHead<'_> {
    let deadline_ms = queued
        .ticket
        .deadline
        .at()
        .map(|at| crate::deadline::millis(at.saturating_duration_since(Instant::now())));
    RunHead::new(
        call,
        queued.def.id,
        deadline_ms,
        queued.trace.as_deref().copied(),
        args_len,
    )
}

impl Outbox {
    /// Queues a call's `Run` frame ending with `args` (all of its arguments, or the last piece
    /// of them), shared rather than copied.
    fn send_run(&self, call: u64, queued: &QueuedCall, args: Bytes) {
        let head = run_head(call, queued, args.len());
        self.send_with_tail(|buf| postcard::to_io(&head, buf.writer()).map(drop), args);
    }
}

impl RunnerConn {
    fn lock(&self) -> MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, msg: &ToRunner) {
        self.out.send(msg);
    }

    /// Registers the call and queues its frame; returns its call id. Gives the call back if the
    /// connection has ended.
    pub(crate) fn start(
        self: &Arc<Self>,
        mut call: QueuedCall,
        args: Encoded,
        slot: Slot,
    ) -> Result<(Arc<RunnerConn>, u64), Box<Unstarted>> {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let mut in_flight = self.lock();
        if in_flight.closed {
            return Err(Box::new(Unstarted { call, slot, args }));
        }
        let chans = call.chans.len() as u32;
        // Routes first, so the runner's first channel frames find them; pumps after the run, so
        // no channel frame overtakes it.
        let pumps: Vec<_> = (0..)
            .zip(std::mem::take(&mut call.chans))
            .map(|(chan, attached)| {
                let port = Port {
                    out: self.out.clone(),
                    side: Side::Parent,
                    call: id,
                    chan,
                };
                attached.open(&self.routes, port)
            })
            .collect();
        // Kept only for a retry: sharing the buffer costs the hot path an allocation and two
        // atomic counts.
        let kept = if call.retries > 0 {
            args.clone()
        } else {
            Encoded::default()
        };
        // Big arguments go in pieces, from a task, so they take turns with other calls' frames.
        let upload = if args.len() > PIECE {
            Some((args, pumps))
        } else {
            // Under the lock, so a cancel for this call can only be queued after its run.
            self.out.send_run(id, &call, args.into_bytes());
            self.arm(id, pumps);
            None
        };
        in_flight.calls.insert(
            id,
            Running {
                call,
                args: kept,
                slot: Some(slot),
                chans,
                cancelled: false,
                took: 0,
                result: None,
            },
        );
        drop(in_flight);
        if let Some((args, pumps)) = upload {
            crate::io_runtime::spawn(self.clone().upload(id, args, pumps));
        }
        Ok((self.clone(), id))
    }

    fn arm(&self, call: u64, pumps: Vec<futures::future::BoxFuture<'static, ()>>) {
        for (chan, pump) in (0..).zip(pumps) {
            self.routes.arm(call, chan, pump);
        }
    }

    /// Sends a call's big arguments in pieces (see `upload_pieces`), then lets go of them off
    /// the protocol thread, which this runs on.
    async fn upload(
        self: Arc<Self>,
        id: u64,
        args: Encoded,
        pumps: Vec<futures::future::BoxFuture<'static, ()>>,
    ) {
        let whole = args.clone();
        self.upload_pieces(id, args, pumps).await;
        crate::io_runtime::let_go(whole);
    }

    /// Sends a call's big arguments in pieces, each once the outbox is low, then its `Run` with
    /// the last piece. Stops at a cancel (the runner drops what it got and acknowledges) or
    /// when the connection ends.
    async fn upload_pieces(
        &self,
        id: u64,
        args: Encoded,
        pumps: Vec<futures::future::BoxFuture<'static, ()>>,
    ) {
        let total = args.len();
        let mut pieces = args.pieces(PIECE).peekable();
        let mut sent = 0u64;
        loop {
            let took = || {
                let in_flight = self.lock();
                let running = in_flight.calls.get(&id).filter(|r| !r.cancelled)?;
                Some(running.took)
            };
            if !protocol::window_open(&self.progress, sent, took).await {
                return;
            }
            self.out.wait_below(HIGH_WATER).await;
            // Under the lock: once a cancel is queued, nothing more of the call is.
            let in_flight = self.lock();
            let Some(running) = in_flight.calls.get(&id).filter(|r| !r.cancelled) else {
                return;
            };
            let piece = pieces.next().unwrap_or_default();
            if pieces.peek().is_none() {
                self.out.send_run(id, &running.call, piece);
                drop(in_flight);
                return self.arm(id, pumps);
            }
            sent += piece.len() as u64;
            self.out
                .send_part(protocol::TO_RUNNER_PART, id, total, piece);
        }
    }

    /// Asks the runner to drop the call's future. Its slot comes back with the acknowledgement,
    /// or, if none comes within `cancel_grace`, when the runner is recycled.
    pub(crate) fn cancel(&self, call: u64) {
        let mut in_flight = self.lock();
        let Some(running) = in_flight.calls.get_mut(&call) else {
            return;
        };
        running.cancelled = true;
        let chans = running.chans;
        self.push(&ToRunner::Cancel { call });
        drop(in_flight);
        self.progress.notify_waiters();
        let due = crate::deadline::after(self.cancel_grace);
        self.overdue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((due, call));
        self.any_overdue.store(true, Ordering::Release);
        // Its channels end now, as cancelled: whatever the runner sends meanwhile (its senders
        // dropped with the task's future, say) would only make the end look ordinary.
        if chans > 0 {
            self.routes.end_call(call, chans, End::Cancelled, false);
        }
    }

    /// When the first cancelled call's grace ends, if any waits.
    fn first_overdue(&self) -> Option<Instant> {
        if !self.any_overdue.load(Ordering::Acquire) {
            return None;
        }
        let overdue = self.overdue.lock().unwrap_or_else(|e| e.into_inner());
        overdue.front().map(|(due, _)| *due)
    }

    /// The cancelled calls whose grace has ended.
    fn take_overdue(&self, now: Instant) -> Vec<u64> {
        let mut overdue = self.overdue.lock().unwrap_or_else(|e| e.into_inner());
        let mut due = Vec::new();
        while let Some(&(at, call)) = overdue.front()
            && at <= now
        {
            overdue.pop_front();
            due.push(call);
        }
        self.any_overdue
            .store(!overdue.is_empty(), Ordering::Release);
        due
    }

    /// Tells the runner to stop taking calls and to finish its own within `grace`.
    pub(crate) fn shutdown(&self, grace: Duration) {
        self.push(&ToRunner::Shutdown {
            grace_ms: crate::deadline::millis(grace),
        });
    }

    /// Adds a piece of a big result to its call's; a piece of a call that is over (cancelled
    /// meanwhile) is dropped.
    fn add_result_part(
        &self,
        part: &protocol::PartRef<'_>,
        max_payload: usize,
    ) -> Result<(), Error> {
        let mut in_flight = self.lock();
        let Some(running) = in_flight.calls.get_mut(&part.call) else {
            return Ok(());
        };
        if let Some(bytes) = part.add_to(
            |capacity| {
                running
                    .result
                    .get_or_insert_with(|| crate::payload::buffer(capacity))
            },
            max_payload,
            "a result",
        )? {
            self.push(&ToRunner::Took {
                call: part.call,
                bytes,
            });
        }
        Ok(())
    }

    /// Why the connection ended, once it has.
    pub(crate) fn ended(&self) -> Option<&Error> {
        self.ended.get()
    }

    /// Takes the call's registration: its slot and what to resolve.
    fn finish(&self, call: u64) -> Option<Running> {
        let mut running = self.lock().calls.remove(&call)?;
        // Arguments kept for a retry are freed off this thread (the reader's) when big.
        if running.args.len() > PIECE {
            crate::io_runtime::let_go(std::mem::take(&mut running.args));
        }
        Some(running)
    }
}

/// Takes over a runner connection that passed the handshake: sends the welcome and starts the
/// reader and writer tasks.
pub(crate) fn open(
    owner: Arc<dyn Owner>,
    key: u64,
    id: String,
    (reader, writer): (BoxRead, BoxWrite),
    welcome: Welcome,
    cancel_grace: Duration,
) -> Arc<RunnerConn> {
    let out = Outbox::new();
    let conn = Arc::new(RunnerConn {
        id,
        key,
        owner,
        out,
        in_flight: Mutex::new(InFlight::default()),
        next_call: AtomicU64::new(1),
        routes: Routes::default(),
        cancel_grace,
        overdue: Mutex::default(),
        any_overdue: std::sync::atomic::AtomicBool::new(false),
        ended: std::sync::OnceLock::new(),
        progress: tokio::sync::Notify::new(),
    });
    // On the protocol's runtime: the runner must hear our heartbeats, and we its, whatever the
    // app's tasks are doing with its workers.
    conn.routes.set_max_message(read::max_payload(&welcome));
    let writer = crate::io_runtime::spawn(protocol::write_loop(writer, conn.out.clone()));
    conn.push(&ToRunner::Welcome(welcome.clone()));
    crate::io_runtime::spawn(read::read(conn.clone(), reader, writer, welcome));
    conn
}
