//! The wire protocol between a parent and its runners.
//!
//! One TCP connection per runner, dialled by the runner, carries every call to that runner.
//! Frames are length-delimited; each holds one postcard-encoded message. Message enums are
//! externally tagged (postcard writes the variant index) and only ever grow at the end, so the
//! protocol version in the handshake is what decides compatibility.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ErrorKind};
use crate::trace::TraceParent;

/// Bumped on any incompatible change of the messages below.
pub(crate) const PROTOCOL_VERSION: u32 = 6;

/// Largest frame either side accepts. Payloads bigger than [`PIECE`] cross in pieces, so no
/// frame comes near it; it bounds what a broken peer can make us allocate.
pub(crate) const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Largest frame the parent reads from a peer that has not proven who it is: a `Hello` with
/// the task manifest of a big app fits many times over; an attacker's 64 MiB allocation doesn't.
pub(crate) const MAX_HELLO_FRAME: usize = 1024 * 1024;

/// The runner's first frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) protocol: u32,
    pub(crate) runner_id: String,
    pub(crate) token: [u8; 16],
    pub(crate) fingerprint: String,
    pub(crate) manifest_hash: u64,
    /// Sorted `(task id, signature hash)` pairs, so a mismatch can be explained by name.
    pub(crate) manifest: Vec<(String, u64)>,
}

/// What the parent tells a runner it accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Welcome {
    pub(crate) heartbeat_ms: u64,
    pub(crate) miss_limit: u32,
    pub(crate) idle_ms: Option<u64>,
    /// The largest result a call may return (the pool's `max_payload`).
    pub(crate) max_payload: u64,
}

/// Parent → runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ToRunner {
    Welcome(Welcome),
    Refused {
        reason: String,
    },
    Run {
        call: u64,
        task: String,
        /// Time left until the call's deadline, relative because clocks differ between hosts.
        deadline_ms: Option<u64>,
        /// The caller's trace context.
        trace: Option<TraceParent>,
        /// Last, so big arguments are written from where they are, not copied into the frame.
        args: Bytes,
    },
    Cancel {
        call: u64,
    },
    Heartbeat,
    /// Stop taking work, let running tasks finish within `grace_ms`, then exit.
    Shutdown {
        grace_ms: u64,
    },
    /// Traffic of a channel carried by a call (see `channel/bridge.rs`).
    Chan(ChanFrame),
    /// A piece of a big call's arguments; the rest follow, the last one in its `Run`.
    Part(Part),
    /// The parent has put `bytes` of call `call`'s result together: the runner may have up to
    /// [`PIECE_WINDOW`] more on their way.
    Took {
        call: u64,
        bytes: u64,
    },
}

/// Runner → parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ToParent {
    Hello(Hello),
    Done {
        call: u64,
        outcome: Outcome,
    },
    /// The task's future has been dropped after a `Cancel`.
    Cancelled {
        call: u64,
    },
    Heartbeat,
    /// The runner has had no work for `idle_ms`; the parent decides whether it stops. Sent
    /// after each idle period.
    Idle {
        idle_ms: u64,
    },
    /// The runner's `main` returned an error: it is going away.
    BootFailed {
        reason: String,
    },
    /// The first frame of a runner of a TLS pool, in plaintext: who it is, so the listener can
    /// route it. Its `Hello` follows inside TLS.
    StartTls {
        runner_id: String,
    },
    /// Traffic of a channel carried by a call (see `channel/bridge.rs`).
    Chan(ChanFrame),
    /// A piece of a big call's result; the rest follow, the last one in its `Done`.
    Part(Part),
    /// The runner's platform is stopping it (SIGTERM): it finishes its calls, takes no more,
    /// then exits.
    Stopping,
    /// The runner has put `bytes` of call `call`'s arguments together: the parent may have up
    /// to [`PIECE_WINDOW`] more on their way.
    Took {
        call: u64,
        bytes: u64,
    },
}

/// A piece of a payload too big for one frame, or big enough to hold the connection while other
/// calls' frames wait: arguments and results above [`PIECE`] go out in pieces of that size,
/// taking turns with other frames. `total` is the whole payload's size, so the receiver
/// allocates it once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Part {
    pub(crate) call: u64,
    pub(crate) total: u64,
    pub(crate) data: Bytes,
}

/// Variant indices of `ToRunner::Part` and `ToParent::Part`, the first byte of their frames.
pub(crate) const TO_RUNNER_PART: u8 = 7;
pub(crate) const TO_PARENT_PART: u8 = 8;

