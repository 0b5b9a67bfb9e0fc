//! Where a channel frame goes: each call's channels, as routes from the connection's reader
//! to the pumps, and how the halves learn why their channel ended ([`Link`], [`End`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use std::any::Any;

use bytes::{BufMut, Bytes};
use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Error, ErrorKind};
use crate::protocol::{
    ChanBodyRef, ChanDataHead, ChanFrameRef, HIGH_WATER, Outbox, PIECE, TO_PARENT_CHAN,
    TO_RUNNER_CHAN,
};

use super::pump::{Inbox, MAX_MESSAGE, OutCredit};

/// What the two halves of one channel share in this process: why the channel ended, when it
/// did not end because one side simply finished.
#[derive(Default)]
pub(crate) struct Link {
    reason: OnceLock<Error>,
    /// Messages the app took from the receiving half, counted once the half is bridged: an
    /// inbound pump grants credit for what the app took, not for what it was handed.
    pub(super) taken: AtomicUsize,
    /// The count of `taken` at which the inbound pump wants to hear of it (0: no pump).
    pub(super) wake_at: AtomicUsize,
    pub(super) took: Notify,
}

impl Link {
    pub(crate) fn new() -> Arc<Link> {
        Arc::default()
    }

    /// The app took a message from the receiving half.
    pub(crate) fn took(&self) {
        let wake_at = self.wake_at.load(Ordering::Acquire);
        if wake_at == 0 {
            return;
        }
        if self.taken.fetch_add(1, Ordering::AcqRel) + 1 >= wake_at {
            self.took.notify_one();
        }
    }

    /// Records why the channel ended; the first reason stands.
    pub(crate) fn end(&self, reason: Error) {
        let _ = self.reason.set(reason);
    }

    pub(crate) fn reason(&self) -> Option<&Error> {
        self.reason.get()
    }
}

/// Which end of the connection this is: the frames it sends are `ToRunner::Chan` from the
/// parent, `ToParent::Chan` from a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Parent,
    Runner,
}

impl Side {
    fn variant(self) -> u8 {
        match self {
            Side::Parent => TO_RUNNER_CHAN,
            Side::Runner => TO_PARENT_CHAN,
        }
    }
}

/// Where one pump sends its frames.
#[derive(Clone)]
pub(crate) struct Port {
    pub(crate) out: Arc<Outbox>,
    pub(crate) side: Side,
    pub(crate) call: u64,
    pub(crate) chan: u32,
}

impl Port {
    pub(super) fn send(&self, body: ChanBodyRef<'_>) {
        self.out.send(&ChanFrameRef {
            variant: self.side.variant(),
            call: self.call,
            chan: self.chan,
            body,
        });
    }

    /// Sends one message that fits a chunk (`len` bytes encoded), encoded straight into the
    /// connection's outbox.
    pub(super) fn send_inline<T: Serialize + 'static>(&self, item: &T, len: usize) {
        let head = ChanDataHead::new(self.side.variant(), self.call, self.chan, len);
        // Bytes go out as they are, shared with the sender: no copy (postcard writes them as
        // their length, then the bytes).
        if let Some(bytes) = (item as &dyn Any).downcast_ref::<Bytes>() {
            self.out.send_with_tail(
                |buf| {
                    postcard::to_io(&head, buf.writer())?;
                    postcard::to_io(&bytes.len(), buf.writer()).map(drop)
                },
                bytes.clone(),
            );
        } else {
            self.out.send_with(|buf| {
                postcard::to_io(&head, buf.writer())?;
                postcard::to_io(item, buf.writer()).map(drop)
            });
        }
    }

    /// Sends an encoded message in chunks that take turns with other frames.
    pub(super) async fn send_chunks(&self, message: &[u8]) {
        let mut chunks = message.chunks(PIECE).peekable();
        while let Some(chunk) = chunks.next() {
            self.out.wait_below(HIGH_WATER).await;
            self.send(match chunks.peek() {
                Some(_) => ChanBodyRef::Part(chunk),
                None => ChanBodyRef::Data(chunk),
            });
        }
    }
}

