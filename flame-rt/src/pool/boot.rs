//! Booting one runner: the backend's boot, the runner's dial back and hello, up to the
//! welcome. It reads the pool's config, never its state: how the boot went is reported to the
//! state as one event (`State::booted`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use super::Shared;
use super::state::Booted;
use crate::backend::{BootSpec, RunnerHandle};
use crate::error::{Error, ErrorKind};
use crate::hooks::{GrowEnd, GrowReason, GrowStart};
use crate::parent::Handoff;
use crate::pool::connection::{self, Owner, RunnerConn};
use crate::pool::listener::{Expectation, Listener, listener_for};
use crate::protocol::handshake::new_token;
use crate::protocol::{BoxRead, BoxWrite, Welcome};

static NEXT_RUNNER: AtomicU64 = AtomicU64::new(1);

impl Shared {
    /// Boots one runner for `reason` (counted in `booting` already) and tells the pool how it
    /// went.
    pub(super) async fn boot_one(self: Arc<Self>, reason: GrowReason) {
        let key = NEXT_RUNNER.fetch_add(1, Ordering::Relaxed);
        let runner_id = format!("{}-{key}", self.name);
        self.hooks.grow_start(GrowStart {
            pool: self.name.to_string(),
            runner_id: runner_id.clone(),
            reason,
        });
        let started = Instant::now();
        let booted = match self.boot_runner(key, &runner_id).await {
            // It hung up before the pool could add it, so nobody else will take it out: it
            // failed to boot.
            Ok((conn, handle)) if conn.ended().is_some() => {
                let why = conn.ended().map(Error::message).unwrap_or_default();
                let error = Error::new(
                    ErrorKind::BootFailed,
                    format!("{why}, right after it connected"),
                );
                Booted::HungUp {
                    conn,
                    handle,
                    error,
                }
            }
            Ok((conn, handle)) => Booted::Ready { key, conn, handle },
            Err(error) => Booted::Failed(error),
        };
        let error = match &booted {
            Booted::HungUp { error, .. } | Booted::Failed(error) => Some(error.clone()),
            Booted::Ready { .. } => None,
        };
        // Waiting calls start on the new runner before the hook runs: a slow hook must not
        // hold them up.
        self.decide(|state, acts| state.booted(booted, acts));
        self.hooks.grow_end(GrowEnd {
            pool: self.name.to_string(),
            runner_id,
            reason,
            duration: started.elapsed(),
            error,
        });
        self.changed.notify_waiters();
    }

    /// Boots the runner `runner_id` and waits for it to dial back and prove itself; returns
    /// its connection, welcomed, and its backend handle.
    async fn boot_runner(
        self: &Arc<Self>,
        key: u64,
        runner_id: &str,
    ) -> Result<(Arc<RunnerConn>, Box<dyn RunnerHandle>), Error> {
        let token = new_token().map_err(|e| Error::io("drawing a runner token", e))?;
        let tls = self.tls_fingerprint()?;
        let (listener, advertise) = self.listener()?;
        let mut expectation = listener.expect(runner_id, token, tls.is_some());
        let mut spec = BootSpec::new(Handoff {
            pool: self.name.to_string(),
            runner_id: runner_id.to_string(),
            addr: advertise.clone(),
            token,
            boot_timeout: self.config.boot_timeout,
            tls,
        });
        spec.test_runner_args = self.test_runner_args.clone();
        let booting = Booting {
            shared: self,
            runner_id,
            backend: self.backend.name().to_string(),
            deadline: crate::deadline::after(self.config.boot_timeout),
        };
        let handle = booting.backend_boot(spec).await?;
        let (halves, handle) = booting.dial_back(&mut expectation, handle).await?;
        let owner: Arc<dyn Owner> = Arc::new(self.clone());
        let conn = connection::open(
            owner,
            key,
            runner_id.to_string(),
            halves,
            self.welcome(),
            self.config.cancel_grace,
        );
        Ok((conn, handle))
    }