/// Big messages (channel messages, arguments, results) go out in pieces of this size.
pub(crate) const PIECE: usize = 256 * 1024;
/// A piece waits for the connection's outbox to go below this first, so a small frame queued
/// meanwhile waits behind at most this much.
pub(crate) const HIGH_WATER: usize = 1024 * 1024;
/// How much of a call's arguments or result may be sent in pieces and not yet put together by
/// the other side. Without it the kernel's socket buffers (autotuned up to 32 MiB here) filled
/// with pieces, and a small call sent beside a 256 MiB argument waited behind them: 25–110 ms.
/// It also caps one transfer at `PIECE_WINDOW` per round trip: 4 GB/s at 1 ms, 40 MB/s across
/// an ocean.
pub(crate) const PIECE_WINDOW: u64 = 4 * 1024 * 1024;
/// The receiver of pieces says how far it got each time another this much has come in.
const TOOK_STEP: u64 = 1024 * 1024;

/// What a receiver of pieces that had `before` bytes of a payload and now has `now` should
/// report to the sender (`Took`), if anything.
pub(crate) fn took_to_report(before: usize, now: usize) -> Option<u64> {
    let (before, now) = (before as u64, now as u64);
    (now / TOOK_STEP > before / TOOK_STEP).then_some(now)
}

/// Waits until less than [`PIECE_WINDOW`] of the `sent` bytes of a payload are not yet taken by
/// the receiver. `took` reads how much it has taken, or `None` if the transfer is over (its
/// call cancelled or its connection ended), which ends the wait with `false`; `progress` is
/// woken whenever that may have changed.
pub(crate) async fn window_open(
    progress: &Notify,
    sent: u64,
    took: impl Fn() -> Option<u64>,
) -> bool {
    loop {
        let notified = progress.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before looking, so a wake-up in between is not lost.
        notified.as_mut().enable();
        match took() {
            None => return false,
            Some(took) if sent.saturating_sub(took) < PIECE_WINDOW => return true,
            Some(_) => notified.await,
        }
    }
}

impl Outbox {
    /// Queues `data`, a piece of call `call`'s payload of `total` bytes, without copying it.
    pub(crate) fn send_part(&self, variant: u8, call: u64, total: usize, data: Bytes) -> bool {
        #[derive(Serialize)]
        struct PartHead {
            variant: u8,
            call: u64,
            total: u64,
            len: usize,
        }
        let head = PartHead {
            variant,
            call,
            total: total as u64,
            len: data.len(),
        };
        self.send_with_tail(|buf| postcard::to_io(&head, buf.writer()).map(drop), data)
    }
}

/// Decodes a `Part` frame of `variant` in place; `None` if the frame is another message.
pub(crate) fn part_frame(frame: &[u8], variant: u8) -> Option<Result<PartRef<'_>, Error>> {
    if frame.first() != Some(&variant) {
        return None;
    }
    Some(
        postcard::from_bytes::<PartRef<'_>>(frame)
            .map_err(|e| Error::new(ErrorKind::Protocol, e.to_string())),
    )
}

/// A `Part` frame with its data borrowed from the frame.
#[derive(Debug, Deserialize)]
pub(crate) struct PartRef<'a> {
    #[allow(dead_code)]
    variant: u8,
    pub(crate) call: u64,
    pub(crate) total: u64,
    pub(crate) data: &'a [u8],
}

/// One frame of a channel: channels are numbered per call, in the order the call's arguments
/// serialized them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ChanFrame {
    pub(crate) call: u64,
    pub(crate) chan: u32,
    pub(crate) body: ChanBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ChanBody {
    /// A whole message, or the last chunk of one.
    Data(Bytes),
    /// A chunk of a message that continues in the next frames: big messages are cut so they
    /// don't hold the connection while other calls' frames wait.
    Part(Bytes),
    /// The receiving side took this many messages: the sender may send as many more.
    Credit(u32),
    /// The sending side is done (every sender dropped), or the receiving side was dropped.
    Close,
    /// The sending side ended with this error (a read error of a streamed file, say).
    Fail(String),
}

/// Variant indices of `ToRunner::Chan` and `ToParent::Chan`, the first byte of their frames.
pub(crate) const TO_RUNNER_CHAN: u32 = 6;
pub(crate) const TO_PARENT_CHAN: u32 = 7;

