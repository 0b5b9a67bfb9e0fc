//! Where a call waits for a slot: a FIFO of callers, served as runners free up or come up.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::deadline::Deadline;
use crate::error::{Error, ErrorKind};
use crate::pool::{Shared, Slot};

type Waiter = oneshot::Sender<Result<Slot, Error>>;

/// Callers waiting for a slot, oldest first. A caller that gives up (handle dropped, deadline)
/// drops its receiver; such entries are skipped and purged, never served.
#[derive(Default)]
pub(crate) struct Queue {
    waiters: VecDeque<Waiter>,
}

impl Queue {
    fn push(&mut self) -> oneshot::Receiver<Result<Slot, Error>> {
        let (tx, rx) = oneshot::channel();
        self.waiters.push_back(tx);
        rx
    }

    /// How many callers are still waiting (purges those who gave up: O(n), for stats).
    pub(crate) fn len(&mut self) -> usize {
        self.waiters.retain(|w| !w.is_closed());
        self.waiters.len()
    }

    /// Whether anyone still waits: O(1) unless callers at the head gave up.
    pub(crate) fn has_waiters(&mut self) -> bool {
        while self.waiters.front().is_some_and(|w| w.is_closed()) {
            self.waiters.pop_front();
        }
        !self.waiters.is_empty()
    }

    /// Whether more than `n` callers still wait, looking at no more entries than it must.
    pub(crate) fn more_than(&self, n: usize) -> bool {
        self.waiters
            .iter()
            .filter(|w| !w.is_closed())
            .nth(n)
            .is_some()
    }

    /// The oldest caller still waiting.
    pub(crate) fn pop(&mut self) -> Option<Waiter> {
        while let Some(w) = self.waiters.pop_front() {
            if !w.is_closed() {
                return Some(w);
            }
        }
        None
    }

    /// Puts a caller back at the head of the line.
    pub(crate) fn push_front(&mut self, waiter: Waiter) {
        self.waiters.push_front(waiter);
    }

    /// Fails every waiting caller with `error`.
    pub(crate) fn fail_all(&mut self, error: &Error) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(error.clone()));
        }
    }
}

impl Shared {
    /// A slot on a runner for one call: at once if a runner has one free and nobody is queued
    /// ahead, else after waiting in line (and asking the pool to grow) until `deadline`.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        task: &str,
        deadline: Deadline,
    ) -> Result<Slot, Error> {
        let waiting = {
            let mut state = self.lock();
            if let Some(error) = &state.closed {
                return Err(error.clone());
            }
            // Demand lifts a pause of `min` taken for idleness.
            state.min_suspended = false;
            if !state.queue.has_waiters()
                && let Some(slot) = self.take_slot(&mut state)
            {
                // A busy pool may want its next runner before it is full.
                self.grow(&mut state, None);
                return Ok(slot);
            }
            let rx = state.queue.push();
            tracing::debug!(pool = %self.name, task, at_max = state.at_max(), "flame: call waits for a slot");
            self.grow(&mut state, None);
            rx
        };
        let until: Instant = deadline.queue_until(self.config.boot_timeout);
        match tokio::time::timeout_at(until, waiting).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => Err(Error::new(
                ErrorKind::PoolClosed,
                format!("pool {} was closed", self.name),
            )),
            Err(_) => Err(deadline.expired(task, true)),
        }
    }
}
