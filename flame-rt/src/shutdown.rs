//! Graceful shutdown of the whole process: every live pool drains when the parent is told to
//! stop (SIGTERM, SIGINT), so a deploy or Ctrl-C never cuts calls off mid-way.

use std::sync::{Arc, Mutex, Weak};

use crate::pool::Shared;

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
