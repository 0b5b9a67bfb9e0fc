//! Every message either side sends, as Rust types, and their plain encoding. The hot ones are
//! also encoded and decoded in place, in `frames.rs`.

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{Error, ErrorKind};
use crate::trace::TraceParent;

#[cfg(doc)]
use super::{PIECE, PIECE_WINDOW};

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

pub(crate) fn encode<T: Serialize>(msg: &T) -> Result<Bytes, Error> {
    postcard::to_stdvec(msg)
        .map(Bytes::from)
        .map_err(|e| Error::new(ErrorKind::Codec, e.to_string()))
}

pub(crate) fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, Error> {
    postcard::from_bytes(frame).map_err(|e| Error::new(ErrorKind::Protocol, e.to_string()))
}
