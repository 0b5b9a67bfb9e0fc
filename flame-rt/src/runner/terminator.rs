//! The runner's failsafe (FLAME's "terminator"): a runner never outlives its parent.
//!
//! It exits when it cannot reach the parent within the boot window, when the connection ends,
//! or when the parent has been silent for the heartbeat window; and before it exits it drops
//! every running task, so their `kill_on_drop` children die too. None of this relies on a
//! parent-death signal, which does not exist across hosts.

use std::fmt;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::calls::Calls;
use crate::backoff::Backoff;
use crate::parent::Handoff;
#[cfg(feature = "tls")]
use crate::protocol::{self, ToParent};
use crate::protocol::{BoxRead, BoxWrite};

/// How long a stopping runner waits for its dropped tasks to be gone: a task blocking its thread
/// can't be dropped until it yields, and must not keep the process alive.
const DROP_WAIT: Duration = Duration::from_millis(250);

/// Set when a stopping runner left a task behind that would not drop: the process then exits
/// without waiting for the app's runtime to shut down, since a worker is known to be held.
pub(crate) static LEFT_A_TASK_BEHIND: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The parent has been silent (`quiet`) for its whole heartbeat window: the runner is orphaned and
/// exits, unless the parent already gave it a grace to finish its calls in (Elixir FLAME #86).
pub(super) fn parent_silent(quiet: Option<Duration>, granted: bool) -> Option<Exit> {
    let quiet = quiet?;
    (!granted).then(|| Exit::ParentLost(format!("no word from the parent for {quiet:?}")))
}

/// Drops every running call before the runner goes away, so their `kill_on_drop` children
/// die with them. A call blocking its thread cannot be dropped until it yields: after
/// [`DROP_WAIT`] the runner leaves without it, and says so.
pub(super) async fn drop_every_call(calls: &Calls, runner_id: &str) {
    if !calls.drop_all(DROP_WAIT).await {
        LEFT_A_TASK_BEHIND.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "flame runner {runner_id}: a task did not stop within {DROP_WAIT:?} of being \
             dropped (it blocks its thread); exiting without it"
        );
    }
}

/// Reaches the parent within the boot window: dials it, and for a TLS pool names itself in
/// plaintext, then completes a TLS handshake trusting only the parent's pinned certificate.
pub(crate) async fn connect(handoff: &Handoff) -> Result<(BoxRead, BoxWrite), Exit> {
    let deadline = crate::deadline::after(handoff.boot_timeout);
    let stream = dial(&handoff.addr, handoff.boot_timeout).await?;
    let Some(fingerprint) = &handoff.tls else {
        let (reader, writer) = stream.into_split();
        return Ok((Box::new(reader), Box::new(writer)));
    };
    #[cfg(feature = "tls")]
    {
        use futures::SinkExt;
        let unreachable = |why: String| {
            Exit::Unreachable(format!(
                "TLS with the parent at {} failed: {why}",
                handoff.addr
            ))
        };
        let mut stream = stream;
        let start = protocol::encode(&ToParent::StartTls {
            runner_id: handoff.runner_id.clone(),
        })
        .map_err(|e| unreachable(e.to_string()))?;
        tokio_util::codec::FramedWrite::new(&mut stream, protocol::codec())
            .send(start)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (connector, name) =
            crate::protocol::tls::connector(fingerprint).map_err(|e| unreachable(e.to_string()))?;
        let stream = match tokio::time::timeout_at(deadline, connector.connect(name, stream)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(
                    "no TLS handshake within the boot window".into(),
                ));
            }
        };
        let (reader, writer) = tokio::io::split(stream);
        Ok((Box::new(reader), Box::new(writer)))
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (fingerprint, deadline);
        Err(Exit::Unreachable(
            "the parent's pool uses TLS, and this build of flame-rt has no `tls` feature".into(),
        ))
    }
}

/// Dials the parent, retrying refused or failed connects with backoff until the boot window
/// closes. A runner that cannot reach its parent in time is of no use to anyone.
async fn dial(addr: &str, window: Duration) -> Result<TcpStream, Exit> {
    let deadline = crate::deadline::after(window);
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(500));
    loop {
        let error = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if Instant::now() + backoff.peek() >= deadline {
            return Err(Exit::Unreachable(format!(
                "could not reach the parent at {addr} within {window:?} ({error})"
            )));
        }
        tokio::time::sleep(backoff.step()).await;
    }
}

/// Why a runner stopped serving.
#[derive(Debug)]
pub(crate) enum Exit {
    /// The parent asked it to stop (shutdown, idle, single use).
    Stopped,
    /// The parent connection ended or went silent.
    ParentLost(String),
    /// The parent could not be reached within the boot window.
    Unreachable(String),
    /// The parent refused the handshake.
    Refused(String),
    /// The app's `main` returned an error.
    BootFailed(String),
    /// The process was told to terminate (SIGTERM, or the parent-death signal).
    Terminated,
}

impl Exit {
    pub(crate) fn code(&self) -> i32 {
        match self {
            Exit::Stopped | Exit::Terminated => 0,
            Exit::ParentLost(_) => 1,
            Exit::Unreachable(_) => 2,
            Exit::Refused(_) => 3,
            Exit::BootFailed(_) => 4,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Stopped => f.write_str("stopped by the parent"),
            Exit::ParentLost(why) => write!(f, "lost the parent: {why}"),
            Exit::Unreachable(why) => f.write_str(why),
            Exit::Refused(why) => write!(f, "refused by the parent: {why}"),
            Exit::BootFailed(why) => write!(f, "main returned an error: {why}"),
            Exit::Terminated => f.write_str("terminated by signal"),
        }
    }
}
