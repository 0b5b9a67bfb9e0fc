//! The reader of one runner connection, on the protocol's runtime: it takes the runner's
//! frames (results, pieces of big results, channel data, idle and stopping words), keeps the
//! heartbeat both ways, looks again at cancelled calls whose grace is over, and, when the
//! connection ends, tells the pool and fails (or retries) the calls that were running.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::{RunnerConn, Running};
use crate::channel::End;
use crate::error::{Error, ErrorKind};
use crate::protocol::{
    self, BoxRead, Heartbeat, Outcome, Reader, TO_PARENT_CHAN, TO_PARENT_PART, ToParent, ToRunner,
    Welcome,
};

/// The most a message or result may be: the pool's `max_payload`, as the runner is told.
pub(super) fn max_payload(welcome: &Welcome) -> usize {
    usize::try_from(welcome.max_payload).unwrap_or(usize::MAX)
}

/// Reads the connection until it ends, then closes it.
pub(super) async fn read(
    conn: Arc<RunnerConn>,
    reader: BoxRead,
    writer: tokio::task::JoinHandle<()>,
    welcome: Welcome,
) {
    let reason = Reading::new(&conn, &welcome).pump(reader).await;
    tracing::debug!(runner = %conn.id, reason = %reason, "flame: runner connection ended");
    writer.abort();
    conn.out.abandon();
    end(&conn, reason);
}

/// What the reader keeps between frames.
struct Reading<'a> {
    conn: &'a RunnerConn,
    max_payload: usize,
    heartbeat: Heartbeat,
}

