//! How a channel half crosses the process boundary.
//!
//! A half is always a plain Tokio `mpsc` half. When one is serialized as an argument of a call,
//! the side sending the call keeps the `mpsc` end it pointed at and puts a *pump* behind it; the
//! side receiving the call makes a fresh `mpsc` pair, gives the task one half and puts a pump
//! behind the other. The two pumps talk over the runner's connection in `Chan` frames:
//!
//! - an **outbound** pump takes messages from its `mpsc` receiver, encodes them and sends them
//!   while it has credit: at most `capacity` messages in flight, and at most a byte window of
//!   `capacity` MiB of them (a bigger message goes out once the window is half empty);
//! - an **inbound** pump decodes arriving messages into its `mpsc` sender and grants the credit
//!   back in batches as the app takes them, so at most `capacity` messages (and the window's
//!   bytes) are between the sending process and the receiving app, and a slow channel never
//!   blocks the connection's reader (which hands frames to pumps without waiting).
//!
//! Both sides keep the same books: the receiver counts what it has not yet granted back, the
//! sender what it has not heard granted, which is never less. A peer that sends beyond its
//! credit, or one message larger than the connection's `max_payload`, ends the channel with a
//! [`Protocol`](ErrorKind::Protocol) error, so it can make this side hold no more than the
//! window (or one message) beyond what the app's receiver holds.
//!
//! Channels belong to the call that carried them: [`Routes::end_call`] takes them down when it
//! ends, is cancelled or loses its runner, and tells the local halves why through their
//! [`Link`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use std::any::Any;

use bytes::{BufMut, Bytes};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Error, ErrorKind};
use crate::protocol::{
    ChanBodyRef, ChanDataHead, ChanFrameRef, HIGH_WATER, Outbox, PIECE, TO_PARENT_CHAN,
    TO_RUNNER_CHAN,
};

/// What the two halves of one channel share in this process: why the channel ended, when it
/// did not end because one side simply finished.
#[derive(Default)]
pub(crate) struct Link {
    reason: OnceLock<Error>,
    /// Messages the app took from the receiving half, counted once the half is bridged: an
    /// inbound pump grants credit for what the app took, not for what it was handed.
    taken: AtomicUsize,
    /// The count of `taken` at which the inbound pump wants to hear of it (0: no pump).
    wake_at: AtomicUsize,
    took: Notify,
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
    fn send(&self, body: ChanBodyRef<'_>) {
        self.out.send(&ChanFrameRef {
            variant: self.side.variant(),
            call: self.call,
            chan: self.chan,
            body,
        });
    }

