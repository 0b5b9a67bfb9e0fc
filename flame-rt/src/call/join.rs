//! `JoinHandle`: the caller's side of a spawned call. Unlike `tokio::task::JoinHandle`, dropping
//! it cancels the call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::de::DeserializeOwned;
use tokio::time::{Instant, Sleep};

use crate::error::{Error, ErrorKind};
use crate::ticket::{Answer, Ticket};

/// How a call's result is decoded from its bytes.
pub(crate) type Decode<R> = fn(&[u8]) -> Result<R, postcard::Error>;

/// A handle to a call started with [`spawn_on`](crate::spawn_on).
///
/// Await it for the task's result (`Result<R, flame::Error>`). Awaiting `&mut handle` is
/// cancel-safe: if that await is dropped (say, in a `select!`), the call keeps running and the
/// handle can be awaited again.
///
/// **Dropping an unfinished handle cancels the call**: a call still waiting for a slot never
/// starts, and a running one has its future dropped on the runner, so child processes spawned
/// with `kill_on_drop(true)` die with it. [`detach`](JoinHandle::detach) opts out.
///
/// While it is awaited, the handle also keeps the call's deadline on this side: a call that
/// waits for a slot past its timeout (or past the pool's `boot_timeout` when it has none), or
/// runs past its timeout, resolves with [`ErrorKind::TimedOut`] and is cancelled.
#[must_use = "dropping a flame::JoinHandle cancels the call; use .detach() to let it run"]
pub struct JoinHandle<R> {
    ticket: Arc<Ticket>,
    /// Until the outcome is taken.
    waiting: bool,
    timer: Option<Pin<Box<Sleep>>>,
    detached: bool,
    decode: Decode<R>,
}

impl<R> JoinHandle<R> {
    pub(crate) fn new(ticket: Arc<Ticket>, decode: Decode<R>) -> JoinHandle<R> {
        JoinHandle {
            ticket,
            waiting: true,
            timer: None,
            detached: false,
            decode,
        }
    }

    /// Cancels the call, as dropping the handle would, but keeps the handle: awaiting it
    /// afterwards gives an error with [`ErrorKind::Cancelled`] (or the result, if the call had
    /// already finished).
    pub fn abort(&self) {
        self.ticket.abort();
    }

    /// Whether the call has ended (with a result, an error, or cancellation).
    pub fn is_finished(&self) -> bool {
        self.ticket.is_resolved()
    }

    /// Lets the call run to completion without anyone waiting for it; its result is discarded.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// When this side should next look at the call's deadline: the end of its wait for a slot
    /// while it waits, its deadline while it runs.
    fn next_bound(&self) -> Option<Instant> {
        let at = self.ticket.deadline.at();
        if self.ticket.is_queued() {
            Some(at.map_or(self.ticket.queue_until, |at| {
                at.min(self.ticket.queue_until)
            }))
        } else {
            at
        }
    }

    /// The bound has passed: time the call out, if it is still on the wrong side of it.
    fn check_bound(&self) {
        let now = Instant::now();
        let (task, deadline) = (self.ticket.task, self.ticket.deadline);
        if self.ticket.is_queued() {
            if now >= self.ticket.queue_until || deadline.at().is_some_and(|at| now >= at) {
                self.ticket.cancel(deadline.expired(task, true));
            }
        } else if deadline.at().is_some_and(|at| now >= at) {
            self.ticket.cancel(deadline.expired(task, false));
        }
    }
}

impl<R: DeserializeOwned + 'static> Future for JoinHandle<R> {
    type Output = Result<R, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            assert!(this.waiting, "flame::JoinHandle polled after it completed");
            if let Poll::Ready(outcome) = this.ticket.poll_outcome(cx) {
                this.waiting = false;
                this.timer = None;
                return Poll::Ready(decode(outcome, this.decode));
            }
            let Some(bound) = this.next_bound() else {
                this.timer = None;
                return Poll::Pending;
            };
            match &mut this.timer {
                Some(timer) if timer.deadline() == bound => {}
                timer => *timer = Some(Box::pin(tokio::time::sleep_until(bound))),
            }
            match this.timer.as_mut().expect("just set").as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Time out if still due, then look at the outcome (and the bound) again.
                Poll::Ready(()) => this.check_bound(),
            }
        }
    }
}

fn decode<R: 'static>(outcome: Answer, decode: Decode<R>) -> Result<R, Error> {
    match outcome {
        Ok(bytes)
            if bytes.len() > crate::protocol::PIECE
                && let Some(whole) = as_whole::<R>(&bytes) =>
        {
            Ok(whole)
        }
        Ok(bytes) if bytes.len() > crate::protocol::PIECE && is::<R, Vec<u8>>() => {
            let vec: Box<dyn std::any::Any> = Box::new(into_vec(bytes).map_err(undecodable)?);
            Ok(*vec.downcast::<R>().expect("R is Vec<u8>"))
        }
        Ok(bytes) => decode(&bytes).map_err(undecodable),
        Err(e) => Err(e),
    }
}

fn undecodable(e: impl fmt::Display) -> Error {
    Error::new(
        ErrorKind::Codec,
        format!(
            "the task's result could not be decoded: {e}; parent and runner must agree on the \
             return type, and it must not use serde features postcard lacks (untagged or \
             internally tagged enums, flatten)"
        ),
    )
}

/// A big `Bytes` result as a slice of the buffer it was reassembled in, instead of a copy of it
/// in fresh memory. (A small one came in a frame that shares the reader's buffer: keeping that
/// alive would cost the reader a new buffer, so it is copied.)
fn as_whole<R: 'static>(bytes: &bytes::Bytes) -> Option<R> {
    let mut whole = None::<R>;
    let slot = (&mut whole as &mut dyn std::any::Any).downcast_mut::<Option<bytes::Bytes>>()?;
    let raw: &[u8] = postcard::from_bytes(bytes).ok()?;
    *slot = Some(bytes.slice_ref(raw));
    whole
}

fn is<A: 'static, B: 'static>() -> bool {
    std::any::TypeId::of::<A>() == std::any::TypeId::of::<B>()
}

/// A big `Vec<u8>` result in the buffer it was reassembled in, moved to its front (a copy within
/// memory already touched), instead of a copy into fresh memory: half the cost of a fresh copy
/// was its page faults.
fn into_vec(mut bytes: bytes::Bytes) -> Result<Vec<u8>, postcard::Error> {
    let (start, len) = {
        let raw: &[u8] = postcard::from_bytes(&bytes)?;
        (raw.as_ptr() as usize - bytes.as_ptr() as usize, raw.len())
    };
    bytes::Buf::advance(&mut bytes, start);
    bytes.truncate(len);
    // Unique, as the connection made it: the conversion keeps the allocation.
    Ok(Vec::from(bytes))
}

impl<R> Drop for JoinHandle<R> {
    fn drop(&mut self) {
        if !self.detached && self.waiting {
            self.ticket.abort();
        }
    }
}

impl<R> fmt::Debug for JoinHandle<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("task", &self.ticket.task)
            .field("finished", &self.is_finished())
            .finish()
    }
}
