//! Backends boot runners: a process, a container, a machine. The pool decides *when*; a backend
//! knows *how*. Core ships [`ProcessBackend`] (the default) and [`LocalBackend`]; remote
//! backends live in their own crates under `backends/` and implement [`Backend`].

mod local;
mod output;
mod process;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use futures::future::BoxFuture;

pub use local::LocalBackend;
pub use output::{LastWords, RunnerOutput};
pub use process::ProcessBackend;
pub(crate) use process::{PARENT_PID_ENV, kill_own_group_but_me};

use crate::error::Error;
use crate::parent::{HANDOFF_ENV, Handoff};

/// Boots runners for a pool.
///
/// A backend is told to boot a runner with a [`BootSpec`]: it must start a copy of the app with
/// the environment variable [`BootSpec::handoff_env`] set, and return a [`RunnerHandle`] to it.
/// The runner then dials the parent by itself; the pool counts it as booted when its handshake
/// succeeds, not when `boot` returns. So an HTTP-API backend (create a machine now, delete it
/// later) fits as well as a local process.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and errors, such as `"process"` or `"fly"`.
    fn name(&self) -> &str;

    /// Where the parent listens for this backend's runners. Loopback by default; a backend whose
    /// runners live on other hosts binds the address of the network they share.
    fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    /// The `host:port` runners dial, given the address the listener is bound to. By default the
    /// bound address itself.
    fn advertise_addr(&self, bound: SocketAddr) -> String {
        bound.to_string()
    }

    /// Starts one runner. The error should say what the backend was told and what failed
    /// (it reaches waiting callers as [`ErrorKind::BootFailed`](crate::ErrorKind::BootFailed)).
    ///
    /// The pool runs the returned future as a task of its own and never drops it half-way: a
    /// handle it returns after the boot window closed, or after the pool shut down, is
    /// destroyed then. So a create request in flight is never abandoned with its runner.
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, Error>>;
}

/// The backend's grip on one runner it booted.
pub trait RunnerHandle: Send + 'static {
    /// Describes the runner for logs, such as `"pid 4242"` or a machine id.
    fn describe(&self) -> String;

    /// Resolves when the backend knows the runner is gone, with how it ended (`"exit status: 3"`).
    /// Lets the pool fail a boot at once when the runner dies before dialing back. A backend
    /// that cannot tell returns a future that never resolves.
    fn exited(&mut self) -> BoxFuture<'_, String>;

    /// Makes sure the runner is gone (kill, delete), and waits until it is.
    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// What a backend needs to boot one runner.
#[derive(Clone)]
pub struct BootSpec {
    pub(crate) handoff: Handoff,
    pub(crate) handoff_value: String,
    /// Set when the pool was started in a `#[flame::test]`: the arguments that make the test
    /// binary run as a runner for that test only.
    pub(crate) test_runner_args: Option<Vec<String>>,
}

impl BootSpec {
    pub(crate) fn new(handoff: Handoff) -> BootSpec {
        BootSpec {
            handoff_value: handoff.encode(),
            handoff,
            test_runner_args: None,
        }
    }

    /// The pool's name.
    pub fn pool(&self) -> &str {
        &self.handoff.pool
    }

    /// The runner's id, unique in this parent process.
    pub fn runner_id(&self) -> &str {
        &self.handoff.runner_id
    }

    /// The `host:port` the runner will dial.
    pub fn parent_addr(&self) -> &str {
        &self.handoff.addr
    }

    /// The environment variable to set in the runner: name and value. It carries the parent's
    /// address, the runner id and its one-time token, so treat it as a secret.
    pub fn handoff_env(&self) -> (&'static str, &str) {
        (HANDOFF_ENV, &self.handoff_value)
    }
}

impl fmt::Debug for BootSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootSpec")
            .field("pool", &self.pool())
            .field("runner_id", &self.runner_id())
            .field("parent_addr", &self.parent_addr())
            .finish_non_exhaustive()
    }
}
