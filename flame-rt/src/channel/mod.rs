//! Typed channels that cross the process boundary: stream data to a task on a runner, and stream
//! its results back as they come.
//!
//! [`channel`](fn@channel) makes a bounded channel. Within one process it is a Tokio `mpsc` channel.
//! Both halves are `Serialize + Deserialize`, so either can be a **task argument** (or a field of
//! one): the task gets a half that works over its runner's connection, and the caller keeps the
//! other one.
//!
//! ```
//! # use std::time::Duration;
//! use flame::{Pool, channel::{Receiver, Sender}};
//!
//! #[flame::task]
//! async fn squares(mut numbers: Receiver<u64>, out: Sender<u64>) -> u64 {
//!     let mut seen = 0;
//!     while let Some(n) = numbers.recv().await {
//!         out.send(n * n).await.expect("the caller went away");
//!         seen += 1;
//!     }
//!     seen
//! }
//!
//! #[flame::main]
//! async fn main() -> Result<(), flame::Error> {
//!     let pool = Pool::builder("squares").max(1).start().await?;
//!     if flame::parent().is_some() {
//!         return Ok(());
//!     }
//!     let (numbers, task_numbers) = flame::channel(16);
//!     let (task_out, mut squares_back) = flame::channel(16);
//!     let handle = flame::spawn_on(&pool, squares(task_numbers, task_out));
//!     for n in 1..=3 {
//!         numbers.send(n).await?;
//!     }
//!     drop(numbers); // the task's `recv` returns `None` once it has the three
//!     let mut got = Vec::new();
//!     while let Some(square) = squares_back.recv().await {
//!         got.push(square);
//!     }
//!     assert_eq!(got, [1, 4, 9]);
//!     assert_eq!(handle.await?, 3);
//!     pool.shutdown().await;
//!     Ok(())
//! }
//! ```
//!
//! # Semantics
//!
//! - **Backpressure end to end.** A channel of capacity `n` has at most `n` messages, and at
//!   most `n` MiB of them, between the sending process and the receiving app: the receiving
//!   side grants credit as the app takes messages, and a sender without credit waits in `send`
//!   (a message bigger than the window waits until half of it is free). The sending process
//!   holds at most `n` more in its `mpsc`. One slow channel never holds up the others on the
//!   same runner, nor the calls' results. Messages bigger than 256 KiB go out in chunks that take
//!   turns with other traffic; one message may be as large as the pool's
//!   [`max_payload`](crate::PoolBuilder::max_payload). A peer that sends past its credit (a
//!   compromised runner, say) ends the channel with [`ErrorKind::Protocol`](crate::ErrorKind)
//!   instead of making this side buffer it.
//! - **Bulk data**: `bytes::Bytes` messages cross without a copy in user space on either side
//!   (the frame's bytes are handed over as they are). A few messages of 64–256 KiB in flight are
//!   fastest, since they stay in cache: [`stream_reader`] keeps 8 × 128 KiB.
//! - **Order** is kept, per channel.
//! - **Closing** is seen across the wire: when every sender is dropped the receiver gets what
//!   was sent, then `None`; when the receiver is dropped the senders' `send` fails.
//! - **Channels belong to the call that carried them.** When the call ends, is cancelled or
//!   loses its runner, its channels close on both sides: a receiver gets `None` (then
//!   [`Receiver::error`] says why, unless the call simply finished), a sender's `send` fails
//!   with an error saying the call ended. What a task sent before returning reaches the caller
//!   before its result. Nothing of a channel outlives its call.
//! - **A half goes to one call.** Sending the same half with two calls (or serializing it
//!   outside a call's arguments) is a [`Codec`](crate::ErrorKind::Codec) error of that call.
//!   Clone a [`Sender`] to give several calls their own.
//! - A call that carries channels cannot be retried ([`Call::retries`](crate::Call::retries)):
//!   a stream can't be replayed.
//!
//! # Placed tasks
//!
//! FLAME's `place_child` — a long-lived process on a runner that talks to its caller — is a
//! task that takes channels: it holds its slot on the runner until it returns, and the caller
//! talks to it for as long as it runs. The shape of the thumbnails app:
//!
//! ```no_run
//! use bytes::Bytes;
//! use flame::channel::{self, Receiver, Sender};
//!
//! #[flame::task]
//! async fn thumbnails(video: Receiver<Bytes>, thumbs: Sender<Vec<u8>>) -> Result<u32, String> {
//!     // On the runner: pipe the upload into ffmpeg as it arrives, send each PNG back as ffmpeg
//!     // writes it (`tokio::io::copy(&mut channel::into_reader(video), &mut stdin)`...).
//! #   let _ = (video, thumbs);
//!     Ok(0)
//! }
//!
//! # async fn upload(pool: &flame::Pool) -> Result<(), Box<dyn std::error::Error>> {
//! // On the parent: two lines to stream a file to the runner.
//! let file = tokio::fs::File::open("video.mp4").await?;
//! let (thumbs_tx, mut thumbs) = flame::channel(8);
//! let handle = flame::spawn_on(pool, thumbnails(channel::stream_reader(file), thumbs_tx));
//! while let Some(png) = thumbs.recv().await {
//!     // push it to the browser as it comes
//! #   let _ = png;
//! }
//! let count = handle.await??; // dropping `handle` instead stops ffmpeg on the runner
//! # let _ = count; Ok(()) }
//! ```

