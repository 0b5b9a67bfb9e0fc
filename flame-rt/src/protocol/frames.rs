//! The frames of the hot path, encoded and decoded in place: a `Run`'s arguments, a `Done`'s
//! result, a `Part`'s piece and a channel's data are written from where they are and read as
//! slices of the frame they came in, never copied. Each layout here encodes byte for byte as
//! its message in `messages.rs` (checked by the tests in `tests.rs`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Outcome, ToParent, WireErrorKind};
use crate::error::{Error, ErrorKind};
use crate::trace::TraceParent;

// Variant numbers of the messages handled in place: postcard writes a variant's index first, as
// a varint, so a frame's first byte says what it is. Checked against the enums by
// `variant_numbers_are_the_enums_own` in `tests.rs`.

/// `ToRunner::Run`.
pub(crate) const RUN: u8 = 2;
/// `ToParent::Done`.
pub(crate) const DONE: u8 = 1;
/// `ToRunner::Chan`.
pub(crate) const TO_RUNNER_CHAN: u8 = 6;
/// `ToParent::Chan`.
pub(crate) const TO_PARENT_CHAN: u8 = 7;
/// `ToRunner::Part`.
pub(crate) const TO_RUNNER_PART: u8 = 7;
/// `ToParent::Part`.
pub(crate) const TO_PARENT_PART: u8 = 8;

/// The head of a `ToRunner::Run` frame, whose arguments (`args_len` bytes) follow as its tail.
#[derive(Serialize)]
pub(crate) struct RunHead<'a> {
    variant: u8,
    call: u64,
    task: &'a str,
    deadline_ms: Option<u64>,
    trace: Option<TraceParent>,
    args_len: usize,
}

impl<'a> RunHead<'a> {
    pub(crate) fn new(
        call: u64,
        task: &'a str,
        deadline_ms: Option<u64>,
        trace: Option<TraceParent>,
        args_len: usize,
    ) -> RunHead<'a> {
        RunHead {
            variant: RUN,
            call,
            task,
            deadline_ms,
            trace,
            args_len,
        }
    }
}

/// A `Run` frame decoded in place.
pub(crate) struct RunRef<'a> {
    pub(crate) call: u64,
    pub(crate) task: &'a str,
    pub(crate) args: &'a [u8],
    pub(crate) deadline_ms: Option<u64>,
    pub(crate) trace: Option<TraceParent>,
}

/// Decodes a `Run` frame in place; `None` if the frame is another message.
pub(crate) fn run_frame(frame: &[u8]) -> Option<Result<RunRef<'_>, Error>> {
    #[derive(Deserialize)]
    struct Borrowed<'a> {
        variant: u8,
        call: u64,
        task: &'a str,
        deadline_ms: Option<u64>,
        trace: Option<TraceParent>,
        args: &'a [u8],
    }
    let run = in_place::<Borrowed<'_>>(frame, RUN)?;
    Some(run.map(|b| {
        debug_assert_eq!(b.variant, RUN);
        RunRef {
            call: b.call,
            task: b.task,
            args: b.args,
            deadline_ms: b.deadline_ms,
            trace: b.trace,
        }
    }))
}

/// The head of a `ToParent::Done` frame of a result (`len` bytes) that follows as its tail.
#[derive(Serialize)]
pub(crate) struct DoneHead {
    variant: u8,
    call: u64,
    /// `Outcome::Ok`.
    outcome: u8,
    len: usize,
}

impl DoneHead {
    pub(crate) fn ok(call: u64, len: usize) -> DoneHead {
        DoneHead {
            variant: DONE,
            call,
            outcome: 0,
            len,
        }
    }
}

/// Decodes a `ToParent::Done` frame with its result as a slice of the frame (no copy, no
/// allocation per result); `None` if the frame is another message.
pub(crate) fn done_frame(frame: &Bytes) -> Option<Result<ToParent, Error>> {
    #[derive(Deserialize)]
    struct Borrowed<'a> {
        variant: u8,
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
    let done = in_place::<Borrowed<'_>>(frame, DONE)?;
    Some(done.map(|done| {
        debug_assert_eq!(done.variant, DONE);
        ToParent::Done {
            call: done.call,
            outcome: match done.outcome {
                OutcomeRef::Ok(result) => Outcome::Ok(frame.slice_ref(result)),
                OutcomeRef::Panicked(message) => Outcome::Panicked(message),
                OutcomeRef::Failed { kind, message } => Outcome::Failed { kind, message },
            },
        }
    }))
}

/// The head of a `Part` frame, whose piece (`len` bytes) follows as its tail.
#[derive(Serialize)]
pub(crate) struct PartHead {
    variant: u8,
    call: u64,
    total: u64,
    len: usize,
}

impl PartHead {
    /// `variant`: [`TO_RUNNER_PART`] or [`TO_PARENT_PART`].
    pub(crate) fn new(variant: u8, call: u64, total: usize, len: usize) -> PartHead {
        PartHead {
            variant,
            call,
            total: total as u64,
            len,
        }
    }
}

/// Decodes a `Part` frame of `variant` in place; `None` if the frame is another message.
pub(crate) fn part_frame(frame: &[u8], variant: u8) -> Option<Result<PartRef<'_>, Error>> {
    in_place(frame, variant)
}

/// A `Part` frame with its data borrowed from the frame.
#[derive(Debug, Deserialize)]
pub(crate) struct PartRef<'a> {
    #[allow(dead_code)]
    pub(super) variant: u8,
    pub(crate) call: u64,
    pub(crate) total: u64,
    pub(crate) data: &'a [u8],
}

/// A channel frame with borrowed data: encodes byte for byte as `ToRunner::Chan` /
/// `ToParent::Chan` (checked by a test), and decodes in place, so a chunk reaches its channel
/// as a slice of the frame it came in, without a copy.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChanFrameRef<'a> {
    pub(crate) variant: u8,
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

/// Serializes a borrowed slice as bytes, as `Bytes` does: serde's own `[u8]` is a sequence, which
/// postcard encodes to the same bytes but one `u8` call at a time.
pub(crate) fn as_bytes<S: serde::Serializer>(data: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(data)
}

/// The head of a channel's `Data` frame, whose message (`len` bytes, encoded) follows as its
/// tail.
#[derive(Serialize)]
pub(crate) struct ChanDataHead {
    variant: u8,
    call: u64,
    chan: u32,
    /// `ChanBody::Data`.
    body: u8,
    len: usize,
}

impl ChanDataHead {
    /// `variant`: [`TO_RUNNER_CHAN`] or [`TO_PARENT_CHAN`].
    pub(crate) fn new(variant: u8, call: u64, chan: u32, len: usize) -> ChanDataHead {
        ChanDataHead {
            variant,
            call,
            chan,
            body: 0,
            len,
        }
    }
}

/// Decodes `frame` as a channel frame of `variant` in place; `None` if it is another message.
pub(crate) fn chan_frame(frame: &[u8], variant: u8) -> Option<Result<ChanFrameRef<'_>, Error>> {
    in_place(frame, variant)
}

/// Decodes `frame` in place as `T` if its first byte is `variant`; `None` if it is another
/// message.
fn in_place<'a, T: Deserialize<'a>>(frame: &'a [u8], variant: u8) -> Option<Result<T, Error>> {
    (frame.first() == Some(&variant)).then(|| {
        postcard::from_bytes(frame).map_err(|e| Error::new(ErrorKind::Protocol, e.to_string()))
    })
}