/// A channel frame with borrowed data: encodes byte for byte as `ToRunner::Chan` /
/// `ToParent::Chan` (checked by a test), and decodes in place, so a chunk reaches its channel
/// as a slice of the frame it came in, without a copy.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChanFrameRef<'a> {
    pub(crate) variant: u32,
    pub(crate) call: u64,
    pub(crate) chan: u32,
    #[serde(borrow)]
    pub(crate) body: ChanBodyRef<'a>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ChanBodyRef<'a> {
    Data(#[serde(serialize_with = "as_bytes")] &'a [u8]),
    Part(#[serde(serialize_with = "as_bytes")] &'a [u8]),
    Credit(u32),
    Close,
    Fail(&'a str),
}

/// Decodes a `ToParent::Done` frame with its result as a slice of the frame (no copy, no
/// allocation per result); `None` if the frame is another message.
pub(crate) fn done_frame(frame: &Bytes) -> Option<Result<ToParent, Error>> {
    #[derive(Deserialize)]
    struct Borrowed<'a> {
        variant: u32,
        call: u64,
        #[serde(borrow)]
        outcome: OutcomeRef<'a>,
    }
    #[derive(Deserialize)]
    enum OutcomeRef<'a> {
        Ok(&'a [u8]),
        Panicked(String),
        Failed {
            kind: WireErrorKind,
            message: String,
        },
    }
    // `Done` is variant 1 of `ToParent`: its frames start with that byte.
    if frame.first() != Some(&1) {
        return None;
    }
    Some(
        postcard::from_bytes::<Borrowed<'_>>(frame)
            .map(|done| {
                debug_assert_eq!(done.variant, 1);
                ToParent::Done {
                    call: done.call,
                    outcome: match done.outcome {
                        OutcomeRef::Ok(result) => Outcome::Ok(frame.slice_ref(result)),
                        OutcomeRef::Panicked(message) => Outcome::Panicked(message),
                        OutcomeRef::Failed { kind, message } => Outcome::Failed { kind, message },
                    },
                }
            })
            .map_err(|e| Error::new(ErrorKind::Protocol, e.to_string())),
    )
}

/// Serializes a borrowed slice as bytes, as `Bytes` does: serde's own `[u8]` is a sequence, which
/// postcard encodes to the same bytes but one `u8` call at a time.
pub(crate) fn as_bytes<S: serde::Serializer>(data: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(data)
}

/// Decodes `frame` as a channel frame of `variant` in place; `None` if it is another message.
pub(crate) fn chan_frame(frame: &[u8], variant: u32) -> Option<Result<ChanFrameRef<'_>, Error>> {
    // Postcard writes the variant index first, as a varint: both are one byte.
    if frame.first().map(|b| u32::from(*b)) != Some(variant) {
        return None;
    }
    Some(
        postcard::from_bytes::<ChanFrameRef<'_>>(frame)
            .map_err(|e| Error::new(ErrorKind::Protocol, e.to_string())),
    )
}

/// How a call ended on the runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    Ok(Bytes),
    Panicked(String),
    Failed {
        kind: WireErrorKind,
        message: String,
    },
}

/// The error kinds a runner can report for a call.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) enum WireErrorKind {
    TimedOut,
    UnknownTask,
    Codec,
    ShuttingDown,
    StateMissing,
}

impl Outcome {
    pub(crate) fn into_result(self) -> Result<Bytes, Error> {
        match self {
            Outcome::Ok(bytes) => Ok(bytes),
            Outcome::Panicked(message) => Err(Error::new(ErrorKind::Panicked, message)),
            Outcome::Failed { kind, message } => Err(Error::new(
                match kind {
                    WireErrorKind::TimedOut => ErrorKind::TimedOut,
                    WireErrorKind::UnknownTask => ErrorKind::UnknownTask,
                    WireErrorKind::Codec => ErrorKind::Codec,
                    WireErrorKind::StateMissing => ErrorKind::StateMissing,
                    WireErrorKind::ShuttingDown => ErrorKind::PoolClosed,
                },
                message,
            )),
        }
    }
}

pub(crate) fn codec() -> LengthDelimitedCodec {
    codec_with_max(MAX_FRAME)
}

fn codec_with_max(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

pub(crate) fn encode<T: Serialize>(msg: &T) -> Result<Bytes, Error> {
    postcard::to_stdvec(msg)
        .map(Bytes::from)
        .map_err(|e| Error::new(ErrorKind::Codec, e.to_string()))
}

/// Whether the peer has spoken within its heartbeat window. Frames only set a flag; the clock
/// is read once per heartbeat tick, not once per frame.
pub(crate) struct Watchdog {
    last_heard: Instant,
    heard: bool,
    window: Duration,
}

impl Watchdog {
    pub(crate) fn new(window: Duration) -> Watchdog {
        Watchdog {
            last_heard: Instant::now(),
            heard: false,
            window,
        }
    }

    pub(crate) fn heard(&mut self) {
        self.heard = true;
    }

    /// Called on each heartbeat tick: how long the peer has been silent, once that is the whole
    /// window (accurate to one tick).
    pub(crate) fn silent_for(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if std::mem::take(&mut self.heard) {
            self.last_heard = now;
        }
        let quiet = now.saturating_duration_since(self.last_heard);
        (quiet >= self.window).then_some(quiet)
    }
}

pub(crate) fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, Error> {
    postcard::from_bytes(frame).map_err(|e| Error::new(ErrorKind::Protocol, e.to_string()))
}

/// How much `read_one_frame` allocates ahead of the bytes that arrived.
const READ_STEP: usize = 16 * 1024;

/// Reads exactly one frame and not a byte more: what follows it may not be for us (a runner of a
/// TLS pool sends its TLS handshake right behind its first frame). `None` at a clean end of
/// stream before the frame.
pub(crate) async fn read_one_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    max_frame: usize,
) -> std::io::Result<Option<Bytes>> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    match io.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max_frame {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte frame, above the {max_frame}-byte limit"),
        ));
    }
    // Grown as the bytes arrive: a peer announcing a big frame and sending nothing costs nothing.
    let mut frame = BytesMut::with_capacity(len.min(READ_STEP));
    while frame.len() < len {
        frame.reserve((len - frame.len()).min(READ_STEP));
        let room = len - frame.len();
        if (&mut *io).take(room as u64).read_buf(&mut frame).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Some(frame.freeze()))
}

