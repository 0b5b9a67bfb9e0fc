//! The pumps behind channel halves, and their credit: an outbound pump sends messages while
//! the peer has granted room for them (in count and in bytes), an inbound pump decodes them
//! into the task's or caller's half and grants the room back as the app takes them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::any::Any;
use std::ops::ControlFlow;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};

use crate::error::{Error, ErrorKind};
use crate::protocol::{ChanBodyRef, PIECE};

use super::routes::{Link, Port, RouteKind, Routes};

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
    routes.open(&port, RouteKind::In(Some(Box::new(inbox))), link.clone());
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
    let kind = RouteKind::Out {
        credit: credit.clone(),
        finish: finish.clone(),
    };
    routes.open(&port, kind, link.clone());
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

/// Decodes a whole message `data` as a byte string, if `T` is a byte type (see `owned_bytes`):
/// `Bytes` as a slice of the `frame` it came in (no copy), a byte vector copied once. `None`
/// for other types (and for `Bytes` put together from chunks), which serde decodes, and for
/// bytes that do not decode, so serde's error names the type.
fn byte_message<T: 'static>(data: &[u8], frame: Option<&Bytes>) -> Option<T> {
    let mut item = None::<T>;
    let slot = &mut item as &mut dyn Any;
    let is_bytes = slot.is::<Option<Bytes>>() && frame.is_some();
    if !(is_bytes || slot.is::<Option<Vec<u8>>>() || slot.is::<Option<Box<[u8]>>>()) {
        return None;
    }
    let raw = postcard::from_bytes::<&[u8]>(data).ok()?;
    if let Some(slot) = slot.downcast_mut::<Option<Bytes>>() {
        *slot = frame.map(|frame| frame.slice_ref(raw));
    } else if let Some(slot) = slot.downcast_mut::<Option<Vec<u8>>>() {
        *slot = Some(raw.to_vec());
    } else if let Some(slot) = slot.downcast_mut::<Option<Box<[u8]>>>() {
        *slot = Some(raw.into());
    }
    item
}

impl<T: DeserializeOwned + Send + 'static> Inbox for Decoder<T> {
    fn push(&mut self, data: &[u8], last: bool, frame: &Bytes) -> bool {
        if last
            && self.partial.is_empty()
            && let Some(item) = byte_message::<T>(data, Some(frame))
        {
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
        let whole = match self.partial.is_empty() {
            true => data,
            false => &self.partial[..],
        };
        let decoded = match byte_message::<T>(whole, None) {
            Some(item) => Ok(item),
            None => postcard::from_bytes::<T>(whole),
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

async fn outbound<T: Serialize + Send + 'static>(
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
        let out = Outgoing {
            port: &port,
            credit: &credit,
            link: &link,
        };
        let sent = match owned_bytes(item) {
            Ok(bytes) => out.send(bytes, &mut spare).await,
            Err(item) => out.send(item, &mut spare).await,
        };
        if sent.is_break() {
            return;
        }
    }
}

/// A byte vector sent on a channel becomes `Bytes`, without a copy, and goes out from where
/// it is, as `Bytes` do (serde would hand postcard a `Vec<u8>` byte by byte: 128 KiB chunks
/// crossed at 0.76 GB/s). Postcard writes both alike, so the receiver decodes either.
fn owned_bytes<T: 'static>(item: T) -> Result<Bytes, T> {
    let mut slot = Some(item);
    let any = &mut slot as &mut dyn Any;
    let bytes = if let Some(vec) = any.downcast_mut::<Option<Vec<u8>>>() {
        vec.take().map(Bytes::from)
    } else if let Some(boxed) = any.downcast_mut::<Option<Box<[u8]>>>() {
        boxed.take().map(Bytes::from)
    } else {
        None
    };
    match (bytes, slot) {
        (Some(bytes), _) => Ok(bytes),
        (None, Some(item)) => Err(item),
        (None, None) => unreachable!("taken only as bytes"),
    }
}

/// Where an outbound pump sends one message.
struct Outgoing<'a> {
    port: &'a Port,
    credit: &'a OutCredit,
    link: &'a Link,
}

impl Outgoing<'_> {
    /// Sends `item` once the credit allows (a big one in chunks, encoded into `spare`), or
    /// ends the channel, and the pump, with a `Codec` error if it cannot go.
    async fn send<T: Serialize + Send + 'static>(
        &self,
        item: T,
        spare: &mut Vec<u8>,
    ) -> ControlFlow<()> {
        // Sized first: the credit is booked by size before anything goes out.
        let encoded = postcard::experimental::serialized_size(&item).and_then(|size| {
            if size > PIECE {
                spare.clear();
                *spare = postcard::to_extend(&item, std::mem::take(spare))?;
            }
            Ok(size)
        });
        let max = self.credit.max_message;
        let why = match encoded {
            Ok(size) if size <= max => {
                self.credit.take(size).await;
                match size <= PIECE {
                    true => self.port.send_inline(&item, size),
                    false => self.port.send_chunks(spare).await,
                }
                return ControlFlow::Continue(());
            }
            Ok(size) => format!(
                "a message of {size} bytes is more than a flame channel carries (the pool's \
                 max_payload, {max} bytes); raise PoolBuilder::max_payload, or send it in \
                 smaller messages"
            ),
            Err(e) => format!(
                "a message of type {} could not be encoded for a flame channel ({e})",
                std::any::type_name::<T>()
            ),
        };
        self.link.end(Error::new(ErrorKind::Codec, why));
        let why = self
            .link
            .reason()
            .map(ToString::to_string)
            .unwrap_or_default();
        self.port.send(ChanBodyRef::Fail(&why));
        ControlFlow::Break(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte vectors leave as `Bytes` and come back as themselves, and what goes on the wire is
    /// what postcard writes for the vector, so a peer decoding it the generic way agrees.
    #[test]
    fn byte_vectors_cross_as_one_string_on_the_same_wire() {
        let data: Vec<u8> = (0..=255).collect();
        let wire = postcard::to_allocvec(&data).unwrap();
        let sent = owned_bytes(data.clone()).expect("a Vec<u8> goes as Bytes");
        assert_eq!(postcard::to_allocvec(&sent).unwrap(), wire);
        let boxed = owned_bytes(data.clone().into_boxed_slice()).expect("so does a Box<[u8]>");
        assert_eq!(postcard::to_allocvec(&boxed).unwrap(), wire);

        let frame = Bytes::from(wire.clone());
        assert_eq!(byte_message::<Vec<u8>>(&wire, None), Some(data.clone()));
        let boxed = byte_message::<Box<[u8]>>(&wire, None).map(Vec::from);
        assert_eq!(boxed, Some(data.clone()));
        let shared = byte_message::<Bytes>(&frame, Some(&frame)).unwrap();
        assert_eq!(shared, data);
        assert_eq!(
            shared.as_ptr(),
            frame[wire.len() - 256..].as_ptr(),
            "a slice, not a copy"
        );

        // Other types go through serde, and bytes that do not decode are left to it too.
        assert!(owned_bytes(vec![1u16, 2]).is_err());
        assert!(owned_bytes(String::from("text")).is_err());
        assert_eq!(byte_message::<Vec<u16>>(&wire, None), None);
        assert_eq!(byte_message::<Vec<u8>>(&[0xFF], None), None);
    }
}
