//! Whether the peer is still there: both sides send a heartbeat each interval and give up on
//! a peer silent for a whole window of them.

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

/// One side's heartbeat: a tick each interval, at which this side sends its own heartbeat and
/// looks at how long the peer has been silent. The parent's runner connections and the runner's
/// service keep one each.
pub(crate) struct Heartbeat {
    ticker: tokio::time::Interval,
    watchdog: Watchdog,
}

impl Heartbeat {
    /// Ticks every `interval`; the peer is lost once silent for `misses` intervals.
    pub(crate) fn new(interval: Duration, misses: u32) -> Heartbeat {
        let interval = interval.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Heartbeat {
            ticker,
            watchdog: Watchdog::new(interval.saturating_mul(misses.max(1))),
        }
    }

    /// The peer sent something.
    pub(crate) fn heard(&mut self) {
        self.watchdog.heard();
    }

    pub(crate) fn interval(&self) -> Duration {
        self.ticker.period()
    }

    /// Waits for the next tick; then how long the peer has been silent, once that is the whole
    /// window.
    pub(crate) async fn tick(&mut self) -> Option<Duration> {
        self.ticker.tick().await;
        self.watchdog.silent_for()
    }
}
