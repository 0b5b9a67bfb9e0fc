//! The parent's side of one runner connection: every call to that runner goes through here.
//!
//! Callers talk to the connection task through an unbounded queue, so a cancel can be sent from
//! `Drop` without awaiting. The task owns the pending calls: each holds its caller's reply and
//! its pool slot, which is released only when the runner reports the call over (done, or its
//! future dropped after a cancel), so a runner never runs more than `max_concurrency` calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Error, ErrorKind};
use crate::pool::{Shared, Slot};
use crate::wire::{self, BoxRead, BoxWrite, Reader, ToParent, ToRunner, Welcome};

pub(crate) type Reply = oneshot::Sender<Result<Bytes, Error>>;

pub(crate) enum Cmd {
    Run {
        call: u64,
        task: &'static str,
        args: Bytes,
        deadline: Option<Instant>,
        reply: Reply,
        slot: Slot,
    },
    Cancel {
        call: u64,
    },
    Shutdown {
        grace: Duration,
    },
}

/// A handle to a runner connection, shared by the pool and in-flight calls.
pub(crate) struct RunnerConn {
    pub(crate) id: String,
    cmds: mpsc::UnboundedSender<Cmd>,
    next_call: AtomicU64,
}

impl RunnerConn {
    pub(crate) fn next_call(&self) -> u64 {
        self.next_call.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a command. If the connection is gone the command is dropped, which drops its
    /// reply (the caller sees the runner lost) and its slot.
    pub(crate) fn send(&self, cmd: Cmd) {
        let _ = self.cmds.send(cmd);
    }
}

/// Takes over an accepted runner connection: sends the welcome and starts the connection task.
pub(crate) fn start(
    shared: Arc<Shared>,
    key: u64,
    id: String,
    (reader, writer): (BoxRead, BoxWrite),
    welcome: Welcome,
) -> Arc<RunnerConn> {
    let (cmds, cmd_rx) = mpsc::unbounded_channel();
    let conn = Arc::new(RunnerConn {
        id,
        cmds,
        next_call: AtomicU64::new(1),
    });
    tokio::spawn(run(
        shared,
        key,
        conn.id.clone(),
        reader,
        writer,
        welcome,
        cmd_rx,
    ));
    conn
}

struct Pending {
    /// `None` once the caller cancelled: the result, if it still comes, is dropped.
    reply: Option<Reply>,
    _slot: Slot,
}

async fn run(
    shared: Arc<Shared>,
    key: u64,
    id: String,
    rd: BoxRead,
    wr: BoxWrite,
    welcome: Welcome,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let heartbeat = Duration::from_millis(welcome.heartbeat_ms);
    let silence_limit = heartbeat * welcome.miss_limit;
    let (out, out_rx) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(wire::write_loop(wr, out_rx));
    let send = |msg: &ToRunner| {
        if let Ok(frame) = wire::encode(msg) {
            let _ = out.send(frame);
        }
    };
    send(&ToRunner::Welcome(welcome));
    let mut reader = Reader::new(rd);
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut last_heard = Instant::now();
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let reason: Error = loop {
        tokio::select! {
            biased;
            msg = reader.next::<ToParent>() => {
                last_heard = Instant::now();
                match msg {
                    Some(Ok(ToParent::Done { call, outcome })) => {
                        shared.note_served();
                        if let Some(p) = pending.remove(&call) {
                            // Free the slot before waking the caller, so its next call finds it.
                            let Pending { reply, _slot } = p;
                            drop(_slot);
                            if let Some(reply) = reply {
                                let _ = reply.send(outcome.into_result());
                            }
                        }
                    }
                    Some(Ok(ToParent::Cancelled { call })) => {
                        pending.remove(&call);
                    }
                    Some(Ok(ToParent::Heartbeat)) => {}
                    Some(Ok(ToParent::Idle { idle_ms })) => shared.runner_idle(key, Duration::from_millis(idle_ms)),
                    Some(Ok(ToParent::BootFailed { reason })) => {
                        break Error::new(ErrorKind::BootFailed, format!("runner {id}: main returned an error: {reason}"));
                    }
                    Some(Ok(ToParent::Hello(_) | ToParent::StartTls { .. })) => {
                        break Error::new(ErrorKind::RunnerLost, format!("runner {id} broke the protocol (a second hello)"));
                    }
                    Some(Err(e)) => break Error::new(ErrorKind::RunnerLost, format!("runner {id}: {e}")),
                    None => break Error::new(ErrorKind::RunnerLost, format!("runner {id} closed its connection (it exited or crashed)")),
                }
            }
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Run { call, task, args, deadline, reply, slot }) => {
                    let deadline_ms = deadline.map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64);
                    send(&ToRunner::Run { call, task: task.to_string(), args, deadline_ms });
                    pending.insert(call, Pending { reply: Some(reply), _slot: slot });
                }
                Some(Cmd::Cancel { call }) => {
                    if let Some(p) = pending.get_mut(&call) {
                        p.reply = None;
                        send(&ToRunner::Cancel { call });
                    }
                }
                Some(Cmd::Shutdown { grace }) => {
                    send(&ToRunner::Shutdown { grace_ms: grace.as_millis() as u64 });
                }
                // The pool is gone: nobody can reach this runner any more.
                None => break Error::new(ErrorKind::PoolClosed, "the pool was dropped"),
            },
            _ = ticker.tick() => {
                let quiet = last_heard.elapsed();
                if quiet >= silence_limit {
                    break Error::new(
                        ErrorKind::RunnerLost,
                        format!("runner {id} sent nothing for {quiet:?} (missed {} heartbeats)", welcome_misses(heartbeat, quiet)),
                    );
                }
                send(&ToRunner::Heartbeat);
            }
        }
    };
    tracing::debug!(runner = %id, reason = %reason, "flame: runner connection ended");
    // Forget the runner first, so the slots released below are not handed out on it.
    shared.runner_gone(key, &reason);
    for (_, p) in pending.drain() {
        if let Some(reply) = p.reply {
            let _ = reply.send(Err(reason.clone()));
        }
    }
}

fn welcome_misses(heartbeat: Duration, quiet: Duration) -> u128 {
    quiet.as_millis() / heartbeat.as_millis().max(1)
}