/// How the call that carried a channel ended, as seen by its local halves.
pub(crate) enum End<'a> {
    /// The task returned (or the parent heard it did).
    Finished,
    /// The task's future was dropped on the runner.
    Cancelled,
    /// The connection to the other side is gone, or the task failed (panicked, timed out):
    /// the stream may be cut short, and the local halves say so.
    Failed(&'a Error),
}

impl End<'_> {
    fn reason(&self) -> Error {
        match self {
            End::Finished => Error::new(
                ErrorKind::ChannelClosed,
                "the call that carried this channel has ended",
            ),
            End::Cancelled => Error::new(
                ErrorKind::Cancelled,
                "the call that carried this channel was cancelled",
            ),
            End::Failed(error) => (*error).clone(),
        }
    }
}

/// The channels of every call on one connection, by `(call, channel number)`: where the
/// connection's reader delivers their frames.
pub(crate) struct Routes {
    map: Mutex<HashMap<(u64, u32), Route>>,
    /// The largest message a channel of this connection carries: the pool's `max_payload`.
    max_message: AtomicUsize,
    /// Frames of calls whose arguments are still being decoded (big ones are decoded off the
    /// protocol thread), kept until their channels exist, in order.
    held: Mutex<HashMap<u64, Vec<Bytes>>>,
    /// How many calls are held, so delivering to a channel costs no second lock when none is.
    holding: std::sync::atomic::AtomicUsize,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            map: Mutex::default(),
            max_message: AtomicUsize::new(MAX_MESSAGE),
            held: Mutex::default(),
            holding: AtomicUsize::new(0),
        }
    }
}

pub(super) struct Route {
    pub(super) kind: RouteKind,
    pub(super) link: Arc<Link>,
    /// Set once the pump is spawned; a route can exist a moment before (see [`Routes::arm`]).
    pub(super) pump: Option<AbortHandle>,
    /// The pump itself, for a runner to wait until an outbound channel is flushed.
    pub(super) join: Option<JoinHandle<()>>,
    /// The peer closed the channel before the pump was spawned.
    pub(super) closed: bool,
}

pub(super) enum RouteKind {
    /// Messages arriving for a local receiver. `None` once the remote sender is done.
    In(Option<Box<dyn Inbox>>),
    /// Messages leaving from a local sender, and how many the remote receiver will take.
    Out {
        credit: Arc<OutCredit>,
        /// Told when the call is over: the pump stops taking messages and flushes.
        finish: Arc<Notify>,
    },
}