    /// Sends one message that fits a chunk (`len` bytes encoded), encoded straight into the
    /// connection's outbox.
    fn send_inline<T: Serialize + 'static>(&self, item: &T, len: usize) {
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
    async fn send_chunks(&self, message: &[u8]) {
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

struct Route {
    kind: RouteKind,
    link: Arc<Link>,
    /// Set once the pump is spawned; a route can exist a moment before (see [`Routes::arm`]).
    pump: Option<AbortHandle>,
    /// The pump itself, for a runner to wait until an outbound channel is flushed.
    join: Option<JoinHandle<()>>,
    /// The peer closed the channel before the pump was spawned.
    closed: bool,
}

enum RouteKind {
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
    fn lock(&self) -> MutexGuard<'_, HashMap<(u64, u32), Route>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the largest message the channels of this connection carry, both ways.
    pub(crate) fn set_max_message(&self, bytes: usize) {
        self.max_message.store(bytes, Ordering::Relaxed);
    }

    fn max_message(&self) -> usize {
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

/// Opens the route of a channel whose messages arrive here for `tx`; returns its pump.
pub(crate) fn open_inbound<T>(
    routes: &Routes,
    port: Port,
    tx: mpsc::Sender<T>,
    link: Arc<Link>,
) -> BoxFuture<'static, ()>
where
    T: DeserializeOwned + Send + 'static,
{
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let capacity = tx.max_capacity();
    let ungranted = Arc::new(InCredit::default());
    let inbox = Decoder {
        arrived,
        ungranted: ungranted.clone(),
        capacity,
        window: window(capacity),
        max_message: routes.max_message(),
        partial: Vec::new(),
        link: link.clone(),
    };
    routes.lock().insert(
        (port.call, port.chan),
        Route {
            kind: RouteKind::In(Some(Box::new(inbox))),
            link: link.clone(),
            pump: None,
            join: None,
            closed: false,
        },
    );
    Box::pin(inbound(tx, arrivals, ungranted, port, link))
}

/// Opens the route of a channel whose messages leave from `rx`; returns its pump.
pub(crate) fn open_outbound<T>(
    routes: &Routes,
    port: Port,
    rx: mpsc::Receiver<T>,
    link: Arc<Link>,
) -> BoxFuture<'static, ()>
where
    T: Serialize + Send + 'static,
{
    let credit = Arc::new(OutCredit::new(rx.max_capacity(), routes.max_message()));
    let finish = Arc::new(Notify::new());
    routes.lock().insert(
        (port.call, port.chan),
        Route {
            kind: RouteKind::Out {
                credit: credit.clone(),
                finish: finish.clone(),
            },
            link: link.clone(),
            pump: None,
            join: None,
            closed: false,
        },
    );
    Box::pin(outbound(rx, port, credit, finish, link))
}

/// Where the connection's reader puts what arrives for an inbound channel: messages are decoded
/// as they arrive, so the frame they came in is freed at once (a read buffer that frames keep
/// alive can't be reused, and a fresh one costs page faults).
trait Inbox: Send {
    /// Takes a message, or a chunk of one; `false` if it could not be decoded (the channel then
    /// ends, its link says why).
    fn push(&mut self, data: &[u8], last: bool, frame: &Bytes) -> bool;
}

struct Decoder<T> {
    /// Decoded messages, with their size on the wire.
    arrived: mpsc::UnboundedSender<(T, usize)>,
    /// What arrived and was not granted back yet: never more than the credit.
    ungranted: Arc<InCredit>,
    capacity: usize,
    window: usize,
    max_message: usize,
    /// The chunks of a message still coming.
    partial: Vec<u8>,
    link: Arc<Link>,
}

/// The largest message a channel carries when the connection has not said (`max_payload`'s
/// default).
const MAX_MESSAGE: usize = 1 << 30;

/// Bytes in flight a channel allows per message of its capacity.
const WINDOW_PER_MESSAGE: usize = 1 << 20;

/// The byte window of a channel of `capacity` messages.
fn window(capacity: usize) -> usize {
    capacity.saturating_mul(WINDOW_PER_MESSAGE)
}

/// Whether a message of `size` bytes may go out with `in_flight` bytes not yet granted back:
/// while it fits the window, or, bigger, once the window is half empty. The sender waits for
/// it; the receiver refuses a peer that did not.
fn fits(in_flight: usize, size: usize, window: usize) -> bool {
    in_flight <= window / 2 || in_flight.saturating_add(size) <= window
}

/// The receiver's books: messages and bytes arrived and not yet granted back.
#[derive(Default)]
struct InCredit {
    messages: AtomicUsize,
    bytes: AtomicUsize,
}

/// The sender's books: the sizes of the messages sent and not yet granted back, oldest first.
struct OutCredit {
    capacity: usize,
    window: usize,
    max_message: usize,
    sent: Mutex<(std::collections::VecDeque<usize>, usize)>,
    granted: Notify,
}

impl OutCredit {
    fn new(capacity: usize, max_message: usize) -> Self {
        OutCredit {
            capacity,
            window: window(capacity),
            max_message,
            sent: Mutex::default(),
            granted: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (std::collections::VecDeque<usize>, usize)> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a message of `size` bytes may go out, and books it.
    async fn take(&self, size: usize) {
        loop {
            {
                let mut sent = self.lock();
                let (sizes, bytes) = &mut *sent;
                if sizes.len() < self.capacity && fits(*bytes, size, self.window) {
                    sizes.push_back(size);
                    *bytes += size;
                    return;
                }
            }
            // One waiter, and a grant before this await leaves a permit: no wakeup is lost.
            self.granted.notified().await;
        }
    }

    /// The receiver took `n` more messages. Never more than were sent: a confused peer can't
    /// make us overrun it.
    fn granted(&self, n: u32) {
        let mut sent = self.lock();
        let (sizes, bytes) = &mut *sent;
        for _ in 0..n {
            let Some(size) = sizes.pop_front() else { break };
            *bytes -= size;
        }
        drop(sent);
        self.granted.notify_one();
    }
}

impl<T> Decoder<T> {
    /// Ends the channel: the peer broke its rules.
    fn refuse(&mut self, why: &str) -> bool {
        self.link.end(Error::new(
            ErrorKind::Protocol,
            format!("the other side {why}"),
        ));
        false
    }

    /// Checks a message, or what arrived of it, against the credit: `size` bytes so far.
    fn within_credit(&mut self, size: usize) -> bool {
        if size > self.max_message {
            let max = self.max_message;
            return self.refuse(&format!(
                "sent a message of more than {max} bytes (the pool's max_payload)"
            ));
        }
        if self.ungranted.messages.load(Ordering::Acquire) >= self.capacity {
            return self.refuse("sent more messages than this channel's credit allows");
        }
        if !fits(
            self.ungranted.bytes.load(Ordering::Acquire),
            size,
            self.window,
        ) {
            return self.refuse("sent more bytes than this channel's credit allows");
        }
        true
    }

    fn deliver(&mut self, item: T, size: usize) -> bool {
        if !self.within_credit(size) {
            return false;
        }
        self.ungranted.messages.fetch_add(1, Ordering::AcqRel);
        self.ungranted.bytes.fetch_add(size, Ordering::AcqRel);
        let _ = self.arrived.send((item, size));
        true
    }
}

impl<T: DeserializeOwned + Send + 'static> Inbox for Decoder<T> {
    fn push(&mut self, data: &[u8], last: bool, frame: &Bytes) -> bool {
        // Bytes are taken as a slice of the frame they came in: no copy.
        let mut zero_copy = None::<T>;
        if last
            && self.partial.is_empty()
            && let Some(slot) = (&mut zero_copy as &mut dyn Any).downcast_mut::<Option<Bytes>>()
            && let Ok(raw) = postcard::from_bytes::<&[u8]>(data)
        {
            *slot = Some(frame.slice_ref(raw));
        }
        if let Some(item) = zero_copy {
            return self.deliver(item, data.len());
        }
        let size = self.partial.len() + data.len();
        // Checked as the chunks arrive: what is reassembled stays within the credit.
        if !self.within_credit(size) {
            self.partial = Vec::new();
            return false;
        }
        if !last || !self.partial.is_empty() {
            self.partial.extend_from_slice(data);
            if !last {
                return true;
            }
        }
        let decoded = match self.partial.is_empty() {
            true => postcard::from_bytes::<T>(data),
            false => postcard::from_bytes::<T>(&self.partial),
        };
        self.partial = Vec::new();
        match decoded {
            Ok(item) => self.deliver(item, size),
            Err(e) => {
                self.link.end(Error::new(
                    ErrorKind::Codec,
                    format!(
                        "a message on a flame channel could not be decoded as {} ({e}); \
                         both sides must use the same message type",
                        std::any::type_name::<T>()
                    ),
                ));
                false
            }
        }
    }
}

async fn inbound<T>(
    tx: mpsc::Sender<T>,
    mut arrivals: mpsc::UnboundedReceiver<(T, usize)>,
    ungranted: Arc<InCredit>,
    port: Port,
    link: Arc<Link>,
) {
    // Credit goes back in batches: a frame per message would double the traffic of small ones.
    let batch = (tx.max_capacity() / 4).max(1) as u32;
    let half_window = window(tx.max_capacity()) / 2;
    let (mut owed, mut owed_bytes) = (0u32, 0usize);
    // The sizes of the messages handed to the app and not taken yet, oldest first.
    let mut handed = std::collections::VecDeque::new();
    let mut seen = link.taken.load(Ordering::Acquire);
    let grant = |owed: &mut u32, owed_bytes: &mut usize| {
        // The books first: what the sender sends on this credit may arrive at once.
        ungranted
            .messages
            .fetch_sub(*owed as usize, Ordering::AcqRel);
        ungranted.bytes.fetch_sub(*owed_bytes, Ordering::AcqRel);
        port.send(ChanBodyRef::Credit(*owed));
        (*owed, *owed_bytes) = (0, 0);
    };
    loop {
        let taken = link.taken.load(Ordering::Acquire);
        for _ in seen..taken {
            let Some(size) = handed.pop_front() else {
                break;
            };
            owed += 1;
            owed_bytes += size;
        }
        seen = taken;
        // A sender past half the window may be waiting for it back to send a big message.
        let over_half = ungranted.bytes.load(Ordering::Acquire) > half_window;
        if owed >= batch || (owed > 0 && over_half) {
            grant(&mut owed, &mut owed_bytes);
        }
        let wanted = match over_half {
            true => 1,
            false => (batch - owed) as usize,
        };
        link.wake_at.store(seen + wanted, Ordering::Release);
        let (item, size) = tokio::select! {
            biased;
            () = link.took.notified() => continue,
            arrived = arrivals.recv() => match arrived {
                Some(arrived) => arrived,
                None => {
                    // Ended by a message that could not be decoded, or by a peer that broke the
                    // rules: the sender must stop too.
                    if link.reason().is_some_and(|e| matches!(e.kind(), ErrorKind::Codec | ErrorKind::Protocol)) {
                        port.send(ChanBodyRef::Close);
                    }
                    return;
                }
            },
            // The local receiver was dropped: the remote sender should hear it now, not when
            // it next sends.
            () = tx.closed() => return port.send(ChanBodyRef::Close),
        };
        handed.push_back(size);
        if tx.send(item).await.is_err() {
            return port.send(ChanBodyRef::Close);
        }
    }
}

async fn outbound<T: Serialize + 'static>(
    mut rx: mpsc::Receiver<T>,
    port: Port,
    credit: Arc<OutCredit>,
    finish: Arc<Notify>,
    link: Arc<Link>,
) {
    let mut spare = Vec::new();
    let mut finishing = false;
    loop {
        let item = if finishing {
            rx.recv().await
        } else {
            tokio::select! {
                // The call's end goes first: a sender kept alive elsewhere (a detached task)
                // must not keep the pump, and so the call's result, waiting forever.
                biased;
                () = finish.notified() => {
                    // Senders still alive can send no more; what they sent goes out.
                    rx.close();
                    finishing = true;
                    continue;
                }
                item = rx.recv() => item,
            }
        };
        let Some(item) = item else {
            // Every sender is gone; one may have ended the channel with an error.
            // Only a failure of the sending side itself (a read error, a message that would not
            // encode) is passed on: the link is shared by every clone of the channel's halves,
            // and another call's cancellation is not this stream's failure.
            return match link.reason() {
                Some(why) if matches!(why.kind(), ErrorKind::Io | ErrorKind::Codec) => {
                    port.send(ChanBodyRef::Fail(&why.to_string()))
                }
                _ => port.send(ChanBodyRef::Close),
            };
        };
        // Sized first: the credit is booked by size before anything goes out.
        let encoded = postcard::experimental::serialized_size(&item).and_then(|size| {
            if size > PIECE {
                spare.clear();
                spare = postcard::to_extend(&item, std::mem::take(&mut spare))?;
            }
            Ok(size)
        });
        let size = match encoded {
            Ok(size) if size <= credit.max_message => size,
            Ok(size) => {
                link.end(Error::new(
                    ErrorKind::Codec,
                    format!(
                        "a message of {size} bytes is more than a flame channel carries (the \
                         pool's max_payload, {} bytes); raise PoolBuilder::max_payload, or send \
                         it in smaller messages",
                        credit.max_message
                    ),
                ));
                let why = link.reason().map(ToString::to_string).unwrap_or_default();
                return port.send(ChanBodyRef::Fail(&why));
            }
            Err(e) => {
                link.end(Error::new(
                    ErrorKind::Codec,
                    format!(
                        "a message of type {} could not be encoded for a flame channel ({e})",
                        std::any::type_name::<T>()
                    ),
                ));
                let why = link.reason().map(ToString::to_string).unwrap_or_default();
                return port.send(ChanBodyRef::Fail(&why));
            }
        };
        credit.take(size).await;
        match size <= PIECE {
            true => port.send_inline(&item, size),
            false => port.send_chunks(&spare).await,
        }
    }
}

/// A channel half serialized into a call's arguments, waiting for the call to start on a
/// connection. If the call never starts, dropping it ends the channel and says why.
pub(crate) struct Attachment {
    link: Arc<Link>,
    open: Option<OpenFn>,
}

type OpenFn = Box<dyn FnOnce(&Routes, Port) -> BoxFuture<'static, ()> + Send>;

impl Attachment {
    /// Opens the channel's route on a connection; returns its pump, to [`Routes::arm`] once the
    /// call's `Run` frame is queued (so nothing of the channel can overtake it).
    pub(crate) fn open(mut self, routes: &Routes, port: Port) -> BoxFuture<'static, ()> {
        let open = self.open.take().expect("an attachment opens once");
        open(routes, port)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self.open.is_some() {
            self.link.end(Error::new(
                ErrorKind::ChannelClosed,
                "the call that carried this channel never started",
            ));
        }
    }
}

thread_local! {
    /// Set while a call's arguments are encoded: the channel halves they hold.
    static ENCODING: RefCell<Option<Encoding>> = const { RefCell::new(None) };
    /// Set while a call's arguments are decoded: where the halves they hold are connected.
    static DECODING: RefCell<Option<Decoding>> = const { RefCell::new(None) };
}

#[derive(Default)]
struct Encoding {
    attached: Vec<Attachment>,
    /// Why a half refused to be encoded: postcard reports every serializer error as the same
    /// "Serde Serialization Error", so the message is kept here for the call's error.
    refused: Option<&'static str>,
}

/// Encodes a call's arguments with `encode`, collecting the channel halves among them, and the
/// reason a half refused to be encoded, if one did.
pub(crate) fn encoding<R>(
    encode: impl FnOnce() -> R,
) -> (R, Vec<Attachment>, Option<&'static str>) {
    /// Puts the outer encoding back even if `encode` panics (a user's `Serialize` may).
    struct Restore(Option<Option<Encoding>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                ENCODING.with(|e| *e.borrow_mut() = outer);
            }
        }
    }
    let mut restore = Restore(Some(
        ENCODING.with(|e| e.borrow_mut().replace(Encoding::default())),
    ));
    let result = encode();
    let outer = restore.0.take().expect("restored once");
    let encoded = ENCODING
        .with(|e| std::mem::replace(&mut *e.borrow_mut(), outer))
        .unwrap_or_default();
    (result, encoded.attached, encoded.refused)
}

thread_local! {
    /// Set while the arguments of a call that failed to encode are probed for the culprit.
    static PROBING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `probe` with channel halves encoding as placeholders: neither taken nor refused.
pub(crate) fn probing<R>(probe: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PROBING.with(|p| p.set(false));
        }
    }
    PROBING.with(|p| p.set(true));
    let _reset = Reset;
    probe()
}

