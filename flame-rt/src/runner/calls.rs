//! The calls a runner runs: each in its own task on the app's runtime, which decodes its
//! arguments if they came in pieces, runs the task under its deadline, sends its own result
//! (in pieces if big) and takes itself off the list. The service loop is not woken per call.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::task::AtomicWaker;
use std::future::Future;
use tokio::sync::Notify;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::service::Service;
use crate::channel::{End, Routes};
use crate::parent::TASK_PARENT;
use crate::payload::Encoded;
use crate::protocol::{
    self, CallMap, HIGH_WATER, Outbox, Outcome, PIECE, RunRef, TO_PARENT_PART, ToParent,
    WireErrorKind,
};
use crate::task::{RunningTask, TaskDef};

/// The calls running on this runner. Each runs in its own task, which sends its own result and
/// takes itself off this list: the service loop is not woken per call.
pub(super) struct Calls {
    running: Mutex<CallMap<Arc<dyn RunningCall>>>,
    /// Woken when the last running call ends.
    emptied: Notify,
    /// When the last call ended, to tell how long the runner has been idle.
    last_end: Mutex<Instant>,
    /// Where calls send their results (the service's outbox).
    out: Arc<Outbox>,
    /// The channels of the calls running here.
    pub(super) routes: Routes,
    /// How much of each result being sent in pieces the parent has put together.
    results_taken: Mutex<CallMap<u64>>,
    /// Woken when the parent says it took more of a result.
    taken: Notify,
}

impl Calls {
    /// An empty list whose calls send their results to `out`.
    pub(super) fn new(out: Arc<Outbox>) -> Calls {
        Calls {
            running: Mutex::new(CallMap::default()),
            emptied: Notify::new(),
            last_end: Mutex::new(Instant::now()),
            out,
            routes: Routes::default(),
            results_taken: Mutex::new(CallMap::default()),
            taken: Notify::new(),
        }
    }

    /// Has every running call's future dropped; whether they all were within `wait` (a task
    /// blocking its thread can't be dropped until it yields).
    pub(super) async fn drop_all(&self, wait: Duration) -> bool {
        let tasks: Vec<_> = self.lock().values().cloned().collect();
        for task in tasks {
            task.cancel();
        }
        tokio::time::timeout(wait, self.wait_empty()).await.is_ok()
    }

    /// Cancels a running call; `false` if none runs under that id.
    pub(super) fn cancel(&self, call: u64) -> bool {
        let task = self.lock().get(&call).cloned();
        let Some(task) = task else {
            return false;
        };
        task.cancel();
        true
    }

    fn lock(&self) -> MutexGuard<'_, CallMap<Arc<dyn RunningCall>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn taken_lock(&self) -> MutexGuard<'_, CallMap<u64>> {
        self.results_taken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a big result in pieces that take turns with other calls' frames, each within the
    /// window; the last one is returned, to go with the `Done`.
    async fn send_pieces(&self, call: u64, result: Encoded) -> Outcome {
        let total = result.len();
        let mut pieces = result.pieces(PIECE).peekable();
        let mut last = Bytes::new();
        let mut sent = 0u64;
        // Forgotten however this ends, a cancel (dropping this future) included.
        struct Sending<'a>(&'a Calls, u64);
        impl Drop for Sending<'_> {
            fn drop(&mut self) {
                self.0.taken_lock().remove(&self.1);
            }
        }
        self.taken_lock().insert(call, 0);
        let _sending = Sending(self, call);
        while let Some(piece) = pieces.next() {
            if pieces.peek().is_none() {
                last = piece;
                break;
            }
            let took = || Some(self.taken_lock().get(&call).copied().unwrap_or(0));
            protocol::window_open(&self.taken, sent, took).await;
            self.out.wait_below(HIGH_WATER).await;
            sent += piece.len() as u64;
            self.out.send_part(TO_PARENT_PART, call, total, piece);
        }
        self.out.wait_below(HIGH_WATER).await;
        Outcome::Ok(last)
    }

    /// The parent took `bytes` of call `call`'s result; ignored unless it is being sent.
    pub(super) fn took(&self, call: u64, bytes: u64) {
        if let Some(taken) = self.taken_lock().get_mut(&call) {
            *taken = (*taken).max(bytes);
        }
        self.taken.notify_waiters();
    }

    /// Resolves once no call runs.
    pub(super) async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.lock().is_empty() {
                return;
            }
            emptied.await;
        }
    }

    /// How long the runner has had nothing to run, if it has nothing now.
    pub(super) fn idle_for(&self) -> Option<Duration> {
        let running = self.lock();
        running.is_empty().then(|| {
            self.last_end
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
        })
    }
}

