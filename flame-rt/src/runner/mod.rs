//! The runner side: dial the parent, prove who we are, then run the calls it sends until it
//! lets us go. One Tokio task per call, so a panic or a slow task never blocks the others; each
//! call's task sends its own result.
//!
//! The service itself (reading frames, heartbeats, cancels, the failsafe) runs on the protocol's
//! runtime (`io_runtime`); the calls run on the app's runtime, so a task that never yields
//! cannot silence its runner.
//!
//! | file | what it holds |
//! |---|---|
//! | `service.rs` | the service loop: hello and welcome, each frame, heartbeats, idle, stopping |
//! | `calls.rs` | the calls running here: starting one, running it, sending its result, cancelling |
//! | `terminator.rs` | the failsafe, who stops an orphaned runner: the dial within the boot window, the silence check, every call dropped before exit |

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::parent::Handoff;
use crate::task::registry;
use service::Service;
use terminator::Exit;
pub(crate) use terminator::LEFT_A_TASK_BEHIND;

mod calls;
mod service;
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
