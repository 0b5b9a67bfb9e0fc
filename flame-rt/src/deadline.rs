//! Deadlines: a call's timeout becomes an instant when the call is sent to a pool. It bounds the
//! wait for a slot and the run; the runner gets the time that is left and enforces it itself.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ErrorKind};

/// So far away it means "never" (about 30 years): what a duration too long to add to an instant
/// becomes. `Duration::MAX` is how users write "no limit", and must not panic.
const NEVER: Duration = Duration::from_secs(86400 * 365 * 30);

/// `from + by`, or "never" when that does not fit in an instant.
pub(crate) fn later(from: Instant, by: Duration) -> Instant {
    from.checked_add(by.min(NEVER)).unwrap_or(from)
}

/// `by` from now, saturating as [`later`] does.
pub(crate) fn after(by: Duration) -> Instant {
    later(Instant::now(), by)
}

/// `d` in whole milliseconds for the wire, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Clone, Copy)]
pub(crate) struct Deadline {
    start: Instant,
    timeout: Option<Duration>,
}

impl Deadline {
    pub(crate) fn starting_now(timeout: Option<Duration>) -> Deadline {
        Deadline {
            start: Instant::now(),
            timeout,
        }
    }

    /// How long ago the call was sent to its pool.
    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// When the call must be over, if it has a timeout.
    pub(crate) fn at(&self) -> Option<Instant> {
        self.timeout.map(|t| later(self.start, t))
    }

    /// How long the call may wait for a slot: its own deadline, or the pool's boot timeout
    /// when it has none (a call should not wait forever on a pool that cannot grow).
    pub(crate) fn queue_until(&self, boot_timeout: Duration) -> Instant {
        self.at().unwrap_or(later(self.start, boot_timeout))
    }

    pub(crate) fn expired(&self, task: &str, waiting_for_slot: bool) -> Error {
        let waited = self.elapsed();
        let message = match (self.timeout, waiting_for_slot) {
            (Some(t), true) => format!(
                "{task} waited {waited:?} for a free runner slot and hit its timeout of {t:?}"
            ),
            (Some(t), false) => format!("{task} did not finish within its timeout of {t:?}"),
            (None, _) => format!(
                "{task} waited {waited:?} for a free runner slot (the pool's boot_timeout, as the call has \
                 no timeout); raise the pool's max or max_concurrency, or give the call a timeout"
            ),
        };
        Error::new(ErrorKind::TimedOut, message)
    }
}