impl Routes {
    /// Registers the route of `port`'s channel, before its pump is spawned.
    pub(super) fn open(&self, port: &Port, kind: RouteKind, link: Arc<Link>) {
        let route = Route {
            kind,
            link,
            pump: None,
            join: None,
            closed: false,
        };
        self.lock().insert((port.call, port.chan), route);
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<(u64, u32), Route>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the largest message the channels of this connection carry, both ways.
    pub(crate) fn set_max_message(&self, bytes: usize) {
        self.max_message.store(bytes, Ordering::Relaxed);
    }

    pub(super) fn max_message(&self) -> usize {
        self.max_message.load(Ordering::Relaxed)
    }

    /// Spawns a channel's pump, unless the channel was taken down in between.
    pub(crate) fn arm(&self, call: u64, chan: u32, pump: BoxFuture<'static, ()>) {
        let mut map = self.lock();
        if let Some(route) = map.get_mut(&(call, chan))
            && !route.closed
        {
            let join = tokio::spawn(pump);
            route.pump = Some(join.abort_handle());
            route.join = Some(join);
        }
    }

    /// Hands a frame that arrived to its channel. Frames for channels that are gone (their call
    /// ended) are dropped.
    pub(crate) fn deliver(&self, frame: ChanFrameRef<'_>, whole: &Bytes) {
        if self.holding.load(std::sync::atomic::Ordering::Acquire) > 0 {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(frames) = held.get_mut(&frame.call) {
                frames.push(whole.clone());
                return;
            }
        }
        self.deliver_now(frame, whole);
    }

    /// Keeps the frames of `call` until [`release`](Routes::release): its channels are not
    /// open yet.
    pub(crate) fn hold(&self, call: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.insert(call, Vec::new()).is_none() {
            self.holding
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Delivers what was held for `call`, in order, before any frame that comes after; or drops
    /// it if the call's channels never opened.
    pub(crate) fn release(&self, call: u64) {
        if self.holding.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(frames) = held.remove(&call) else {
            return;
        };
        // Under the lock, so a frame arriving meanwhile waits for these.
        for whole in frames {
            if let Some(Ok(frame)) = crate::protocol::chan_frame(&whole, whole[0]) {
                self.deliver_now(frame, &whole);
            }
        }
        // Only now: a frame that sees no call held skips the lock, and would have overtaken the
        // held ones (payloads' stream-beside-a-big-argument test, 2 runs in 20).
        self.holding
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn deliver_now(&self, frame: ChanFrameRef<'_>, whole: &Bytes) {
        let mut map = self.lock();
        let Some(route) = map.get_mut(&(frame.call, frame.chan)) else {
            return;
        };
        match (frame.body, &mut route.kind) {
            (ChanBodyRef::Data(data), RouteKind::In(inbox @ Some(_))) => {
                if inbox.as_mut().is_some_and(|i| !i.push(data, true, whole)) {
                    *inbox = None;
                }
            }
            (ChanBodyRef::Part(data), RouteKind::In(Some(inbox))) => {
                inbox.push(data, false, whole);
            }
            // The remote sender is done: the pump delivers what arrived, then ends.
            (ChanBodyRef::Close, RouteKind::In(inbox)) => *inbox = None,
            (ChanBodyRef::Fail(why), RouteKind::In(inbox)) => {
                route.link.end(Error::new(
                    ErrorKind::ChannelClosed,
                    format!("the sending side failed: {why}"),
                ));
                *inbox = None;
            }
            (ChanBodyRef::Credit(n), RouteKind::Out { credit, .. }) => credit.granted(n),
            (ChanBodyRef::Close, RouteKind::Out { .. }) => {
                route.link.end(Error::new(
                    ErrorKind::ChannelClosed,
                    "the receiving half of this channel was dropped",
                ));
                route.closed = true;
                if let Some(pump) = &route.pump {
                    pump.abort();
                }
            }
            (body, _) => {
                tracing::debug!(
                    call = frame.call,
                    chan = frame.chan,
                    ?body,
                    "flame: a channel frame that does not fit its channel was dropped"
                );
            }
        }
    }

    /// Waits until the call's outbound channels have sent everything their senders gave them:
    /// what a task sent before returning reaches the caller before its result. Senders still
    /// alive (moved into a detached task, say) can send no more.
    pub(crate) async fn flush(&self, call: u64, chans: u32) {
        let pumps: Vec<JoinHandle<()>> = {
            let mut map = self.lock();
            (0..chans)
                .filter_map(|chan| {
                    let route = map.get_mut(&(call, chan))?;
                    let RouteKind::Out { finish, .. } = &route.kind else {
                        return None;
                    };
                    finish.notify_one();
                    route.join.take()
                })
                .collect()
        };
        for pump in pumps {
            let _ = pump.await;
        }
    }

    /// Takes down a call's channels. Inbound ones deliver what already arrived if `drain`,
    /// then end; outbound ones stop at once. Local halves learn why through their link.
    pub(crate) fn end_call(&self, call: u64, chans: u32, end: End<'_>, drain: bool) {
        let routes: Vec<Route> = {
            let mut map = self.lock();
            (0..chans)
                .filter_map(|chan| map.remove(&(call, chan)))
                .collect()
        };
        for route in routes {
            if !matches!(end, End::Finished) || matches!(route.kind, RouteKind::Out { .. }) {
                route.link.end(end.reason());
            }
            let stop = !drain || matches!(route.kind, RouteKind::Out { .. });
            if stop && let Some(pump) = route.pump {
                pump.abort();
            }
        }
    }
}
