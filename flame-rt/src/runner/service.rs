//! The runner's service loop: dial the parent, prove who we are, then serve its frames —
//! calls, cancels, channel data, heartbeats, a shutdown with its grace — until it lets us go,
//! and drop every call before leaving.

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::Control;
use super::calls::{CallTask, Calls, dispatcher};
use super::terminator::{self, Exit};
use crate::error::Error;
use crate::parent::{Handoff, Parent, process_handoff};
use crate::protocol::{
    self, BoxRead, CallMap, Heartbeat, Hello, Outbox, Outcome, PROTOCOL_VERSION, Reader,
    TO_RUNNER_CHAN, TO_RUNNER_PART, ToParent, ToRunner, Welcome, WireErrorKind,
};
use crate::task::Registry;

pub(super) struct Service {
    pub(super) handoff: Arc<Handoff>,
    /// Set for a runner inside the parent's process (`LocalBackend`), whose tasks learn who
    /// their parent is from a task-local; a runner process knows it from its environment.
    pub(super) in_process: Option<Parent>,
    pub(super) registry: &'static Registry,
    out: Arc<Outbox>,
    pub(super) calls: Arc<Calls>,
    /// Hands calls to the dispatcher on the app's runtime, where they run.
    pub(super) dispatch: mpsc::UnboundedSender<CallTask>,
    /// The largest result a call may return, from the parent's welcome.
    pub(super) max_payload: AtomicUsize,
}

/// What the service loop keeps between events.
struct Serving {
    /// The pieces of big arguments received so far, by call: each call's `Run` brings the last.
    uploads: CallMap<Vec<u8>>,
    heartbeat: Heartbeat,
    idle_after: Option<Duration>,
    /// Once the parent or the platform asks us to stop: no new calls, and we end when the last
    /// one does.
    draining: bool,
    /// The parent itself gave a grace (a `Shutdown`): it stands even if the parent goes away.
    /// A platform's stop (SIGTERM) is drained only for the parent's sake: if the parent is lost
    /// meanwhile (the pod deleted with it, say), the failsafe stands.
    granted: bool,
    control_open: bool,
    parent_open: bool,
}