/// Calls by id. Ids are a counter each side hands out, so they need no DoS-resistant hash: this
/// one multiplies once, where SipHash runs a dozen rounds per lookup on the hot path.
pub(crate) type CallMap<V> =
    std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<CallIdHasher>>;

#[derive(Default)]
pub(crate) struct CallIdHasher(u64);

impl std::hash::Hasher for CallIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing spreads consecutive ids over the table's buckets.
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Either half of a connection, plaintext or TLS.
pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The reading half of a connection: decoded messages.
pub(crate) struct Reader<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub(crate) fn new(io: R) -> Self {
        Reader::with_max_frame(io, MAX_FRAME)
    }

    pub(crate) fn with_max_frame(io: R, max_frame: usize) -> Self {
        Reader {
            inner: FramedRead::new(io, codec_with_max(max_frame)),
        }
    }

    /// The next frame, undecoded; `None` at a clean end of stream.
    pub(crate) async fn next_frame(&mut self) -> Option<Result<bytes::BytesMut, Error>> {
        Some(
            self.inner
                .next()
                .await?
                .map_err(|e| Error::io("reading a frame", e)),
        )
    }

    /// The next message; `None` at a clean end of stream.
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Option<Result<T, Error>> {
        match self.inner.next().await? {
            Ok(frame) => Some(decode(&frame)),
            Err(e) => Some(Err(Error::io("reading a frame", e))),
        }
    }
}

/// The frames one side has to send, encoded straight into one buffer that the writer task takes
/// whole: every frame queued while the previous write was in flight goes out in one syscall,
/// and queueing a frame allocates nothing and copies it once.
///
/// A frame sent when the connection is quiet is written at once by its sender, from its own
/// thread, if the socket takes it without waiting: the connection is served on the protocol's
/// own thread (`io_runtime`), and waking that thread for every lone frame would cost a call a
/// cross-thread wake-up each way. Under load (a frame within [`WRITE_THROUGH_GAP`] of the last
/// one written that way) frames are left to the writer task, which batches them.
pub(crate) struct Outbox {
    inner: Mutex<OutboxInner>,
    /// The connection's write half while the writer task is not writing with it; `None` before
    /// the writer starts and while it writes.
    io: Mutex<Option<BoxWrite>>,
    ready: Notify,
    /// Woken after each write, for senders of big messages waiting for the queue to go down.
    drained: Notify,
}

/// Frames closer together than this are batched by the writer task rather than written by
/// their senders one syscall each.
const WRITE_THROUGH_GAP: Duration = Duration::from_micros(50);

#[derive(Default)]
struct OutboxInner {
    /// What is queued, in order.
    queued: Batch,
    /// The allocations of the batch written last, for the next one: at 500 k calls/s a fresh
    /// buffer per write was a third of a side's allocations.
    spare: Batch,
    segment_bytes: usize,
    closed: bool,
    /// When a sender last wrote through.
    last_write_through: Option<Instant>,
}

/// Frames as a writer takes them from the outbox: `segments` (big payloads queued without a
/// copy, and the frames queued before each), then `buf`.
#[derive(Default)]
struct Batch {
    segments: Vec<Bytes>,
    buf: BytesMut,
}

/// A spare buffer bigger than this is let go rather than kept for the next batch.
const SPARE_MAX: usize = 1 << 20;

/// At most this many slices per `writev` (Linux takes up to 1024): each is a frame run or a
/// payload, so 64 cover several MiB.
const MAX_SLICES: usize = 64;

impl Batch {
    fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.buf.is_empty()
    }

    /// Part `i` in write order: the segments, then the buffer.
    fn part(&self, i: usize) -> &[u8] {
        self.segments.get(i).map_or(&self.buf[..], |b| &b[..])
    }

    fn parts(&self) -> usize {
        self.segments.len() + 1
    }
}

/// How much of a [`Batch`] has been written.
#[derive(Default)]
struct Written {
    part: usize,
    offset: usize,
}

impl Written {
    fn done(&self, batch: &Batch) -> bool {
        self.part >= batch.parts()
    }