/// Ends a call's life on the runner: takes it off the list and, if its future was dropped before
/// it finished (cancelled, or the runner is stopping), tells the parent so.
pub(super) struct CallGuard {
    call: u64,
    /// How many channels the call carries: they end with it. Known once its arguments are
    /// decoded.
    chans: std::cell::Cell<u32>,
    calls: Arc<Calls>,
    finished: std::cell::Cell<bool>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        // A finished call ended its channels before sending its result; a dropped one ends them
        // here.
        if self.chans.get() > 0 && !self.finished.get() {
            self.calls
                .routes
                .end_call(self.call, self.chans.get(), End::Cancelled, false);
        }
        // Dropped before its arguments were decoded: nothing waits for its frames.
        self.calls.routes.release(self.call);
        // Told before the call leaves the list: a stopping runner closes its outbox once the
        // list is empty, and a word sent after that would be lost (the parent then heard only
        // "closed its connection", 1 run in 2 of runner_loss's SIGTERM test under load).
        if !self.finished.get() {
            self.calls
                .out
                .send(&ToParent::Cancelled { call: self.call });
        }
        let mut running = self.calls.lock();
        running.remove(&self.call);
        if running.is_empty() {
            *self
                .calls
                .last_end
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
            self.calls.emptied.notify_waiters();
        }
        drop(running);
    }
}

impl Service {
    /// Starts a call. Arguments that came in pieces are decoded by the call's task on the app's
    /// runtime: decoding hundreds of MiB here would hold up every other call's frames.
    pub(super) fn start(&self, run: RunRef<'_>, pieces: Option<Bytes>) {
        let RunRef {
            call,
            task,
            args,
            deadline_ms,
            trace,
        } = run;
        let Some(def) = self.registry.get(task) else {
            return self.done(
                call,
                Outcome::Failed {
                    kind: WireErrorKind::UnknownTask,
                    message: format!("this runner has no task {task:?}"),
                },
            );
        };
        let guard = CallGuard {
            call,
            chans: std::cell::Cell::new(0),
            calls: self.calls.clone(),
            finished: std::cell::Cell::new(false),
        };
        let body = match pieces {
            Some(args) => {
                // Channel frames that arrive before the decode opens the channels wait for it.
                self.calls.routes.hold(call);
                Err(args)
            }
            None => match prepare(&guard, def, args) {
                Some(body) => Ok(body),
                None => return,
            },
        };
        let deadline = deadline_ms.map(|ms| crate::deadline::after(Duration::from_millis(ms)));
        let max_payload = self.max_payload.load(Ordering::Relaxed);
        let work = run_call(guard, def, body, deadline, max_payload);
        let span = crate::trace::task_span(
            def.id,
            call,
            &self.handoff.pool,
            &self.handoff.runner_id,
            trace,
        );
        let cell = match (&self.in_process, span.is_disabled()) {
            (Some(parent), _) => {
                call_cell(TASK_PARENT.scope(parent.clone(), work.instrument(span)))
            }
            // No subscriber wants the span: skip the instrumentation on the hot path.
            (None, true) => call_cell(work),
            (None, false) => call_cell(work.instrument(span)),
        };
        // Cancellable from the moment it is on the list, before the dispatcher has spawned it.
        self.calls.lock().insert(call, cell.clone());
        // A dispatcher that is gone (the app's runtime shut down) drops the call, which ends it.
        let _ = self.dispatch.send(CallTask(cell));
    }
}