mod bridge;
mod io;
mod pump;
mod routes;

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::{Sink, Stream};
use serde::de::{DeserializeOwned, Error as _};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::error::{Error, ErrorKind};
pub(crate) use bridge::{Attachment, decoding, encoding, probing};
pub use io::{ChannelReader, ChannelWriter, into_reader, into_writer, stream_reader};
pub(crate) use routes::{End, Port, Routes, Side};

use routes::Link;

/// Makes a bounded channel for messages of type `T` that can cross to a runner: pass either
/// half to a task as an argument. `capacity` (at least 1) bounds how many messages wait on each
/// side of the connection. See the [module docs](self).
///
/// # Panics
/// If `capacity` is 0, like `tokio::sync::mpsc::channel`.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>)
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    let (tx, rx) = mpsc::channel(capacity);
    let link = Link::new();
    (Sender::new(tx, link.clone()), Receiver::new(rx, link))
}

/// How a half is written into a call's arguments: which of the call's channels it is.
#[derive(Serialize, Deserialize)]
struct Wire {
    chan: u32,
    capacity: u32,
}

impl Wire {
    /// What a half encodes as while arguments are probed for the one that fails.
    fn placeholder<S: Serializer>(serializer: S) -> Result<S::Ok, S::Error> {
        Wire {
            chan: 0,
            capacity: 0,
        }
        .serialize(serializer)
    }

    /// Attaches a half to the call being encoded, with the pump `open` makes for the end it
    /// pointed at, and writes its channel number.
    fn write<S: Serializer>(
        serializer: S,
        capacity: usize,
        link: Arc<Link>,
        open: impl FnOnce(&Routes, Port) -> BoxFuture<'static, ()> + Send + 'static,
    ) -> Result<S::Ok, S::Error> {
        let capacity = u32::try_from(capacity).map_err(|_| {
            S::Error::custom(bridge::refuse(
                "a flame channel sent to a runner holds at most u32::MAX messages",
            ))
        })?;
        let chan = bridge::attach(link, open).map_err(S::Error::custom)?;
        Wire { chan, capacity }.serialize(serializer)
    }

    /// Reads a half of a call's arguments, and makes the local channel one end of which the
    /// task gets, the other end being pumped over the connection.
    #[allow(clippy::type_complexity)]
    fn read<'de, D: Deserializer<'de>, T>(
        deserializer: D,
    ) -> Result<(u32, mpsc::Sender<T>, mpsc::Receiver<T>, Arc<Link>), D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        let (tx, rx) = mpsc::channel(wire.capacity.max(1) as usize);
        Ok((wire.chan, tx, rx, Link::new()))
    }
}

/// The sending half of a [`channel`](fn@channel). Cheap to clone; implements
/// [`futures::Sink`].
pub struct Sender<T> {
    tx: PollSender<T>,
    link: Arc<Link>,
    /// Serialized into a call already.
    sent: AtomicBool,
}

impl<T: Send + 'static> Sender<T> {
    fn new(tx: mpsc::Sender<T>, link: Arc<Link>) -> Sender<T> {
        Sender {
            tx: PollSender::new(tx),
            link,
            sent: AtomicBool::new(false),
        }
    }

    /// Sends a message, waiting for room in the channel. Fails if the receiver is gone: dropped,
    /// or its call ended, was cancelled or lost its runner (the error says which).
    pub async fn send(&self, message: T) -> Result<(), Error> {
        match self.tx.get_ref() {
            Some(tx) => tx.send(message).await.map_err(|_| self.closed_error()),
            None => Err(self.closed_error()),
        }
    }

    /// Whether the receiving side is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.get_ref().is_none_or(|tx| tx.is_closed())
    }

    /// Resolves when the receiving side is gone.
    pub async fn closed(&self) {
        if let Some(tx) = self.tx.get_ref() {
            tx.closed().await;
        }
    }

    /// Why sending fails, if it does.
    fn closed_error(&self) -> Error {
        match self.link.reason() {
            Some(reason) => reason.clone(),
            None if self.sent.load(Ordering::Relaxed) => Error::new(
                ErrorKind::ChannelClosed,
                "this sender was sent to a runner with a call; send through the runner's copy",
            ),
            None => Error::new(
                ErrorKind::ChannelClosed,
                "the receiving half of this channel was dropped",
            ),
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            link: self.link.clone(),
            sent: AtomicBool::new(false),
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("flame::channel::Sender")
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Sink<T> for Sender<T> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        this.tx.poll_reserve(cx).map_err(|_| this.closed_error())
    }

    fn start_send(self: Pin<&mut Self>, message: T) -> Result<(), Error> {
        let this = self.get_mut();
        this.tx.send_item(message).map_err(|_| this.closed_error())
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().tx.close();
        Poll::Ready(Ok(()))
    }
}