    /// Fills `slices` with what is left to write, from here; returns how many it filled.
    fn slices<'a>(&self, batch: &'a Batch, slices: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut filled = 0;
        let mut offset = self.offset;
        for part in self.part..batch.parts() {
            if filled == slices.len() {
                break;
            }
            let rest = &batch.part(part)[offset..];
            offset = 0;
            if !rest.is_empty() {
                slices[filled] = std::io::IoSlice::new(rest);
                filled += 1;
            }
        }
        filled
    }

    /// Moves past `n` more bytes written, and past any empty parts after them.
    fn advance(&mut self, batch: &Batch, mut n: usize) {
        while self.part < batch.parts() {
            let left = batch.part(self.part).len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.part += 1;
            self.offset = 0;
        }
    }
}

impl OutboxInner {
    fn queued(&self) -> usize {
        self.segment_bytes + self.queued.buf.len()
    }

    /// Everything queued, in order; the queue goes on in the spare batch.
    fn take(&mut self) -> Batch {
        self.segment_bytes = 0;
        let spare = std::mem::take(&mut self.spare);
        std::mem::replace(&mut self.queued, spare)
    }

    /// Keeps a written batch's allocations for the next one.
    fn recycle(&mut self, mut batch: Batch) {
        batch.segments.clear();
        batch.buf.clear();
        if batch.buf.capacity() > SPARE_MAX {
            batch.buf = BytesMut::new();
        }
        self.spare = batch;
    }

    /// Puts back, in front of anything queued since, what a write left unwritten.
    fn put_back(&mut self, mut batch: Batch, written: &Written) {
        let buf = std::mem::take(&mut batch.buf).freeze();
        let rest: Vec<Bytes> = batch
            .segments
            .drain(..)
            .chain([buf])
            .skip(written.part)
            .enumerate()
            .map(|(i, b)| if i == 0 { b.slice(written.offset..) } else { b })
            .filter(|b| !b.is_empty())
            .collect();
        self.segment_bytes += rest.iter().map(Bytes::len).sum::<usize>();
        self.queued.segments.splice(0..0, rest);
    }
}

