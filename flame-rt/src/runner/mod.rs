//! The runner side: dial the parent, prove who we are, then run the calls it sends until it
//! lets us go. One Tokio task per call, so a panic or a slow task never blocks the others; each
//! call's task sends its own result.
//!
//! The service itself (reading frames, heartbeats, cancels, the failsafe) runs on the protocol's
//! runtime (`io_runtime`); the calls run on the app's runtime, so a task that never yields
//! cannot silence its runner.

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

use crate::channel::{End, Routes};
use crate::parent::{Handoff, Parent, TASK_PARENT, process_handoff};
use crate::protocol::{
    self, CallMap, HIGH_WATER, Hello, Outbox, Outcome, PIECE, PROTOCOL_VERSION, Reader, RunRef,
    TO_PARENT_PART, TO_RUNNER_CHAN, TO_RUNNER_PART, ToParent, ToRunner, Watchdog, WireErrorKind,
};
use crate::task::{Registry, registry};
use terminator::Exit;

pub(crate) mod terminator;

/// Told to a running service by the process hosting it.
#[derive(Debug)]
pub(crate) enum Control {
    /// The app's `main` failed: report it to the parent and stop.
    BootFailed(String),
    /// Stop now (a second SIGTERM, or the parent-death signal of a process runner).
    Terminate,
    /// The platform is stopping this runner (SIGTERM of a container, pod or Machine): finish
    /// the calls in flight, take no more, then exit; whatever is left when the platform's grace
    /// ends is cut off by its SIGKILL.
    Drain,
}

/// How long a stopping runner waits for its dropped tasks to be gone: a task blocking its thread
/// can't be dropped until it yields, and must not keep the process alive.
const DROP_WAIT: Duration = Duration::from_millis(250);

/// Set when a stopping runner left a task behind that would not drop: the process then exits
/// without waiting for the app's runtime to shut down, since a worker is known to be held.
pub(crate) static LEFT_A_TASK_BEHIND: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Serves one runner's connection to its parent until it ends, then drops every task. Call it on
/// the protocol's runtime; the calls run on `app`.
pub(crate) async fn serve(
    handoff: Arc<Handoff>,
    control: mpsc::UnboundedReceiver<Control>,
    app: tokio::runtime::Handle,
) -> Exit {
    let exit = match registry() {
        Ok(reg) => Service::run(handoff.clone(), reg, control, app).await,
        Err(e) => Exit::Unreachable(e.to_string()),
    };
    if !matches!(exit, Exit::Stopped | Exit::Terminated) {
        eprintln!("flame runner {}: {exit}", handoff.runner_id);
    }
    exit
}

struct Service {
    handoff: Arc<Handoff>,
    /// Set for a runner inside the parent's process (`LocalBackend`), whose tasks learn who
    /// their parent is from a task-local; a runner process knows it from its environment.
    in_process: Option<Parent>,
    registry: &'static Registry,
    out: Arc<Outbox>,
    calls: Arc<Calls>,
    /// Hands calls to the dispatcher on the app's runtime, where they run.
    dispatch: mpsc::UnboundedSender<CallTask>,
    /// The largest result a call may return, from the parent's welcome.
    max_payload: Arc<std::sync::atomic::AtomicUsize>,
}

/// The calls running on this runner. Each runs in its own task, which sends its own result and
/// takes itself off this list: the service loop is not woken per call.
struct Calls {
    running: Mutex<CallMap<Arc<dyn RunningCall>>>,
    /// Woken when the last running call ends.
    emptied: Notify,
    /// When the last call ended, to tell how long the runner has been idle.
    last_end: Mutex<Instant>,
    /// Where calls send their results (the service's outbox).
    out: Arc<Outbox>,
    /// The channels of the calls running here.
    routes: Routes,
    /// How much of each result being sent in pieces the parent has put together.
    results_taken: Mutex<CallMap<u64>>,
    /// Woken when the parent says it took more of a result.
    taken: Notify,
}

impl Calls {
    fn lock(&self) -> MutexGuard<'_, CallMap<Arc<dyn RunningCall>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn taken_lock(&self) -> MutexGuard<'_, CallMap<u64>> {
        self.results_taken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a big result in pieces that take turns with other calls' frames, each within the
    /// window; the last one is returned, to go with the `Done`.
    async fn send_pieces(&self, call: u64, result: crate::payload::Encoded) -> Outcome {
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
    fn took(&self, call: u64, bytes: u64) {
        if let Some(taken) = self.taken_lock().get_mut(&call) {
            *taken = (*taken).max(bytes);
        }
        self.taken.notify_waiters();
    }

    /// Resolves once no call runs.
    async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.lock().is_empty() {
                return;
            }
            emptied.await;
        }
    }

