//! The pause between retries: a runner dialling its parent, a backend calling its platform's
//! API, a watch reopening. One type, so every retry loop in flame-rt and its backends backs off
//! alike.

use std::time::Duration;

/// A pause that doubles after each failure, up to a cap, and starts over after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first`; never pauses longer than `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first.min(max),
        }
    }

    /// The pause due now, to check it against a deadline before taking it.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The pause due now; the next one is twice as long, up to the cap.
    pub fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Back to the first pause, after a success.
    pub fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_start_over_after_a_reset() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(5), ms(30));
        let pauses: Vec<_> = (0..5).map(|_| backoff.step()).collect();
        assert_eq!(pauses, [ms(5), ms(10), ms(20), ms(30), ms(30)]);
        assert_eq!(backoff.peek(), ms(30));
        backoff.reset();
        assert_eq!(backoff.step(), ms(5));
    }
}