/// One call's life on the app's runtime: its arguments decoded (if they came in pieces), the
/// task run under its deadline, its channels ended, its result sent.
async fn run_call(
    guard: CallGuard,
    def: &'static TaskDef,
    body: Result<RunningTask, Bytes>,
    deadline: Option<Instant>,
    max_payload: usize,
) {
    let call = guard.call;
    let body = match body {
        Ok(body) => body,
        Err(args) => {
            // `Bytes` arguments are slices of `args`, not copies of them.
            let body = crate::payload::sharing(&args, || prepare(&guard, def, &args));
            drop(args);
            guard.calls.routes.release(call);
            match body {
                Some(body) => body,
                None => return,
            }
        }
    };
    let ran = match deadline {
        // Boxed: a timer is large, and most calls have no deadline to pay for it.
        Some(deadline) => {
            Box::pin(tokio::time::timeout_at(
                deadline,
                AssertUnwindSafe(body).catch_unwind(),
            ))
            .await
        }
        None => Ok(AssertUnwindSafe(body).catch_unwind().await),
    };
    let (outcome, big) = outcome(ran, def.id, max_payload);
    // The call's channels end before the parent hears it did: a half the task left behind (in
    // a detached task, say) must already say "the call ended" by the time the parent can start
    // another call that might use it.
    if guard.chans.get() > 0 {
        guard
            .calls
            .routes
            .end_call(call, guard.chans.get(), End::Finished, false);
    }
    let outcome = match big {
        // Boxed: most calls have no big result, and their futures stay small.
        Some(result) => Box::pin(guard.calls.send_pieces(call, result)).await,
        None => outcome,
    };
    guard.calls.out.send_done(call, outcome);
    guard.finished.set(true);
}

/// How a task's run ended: past its deadline, panicked, or returned its encoded result or
/// error.
type Ran = Result<
    Result<Result<Encoded, crate::Error>, Box<dyn std::any::Any + Send>>,
    tokio::time::error::Elapsed,
>;

/// How a task run went (timed out, panicked, returned), as its `Done` says it; with the encoded
/// result apart when it is too big for one frame, to be sent in pieces.
fn outcome(ran: Ran, task_id: &str, max_payload: usize) -> (Outcome, Option<Encoded>) {
    let outcome = match ran {
        Err(_) => Outcome::Failed {
            kind: WireErrorKind::TimedOut,
            message: format!("{task_id} did not finish before its deadline; the runner dropped it"),
        },
        Ok(Err(panic)) => Outcome::Panicked(panic_message(panic)),
        Ok(Ok(Ok(encoded))) if encoded.len() > max_payload => Outcome::Failed {
            kind: WireErrorKind::Codec,
            message: format!(
                "the result of {task_id} is {} bytes encoded, more than the pool's \
                 max_payload of {max_payload} bytes; raise it with PoolBuilder::max_payload, \
                 or stream the data through a flame channel",
                encoded.len()
            ),
        },
        Ok(Ok(Ok(encoded))) if encoded.len() > PIECE => {
            return (Outcome::Ok(Bytes::new()), Some(encoded));
        }
        Ok(Ok(Ok(encoded))) => Outcome::Ok(encoded.into_bytes()),
        Ok(Ok(Err(error))) => Outcome::Failed {
            kind: match error.kind() {
                crate::ErrorKind::StateMissing => WireErrorKind::StateMissing,
                _ => WireErrorKind::Codec,
            },
            message: format!("{task_id}: {}", error.message()),
        },
    };
    (outcome, None)
}