impl Outbox {
    pub(crate) fn new() -> Arc<Outbox> {
        Arc::new(Outbox {
            inner: Mutex::new(OutboxInner::default()),
            io: Mutex::new(None),
            ready: Notify::new(),
            drained: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutboxInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `msg` as one length-delimited frame; `false` once the outbox is closed.
    pub(crate) fn send<T: Serialize>(&self, msg: &T) -> bool {
        self.send_with(|buf| postcard::to_io(msg, buf.writer()).map(drop))
    }

    /// Queues one frame whose body `write` appends to the buffer: a frame built from parts is
    /// encoded in place, without a copy. `false` once the outbox is closed or if `write` fails.
    pub(crate) fn send_with(
        &self,
        write: impl FnOnce(&mut BytesMut) -> postcard::Result<()>,
    ) -> bool {
        self.send_with_tail(write, Bytes::new())
    }

    /// Like [`send_with`](Outbox::send_with), for a frame that ends with `tail`: a big tail is
    /// queued as it is, shared, not copied.
    pub(crate) fn send_with_tail(
        &self,
        write: impl FnOnce(&mut BytesMut) -> postcard::Result<()>,
        tail: Bytes,
    ) -> bool {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let queued = &mut inner.queued;
        if inner.closed || !push_frame(&mut queued.buf, write, tail.len()) {
            return false;
        }
        if tail.len() < 16 * 1024 {
            queued.buf.extend_from_slice(&tail);
        } else {
            inner.segment_bytes += queued.buf.len() + tail.len();
            queued.segments.push(queued.buf.split().freeze());
            queued.segments.push(tail);
        }
        let now = Instant::now();
        let quiet = inner
            .last_write_through
            .is_none_or(|last| now.saturating_duration_since(last) >= WRITE_THROUGH_GAP);
        if quiet {
            inner.last_write_through = Some(now);
        }
        drop(guard);
        if !(quiet && self.write_through()) {
            self.ready.notify_one();
        }
        true
    }

    /// Queues a call's `Done`: a result goes out from where it is, not copied into the frame,
    /// since it is the frame's last field.
    pub(crate) fn send_done(&self, call: u64, outcome: Outcome) -> bool {
        #[derive(Serialize)]
        struct DoneHead {
            variant: u32,
            call: u64,
            outcome: u32,
            len: usize,
        }
        match outcome {
            Outcome::Ok(result) => {
                let head = DoneHead {
                    variant: 1,
                    call,
                    outcome: 0,
                    len: result.len(),
                };
                self.send_with_tail(|buf| postcard::to_io(&head, buf.writer()).map(drop), result)
            }
            outcome => self.send(&ToParent::Done { call, outcome }),
        }
    }

    /// Writes what is queued from this thread, if the writer task is not writing and the socket
    /// takes it all without waiting. `false` if something is left for the writer task.
    fn write_through(&self) -> bool {
        let Ok(mut io) = self.io.try_lock() else {
            return false;
        };
        let Some(writer) = io.as_mut() else {
            return false;
        };
        let batch = self.lock().take();
        let mut written = Written::default();
        match write_now(writer, &batch, &mut written) {
            Ok(true) => {
                self.lock().recycle(batch);
                self.drained.notify_waiters();
                true
            }
            Ok(false) => {
                self.lock().put_back(batch, &written);
                false
            }
            Err(_) => {
                drop(io);
                self.lock().closed = true;
                self.drained.notify_waiters();
                // The writer task ends on the closed outbox.
                false
            }
        }
    }

    /// No more frames: the writer sends what is queued, then shuts the connection's write side.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
        self.drained.notify_waiters();
    }

    /// Closes the outbox and lets go of the connection at once, unsent frames and all: the
    /// connection is over, and whoever still holds the outbox (a channel's pump) must not keep
    /// its socket open, nobody reading it.
    pub(crate) fn abandon(&self) {
        self.close();
        drop(self.io.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// Waits until at most `limit` bytes are queued (or the outbox is closed), so the chunks of
    /// one big message take turns with other frames instead of queueing all at once.
    pub(crate) async fn wait_below(&self, limit: usize) {
        loop {
            let drained = self.drained.notified();
            {
                let inner = self.lock();
                if inner.queued() <= limit || inner.closed {
                    return;
                }
            }
            drained.await;
        }
    }
}

/// Appends a frame to `buf`: a 4-byte big-endian length, then what `write` appends; the
/// frame's last `tail` bytes are for the caller to queue after.
fn push_frame(
    buf: &mut BytesMut,
    write: impl FnOnce(&mut BytesMut) -> postcard::Result<()>,
    tail: usize,
) -> bool {
    let start = buf.len();
    buf.put_u32(0);
    match write(buf) {
        Ok(()) => {
            let len = buf.len() - start - 4 + tail;
            if len > MAX_FRAME {
                buf.truncate(start);
                tracing::error!(len, "flame: a frame above the size limit was not sent");
                return false;
            }
            buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
            true
        }
        Err(e) => {
            buf.truncate(start);
            tracing::error!(error = %e, "flame: a message could not be encoded");
            false
        }
    }
}

/// Writes `batch` with as few syscalls as the socket allows: one `writev` for a payload and
/// the frame head before it, not one write each.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &Batch,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut written = Written::default();
    written.advance(batch, 0);
    while !written.done(batch) {
        let mut slices = [std::io::IoSlice::new(&[]); MAX_SLICES];
        let filled = written.slices(batch, &mut slices);
        let n = io.write_vectored(&slices[..filled]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written.advance(batch, n);
    }
    Ok(())
}

/// Writes without waiting as much of `batch` as the socket takes, and flushes. `false` if the
/// socket would block (`written` says how far it got) or a flush is pending.
fn write_now(io: &mut BoxWrite, batch: &Batch, written: &mut Written) -> std::io::Result<bool> {
    use std::task::{Context, Poll, Waker};
    // A Pending poll registers this no-op waker in place of the writer task's; the writer task
    // is woken to write the rest and registers its own again.
    let mut cx = Context::from_waker(Waker::noop());
    written.advance(batch, 0);
    while !written.done(batch) {
        let mut slices = [std::io::IoSlice::new(&[]); MAX_SLICES];
        let filled = written.slices(batch, &mut slices);
        match std::pin::Pin::new(&mut *io).poll_write_vectored(&mut cx, &slices[..filled]) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written.advance(batch, n),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(false),
        }
    }
    match std::pin::Pin::new(&mut *io).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok(true),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(false),
    }
}

/// Writes what the outbox holds until it is closed and drained, or the connection fails.
/// Between its own writes it lends the write half to the outbox, for senders to write through.
pub(crate) async fn write_loop(io: BoxWrite, outbox: Arc<Outbox>) {
    use tokio::io::AsyncWriteExt;
    *outbox.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
    loop {
        let ready = outbox.ready.notified();
        // Taken back from the outbox: a sender writing through holds it only for its syscall.
        let Some(mut io) = outbox.io.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let (batch, closed) = {
            let mut inner = outbox.lock();
            (inner.take(), inner.closed)
        };
        if !batch.is_empty() || closed {
            let written = async {
                write_all_vectored(&mut io, &batch).await?;
                // A TLS stream may keep records back until flushed; a socket's flush is free.
                io.flush().await
            };
            if written.await.is_err() {
                outbox.lock().closed = true;
                outbox.drained.notify_waiters();
                return;
            }
            outbox.lock().recycle(batch);
            outbox.drained.notify_waiters();
            if closed && outbox.lock().queued() == 0 {
                let _ = io.shutdown().await;
                return;
            }
            *outbox.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
        } else {
            outbox.lock().recycle(batch);
            *outbox.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
            ready.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::option;
    use proptest::prelude::*;

    fn bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..512).prop_map(Bytes::from)
    }

    fn to_runner() -> impl Strategy<Value = ToRunner> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u32>(),
                option::of(any::<u64>()),
                any::<u64>()
            )
                .prop_map(|(heartbeat_ms, miss_limit, idle_ms, max_payload)| {
                    ToRunner::Welcome(Welcome {
                        heartbeat_ms,
                        miss_limit,
                        idle_ms,
                        max_payload,
                    })
                }),
            part().prop_map(ToRunner::Part),
            (any::<u64>(), any::<u64>()).prop_map(|(call, bytes)| ToRunner::Took { call, bytes }),
            ".{0,80}".prop_map(|reason| ToRunner::Refused { reason }),
            (
                any::<u64>(),
                "[a-z_:]{0,60}",
                bytes(),
                option::of(any::<u64>()),
                option::of(any::<([u8; 16], [u8; 8], u8)>())
            )
                .prop_map(|(call, task, args, deadline_ms, trace)| ToRunner::Run {
                    call,
                    task,
                    args,
                    deadline_ms,
                    trace: trace.map(|(trace_id, span_id, flags)| TraceParent {
                        trace_id,
                        span_id,
                        flags
                    }),
                }),
            any::<u64>().prop_map(|call| ToRunner::Cancel { call }),
            Just(ToRunner::Heartbeat),
            any::<u64>().prop_map(|grace_ms| ToRunner::Shutdown { grace_ms }),
            chan().prop_map(ToRunner::Chan),
        ]
    }

    fn chan() -> impl Strategy<Value = ChanFrame> {
        let body = prop_oneof![
            bytes().prop_map(ChanBody::Data),
            bytes().prop_map(ChanBody::Part),
            any::<u32>().prop_map(ChanBody::Credit),
            Just(ChanBody::Close),
            ".{0,40}".prop_map(ChanBody::Fail),
        ];
        (any::<u64>(), any::<u32>(), body).prop_map(|(call, chan, body)| ChanFrame {
            call,
            chan,
            body,
        })
    }

    fn borrowed(frame: &ChanFrame, variant: u32) -> ChanFrameRef<'_> {
        ChanFrameRef {
            variant,
            call: frame.call,
            chan: frame.chan,
            body: match &frame.body {
                ChanBody::Data(b) => ChanBodyRef::Data(b),
                ChanBody::Part(b) => ChanBodyRef::Part(b),
                ChanBody::Credit(n) => ChanBodyRef::Credit(*n),
                ChanBody::Close => ChanBodyRef::Close,
                ChanBody::Fail(m) => ChanBodyRef::Fail(m),
            },
        }
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        let kind = prop_oneof![
            Just(WireErrorKind::TimedOut),
            Just(WireErrorKind::UnknownTask),
            Just(WireErrorKind::Codec),
            Just(WireErrorKind::ShuttingDown),
        ];
        prop_oneof![
            bytes().prop_map(Outcome::Ok),
            ".{0,80}".prop_map(Outcome::Panicked),
            (kind, ".{0,80}").prop_map(|(kind, message)| Outcome::Failed { kind, message }),
        ]
    }

    fn to_parent() -> impl Strategy<Value = ToParent> {
        prop_oneof![
            (
                any::<u32>(),
                "[a-z0-9-]{0,40}",
                any::<[u8; 16]>(),
                ".{0,60}",
                any::<u64>(),
                vec(("[a-z_:]{0,40}", any::<u64>()), 0..20)
            )
                .prop_map(
                    |(protocol, runner_id, token, fingerprint, manifest_hash, manifest)| {
                        ToParent::Hello(Hello {
                            protocol,
                            runner_id,
                            token,
                            fingerprint,
                            manifest_hash,
                            manifest,
                        })
                    }
                ),
            (any::<u64>(), outcome()).prop_map(|(call, outcome)| ToParent::Done { call, outcome }),
            any::<u64>().prop_map(|call| ToParent::Cancelled { call }),
            Just(ToParent::Heartbeat),
            any::<u64>().prop_map(|idle_ms| ToParent::Idle { idle_ms }),
            ".{0,80}".prop_map(|reason| ToParent::BootFailed { reason }),
            chan().prop_map(ToParent::Chan),
            part().prop_map(ToParent::Part),
            Just(ToParent::Stopping),
            (any::<u64>(), any::<u64>()).prop_map(|(call, bytes)| ToParent::Took { call, bytes }),
        ]
    }

    fn part() -> impl Strategy<Value = Part> {
        (any::<u64>(), any::<u64>(), bytes()).prop_map(|(call, total, data)| Part {
            call,
            total,
            data,
        })
    }

    /// What an outbox holds, as the frames' bodies.
    fn queued_frames(out: &Outbox) -> Vec<Vec<u8>> {
        let batch = out.lock().take();
        let all: Vec<u8> = (0..batch.parts())
            .flat_map(|i| batch.part(i).to_vec())
            .collect();
        let mut frames = Vec::new();
        let mut rest = &all[..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            frames.push(rest[4..4 + len].to_vec());
            rest = &rest[4 + len..];
        }
        frames
    }

    proptest! {
        /// A write cut anywhere puts back exactly what it left, in order, before what was
        /// queued meanwhile; the next batch reuses the written one's buffer.
        #[test]
        fn a_batch_cut_anywhere_is_put_back_whole(
            segments in vec(bytes(), 0..4),
            buf in vec(any::<u8>(), 0..64),
            later in vec(any::<u8>(), 0..16),
            cut in any::<prop::sample::Index>(),
        ) {
            let batch = Batch { segments: segments.clone(), buf: BytesMut::from(&buf[..]) };
            let all: Vec<u8> = segments.iter().flat_map(|b| b.to_vec()).chain(buf.clone()).collect();
            let cut = cut.index(all.len() + 1);
            let mut written = Written::default();
            // Written in two writes, the first cut at `cut`, as a socket that fills up would.
            let mut slices = [std::io::IoSlice::new(&[]); MAX_SLICES];
            let filled = written.slices(&batch, &mut slices);
            let sent: usize = slices[..filled].iter().map(|s| s.len()).sum();
            prop_assert_eq!(sent, all.len());
            written.advance(&batch, cut);
            let mut inner = OutboxInner::default();
            inner.queued.buf.extend_from_slice(&later);
            inner.put_back(batch, &written);
            prop_assert_eq!(inner.queued(), all.len() - cut + later.len());
            let rest = inner.take();
            let rest: Vec<u8> = (0..rest.parts()).flat_map(|i| rest.part(i).to_vec()).collect();
            prop_assert_eq!(rest, [&all[cut..], &later[..]].concat());
        }

        #[test]
        fn parent_messages_round_trip(msg in to_runner()) {
            prop_assert_eq!(decode::<ToRunner>(&encode(&msg).unwrap()).unwrap(), msg);
        }

        #[test]
        fn runner_messages_round_trip(msg in to_parent()) {
            prop_assert_eq!(decode::<ToParent>(&encode(&msg).unwrap()).unwrap(), msg);
        }

        #[test]
        fn borrowed_channel_frames_encode_as_the_messages(frame in chan()) {
            let to_runner = encode(&ToRunner::Chan(frame.clone())).unwrap();
            prop_assert_eq!(&postcard::to_stdvec(&borrowed(&frame, TO_RUNNER_CHAN)).unwrap()[..], &to_runner[..]);
            let back = chan_frame(&to_runner, TO_RUNNER_CHAN).unwrap().unwrap();
            prop_assert_eq!((back.call, back.chan), (frame.call, frame.chan));
            let to_parent = encode(&ToParent::Chan(frame.clone())).unwrap();
            prop_assert_eq!(&postcard::to_stdvec(&borrowed(&frame, TO_PARENT_CHAN)).unwrap()[..], &to_parent[..]);
            prop_assert!(chan_frame(&to_parent, TO_RUNNER_CHAN).is_none());
        }

        #[test]
        fn done_frames_decode_in_place_as_the_messages(call in any::<u64>(), outcome in outcome()) {
            let msg = ToParent::Done { call, outcome };
            let frame = encode(&msg).unwrap();
            prop_assert_eq!(done_frame(&frame).unwrap().unwrap(), msg);
        }

        #[test]
        fn pieces_and_results_sent_from_where_they_are_encode_as_the_messages(
            part in part(),
            call in any::<u64>(),
            outcome in outcome(),
        ) {
            let out = Outbox::new();
            let total = part.total as usize;
            out.send_part(TO_RUNNER_PART, part.call, total, part.data.clone());
            out.send_part(TO_PARENT_PART, part.call, total, part.data.clone());
            out.send_done(call, outcome.clone());
            let frames = queued_frames(&out);
            prop_assert_eq!(&frames[0], &encode(&ToRunner::Part(part.clone())).unwrap().to_vec());
            prop_assert_eq!(&frames[1], &encode(&ToParent::Part(part.clone())).unwrap().to_vec());
            prop_assert_eq!(&frames[2], &encode(&ToParent::Done { call, outcome }).unwrap().to_vec());
            let back = part_frame(&frames[0], TO_RUNNER_PART).unwrap().unwrap();
            prop_assert_eq!((back.call, back.total, back.data), (part.call, part.total, &part.data[..]));
            prop_assert!(part_frame(&frames[0], TO_PARENT_PART).is_none());
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(data in vec(any::<u8>(), 0..2048)) {
            crate::fuzz::frames(&data);
        }
    }
}