impl Service {
    pub(super) async fn run(
        handoff: Arc<Handoff>,
        registry: &'static Registry,
        control: mpsc::UnboundedReceiver<Control>,
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
            calls: Arc::new(Calls::new(out)),
            dispatch: dispatcher(&app),
            max_payload: AtomicUsize::new(usize::MAX),
        };
        let exit = match service.greet(&mut reader, boot_deadline).await {
            Ok(welcome) => service.serve(reader, welcome, control).await,
            Err(exit) => exit,
        };
        service.stop(writer).await;
        exit
    }

    /// Says hello and waits for the parent's welcome, within the boot window.
    async fn greet(
        &self,
        reader: &mut Reader<BoxRead>,
        boot_deadline: Instant,
    ) -> Result<Welcome, Exit> {
        let registry = self.registry;
        self.send(&ToParent::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            runner_id: self.handoff.runner_id.clone(),
            token: self.handoff.token,
            fingerprint: crate::protocol::handshake::fingerprint().to_string(),
            manifest_hash: registry.manifest_hash,
            manifest: registry.manifest.clone(),
        }));
        let welcome = match tokio::time::timeout_at(boot_deadline, reader.next::<ToRunner>()).await
        {
            Ok(Some(Ok(ToRunner::Welcome(w)))) => w,
            Ok(Some(Ok(ToRunner::Refused { reason }))) => return Err(Exit::Refused(reason)),
            Ok(Some(Ok(other))) => {
                return Err(Exit::ParentLost(format!(
                    "expected a welcome, got {other:?}"
                )));
            }
            Ok(Some(Err(e))) => return Err(Exit::ParentLost(e.to_string())),
            Ok(None) => {
                return Err(Exit::ParentLost(
                    "the parent closed the connection during the handshake".into(),
                ));
            }
            Err(_) => {
                return Err(Exit::Unreachable(
                    "the parent did not answer the handshake in the boot window".into(),
                ));
            }
        };
        let max_payload = usize::try_from(welcome.max_payload).unwrap_or(usize::MAX);
        self.max_payload.store(max_payload, Ordering::Relaxed);
        self.calls.routes.set_max_message(max_payload);
        Ok(welcome)
    }

    /// Serves the parent's frames until the runner must exit, and says why.
    async fn serve(
        &self,
        mut reader: Reader<BoxRead>,
        welcome: Welcome,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) -> Exit {
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms);
        let mut state = Serving {
            uploads: CallMap::default(),
            heartbeat: Heartbeat::new(heartbeat, welcome.miss_limit),
            idle_after: welcome.idle_ms.map(Duration::from_millis),
            draining: false,
            granted: false,
            control_open: true,
            parent_open: true,
        };
        // Timers live across iterations: re-arming them per message would cost a timer-wheel
        // insert and removal for every call.
        let far_future = Instant::now() + Duration::from_secs(86400 * 365);
        let idle_timer =
            tokio::time::sleep_until(state.idle_after.map_or(far_future, crate::deadline::after));
        let grace_timer = tokio::time::sleep_until(far_future);
        tokio::pin!(idle_timer, grace_timer);
        let all_done = self.calls.wait_empty();
        tokio::pin!(all_done);
        loop {
            let flow = tokio::select! {
                // A failed `main` goes first: such a runner should take no more calls.
                biased;
                ctl = control.recv(), if state.control_open => state.on_control(self, ctl),
                frame = reader.next_frame(), if state.parent_open => {
                    state.on_frame(self, frame, grace_timer.as_mut())
                }
                _ = &mut all_done, if state.draining => ControlFlow::Break(Exit::Stopped),
                quiet = state.heartbeat.tick() => state.on_tick(self, quiet),
                _ = &mut idle_timer, if !state.draining => {
                    state.on_idle_timer(self, idle_timer.as_mut());
                    ControlFlow::Continue(())
                }
                _ = &mut grace_timer, if state.draining => ControlFlow::Break(Exit::Stopped),
            };
            if let ControlFlow::Break(exit) = flow {
                return exit;
            }
        }
    }

    /// Drops every call before going away (see the terminator), then lets the last frames
    /// out.
    async fn stop(&self, writer: tokio::task::JoinHandle<()>) {
        terminator::drop_every_call(&self.calls, &self.handoff.runner_id).await;
        self.out.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    }

    pub(super) fn send(&self, msg: &ToParent) {
        self.out.send(msg);
    }

    /// Adds a piece of a call's big arguments to the others.
    pub(super) fn add_part(
        &self,
        uploads: &mut CallMap<Vec<u8>>,
        part: &protocol::PartRef<'_>,
    ) -> Result<(), Error> {
        let max = self.max_payload.load(Ordering::Relaxed);
        if let Some(bytes) = part.add_to(
            |capacity| {
                uploads
                    .entry(part.call)
                    .or_insert_with(|| crate::payload::buffer(capacity))
            },
            max,
            "arguments",
        )? {
            self.send(&ToParent::Took {
                call: part.call,
                bytes,
            });
        }
        Ok(())
    }

    pub(super) fn done(&self, call: u64, outcome: Outcome) {
        self.out.send_done(call, outcome);
    }
}

impl Serving {
    fn on_control(&mut self, service: &Service, ctl: Option<Control>) -> ControlFlow<Exit> {
        match ctl {
            Some(Control::BootFailed(reason)) => {
                service.send(&ToParent::BootFailed {
                    reason: reason.clone(),
                });
                return ControlFlow::Break(Exit::BootFailed(reason));
            }
            // Told to stop while finishing calls within a grace the parent gave (its death
            // signal, say): the grace stands.
            Some(Control::Terminate) if self.draining => {}
            Some(Control::Terminate) => return ControlFlow::Break(Exit::Terminated),
            Some(Control::Drain) => {
                if !self.draining {
                    eprintln!(
                        "flame runner {}: stopped by its platform: finishing the calls in flight",
                        service.handoff.runner_id
                    );
                    service.send(&ToParent::Stopping);
                    self.draining = true;
                }
            }
            // The host dropped its control handle: keep serving.
            None => self.control_open = false,
        }
        ControlFlow::Continue(())
    }