/// Whether halves are being probed (see [`probing`]).
pub(crate) fn is_probing() -> bool {
    PROBING.with(|p| p.get())
}

const NOT_IN_A_CALL: &str =
    "a flame channel half can only be serialized as (part of) an argument of a flame call";

/// A half can't be encoded, for `why`: tells the call being encoded, and returns `why` for the
/// serializer's error.
pub(crate) fn refuse(why: &'static str) -> &'static str {
    ENCODING.with(|e| {
        if let Some(encoding) = e.borrow_mut().as_mut() {
            encoding.refused.get_or_insert(why);
        }
    });
    why
}

/// Whether a half being serialized can be attached to a call (see [`attach`]).
pub(crate) fn attachable() -> Result<(), &'static str> {
    ENCODING.with(|e| e.borrow().as_ref().map(|_| ()).ok_or(NOT_IN_A_CALL))
}

/// Called by a half being serialized: registers it with the call being encoded and returns
/// its channel number, or says why it can't be sent.
pub(crate) fn attach(
    link: Arc<Link>,
    open: impl FnOnce(&Routes, Port) -> BoxFuture<'static, ()> + Send + 'static,
) -> Result<u32, &'static str> {
    ENCODING.with(|e| {
        let mut e = e.borrow_mut();
        let encoding = e.as_mut().ok_or(NOT_IN_A_CALL)?;
        encoding.attached.push(Attachment {
            link,
            open: Some(Box::new(open)),
        });
        Ok((encoding.attached.len() - 1) as u32)
    })
}