    /// How long the runner has had nothing to run, if it has nothing now.
    fn idle_for(&self) -> Option<Duration> {
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
struct CallGuard {
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
    async fn run(
        handoff: Arc<Handoff>,
        registry: &'static Registry,
        mut control: mpsc::UnboundedReceiver<Control>,
        app: tokio::runtime::Handle,
    ) -> Exit {
        let boot_deadline = crate::deadline::after(handoff.boot_timeout);
        let (rd, wr) = match terminator::connect(&handoff).await {
            Ok(halves) => halves,
            Err(exit) => return exit,
        };
        let out = Outbox::new();
        let writer = tokio::spawn(protocol::write_loop(wr, out.clone()));
        let mut reader = Reader::new(rd);
        let service = Service {
            handoff: handoff.clone(),
            in_process: (!matches!(process_handoff(), Some(Ok(h)) if Arc::ptr_eq(h, &handoff)))
                .then(|| Parent::new(handoff.clone())),
            registry,
            out: out.clone(),
            calls: Arc::new(Calls {
                running: Mutex::new(CallMap::default()),
                emptied: Notify::new(),
                last_end: Mutex::new(Instant::now()),
                out,
                routes: Routes::default(),
                results_taken: Mutex::new(CallMap::default()),
                taken: Notify::new(),
            }),
            dispatch: dispatcher(&app),
            max_payload: Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX)),
        };
        service.send(&ToParent::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            runner_id: handoff.runner_id.clone(),
            token: handoff.token,
            fingerprint: crate::protocol::handshake::fingerprint().to_string(),
            manifest_hash: registry.manifest_hash,
            manifest: registry.manifest.clone(),
        }));
        let welcome = match tokio::time::timeout_at(boot_deadline, reader.next::<ToRunner>()).await
        {
            Ok(Some(Ok(ToRunner::Welcome(w)))) => w,
            Ok(Some(Ok(ToRunner::Refused { reason }))) => return Exit::Refused(reason),
            Ok(Some(Ok(other))) => {
                return Exit::ParentLost(format!("expected a welcome, got {other:?}"));
            }
            Ok(Some(Err(e))) => return Exit::ParentLost(e.to_string()),
            Ok(None) => {
                return Exit::ParentLost(
                    "the parent closed the connection during the handshake".into(),
                );
            }
            Err(_) => {
                return Exit::Unreachable(
                    "the parent did not answer the handshake in the boot window".into(),
                );
            }
        };
        let max_payload = usize::try_from(welcome.max_payload).unwrap_or(usize::MAX);
        service
            .max_payload
            .store(max_payload, std::sync::atomic::Ordering::Relaxed);
        service.calls.routes.set_max_message(max_payload);
        // The pieces of big arguments received so far, by call: each call's `Run` brings the
        // last one.
        let mut uploads: CallMap<Vec<u8>> = CallMap::default();
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms.max(1));
        let mut watchdog = Watchdog::new(heartbeat.saturating_mul(welcome.miss_limit.max(1)));
        let idle_after = welcome.idle_ms.map(Duration::from_millis);
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Timers live across iterations: re-arming them per message would cost a timer-wheel
        // insert and removal for every call.
        let far_future = Instant::now() + Duration::from_secs(86400 * 365);
        let idle_timer =
            tokio::time::sleep_until(idle_after.map_or(far_future, crate::deadline::after));
        let grace_timer = tokio::time::sleep_until(far_future);
        tokio::pin!(idle_timer, grace_timer);
        // Once the parent or the platform asks us to stop: no new calls, and we end when the
        // last one does.
        let mut draining = false;
        // The parent itself gave a grace (a `Shutdown`): it stands even if the parent goes
        // away. A platform's stop (SIGTERM) is drained only for the parent's sake: if the parent
        // is lost meanwhile (the pod deleted with it, say), the failsafe stands.
        let mut granted = false;
        let all_done = service.calls.wait_empty();
        tokio::pin!(all_done);
        let mut control_open = true;
        let mut parent_open = true;

        let exit = loop {
            tokio::select! {
                // A failed `main` goes first: such a runner should take no more calls.
                biased;
                ctl = control.recv(), if control_open => match ctl {
                    Some(Control::BootFailed(reason)) => {
                        service.send(&ToParent::BootFailed { reason: reason.clone() });
                        break Exit::BootFailed(reason);
                    }
                    // Told to stop while finishing calls within a grace the parent gave (its
                    // death signal, say): the grace stands.
                    Some(Control::Terminate) if draining => {}
                    Some(Control::Terminate) => break Exit::Terminated,
                    Some(Control::Drain) => {
                        if !draining {
                            eprintln!(
                                "flame runner {}: stopped by its platform: finishing the calls in flight",
                                service.handoff.runner_id
                            );
                            service.send(&ToParent::Stopping);
                            draining = true;
                        }
                    }
                    // The host dropped its control handle: keep serving.
                    None => control_open = false,
                },
                frame = reader.next_frame(), if parent_open => {
                    watchdog.heard();
                    let frame = frame.map(|frame| frame.map(bytes::BytesMut::freeze));
                    let msg = match frame {
                        Some(Ok(frame)) => match protocol::run_frame(&frame) {
                            None if let Some(part) = protocol::part_frame(&frame, TO_RUNNER_PART) => {
                                match part.and_then(|part| service.add_part(&mut uploads, &part)) {
                                    Ok(()) => continue,
                                    Err(e) => Some(Err(e)),
                                }
                            }
                            None if let Some(chan) = protocol::chan_frame(&frame, TO_RUNNER_CHAN) => match chan {
                                Ok(chan) => {
                                    service.calls.routes.deliver(chan, &frame);
                                    continue;
                                }
                                Err(e) => Some(Err(e)),
                            },
                            // The hot path: a call, decoded without copying its arguments.
                            Some(Ok(run)) => {
                                let pieces = uploads.remove(&run.call).map(|mut pieces| {
                                    pieces.extend_from_slice(run.args);
                                    Bytes::from(pieces)
                                });
                                if draining {
                                    service.done(run.call, Outcome::Failed {
                                        kind: WireErrorKind::ShuttingDown,
                                        message: "the runner is shutting down".into(),
                                    });
                                } else {
                                    service.start(run, pieces);
                                }
                                continue;
                            }
                            Some(Err(e)) => Some(Err(e)),
                            None => Some(protocol::decode::<ToRunner>(&frame)),
                        },
                        Some(Err(e)) => Some(Err(e)),
                        None => None,
                    };
                    match msg {
                        Some(Ok(ToRunner::Cancel { call })) => {
                            let task = service.calls.lock().get(&call).cloned();
                            match task {
                                Some(task) => task.cancel(),
                                // Cancelled while its arguments were on their way, or just after
                                // it ended: nothing runs, which the parent waits to hear.
                                None => {
                                    uploads.remove(&call);
                                    service.send(&ToParent::Cancelled { call });
                                }
                            }
                        }
                        Some(Ok(ToRunner::Heartbeat)) => {}
                        Some(Ok(ToRunner::Took { call, bytes })) => service.calls.took(call, bytes),
                        Some(Ok(ToRunner::Shutdown { grace_ms })) => {
                            let until = crate::deadline::after(Duration::from_millis(grace_ms));
                            if !draining || until < grace_timer.deadline() {
                                grace_timer.as_mut().reset(until);
                            }
                            draining = true;
                            granted = true;
                        }
                        Some(Ok(other)) => break Exit::ParentLost(format!("unexpected message {other:?}")),
                        // A runner told to stop keeps the grace it was given even if the parent
                        // goes away meanwhile (Elixir FLAME #86): its tasks may be half-way
                        // through work worth finishing.
                        Some(Err(_)) | None if granted => parent_open = false,
                        Some(Err(e)) => break Exit::ParentLost(e.to_string()),
                        None => break Exit::ParentLost("the parent closed the connection".into()),
                    }
                }
                _ = &mut all_done, if draining => break Exit::Stopped,
                _ = ticker.tick() => {
                    if let Some(quiet) = watchdog.silent_for()
                        && !granted
                    {
                        break Exit::ParentLost(format!("no word from the parent for {quiet:?}"));
                    }
                    service.send(&ToParent::Heartbeat);
                }
                _ = &mut idle_timer, if !draining => {
                    let after = idle_after.expect("the idle timer runs only with an idle period");
                    match service.calls.idle_for() {
                        Some(idle) if idle >= after => {
                            service.send(&ToParent::Idle { idle_ms: crate::deadline::millis(idle) });
                            // The parent may keep us (min runners): tell it again later.
                            idle_timer.as_mut().reset(crate::deadline::after(after));
                        }
                        Some(idle) => idle_timer.as_mut().reset(crate::deadline::after(after.saturating_sub(idle))),
                        None => idle_timer.as_mut().reset(crate::deadline::after(after)),
                    }
                }
                _ = &mut grace_timer, if draining => break Exit::Stopped,
            }
        };
        // Drop every task before going away, so their kill_on_drop children die with them.
        let tasks: Vec<_> = service.calls.lock().values().cloned().collect();
        for task in tasks {
            task.cancel();
        }
        if tokio::time::timeout(DROP_WAIT, service.calls.wait_empty())
            .await
            .is_err()
        {
            LEFT_A_TASK_BEHIND.store(true, std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "flame runner {}: a task did not stop within {DROP_WAIT:?} of being dropped \
                 (it blocks its thread); exiting without it",
                handoff.runner_id
            );
        }
        service.out.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        exit
    }

    fn send(&self, msg: &ToParent) {
        self.out.send(msg);
    }

    /// Adds a piece of a call's big arguments to the others.
    fn add_part(
        &self,
        uploads: &mut CallMap<Vec<u8>>,
        part: &protocol::PartRef<'_>,
    ) -> Result<(), crate::error::Error> {
        let max = self.max_payload.load(Ordering::Relaxed);
        let total = usize::try_from(part.total).unwrap_or(usize::MAX);
        let whole = uploads
            .entry(part.call)
            .or_insert_with(|| crate::payload::buffer(total.min(max)));
        if total > max || whole.len() + part.data.len() > total {
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::Protocol,
                format!("arguments of {total} bytes in pieces overflow (max_payload is {max})"),
            ));
        }
        let before = whole.len();
        whole.extend_from_slice(part.data);
        if let Some(bytes) = protocol::took_to_report(before, whole.len()) {
            self.send(&ToParent::Took {
                call: part.call,
                bytes,
            });
        }
        Ok(())
    }

    fn done(&self, call: u64, outcome: Outcome) {
        self.out.send_done(call, outcome);
    }

    /// Starts a call. Arguments that came in pieces are decoded by the call's task on the app's
    /// runtime: decoding hundreds of MiB here would hold up every other call's frames.
    fn start(&self, run: RunRef<'_>, pieces: Option<Bytes>) {
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
        let task_id = def.id;
        let work = async move {
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
            // A result too big for one frame, sent in pieces below.
            let mut big = None;
            let result = match deadline {
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
            let outcome = match result {
                Err(_) => Outcome::Failed {
                    kind: WireErrorKind::TimedOut,
                    message: format!(
                        "{task_id} did not finish before its deadline; the runner dropped it"
                    ),
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
                    big = Some(encoded);
                    Outcome::Ok(Bytes::new())
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
            // The call's channels end before the parent hears it did: a half the task left
            // behind (in a detached task, say) must already say "the call ended" by the time the
            // parent can start another call that might use it.
            if guard.chans.get() > 0 {
                guard
                    .calls
                    .routes
                    .end_call(call, guard.chans.get(), End::Finished, false);
            }
            let out = &guard.calls.out;
            let outcome = match big {
                // Boxed: most calls have no big result, and their futures stay small.
                Some(result) => Box::pin(guard.calls.send_pieces(call, result)).await,
                None => outcome,
            };
            out.send_done(call, outcome);
            guard.finished.set(true);
        };
        let span = crate::trace::task_span(
            task_id,
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

/// Decodes a call's arguments, opening its channels, into the task's future; or reports why
/// they don't decode, ending the call (`None`).
fn prepare(
    guard: &CallGuard,
    def: &'static crate::task::TaskDef,
    args: &[u8],
) -> Option<crate::task::RunningTask> {
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
struct CallTask(Arc<dyn RunningCall>);

impl Future for CallTask {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.0.poll_call(cx)
    }
}

/// The app-runtime end of the hand-off: spawns the calls the protocol thread sends, from a
/// worker, so a batch of calls costs one cross-thread wake-up rather than one each (a spawn from
/// outside the runtime wakes a parked worker every time).
fn dispatcher(app: &tokio::runtime::Handle) -> mpsc::UnboundedSender<CallTask> {
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
