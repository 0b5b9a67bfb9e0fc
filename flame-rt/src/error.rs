//! The one error type of flame-rt.

use std::fmt;

/// What went wrong with a remote call or a pool, as returned by [`Error::kind`].
///
/// The task's *own* errors never appear here: they stay inside the task's return type
/// (`Result<Result<T, E>, flame::Error>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The call was cancelled: its [`JoinHandle`](crate::JoinHandle) was aborted.
    Cancelled,
    /// The task panicked on the runner; the message is in [`Error::panic_message`].
    Panicked,
    /// The call's deadline passed, while it waited for a slot or while it ran.
    TimedOut,
    /// The runner died or stopped answering while the call was in flight.
    RunnerLost,
    /// No runner could be booted for the call (backend error, runner exited early, boot timeout,
    /// or the runner's `main` returned an error).
    BootFailed,
    /// The parent refused the runner during the handshake (wrong token, unknown runner,
    /// protocol or task manifest mismatch).
    Rejected,
    /// The runner has no task with the id the call named.
    UnknownTask,
    /// Arguments or results could not be encoded or decoded.
    Codec,
    /// The pool was shut down (or dropped) and takes no more calls.
    PoolClosed,
    /// The pool or backend was configured wrongly.
    Config,
    /// An I/O error outside any single call (binding the listener, spawning a process).
    Io,
    /// The peer broke the wire protocol.
    Protocol,
    /// The other side of a [`channel`](crate::channel()) is gone: dropped, or the call that
    /// carried the channel has ended.
    ChannelClosed,
    /// A task takes a [`State<T>`](crate::State) that was not [`provide`](crate::provide)d in
    /// the process running it within the pool's `boot_timeout`.
    StateMissing,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Cancelled => "call cancelled",
            ErrorKind::Panicked => "task panicked",
            ErrorKind::TimedOut => "call timed out",
            ErrorKind::RunnerLost => "runner lost",
            ErrorKind::BootFailed => "runner boot failed",
            ErrorKind::Rejected => "runner rejected",
            ErrorKind::UnknownTask => "unknown task",
            ErrorKind::Codec => "encoding error",
            ErrorKind::PoolClosed => "pool closed",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Io => "I/O error",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::ChannelClosed => "channel closed",
            ErrorKind::StateMissing => "state missing",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// The error of a remote call or pool operation: a [`kind`](Error::kind) to match on and a
/// message that says what happened and, for a user's mistake, what to do.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// An error of `kind` saying `message`. For [`Backend`](crate::Backend) implementations,
    /// whose boot errors should say what they were told and what failed.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// What went wrong, to match on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable detail (without the kind's prefix).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The call was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.kind == ErrorKind::Cancelled
    }

    /// The task panicked.
    pub fn is_panic(&self) -> bool {
        self.kind == ErrorKind::Panicked
    }

    /// The call's deadline passed.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::TimedOut
    }

    /// The runner was lost while the call was in flight.
    pub fn is_runner_lost(&self) -> bool {
        self.kind == ErrorKind::RunnerLost
    }

    /// The panic message, when the task panicked.
    pub fn panic_message(&self) -> Option<&str> {
        self.is_panic().then_some(self.message.as_str())
    }

    pub(crate) fn io(context: &str, err: std::io::Error) -> Error {
        Error::new(ErrorKind::Io, format!("{context}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl std::error::Error for Error {}