struct Decoding {
    openers: Vec<OpenFn>,
}

/// Decodes a call's arguments with `decode`, then connects the channel halves among them to the
/// call's connection and starts their pumps. Returns how many channels the call carries. Costs
/// a call without channels two thread-local swaps.
pub(crate) fn decoding<R>(
    routes: &Routes,
    out: &Arc<Outbox>,
    call: u64,
    decode: impl FnOnce() -> R,
) -> (R, u32) {
    /// Puts the outer decoding back even if `decode` panics.
    struct Restore(Option<Option<Decoding>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                DECODING.with(|d| *d.borrow_mut() = outer);
            }
        }
    }
    let mut restore = Restore(Some(DECODING.with(|d| {
        d.borrow_mut().replace(Decoding {
            openers: Vec::new(),
        })
    })));
    let result = decode();
    let outer = restore.0.take().expect("restored once");
    let decoded = DECODING.with(|d| std::mem::replace(&mut *d.borrow_mut(), outer));
    let openers = decoded.map(|d| d.openers).unwrap_or_default();
    let chans = openers.len() as u32;
    for (chan, open) in (0..).zip(openers) {
        let port = Port {
            out: out.clone(),
            side: Side::Runner,
            call,
            chan,
        };
        let pump = open(routes, port);
        routes.arm(call, chan, pump);
    }
    (result, chans)
}

/// Called by a half being deserialized: it will be channel `chan` of the call being decoded,
/// connected by `open`; or says why it can't be.
pub(crate) fn connect(
    chan: u32,
    open: impl FnOnce(&Routes, Port) -> BoxFuture<'static, ()> + Send + 'static,
) -> Result<(), &'static str> {
    DECODING.with(|d| {
        let mut d = d.borrow_mut();
        let decoding = d.as_mut().ok_or(
            "a flame channel half can only be deserialized as (part of) an argument of a flame call",
        )?;
        // The sender numbers a call's channels 0, 1, 2... in the order they serialize, and
        // `end_call` takes down exactly those: anything else would outlive its call.
        if chan as usize != decoding.openers.len() {
            return Err("a call's channels arrived out of order");
        }
        decoding.openers.push(Box::new(open));
        Ok(())
    })
}
