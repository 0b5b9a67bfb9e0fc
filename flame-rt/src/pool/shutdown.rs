//! Graceful shutdown of the whole process: every live pool drains when the parent is told to
//! stop (SIGTERM, SIGINT), so a deploy or Ctrl-C never cuts calls off mid-way.

use std::sync::{Arc, Mutex, Weak};

use super::Shared;

static POOLS: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// Remembers a pool for [`shutdown_all`], forgetting pools that are gone.
pub(crate) fn register(pool: &Arc<Shared>) {
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    pools.retain(|p| p.strong_count() > 0);
    pools.push(Arc::downgrade(pool));
}

/// Shuts down every pool of this process, concurrently, as [`Pool::shutdown`](crate::Pool::shutdown)
/// does for one: new calls are refused, calls in flight (detached ones included) get their pool's
/// `shutdown_timeout`, then runners are stopped and reaped.
///
/// `#[flame::main]` calls this on SIGTERM or SIGINT; apps with their own signal handling call
/// it themselves.
pub async fn shutdown_all() {
    let pools: Vec<Arc<Shared>> = {
        let pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        pools.iter().filter_map(Weak::upgrade).collect()
    };
    futures::future::join_all(pools.iter().map(|p| p.shutdown())).await;
}

/// Set by `#[flame::main]`: this process drains its pools before it exits.
static DRAIN_ON_EXIT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a dropped pool drains in the background (see [`drain_on_exit`]) rather than closing
/// at once.
pub(crate) fn drains_on_exit() -> bool {
    DRAIN_ON_EXIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Makes this process drain every pool before it exits: pools dropped meanwhile drain in the
/// background instead of killing their runners, and [`drain_all`] waits for all of them.
pub(crate) fn drain_on_exit() {
    DRAIN_ON_EXIT.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// What `#[flame::main]` does once `main` has returned: every pool still alive (dropped ones
/// draining included) gets its `shutdown_timeout` for the calls in flight, casts and detached
/// calls included; a stop signal meanwhile ends the wait.
pub(crate) async fn drain_all() {
    let busy = {
        let pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        pools.iter().filter_map(Weak::upgrade).count()
    };
    if busy == 0 {
        return;
    }
    tracing::debug!(
        pools = busy,
        "flame: main returned; draining pools before exiting"
    );
    tokio::select! {
        () = shutdown_all() => {}
        _ = stop_signal() => {}
    }
}

/// Resolves with the signal number when the process is told to stop.
#[cfg(unix)]
pub(crate) async fn stop_signal() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => libc::SIGTERM,
        _ = int.recv() => libc::SIGINT,
    }
}

#[cfg(not(unix))]
pub(crate) async fn stop_signal() -> i32 {
    let _ = tokio::signal::ctrl_c().await;
    2
}