impl<T> Serialize for Sender<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if bridge::is_probing() {
            return Wire::placeholder(serializer);
        }
        if let Err(why) = bridge::attachable() {
            return Err(S::Error::custom(why));
        }
        if self.sent.swap(true, Ordering::Relaxed) {
            return Err(S::Error::custom(bridge::refuse(
                "this flame::channel::Sender was already sent with a call; \
                 clone it to give each call its own",
            )));
        }
        let Some(tx) = self.tx.get_ref().cloned() else {
            return Err(S::Error::custom(bridge::refuse(
                "this flame::channel::Sender was closed before it was sent",
            )));
        };
        let capacity = tx.max_capacity();
        let link = self.link.clone();
        Wire::write(serializer, capacity, link.clone(), move |routes, port| {
            pump::open_inbound(routes, port, tx, link)
        })
    }
}

impl<'de, T> Deserialize<'de> for Sender<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (chan, tx, rx, link) = Wire::read(deserializer)?;
        let pump_link = link.clone();
        bridge::connect(chan, move |routes, port| {
            pump::open_outbound(routes, port, rx, pump_link)
        })
        .map_err(D::Error::custom)?;
        Ok(Sender::new(tx, link))
    }
}

/// The receiving half of a [`channel`](fn@channel). Implements [`futures::Stream`].
pub struct Receiver<T> {
    /// Taken when the half is serialized into a call.
    rx: Mutex<Option<mpsc::Receiver<T>>>,
    link: Arc<Link>,
}

impl<T> Receiver<T> {
    fn new(rx: mpsc::Receiver<T>, link: Arc<Link>) -> Receiver<T> {
        Receiver {
            rx: Mutex::new(Some(rx)),
            link,
        }
    }

    fn rx(&mut self) -> Option<&mut mpsc::Receiver<T>> {
        self.rx
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
    }

    /// The next message; `None` once every sender is gone and all they sent was received, or
    /// once the call that carried the channel ended ([`error`](Receiver::error) says why).
    pub async fn recv(&mut self) -> Option<T> {
        let message = self.rx()?.recv().await;
        if message.is_some() {
            self.link.took();
        }
        message
    }

    /// Why the channel ended, when it ended other than by its senders finishing: the call that
    /// carried it was cancelled or lost its runner, a message could not be decoded...
    pub fn error(&self) -> Option<Error> {
        self.link.reason().cloned()
    }

    /// Stops the senders from sending more. Within one process, what they sent already can
    /// still be received; across the wire, messages in flight are dropped and the remote
    /// senders' `send` fails.
    pub fn close(&mut self) {
        if let Some(rx) = self.rx() {
            rx.close();
        }
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("flame::channel::Receiver")
            .finish_non_exhaustive()
    }
}

impl<T> Stream for Receiver<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        let polled = match this.rx() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        };
        if let Poll::Ready(Some(_)) = &polled {
            this.link.took();
        }
        polled
    }
}

impl<T> Serialize for Receiver<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if bridge::is_probing() {
            return Wire::placeholder(serializer);
        }
        let mut slot = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(why) = bridge::attachable() {
            return Err(S::Error::custom(why));
        }
        let Some(rx) = slot.take() else {
            return Err(S::Error::custom(bridge::refuse(
                "this flame::channel::Receiver was already sent with a call; \
                 a receiver can go to one call only",
            )));
        };
        let capacity = rx.max_capacity();
        let link = self.link.clone();
        Wire::write(serializer, capacity, link.clone(), move |routes, port| {
            pump::open_outbound(routes, port, rx, link)
        })
    }
}

impl<'de, T> Deserialize<'de> for Receiver<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (chan, tx, rx, link) = Wire::read(deserializer)?;
        let pump_link = link.clone();
        bridge::connect(chan, move |routes, port| {
            pump::open_inbound(routes, port, tx, pump_link)
        })
        .map_err(D::Error::custom)?;
        Ok(Receiver::new(rx, link))
    }
}
