//! Payloads too big for one frame, or big enough to hold the connection while other calls'
//! frames wait, cross in pieces that take turns with other frames, within a window.

use bytes::{BufMut, Bytes};
use tokio::sync::Notify;

use super::{Outbox, PartHead, PartRef};
use crate::error::{Error, ErrorKind};

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
fn took_to_report(before: usize, now: usize) -> Option<u64> {
    let (before, now) = (before as u64, now as u64);
    (now / TOOK_STEP > before / TOOK_STEP).then_some(now)
}

impl PartRef<'_> {
    /// Puts this piece after the others of its payload, in the buffer `whole` returns: the one
    /// already started, or a new one for the capacity it is given (the announced size). Returns how far the receiver got, when it is time to say so (`Took`),
    /// or an error naming `what` the payload is when the pieces overflow their announced size
    /// or `max_payload`.
    pub(crate) fn add_to<'w>(
        &self,
        whole: impl FnOnce(usize) -> &'w mut Vec<u8>,
        max_payload: usize,
        what: &str,
    ) -> Result<Option<u64>, Error> {
        let total = usize::try_from(self.total).unwrap_or(usize::MAX);
        let wrong = if total > max_payload {
            format!("{what} of {total} bytes in pieces: over max_payload ({max_payload})")
        } else {
            let whole = whole(total);
            if whole.len() + self.data.len() > total {
                format!("{what} of {total} bytes in pieces: more came than announced")
            } else {
                let before = whole.len();
                whole.extend_from_slice(self.data);
                return Ok(took_to_report(before, whole.len()));
            }
        };
        Err(Error::new(ErrorKind::Protocol, wrong))
    }
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
        let head = PartHead::new(variant, call, total, data.len());
        self.send_with_tail(|buf| postcard::to_io(&head, buf.writer()).map(drop), data)
    }
}