    /// A frame from the parent: calls, pieces of their arguments and channel data are taken
    /// in place, on the hot path; anything else is decoded as a message.
    fn on_frame(
        &mut self,
        service: &Service,
        frame: Option<Result<BytesMut, Error>>,
        grace_timer: Pin<&mut Sleep>,
    ) -> ControlFlow<Exit> {
        self.heartbeat.heard();
        let frame = match frame {
            Some(Ok(frame)) => frame.freeze(),
            Some(Err(e)) => return self.on_message(service, Some(Err(e)), grace_timer),
            None => return self.on_message(service, None, grace_timer),
        };
        let msg = match protocol::run_frame(&frame) {
            None if let Some(part) = protocol::part_frame(&frame, TO_RUNNER_PART) => {
                match part.and_then(|part| service.add_part(&mut self.uploads, &part)) {
                    Ok(()) => return ControlFlow::Continue(()),
                    Err(e) => Err(e),
                }
            }
            None if let Some(chan) = protocol::chan_frame(&frame, TO_RUNNER_CHAN) => match chan {
                Ok(chan) => {
                    service.calls.routes.deliver(chan, &frame);
                    return ControlFlow::Continue(());
                }
                Err(e) => Err(e),
            },
            // The hot path: a call, decoded without copying its arguments.
            Some(Ok(run)) => {
                let pieces = self.uploads.remove(&run.call).map(|mut pieces| {
                    pieces.extend_from_slice(run.args);
                    Bytes::from(pieces)
                });
                if self.draining {
                    let refused = Outcome::Failed {
                        kind: WireErrorKind::ShuttingDown,
                        message: "the runner is shutting down".into(),
                    };
                    service.done(run.call, refused);
                    if let Some(pieces) = pieces {
                        crate::io_runtime::let_go(pieces);
                    }
                } else {
                    service.start(run, pieces);
                }
                return ControlFlow::Continue(());
            }
            Some(Err(e)) => Err(e),
            None => protocol::decode::<ToRunner>(&frame),
        };
        self.on_message(service, Some(msg), grace_timer)
    }

    fn on_message(
        &mut self,
        service: &Service,
        msg: Option<Result<ToRunner, Error>>,
        grace_timer: Pin<&mut Sleep>,
    ) -> ControlFlow<Exit> {
        match msg {
            Some(Ok(ToRunner::Cancel { call })) => {
                // Cancelled while its arguments were on their way, or just after it ended:
                // nothing runs, which the parent waits to hear.
                if !service.calls.cancel(call) {
                    // Up to `max_payload` of pieces: freed off this thread.
                    if let Some(partial) = self.uploads.remove(&call) {
                        crate::io_runtime::let_go(partial);
                    }
                    service.send(&ToParent::Cancelled { call });
                }
            }
            Some(Ok(ToRunner::Heartbeat)) => {}
            Some(Ok(ToRunner::Took { call, bytes })) => service.calls.took(call, bytes),
            Some(Ok(ToRunner::Shutdown { grace_ms })) => {
                let until = crate::deadline::after(Duration::from_millis(grace_ms));
                if !self.draining || until < grace_timer.deadline() {
                    grace_timer.reset(until);
                }
                self.draining = true;
                self.granted = true;
            }
            Some(Ok(other)) => {
                return ControlFlow::Break(Exit::ParentLost(format!(
                    "unexpected message {other:?}"
                )));
            }
            // A runner told to stop keeps the grace it was given even if the parent goes away
            // meanwhile (Elixir FLAME #86): its tasks may be half-way through work worth
            // finishing.
            Some(Err(_)) | None if self.granted => self.parent_open = false,
            Some(Err(e)) => return ControlFlow::Break(Exit::ParentLost(e.to_string())),
            None => {
                return ControlFlow::Break(Exit::ParentLost(
                    "the parent closed the connection".into(),
                ));
            }
        }
        ControlFlow::Continue(())
    }

    /// A heartbeat tick: the runner's own heartbeat goes out, unless the parent has been
    /// silent too long.
    fn on_tick(&mut self, service: &Service, quiet: Option<Duration>) -> ControlFlow<Exit> {
        if let Some(lost) = terminator::parent_silent(quiet, self.granted) {
            return ControlFlow::Break(lost);
        }
        service.send(&ToParent::Heartbeat);
        ControlFlow::Continue(())
    }

    /// Tells the parent the runner is idle once it has been for the idle period, and again
    /// each period after (the parent may keep it, for `min`).
    fn on_idle_timer(&self, service: &Service, timer: Pin<&mut Sleep>) {
        let after = (self.idle_after).expect("the idle timer runs only with an idle period");
        match service.calls.idle_for() {
            Some(idle) if idle >= after => {
                let idle_ms = crate::deadline::millis(idle);
                service.send(&ToParent::Idle { idle_ms });
                timer.reset(crate::deadline::after(after));
            }
            Some(idle) => timer.reset(crate::deadline::after(after.saturating_sub(idle))),
            None => timer.reset(crate::deadline::after(after)),
        }
    }
}
