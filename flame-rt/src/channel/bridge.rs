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
//!
//! The routes live in `routes.rs`, the pumps and their credit in `pump.rs`; this file holds
//! what happens while a call's arguments are encoded and decoded: a half becomes an
//! [`Attachment`] and is connected when the call starts.

use std::cell::RefCell;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::error::{Error, ErrorKind};
use crate::protocol::Outbox;

use super::routes::{Link, Port, Routes, Side};

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
