//! Payloads too big for one frame, or big enough to hold the connection while other calls'
//! frames wait, cross in pieces that take turns with other frames, within a window.

use bytes::{BufMut, Bytes};
use tokio::sync::Notify;

use super::{Outbox, PartHead};

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
        let head = PartHead::new(variant, call, total, data.len());
        self.send_with_tail(|buf| postcard::to_io(&head, buf.writer()).map(drop), data)
    }
}
