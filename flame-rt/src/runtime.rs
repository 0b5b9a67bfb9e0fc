//! What `#[flame::main]` runs: the app's `main` on a Tokio runtime, plus, when the process was
//! booted as a runner, the runner service beside it.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::parent::{HANDOFF_ENV, process_handoff};
use crate::pool::shutdown;
use crate::runner::{self, Control};

/// The return types `#[flame::main]` accepts: `()` and `Result<T, E: Debug>`. Not public API.
#[doc(hidden)]
pub trait MainOutput {
    /// Why `main` failed, if it did.
    fn failure(&self) -> Option<String>;
}

impl MainOutput for () {
    fn failure(&self) -> Option<String> {
        None
    }
}

impl<T, E: Debug> MainOutput for Result<T, E> {
    fn failure(&self) -> Option<String> {
        self.as_ref().err().map(|e| {
            let text = format!("{e:?}");
            // anyhow and friends append a backtrace when RUST_BACKTRACE is set: the parent's
            // error message needs the cause, not that.
            match text.split_once("\n\nStack backtrace:") {
                Some((cause, _)) => cause.to_string(),
                None => text,
            }
        })
    }
}

/// Runs `body` as the app's main. In a runner process this never returns: the process exits
/// when its runner service ends. Not public API.
#[doc(hidden)]
pub fn run_main<F>(
    mut runtime: tokio::runtime::Builder,
    graceful_shutdown: bool,
    body: F,
) -> F::Output
where
    F: Future,
    F::Output: MainOutput,
{
    match process_handoff() {
        Some(Ok(handoff)) => serve_as_runner(runtime, handoff.clone(), body, true),
        Some(Err(e)) => bad_handoff(e),
        None => {
            let runtime = runtime
                .enable_all()
                .build()
                .expect("failed to build the Tokio runtime");
            if graceful_shutdown {
                runtime.block_on(parent_main(body))
            } else {
                runtime.block_on(body)
            }
        }
    }
}