/// Decodes a call's arguments, opening its channels, into the task's future; or reports why
/// they don't decode, ending the call (`None`).
fn prepare(guard: &CallGuard, def: &'static TaskDef, args: &[u8]) -> Option<RunningTask> {
    let (call, calls) = (guard.call, &guard.calls);
    let (body, chans) =
        crate::channel::decoding(&calls.routes, &calls.out, call, || (def.invoke)(args));
    guard.chans.set(chans);
    match body {
        Ok(body) if chans == 0 => Some(body),
        // What the task sent before returning goes out before its result.
        Ok(body) => {
            let calls = calls.clone();
            Some(Box::pin(async move {
                let result = body.await;
                calls.routes.flush(call, chans).await;
                result
            }))
        }
        Err(message) => {
            calls.routes.end_call(call, chans, End::Finished, false);
            calls.out.send_done(
                call,
                Outcome::Failed {
                    kind: WireErrorKind::Codec,
                    message: format!("{}: {message}", def.id),
                },
            );
            guard.finished.set(true);
            None
        }
    }
}

/// A call's future and what cancels it, in one allocation: the list of running calls holds it
/// to cancel the call, the task on the app's runtime to run it. A cancel marks it and wakes the
/// task, which drops the future on the app's runtime, where the task's destructors expect to run
/// (a call's channel halves end there, for one).
///
/// The future lives inside the cell, not boxed beside it: one allocation per call, not two.
struct CallCell<F> {
    /// `None` once the call has finished or been dropped. Pinned: never moved, dropped in place.
    /// Locked only by the task that polls it.
    future: Mutex<Option<F>>,
    cancelled: AtomicBool,
    waker: AtomicWaker,
}

/// A [`CallCell`] of any future, as the list of running calls and the app's task hold it.
trait RunningCall: Send + Sync {
    /// Has the call's future dropped at its task's next poll (at once if it is not running).
    fn cancel(&self);
    fn poll_call(&self, cx: &mut std::task::Context<'_>) -> Poll<()>;
}

impl<F: Future<Output = ()> + Send> RunningCall for CallCell<F> {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll_call(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        let mut slot = self.future.lock().unwrap_or_else(|e| e.into_inner());
        if self.cancelled.load(Ordering::Acquire) {
            *slot = None;
            return Poll::Ready(());
        }
        let Some(future) = slot.as_mut() else {
            return Poll::Ready(());
        };
        // SAFETY: the future is never moved out of its cell, which an `Arc` keeps in place; it
        // is only ever dropped there, by setting the slot to `None`.
        let future = unsafe { std::pin::Pin::new_unchecked(future) };
        match future.poll(cx) {
            Poll::Ready(()) => {
                *slot = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn call_cell(future: impl Future<Output = ()> + Send + 'static) -> Arc<dyn RunningCall> {
    Arc::new(CallCell {
        future: Mutex::new(Some(future)),
        cancelled: AtomicBool::new(false),
        waker: AtomicWaker::new(),
    })
}

/// What the app's runtime spawns for a call: polls the call's future until it ends or is
/// cancelled.
pub(super) struct CallTask(Arc<dyn RunningCall>);

impl Future for CallTask {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.0.poll_call(cx)
    }
}

/// The app-runtime end of the hand-off: spawns the calls the protocol thread sends, from a
/// worker, so a batch of calls costs one cross-thread wake-up rather than one each (a spawn from
/// outside the runtime wakes a parked worker every time).
pub(super) fn dispatcher(app: &tokio::runtime::Handle) -> mpsc::UnboundedSender<CallTask> {
    let (dispatch, mut calls) = mpsc::unbounded_channel::<CallTask>();
    app.spawn(async move {
        while let Some(call) = calls.recv().await {
            tokio::spawn(call);
        }
    });
    dispatch
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_string(),
            Err(_) => "the task panicked with a non-string payload".to_string(),
        },
    }
}
