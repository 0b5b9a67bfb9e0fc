//! A call's ticket: the state one call shares between its [`JoinHandle`](crate::JoinHandle)
//! and wherever the call is (waiting in the pool's queue, or running on a runner connection),
//! and how it is cancelled.
//!
//! There is no task per call: the handle cancels through this ticket. A queued call that is
//! cancelled is skipped when a slot frees (it never takes one); a running one gets a `Cancel`
//! frame, and its slot is released only when the runner acknowledges that the task's future was
//! dropped. `Drop` cannot await, so nothing here does.

use std::sync::{Arc, Mutex, MutexGuard};

use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::time::Instant;

use crate::deadline::Deadline;
use crate::error::{Error, ErrorKind};
use crate::payload::Encoded;

/// A call's result as its runner sent it: the encoded value, or why there is none.
pub(crate) type Answer = Result<Bytes, Error>;

/// Where a running call runs, as its ticket sees it: somewhere it can be cancelled (a runner
/// connection).
pub(crate) trait Remote: Send + Sync {
    /// Asks for the call's future to be dropped.
    fn cancel(&self, call: u64);
}

/// One call's shared state, and the cell its outcome is delivered in (no channel per call).
pub(crate) struct Ticket {
    pub(crate) task: &'static str,
    /// The pool's name, for the call's metrics.
    #[cfg(feature = "metrics")]
    pool: Arc<str>,
    pub(crate) deadline: Deadline,
    /// The longest the call may wait for a slot.
    pub(crate) queue_until: Instant,
    inner: Mutex<Inner>,
}

struct Inner {
    place: Place,
    outcome: Delivery,
}

enum Place {
    /// Waiting for a slot. The encoded arguments wait here, not in the queue, so a call
    /// cancelled while it waits frees them at once, whatever waits ahead of it.
    Queued {
        args: Encoded,
    },
    Running {
        conn: Arc<dyn Remote>,
        call: u64,
    },
    Cancelled,
}

/// Set exactly once, by whoever resolves the call; taken once, by the handle.
enum Delivery {
    Pending(Option<Waker>),
    Ready(Answer),
    Taken,
}

impl Ticket {
    pub(crate) fn new(
        task: &'static str,
        pool: &Arc<str>,
        deadline: Deadline,
        queue_until: Instant,
        args: Encoded,
    ) -> Arc<Ticket> {
        #[cfg(not(feature = "metrics"))]
        let _ = pool;
        Arc::new(Ticket {
            task,
            #[cfg(feature = "metrics")]
            pool: pool.clone(),
            deadline,
            queue_until,
            inner: Mutex::new(Inner {
                place: Place::Queued { args },
                outcome: Delivery::Pending(None),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers the call's outcome, if nobody did yet. Returns whether this did.
    pub(crate) fn resolve(&self, outcome: Answer) -> bool {
        let mut inner = self.lock();
        let Delivery::Pending(waker) = &mut inner.outcome else {
            return false;
        };
        let waker = waker.take();
        #[cfg(feature = "metrics")]
        crate::metrics::call_done(
            &self.pool,
            self.task,
            outcome.as_ref().map(drop),
            self.deadline.elapsed(),
        );
        inner.outcome = Delivery::Ready(outcome);
        drop(inner);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// The outcome, once delivered; else remembers who to wake.
    pub(crate) fn poll_outcome(&self, cx: &mut Context<'_>) -> Poll<Answer> {
        let mut inner = self.lock();
        match std::mem::replace(&mut inner.outcome, Delivery::Taken) {
            Delivery::Ready(outcome) => Poll::Ready(outcome),
            Delivery::Pending(waker) => {
                let waker = match waker {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                };
                inner.outcome = Delivery::Pending(Some(waker));
                Poll::Pending
            }
            Delivery::Taken => panic!("flame::JoinHandle polled after it completed"),
        }
    }

    /// Whether the call should still run: neither cancelled nor resolved.
    pub(crate) fn is_live(&self) -> bool {
        let inner = self.lock();
        !matches!(inner.place, Place::Cancelled) && matches!(inner.outcome, Delivery::Pending(_))
    }

    pub(crate) fn is_resolved(&self) -> bool {
        !matches!(self.lock().outcome, Delivery::Pending(_))
    }

    pub(crate) fn is_queued(&self) -> bool {
        matches!(self.lock().place, Place::Queued { .. })
    }

    /// Starts the call on a runner with `start`, given its arguments, unless it was cancelled
    /// meanwhile. Holding the ticket while `start` registers and sends the call means a
    /// concurrent cancel either comes first (and the call never starts) or finds it running
    /// (and cancels it there). A call that could not start keeps waiting, its arguments back.
    pub(crate) fn start<E>(
        &self,
        start: impl FnOnce(Encoded) -> Result<(Arc<dyn Remote>, u64), (Encoded, E)>,
    ) -> Option<Result<(), E>> {
        let mut inner = self.lock();
        if !matches!(inner.outcome, Delivery::Pending(_)) {
            return None;
        }
        let Place::Queued { args } = &mut inner.place else {
            return None;
        };
        Some(match start(std::mem::take(args)) {
            Ok((conn, call)) => {
                inner.place = Place::Running { conn, call };
                Ok(())
            }
            Err((args, unstarted)) => {
                inner.place = Place::Queued { args };
                Err(unstarted)
            }
        })
    }

    /// A running call whose runner was lost goes back to waiting, with its arguments (it will
    /// be retried).
    pub(crate) fn requeue(&self, args: Encoded) {
        let mut inner = self.lock();
        if matches!(inner.place, Place::Running { .. }) {
            inner.place = Place::Queued { args };
        }
    }

    /// Cancels the call: resolves it with `error`, and cancels it on its runner if it runs.
    pub(crate) fn cancel(&self, error: Error) {
        let place = std::mem::replace(&mut self.lock().place, Place::Cancelled);
        self.resolve(Err(error));
        if let Place::Running { conn, call } = place {
            conn.cancel(call);
        }
    }

    /// The handle was dropped or aborted.
    pub(crate) fn abort(&self) {
        self.cancel(Error::new(ErrorKind::Cancelled, "the call was aborted"));
    }
}
