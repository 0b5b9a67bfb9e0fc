//! The runner side: dial the parent, prove who we are, then run the calls it sends until it
//! lets us go. One Tokio task per call, so a panic or a slow task never blocks the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::parent::{Handoff, Parent, TASK_PARENT};
use crate::task::{Registry, registry};
use crate::terminator::{self, Exit, Watchdog};
use crate::wire::{
    self, Hello, MAX_FRAME, Outcome, PROTOCOL_VERSION, Reader, ToParent, ToRunner, WireErrorKind,
};

/// Told to a running service by the process hosting it.
#[derive(Debug)]
pub(crate) enum Control {
    /// The app's `main` failed: report it to the parent and stop.
    BootFailed(String),
    /// Stop now (SIGTERM).
    Terminate,
}

/// Serves one runner's connection to its parent until it ends, then drops every task.
pub(crate) async fn serve(
    handoff: Arc<Handoff>,
    control: mpsc::UnboundedReceiver<Control>,
) -> Exit {
    let exit = match registry() {
        Ok(reg) => Service::run(handoff.clone(), reg, control).await,
        Err(e) => Exit::Unreachable(e.to_string()),
    };
    if !matches!(exit, Exit::Stopped | Exit::Terminated) {
        eprintln!("flame runner {}: {exit}", handoff.runner_id);
    }
    exit
}

struct Service {
    parent: Parent,
    registry: &'static Registry,
    out: mpsc::UnboundedSender<Bytes>,
    tasks: JoinSet<Outcome>,
    by_call: HashMap<u64, AbortHandle>,
    by_task: HashMap<tokio::task::Id, u64>,
}

