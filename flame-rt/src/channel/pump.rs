//! The pumps behind channel halves, and their credit: an outbound pump sends messages while
//! the peer has granted room for them (in count and in bytes), an inbound pump decodes them
//! into the task's or caller's half and grants the room back as the app takes them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::any::Any;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};

use crate::error::{Error, ErrorKind};
use crate::protocol::{ChanBodyRef, PIECE};

use super::routes::{Link, Port, Route, RouteKind, Routes};

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
pub(super) trait Inbox: Send {
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
pub(super) const MAX_MESSAGE: usize = 1 << 30;

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
pub(super) struct OutCredit {
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
    pub(super) fn granted(&self, n: u32) {
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
