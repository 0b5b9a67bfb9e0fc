//! What crosses the wire between a parent and its runners: the messages, their byte layouts,
//! how frames are read and written, and the handshake that opens a connection. Both sides speak
//! through this module only; nothing outside it knows a byte offset or a variant number.
//!
//! One TCP connection per runner, dialled by the runner, carries every call to that runner.
//! Frames are length-delimited; each holds one postcard-encoded message. Message enums are
//! externally tagged (postcard writes the variant index) and only ever grow at the end, so the
//! protocol version in the handshake is what decides compatibility.
//!
//! | file | holds |
//! |---|---|
//! | `messages.rs` | every message either side sends, as Rust types |
//! | `frames.rs` | the hot frames (`Run`, `Done`, `Part`, `Chan`) encoded and decoded in place, their payloads never copied; the variant numbers they rely on |
//! | `pieces.rs` | payloads too big for one frame: the piece size and the window |
//! | `reader.rs` | reading frames |
//! | `outbox.rs` | queueing frames and writing them, batched |
//! | `watchdog.rs` | whether the peer is still there |
//! | `handshake.rs` | tokens, the build fingerprint, the checks on a runner's `Hello` |
//! | `tls.rs` | the TLS configurations of both sides |

mod frames;
pub(crate) mod handshake;
mod messages;
mod outbox;
mod pieces;
mod reader;
#[cfg(feature = "tls")]
pub(crate) mod tls;
mod watchdog;

#[cfg(test)]
mod tests;

pub(crate) use frames::*;
pub(crate) use messages::*;
pub(crate) use outbox::{Outbox, write_loop};
pub(crate) use pieces::*;
pub(crate) use reader::*;
pub(crate) use watchdog::Heartbeat;

use tokio::io::{AsyncRead, AsyncWrite};

/// Bumped on any incompatible change of the messages below.
pub(crate) const PROTOCOL_VERSION: u32 = 6;

/// Largest frame either side accepts. Payloads bigger than [`PIECE`] cross in pieces, so no
/// frame comes near it; it bounds what a broken peer can make us allocate.
pub(crate) const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Largest frame the parent reads from a peer that has not proven who it is: a `Hello` with
/// the task manifest of a big app fits many times over; an attacker's 64 MiB allocation doesn't.
pub(crate) const MAX_HELLO_FRAME: usize = 1024 * 1024;

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