    /// What a runner of this pool is told once admitted: heartbeat, idle period, payload limit.
    fn welcome(&self) -> Welcome {
        let config = &self.config;
        let idle = match (config.idle_shutdown_after, config.min_idle_shutdown_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Welcome {
            heartbeat_ms: crate::deadline::millis(config.heartbeat_interval),
            miss_limit: config.heartbeat_miss_limit,
            idle_ms: idle.map(crate::deadline::millis),
            max_payload: config.max_payload as u64,
        }
    }

    fn listener(&self) -> Result<&(Arc<Listener>, String), Error> {
        if let Some(bound) = self.listener.get() {
            return Ok(bound);
        }
        let listener = listener_for(self.backend.listen_addr())?;
        let advertise = self.backend.advertise_addr(listener.addr());
        Ok(self.listener.get_or_init(|| (listener, advertise)))
    }

    /// The fingerprint runners of this pool must see on the parent's certificate, if it uses TLS.
    fn tls_fingerprint(&self) -> Result<Option<String>, Error> {
        #[cfg(feature = "tls")]
        if self.config.tls {
            return Ok(Some(
                crate::protocol::tls::parent_tls()?.fingerprint.clone(),
            ));
        }
        Ok(None)
    }

    /// Takes over a backend boot that returned too late to be used (its window closed, or the
    /// pool did): destroys what it returns. It counts as exiting until then, so `max` and
    /// shutdown see it; a boot that has still not returned after another boot window is given
    /// up on.
    fn destroy_late(
        self: &Arc<Self>,
        boot: tokio::task::JoinHandle<Result<Box<dyn RunnerHandle>, Error>>,
    ) {
        let exiting = self.leaving();
        let limit = self.config.boot_timeout;
        self.spawn(async move {
            match tokio::time::timeout(limit, boot).await {
                Ok(Ok(Ok(late))) => late.destroy().await,
                // It failed or panicked: nothing to destroy.
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    pool = %exiting.0.name,
                    "flame: a backend boot has not returned a boot window after it was given up; \
                     whatever it starts is left to the runner's own failsafe"
                ),
            }
        });
    }
}

/// One runner's boot, within its boot window.
struct Booting<'a> {
    shared: &'a Arc<Shared>,
    runner_id: &'a str,
    backend: String,
    deadline: Instant,
}

impl Booting<'_> {
    fn timed_out(&self) -> Error {
        Error::new(
            ErrorKind::BootFailed,
            format!(
                "runner {} did not connect back within the boot timeout of {:?} (backend {})",
                self.runner_id, self.shared.config.boot_timeout, self.backend
            ),
        )
    }

    fn closed(&self) -> Error {
        Error::new(
            ErrorKind::PoolClosed,
            format!(
                "pool {} was shut down while runner {} was booting",
                self.shared.name, self.runner_id
            ),
        )
    }

    /// The backend's boot: a handle to the runner it started.
    async fn backend_boot(&self, spec: BootSpec) -> Result<Box<dyn RunnerHandle>, Error> {
        let (shared, backend, runner_id) = (self.shared, &self.backend, self.runner_id);
        // Spawned so that a boot past its deadline still hands its runner over, to be
        // destroyed: a create request cut off mid-flight would leave a container or machine
        // nobody knows of.
        let mut boot = shared.spawn(shared.backend.boot(spec));
        let first = tokio::select! {
            biased;
            () = shared.closing.cancelled() => None,
            joined = tokio::time::timeout_at(self.deadline, &mut boot) => Some(joined),
        };
        let booted = match first {
            Some(Ok(Ok(booted))) => booted,
            Some(Ok(Err(panicked))) => Err(Error::new(
                ErrorKind::BootFailed,
                format!("backend {backend} panicked booting runner {runner_id}: {panicked}"),
            )),
            Some(Err(_)) => {
                shared.destroy_late(boot);
                return Err(self.timed_out());
            }
            None => {
                shared.destroy_late(boot);
                return Err(self.closed());
            }
        };
        booted.map_err(|e| match e.kind() {
            ErrorKind::BootFailed => e,
            // A mistake in the setup stays one: no retry will fix it.
            ErrorKind::Config => Error::new(
                ErrorKind::Config,
                format!("backend {backend}: {}", e.message()),
            ),
            _ => Error::new(ErrorKind::BootFailed, format!("backend {backend}: {e}")),
        })
    }

    /// Waits for the booted runner to dial back and prove itself; destroys it if it does not.
    async fn dial_back(
        &self,
        expectation: &mut Expectation,
        mut handle: Box<dyn RunnerHandle>,
    ) -> Result<((BoxRead, BoxWrite), Box<dyn RunnerHandle>), Error> {
        let runner_id = self.runner_id;
        let accepted = tokio::select! {
            biased;
            () = self.shared.closing.cancelled() => Err(self.closed()),
            accepted = expectation.accepted() => accepted,
            status = handle.exited() => Err(Error::new(
                ErrorKind::BootFailed,
                format!("runner {runner_id} ({}) exited before it connected back: {status}", handle.describe()),
            )),
            // Destroyed below: dropping a handle need not stop a machine (an API backend's
            // is just an id).
            () = tokio::time::sleep_until(self.deadline) => Err(self.timed_out()),
        };
        // A boot that failed while peers claiming its runner were refused most likely failed
        // because its runner could not prove itself (wrong token, TLS): say so.
        let accepted = accepted.map_err(|e| match expectation.refused_claims() {
            Some(claims) if e.kind() == ErrorKind::BootFailed => Error::new(
                ErrorKind::Rejected,
                format!(
                    "{}; the listener refused whoever claimed to be it: {claims}",
                    e.message()
                ),
            ),
            _ => e,
        });
        match accepted {
            Ok(halves) => Ok((halves, handle)),
            Err(e) => {
                handle.destroy().await;
                Err(e)
            }
        }
    }
}