impl Service {
    async fn run(
        handoff: Arc<Handoff>,
        registry: &'static Registry,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) -> Exit {
        let boot_deadline = Instant::now() + handoff.boot_timeout;
        let (rd, wr) = match terminator::connect(&handoff).await {
            Ok(halves) => halves,
            Err(exit) => return exit,
        };
        let (out, out_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(wire::write_loop(wr, out_rx));
        let mut reader = Reader::new(rd);
        let mut service = Service {
            parent: Parent::new(handoff.clone()),
            registry,
            out,
            tasks: JoinSet::new(),
            by_call: HashMap::new(),
            by_task: HashMap::new(),
        };
        service.send(&ToParent::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            runner_id: handoff.runner_id.clone(),
            token: handoff.token,
            fingerprint: crate::handshake::fingerprint().to_string(),
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
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms.max(1));
        let mut watchdog = Watchdog::new(heartbeat * welcome.miss_limit.max(1));
        let idle_after = welcome.idle_ms.map(Duration::from_millis);
        // When the runner last became idle, and when it next tells the parent so.
        let mut idle_since = Instant::now();
        let mut idle_report = idle_after.map(|after| idle_since + after);
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set once the parent asks us to stop: no new calls, and this is when we stop waiting.
        let mut draining: Option<Instant> = None;
        let far_future = Instant::now() + Duration::from_secs(86400 * 365);
        let mut control_open = true;
        let mut parent_open = true;

        let exit = loop {
            let idle_at = match idle_report {
                Some(at) if service.tasks.is_empty() && draining.is_none() => at,
                _ => far_future,
            };
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
                    Some(Control::Terminate) if draining.is_some() => {}
                    Some(Control::Terminate) => break Exit::Terminated,
                    // The host dropped its control handle: keep serving.
                    None => control_open = false,
                },
                msg = reader.next::<ToRunner>(), if parent_open => {
                    watchdog.heard();
                    match msg {
                        Some(Ok(ToRunner::Run { call, task, args, deadline_ms })) => {
                            if draining.is_some() {
                                service.done(call, Outcome::Failed {
                                    kind: WireErrorKind::ShuttingDown,
                                    message: "the runner is shutting down".into(),
                                });
                            } else {
                                service.start(call, &task, &args, deadline_ms);
                            }
                        }
                        Some(Ok(ToRunner::Cancel { call })) => {
                            if let Some(task) = service.by_call.get(&call) {
                                task.abort();
                            }
                        }
                        Some(Ok(ToRunner::Heartbeat)) => {}
                        Some(Ok(ToRunner::Shutdown { grace_ms })) => {
                            if service.tasks.is_empty() {
                                break Exit::Stopped;
                            }
                            let until = Instant::now() + Duration::from_millis(grace_ms);
                            draining = Some(draining.map_or(until, |d| d.min(until)));
                        }
                        Some(Ok(other)) => break Exit::ParentLost(format!("unexpected message {other:?}")),
                        // A runner told to stop keeps the grace it was given even if the parent
                        // goes away meanwhile (Elixir FLAME #86): its tasks may be half-way
                        // through work worth finishing.
                        Some(Err(_)) | None if draining.is_some() => parent_open = false,
                        Some(Err(e)) => break Exit::ParentLost(e.to_string()),
                        None => break Exit::ParentLost("the parent closed the connection".into()),
                    }
                }
                Some(joined) = service.tasks.join_next_with_id(), if !service.tasks.is_empty() => {
                    service.finished(joined);
                    if service.tasks.is_empty() {
                        if draining.is_some() {
                            break Exit::Stopped;
                        }
                        idle_since = Instant::now();
                        idle_report = idle_after.map(|after| idle_since + after);
                    }
                }
                _ = ticker.tick() => {
                    if draining.is_none()
                        && let Some(exit) = watchdog.silent()
                    {
                        break exit;
                    }
                    service.send(&ToParent::Heartbeat);
                }
                _ = tokio::time::sleep_until(idle_at) => {
                    let idle_ms = idle_since.elapsed().as_millis() as u64;
                    service.send(&ToParent::Idle { idle_ms });
                    // The parent may keep us (min runners): tell it again after another period.
                    idle_report = idle_after.map(|after| idle_at + after);
                }
                _ = tokio::time::sleep_until(draining.unwrap_or(far_future)) => break Exit::Stopped,
            }
        };
        // Drop every task before going away, so their kill_on_drop children die with them.
        service.tasks.shutdown().await;
        let Service { out, .. } = service;
        drop(out);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        exit
    }

    fn send(&self, msg: &ToParent) {
        match wire::encode(msg) {
            Ok(frame) => {
                let _ = self.out.send(frame);
            }
            Err(e) => tracing::error!(error = %e, "flame runner: cannot encode a message"),
        }
    }

    fn done(&self, call: u64, outcome: Outcome) {
        self.send(&ToParent::Done { call, outcome });
    }

    fn start(&mut self, call: u64, task: &str, args: &[u8], deadline_ms: Option<u64>) {
        let Some(def) = self.registry.get(task) else {
            return self.done(
                call,
                Outcome::Failed {
                    kind: WireErrorKind::UnknownTask,
                    message: format!("this runner has no task {task:?}"),
                },
            );
        };
        let body = match (def.invoke)(args) {
            Ok(body) => body,
            Err(message) => {
                return self.done(
                    call,
                    Outcome::Failed {
                        kind: WireErrorKind::Codec,
                        message: format!("{task}: {message}"),
                    },
                );
            }
        };
        let deadline = deadline_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
        let task_id = def.id;
        let work = async move {
            let result = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, body).await {
                    Ok(result) => result,
                    Err(_) => {
                        return Outcome::Failed {
                            kind: WireErrorKind::TimedOut,
                            message: format!(
                                "{task_id} did not finish before its deadline; the runner dropped it"
                            ),
                        };
                    }
                },
                None => body.await,
            };
            match result {
                Ok(bytes) if bytes.len() > MAX_FRAME - 1024 => Outcome::Failed {
                    kind: WireErrorKind::Codec,
                    message: format!(
                        "the result of {task_id} is {} bytes, more than the {MAX_FRAME}-byte frame limit; \
                         stream large data through a flame channel instead",
                        bytes.len()
                    ),
                },
                Ok(bytes) => Outcome::Ok(bytes),
                Err(message) => Outcome::Failed {
                    kind: WireErrorKind::Codec,
                    message: format!("{task_id}: {message}"),
                },
            }
        };
        let handle = self
            .tasks
            .spawn(TASK_PARENT.scope(self.parent.clone(), work));
        self.by_task.insert(handle.id(), call);
        self.by_call.insert(call, handle);
    }

    fn finished(&mut self, joined: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>) {
        let (id, outcome) = match joined {
            Ok((id, outcome)) => (id, Some(outcome)),
            Err(e) if e.is_cancelled() => (e.id(), None),
            Err(e) => {
                let id = e.id();
                (id, Some(Outcome::Panicked(panic_message(e.into_panic()))))
            }
        };
        let Some(call) = self.by_task.remove(&id) else {
            return;
        };
        self.by_call.remove(&call);
        match outcome {
            Some(outcome) => self.done(call, outcome),
            None => self.send(&ToParent::Cancelled { call }),
        }
    }
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
