//! `LocalBackend`: runners as tasks inside the parent process.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Backend, BootSpec, RunnerHandle};
use crate::error::Error;
use crate::runner;

/// Runs each runner as a Tokio task inside the parent process, over a real loopback connection
/// with the same encoding, handshake and cancellation as a remote runner.
///
/// A task whose arguments don't serialize, or whose types don't match, fails here exactly as it
/// would on a remote runner, so `LocalBackend` is the fast choice for unit tests and development;
/// [`ProcessBackend`](crate::ProcessBackend) gives real isolation. Inside a local runner,
/// [`parent()`](crate::parent()) is `Some` for the running task.
#[derive(Debug, Clone, Default)]
pub struct LocalBackend {
    _private: (),
}

impl LocalBackend {
    /// A backend that runs runners in this process.
    pub fn new() -> LocalBackend {
        LocalBackend::default()
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &str {
        "local"
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, Error>> {
        // The runner's control channel stays open as long as the handle lives.
        let (control, control_rx) = mpsc::unbounded_channel();
        // Its calls run on the pool's runtime, its protocol on the protocol's, as in a process.
        let app = tokio::runtime::Handle::current();
        let service =
            crate::io_runtime::spawn(runner::serve(Arc::new(spec.handoff), control_rx, app));
        let handle: Box<dyn RunnerHandle> = Box::new(LocalRunner {
            service,
            _control: control,
        });
        futures::future::ready(Ok(handle)).boxed()
    }
}

struct LocalRunner {
    service: tokio::task::JoinHandle<crate::runner::terminator::Exit>,
    _control: mpsc::UnboundedSender<runner::Control>,
}

impl RunnerHandle for LocalRunner {
    fn describe(&self) -> String {
        "in-process".to_string()
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        async move {
            match (&mut self.service).await {
                Ok(exit) => exit.to_string(),
                Err(e) => format!("runner task ended: {e}"),
            }
        }
        .boxed()
    }

    fn destroy(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            // A finished service has already been awaited by `exited`: polling it again panics.
            if !self.service.is_finished() {
                self.service.abort();
                let _ = (&mut self.service).await;
            }
        }
        .boxed()
    }
}

impl Drop for LocalRunner {
    fn drop(&mut self) {
        self.service.abort();
    }
}
