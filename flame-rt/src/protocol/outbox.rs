//! Queueing frames and writing them: every frame queued while a write is in flight goes out in
//! the next one, and payloads go out from where they are.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BoxWrite, DoneHead, MAX_FRAME, Outcome, ToParent};

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
        // Frames already waiting mean their sender has woken the writer (or is writing them
        // through), and it takes everything queued when it comes: this one rides along.
        let woken = !queued.is_empty();
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
        if woken {
            return true;
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
        match outcome {
            Outcome::Ok(result) => {
                let head = DoneHead::ok(call, result.len());
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
        let mut batch = self.lock().take();
        let mut written = Written::default();
        match write_now(writer, &batch, &mut written) {
            Ok(true) => {
                let_go_payloads(&mut batch);
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

/// A written payload that nobody else holds is freed on another thread (see
/// [`io_runtime::let_go`](crate::io_runtime::let_go)), not on the protocol's, nor under the outbox
/// lock: it may be the last piece of hundreds of MiB. A smaller one, or one shared with its
/// sender, is let go here at the cost of a count.
fn let_go_payloads(batch: &mut Batch) {
    const SMALL: usize = 64 * 1024;
    if batch
        .segments
        .iter()
        .any(|segment| segment.len() >= SMALL && segment.is_unique())
    {
        crate::io_runtime::let_go(std::mem::take(&mut batch.segments));
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
        let (mut batch, closed) = {
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
            let_go_payloads(&mut batch);
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
impl Outbox {
    /// What the outbox holds, as the frames' bodies.
    pub(crate) fn queued_frames(&self) -> Vec<Vec<u8>> {
        let batch = self.lock().take();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..512).prop_map(Bytes::from)
    }

    /// After a write, a big payload nobody else holds leaves the batch (to be freed on another
    /// thread); one its sender still holds, or a small one, stays to be let go in place.
    #[test]
    fn only_big_payloads_nobody_else_holds_are_freed_elsewhere() {
        let big = || Bytes::from(vec![7u8; 1 << 20]);
        let held = big();
        let mut batch = Batch {
            segments: vec![held.slice(..1000 * 64), Bytes::from(vec![1u8; 1024]), big()],
            buf: BytesMut::new(),
        };
        let_go_payloads(&mut batch);
        assert!(
            batch.segments.is_empty(),
            "the unique 1 MiB payload went elsewhere"
        );
        let mut batch = Batch {
            segments: vec![held.slice(..), Bytes::from(vec![1u8; 1024]), held.clone()],
            buf: BytesMut::new(),
        };
        let_go_payloads(&mut batch);
        assert_eq!(batch.segments.len(), 3, "shared or small: let go in place");
        drop(held);
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
    }
}