/// Runs a `#[flame::test]`: the test's body, or, when this test binary was re-executed as a
/// runner for it, the runner service. Not public API.
#[doc(hidden)]
pub fn run_test<F>(path: &'static str, mut runtime: tokio::runtime::Builder, body: F) -> F::Output
where
    F: Future,
    F::Output: MainOutput,
{
    match process_handoff() {
        // The parent's test is the test; its runner only serves.
        // libtest's threads exist already: the environment stays as it is (see below).
        Some(Ok(handoff)) => serve_as_runner(runtime, handoff.clone(), async {}, false),
        Some(Err(e)) => bad_handoff(e),
        None => {
            // libtest names tests by module path without the crate.
            let name = path.split_once("::").map_or(path, |(_, rest)| rest);
            crate::parent::set_current_test(Some(name));
            let runtime = runtime
                .enable_all()
                .build()
                .expect("failed to build the Tokio runtime");
            let output = runtime.block_on(body);
            crate::parent::set_current_test(None);
            output
        }
    }
}

fn bad_handoff(e: &crate::error::Error) -> ! {
    eprintln!("flame: {HANDOFF_ENV} is set but cannot be used: {e}");
    std::process::exit(2);
}

/// Serves as a runner until the parent lets this process go, with the app's `body` running
/// beside the service; then ends the process.
fn serve_as_runner<F>(
    mut runtime: tokio::runtime::Builder,
    handoff: std::sync::Arc<crate::parent::Handoff>,
    body: F,
    scrub_env: bool,
) -> !
where
    F: Future,
    F::Output: MainOutput,
{
    // Before the runtime's threads exist: the kernel keeps this per thread.
    arm_parent_death_signal();
    let process_runner = std::env::var_os(crate::backend::PARENT_PID_ENV).is_some();
    if scrub_env {
        // Read, and no longer needed: every process a task starts would inherit the token, and
        // a flame app started from a task would take itself for this runner.
        // SAFETY: `#[flame::main]` calls this first thing on the main thread, before the
        // runtime or the app has started a thread that could read the environment.
        unsafe {
            std::env::remove_var(HANDOFF_ENV);
            std::env::remove_var(crate::backend::PARENT_PID_ENV);
        }
    }
    let runtime = runtime
        .enable_all()
        .build()
        .expect("failed to build the Tokio runtime");
    let code = runtime.block_on(async move {
        let (control, control_rx) = mpsc::unbounded_channel();
        let app = tokio::runtime::Handle::current();
        let mut service = crate::io_runtime::spawn(runner::serve(handoff, control_rx, app));
        // Heard on the protocol's runtime too: a stop must not wait for a busy worker.
        crate::io_runtime::spawn(forward_sigterm(control.clone(), process_runner));
        tokio::pin!(body);
        tokio::select! {
            output = &mut body => {
                if let Some(reason) = output.failure() {
                    let _ = control.send(Control::BootFailed(reason));
                }
                // The app's main is done; the runner keeps serving until the parent lets it go.
                match service.await {
                    Ok(exit) => exit.code(),
                    Err(_) => 1,
                }
            }
            exit = &mut service => exit.map_or(1, |e| e.code()),
        }
    });
    // Drop whatever else the app spawned, but don't wait long for blocking threads (or for a
    // worker a task holds: the process is going anyway).
    if runner::LEFT_A_TASK_BEHIND.load(std::sync::atomic::Ordering::Relaxed) {
        runtime.shutdown_background();
    } else {
        runtime.shutdown_timeout(Duration::from_millis(250));
    }
    // Children its tasks started without `kill_on_drop` go with it.
    crate::backend::kill_own_group_but_me();
    std::process::exit(code);
}

/// A process runner stops (SIGTERM) when the thread of its parent that started it dies. Set here,
/// in the runner, rather than between fork and exec in the parent (see `ProcessBackend`).
fn arm_parent_death_signal() {
    #[cfg(target_os = "linux")]
    if let Some(parent) = std::env::var(crate::backend::PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<libc::pid_t>().ok())
    {
        // SAFETY: prctl and getppid take no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // The parent may have died before the prctl: then nobody would signal us.
            if libc::getppid() != parent {
                eprintln!("flame runner: the parent ({parent}) is already gone");
                std::process::exit(1);
            }
        }
    }
}

/// The app's main in the parent: on SIGTERM or SIGINT every pool drains, then the process
/// ends; the body keeps running meanwhile, so it still sees the results of its calls. When the
/// body returns (on the signal itself, as an axum server with graceful shutdown does, or
/// otherwise), the pools drain too before the process exits.
async fn parent_main<F: Future>(body: F) -> F::Output {
    shutdown::drain_on_exit();
    tokio::pin!(body);
    let signal = tokio::select! {
        output = &mut body => {
            shutdown::drain_all().await;
            return output;
        }
        signal = shutdown::stop_signal() => signal,
    };
    tracing::info!(
        signal,
        "flame: stop signal received, draining pools (send it again to stop at once)"
    );
    let mut drained = tokio::spawn(shutdown::shutdown_all());
    tokio::select! {
        output = &mut body => {
            // Main returned on the signal itself: the drain goes on before the process ends.
            tokio::select! {
                _ = &mut drained => {}
                _ = shutdown::stop_signal() => {}
            }
            return output;
        }
        _ = &mut drained => {}
        _ = shutdown::stop_signal() => {}
    }
    std::process::exit(128 + signal);
}

/// SIGTERM to a process runner is its parent-death signal: it stops at once, dropping its
/// tasks, so their `kill_on_drop` children die too. To a runner in a container, pod or Machine
/// it is its platform stopping it with a grace period (`docker stop`, a pod deleted, a spot
/// eviction): it finishes its calls first and takes no more; a second SIGTERM stops it at once.
async fn forward_sigterm(control: mpsc::UnboundedSender<Control>, process_runner: bool) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return;
        };
        if term.recv().await.is_some() {
            let first = if process_runner {
                Control::Terminate
            } else {
                Control::Drain
            };
            let _ = control.send(first);
        }
        if term.recv().await.is_some() {
            let _ = control.send(Control::Terminate);
        }
    }
    #[cfg(not(unix))]
    drop((control, process_runner));
}