impl<'a> Reading<'a> {
    fn new(conn: &'a RunnerConn, welcome: &Welcome) -> Self {
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms);
        Reading {
            conn,
            max_payload: max_payload(welcome),
            heartbeat: Heartbeat::new(heartbeat, welcome.miss_limit),
        }
    }

    /// Serves frames, cancel graces and heartbeats until the connection ends; returns why.
    async fn pump(mut self, reader: BoxRead) -> Error {
        let mut reader = Reader::new(reader);
        let far_future = Instant::now() + Duration::from_secs(86400 * 365);
        let overdue_timer = tokio::time::sleep_until(far_future);
        tokio::pin!(overdue_timer);
        let mut armed = far_future;
        loop {
            let due = self.conn.first_overdue().unwrap_or(far_future);
            if due != armed {
                overdue_timer.as_mut().reset(due);
                armed = due;
            }
            let flow = tokio::select! {
                biased;
                frame = reader.next_frame() => self.on_frame(frame),
                () = &mut overdue_timer, if armed != far_future => {
                    self.on_overdue();
                    ControlFlow::Continue(())
                }
                quiet = self.heartbeat.tick() => self.on_tick(quiet),
            };
            if let ControlFlow::Break(reason) = flow {
                return reason;
            }
        }
    }

    /// A frame from the runner: pieces of big results and channel data are taken in place,
    /// results (the hot path) decoded in place; anything else is decoded as a message.
    fn on_frame(&mut self, frame: Option<Result<BytesMut, Error>>) -> ControlFlow<Error> {
        self.heartbeat.heard();
        let (conn, id) = (self.conn, &self.conn.id);
        let msg = match frame {
            Some(Ok(frame)) => {
                let frame = frame.freeze();
                if let Some(part) = protocol::part_frame(&frame, TO_PARENT_PART) {
                    return match part.and_then(|part| conn.add_result_part(&part, self.max_payload))
                    {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(e) => ControlFlow::Break(Error::new(
                            ErrorKind::RunnerLost,
                            format!("runner {id}: {e}"),
                        )),
                    };
                }
                match protocol::chan_frame(&frame, TO_PARENT_CHAN) {
                    Some(Ok(chan)) => {
                        conn.routes.deliver(chan, &frame);
                        return ControlFlow::Continue(());
                    }
                    Some(Err(e)) => Some(Err(e)),
                    // Results, the hot path, are decoded in place.
                    None => Some(
                        protocol::done_frame(&frame)
                            .unwrap_or_else(|| protocol::decode::<ToParent>(&frame)),
                    ),
                }
            }
            Some(Err(e)) => Some(Err(e)),
            None => None,
        };
        self.on_message(msg)
    }

    fn on_message(&mut self, msg: Option<Result<ToParent, Error>>) -> ControlFlow<Error> {
        let (conn, id, key) = (self.conn, &self.conn.id, self.conn.key);
        let lost = |why: String| ControlFlow::Break(Error::new(ErrorKind::RunnerLost, why));
        match msg {
            Some(Ok(ToParent::Done { call, outcome })) => self.on_done(call, outcome),
            Some(Ok(ToParent::Cancelled { call })) => self.on_cancelled(call),
            // Channel frames and pieces were handled above.
            Some(Ok(ToParent::Chan(_) | ToParent::Part(_))) => {}
            Some(Ok(ToParent::Heartbeat)) => {}
            Some(Ok(ToParent::Idle { idle_ms })) => {
                conn.owner.idle(key, Duration::from_millis(idle_ms))
            }
            Some(Ok(ToParent::Stopping)) => conn.owner.stopping(key),
            Some(Ok(ToParent::Took { call, bytes })) => {
                if let Some(running) = conn.lock().calls.get_mut(&call) {
                    running.took = running.took.max(bytes);
                }
                conn.progress.notify_waiters();
            }
            Some(Ok(ToParent::BootFailed { reason })) => {
                let why = format!("runner {id}: main returned an error: {reason}");
                return ControlFlow::Break(Error::new(ErrorKind::BootFailed, why));
            }
            Some(Ok(ToParent::Hello(_) | ToParent::StartTls { .. })) => {
                return lost(format!("runner {id} broke the protocol (a second hello)"));
            }
            Some(Err(e)) => return lost(format!("runner {id}: {e}")),
            None => {
                return lost(format!(
                    "runner {id} closed its connection (it exited or crashed)"
                ));
            }
        }
        ControlFlow::Continue(())
    }

    /// A call's result: its caller gets it, and its slot is free.
    fn on_done(&self, id: u64, outcome: Outcome) {
        let conn = self.conn;
        // Only a call that runs here counts: a runner can send anything.
        let Some(Running {
            call,
            slot,
            chans,
            result: parts,
            ..
        }) = conn.finish(id)
        else {
            return;
        };
        conn.owner.served();
        // A big result: its last piece came with the `Done`.
        let outcome = match (outcome, parts) {
            (Outcome::Ok(last), Some(mut whole)) => {
                whole.extend_from_slice(&last);
                Outcome::Ok(Bytes::from(whole))
            }
            (outcome, _) => outcome,
        };
        let result = outcome.into_result();
        if chans > 0 {
            // A task that failed may have cut its streams short: say so.
            let end = match &result {
                Ok(_) => End::Finished,
                Err(e) => End::Failed(e),
            };
            conn.routes.end_call(id, chans, end, true);
        }
        // Free the slot before waking the caller, so its next call finds it.
        drop(slot);
        call.ticket.resolve(result);
    }

    /// The runner dropped a call's future: asked to (a cancel), or on its own, as it does when
    /// it stops (a signal, its grace over), when its caller must hear why.
    fn on_cancelled(&self, id: u64) {
        let conn = self.conn;
        let Some(Running {
            call,
            chans,
            cancelled,
            ..
        }) = conn.finish(id)
        else {
            return;
        };
        if chans > 0 {
            conn.routes.end_call(id, chans, End::Cancelled, true);
        }
        if !cancelled {
            call.ticket.resolve(Err(Error::new(
                ErrorKind::RunnerLost,
                format!(
                    "runner {} ended the call before it finished: it is stopping (a signal, or its grace ran out)",
                    conn.id
                ),
            )));
        }
    }

    /// Cancelled calls past their grace that still run block their thread or never yield: their
    /// runner is recycled and their slots freed.
    fn on_overdue(&self) {
        let conn = self.conn;
        for call in conn.take_overdue(Instant::now()) {
            let stuck = (conn.lock().calls.get_mut(&call))
                .and_then(|r| Some((r.slot.take()?, r.call.def.id)));
            if let Some((slot, task)) = stuck {
                conn.owner.recycle(conn.key, task, call);
                drop(slot);
            }
        }
    }

    /// A heartbeat tick: ours goes out, unless the runner has been silent too long.
    fn on_tick(&mut self, quiet: Option<Duration>) -> ControlFlow<Error> {
        if let Some(quiet) = quiet {
            let missed = quiet.as_millis() / self.heartbeat.interval().as_millis().max(1);
            let why = format!(
                "runner {} sent nothing for {quiet:?} (missed {missed} heartbeats)",
                self.conn.id
            );
            return ControlFlow::Break(Error::new(ErrorKind::RunnerLost, why));
        }
        self.conn.push(&ToRunner::Heartbeat);
        ControlFlow::Continue(())
    }
}

/// The connection ended for `reason`: the pool forgets the runner, then every call that ran
/// there is failed with the reason, or tried again if it asked for retries.
fn end(conn: &RunnerConn, reason: Error) {
    let _ = conn.ended.set(reason.clone());
    // Forget the runner first, so the slots released below are not handed out on it.
    conn.owner.gone(conn.key, &reason);
    let running = {
        let mut in_flight = conn.lock();
        in_flight.closed = true;
        std::mem::take(&mut in_flight.calls)
    };
    conn.progress.notify_waiters();
    for (
        id,
        Running {
            mut call,
            args,
            slot,
            chans,
            ..
        },
    ) in running
    {
        if chans > 0 {
            conn.routes.end_call(id, chans, End::Failed(&reason), true);
        }
        drop(slot);
        if call.take_retry(&reason) {
            call.ticket.requeue(args);
            tracing::debug!(runner = %conn.id, task = call.def.id, "flame: retrying a call whose runner was lost");
            conn.owner.resubmit(call);
        } else {
            call.ticket.resolve(Err(reason.clone()));
        }
    }
}
