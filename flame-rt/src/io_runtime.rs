//! The protocol's own runtime: every runner connection's reads, writes and heartbeats, on both
//! sides, and the listener, run on one small thread that the app's tasks cannot block.
//!
//! FLAME's work is heavy: a task may compute for minutes without yielding, or call a blocking
//! library. When the protocol shared the app's multi-thread runtime, such a task silenced its
//! runner although a second worker was free (measured: no heartbeat for the task's 8 s, so the
//! parent declared the runner lost after 5). The mechanism, reproduced in isolation on Tokio 1.54:
//! the worker that was parked holding the I/O-and-timer driver is the one the `Run` frame wakes;
//! the service spawns the call from there, which puts it in that worker's LIFO slot and wakes no
//! other worker; the worker then runs the call itself and blocks — taking the driver with it. The
//! other worker sleeps on a condvar, not on the driver, so no timer fires and no socket is read
//! until the task ends. (Spawning from a non-worker thread, which goes through the inject queue
//! and wakes a parked worker, did not starve.) The parent side escaped only by luck of which
//! worker held the driver.
//!
//! So both sides' connections — reads, writes, heartbeats, cancels, the failsafe — run here, and
//! liveness never depends on how tasks behave: a runner whose every worker is busy still answers
//! heartbeats, and a parent whose workers are all blocked keeps its runners. Tasks, and the
//! pool's own work (boots, hooks), stay on the app's runtime; a runner hands each call to it
//! from this thread, through the inject queue.
//!
//! The thread lives as long as the process, so connections outlive any one app runtime (tests
//! start pools on many runtimes, one after another).

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// The protocol runtime, started on first use.
pub(crate) fn handle() -> &'static Handle {
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building flame's protocol runtime");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("flame-io".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .expect("starting flame's protocol thread");
        handle
    })
}

/// Runs `future` on the protocol runtime, with the caller's tracing subscriber: the work moved
/// here still logs where the caller's would (a scoped subscriber of a test, say). Where the
/// caller has none yet, it is left to find the global one when it logs, since an app may set
/// that after starting its pools (a runner's service starts before `main`'s body).
pub(crate) fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::instrument::WithSubscriber;
    let caller = tracing::dispatcher::get_default(|d| d.clone());
    if caller.is::<tracing::subscriber::NoSubscriber>() {
        handle().spawn(future)
    } else {
        handle().spawn(future.with_subscriber(caller))
    }
}

/// Drops `value` on a blocking thread rather than here. The last reference to a big payload
/// frees it, and giving back memory takes time in proportion: unmapping 256 MiB took 40 ms on
/// the 2-core VM, during which the protocol thread would read, write and heartbeat for no
/// connection (a small call beside a 256 MiB argument waited 13–19 ms for it).
pub(crate) fn let_go<T: Send + 'static>(value: T) {
    drop(handle().spawn_blocking(move || drop(value)));
}
