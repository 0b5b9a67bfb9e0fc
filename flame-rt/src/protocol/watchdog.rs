//! Whether the peer is still there.

use std::time::Duration;

use tokio::time::Instant;

/// Whether the peer has spoken within its heartbeat window. Frames only set a flag; the clock
/// is read once per heartbeat tick, not once per frame.
pub(crate) struct Watchdog {
    last_heard: Instant,
    heard: bool,
    window: Duration,
}

impl Watchdog {
    pub(crate) fn new(window: Duration) -> Watchdog {
        Watchdog {
            last_heard: Instant::now(),
            heard: false,
            window,
        }
    }

    pub(crate) fn heard(&mut self) {
        self.heard = true;
    }

    /// Called on each heartbeat tick: how long the peer has been silent, once that is the whole
    /// window (accurate to one tick).
    pub(crate) fn silent_for(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if std::mem::take(&mut self.heard) {
            self.last_heard = now;
        }
        let quiet = now.saturating_duration_since(self.last_heard);
        (quiet >= self.window).then_some(quiet)
    }
}
