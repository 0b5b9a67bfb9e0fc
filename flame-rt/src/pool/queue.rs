//! Where a call waits for a slot: a FIFO of calls, served as runners free up or come up.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;

use crate::channel::Attachment;
use crate::error::{Error, ErrorKind};
use crate::task::TaskDef;
use crate::ticket::Ticket;
use crate::trace::TraceParent;

/// A call on its way to a runner: everything needed to start it, and to start it again if it
/// asked for retries, but its arguments, which its ticket holds while it waits.
pub(crate) struct QueuedCall {
    pub(crate) def: &'static TaskDef,
    pub(crate) retries: u32,
    pub(crate) ticket: Arc<Ticket>,
    /// The channel halves among the arguments, connected when the call starts.
    pub(crate) chans: Vec<Attachment>,
    /// The caller's trace context (boxed: most calls have none, and this struct moves a lot).
    pub(crate) trace: Option<Box<TraceParent>>,
}

impl QueuedCall {
    /// Spends one of the call's retries if `error` is worth one (its runner was lost or could
    /// not boot) and its caller still waits; `false` if the call must fail with `error`.
    pub(crate) fn take_retry(&mut self, error: &Error) -> bool {
        let worth_one = matches!(error.kind(), ErrorKind::RunnerLost | ErrorKind::BootFailed);
        if worth_one && self.retries > 0 && self.ticket.is_live() {
            self.retries -= 1;
            return true;
        }
        false
    }
}

/// Calls waiting for a slot, oldest first. A call whose caller gave up (handle dropped or
/// aborted) or whose wait ran out is skipped and dropped, never served.
#[derive(Default)]
pub(crate) struct Queue {
    calls: VecDeque<QueuedCall>,
}

impl Queue {
    pub(crate) fn push(&mut self, call: QueuedCall) {
        self.calls.push_back(call);
    }

    /// Puts a call back at the head of the line.
    pub(crate) fn push_front(&mut self, call: QueuedCall) {
        self.calls.push_front(call);
    }

    /// How many calls still wait (purges those given up: O(n), for stats).
    pub(crate) fn len(&mut self) -> usize {
        self.calls.retain(|c| c.ticket.is_live());
        self.calls.len()
    }

    /// Whether any call still waits: O(1) unless calls at the head were given up.
    pub(crate) fn has_waiters(&mut self) -> bool {
        while self.calls.front().is_some_and(|c| !c.ticket.is_live()) {
            self.calls.pop_front();
        }
        !self.calls.is_empty()
    }

    /// Whether more than `n` calls still wait, looking at no more entries than it must.
    pub(crate) fn more_than(&self, n: usize) -> bool {
        self.calls
            .iter()
            .filter(|c| c.ticket.is_live())
            .nth(n)
            .is_some()
    }

    /// The oldest call still waiting. Calls whose wait ran out are failed on the way.
    pub(crate) fn pop(&mut self) -> Option<QueuedCall> {
        let now = Instant::now();
        while let Some(call) = self.calls.pop_front() {
            if !call.ticket.is_live() {
                continue;
            }
            if now >= call.ticket.queue_until {
                call.ticket
                    .resolve(Err(call.ticket.deadline.expired(call.def.id, true)));
                continue;
            }
            return Some(call);
        }
        None
    }

    /// Fails every waiting call with `error`, except those that asked for retries when the
    /// error is worth one: they stay, one retry spent.
    pub(crate) fn fail_all(&mut self, error: &Error) {
        self.calls.retain_mut(|call| {
            if call.take_retry(error) {
                return true;
            }
            call.ticket.resolve(Err(error.clone()));
            false
        });
    }
}
