//! `Call<R>`: one invocation of a task, ready to run here or on a pool; and the three ways to send
//! it to a pool: [`spawn_on`], [`call`], [`cast`].

use std::fmt;
use std::future::IntoFuture;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;

use crate::call::join::{Decode, JoinHandle};
use crate::channel::Attachment;
use crate::deadline::Deadline;
use crate::error::{Error, ErrorKind};
use crate::payload::Encoded;
use crate::pool::Pool;
use crate::pool::queue::QueuedCall;
use crate::task::TaskDef;
use crate::ticket::Ticket;

pub(crate) mod join;
pub(crate) mod map;

/// One invocation of a `#[flame::task]`: the task's identity and its arguments.
///
/// Calling a task function returns a `Call` instead of running the body. Then either
/// - `.await` it: the body runs right here, in this process, exactly as if the function had no
///   attribute (no encoding, no runner); or
/// - hand it to a pool with [`spawn_on`], [`call`] or [`cast`]: the arguments are encoded and the
///   body runs on a runner.
///
/// ```
/// #[flame::task]
/// async fn add(a: u64, b: u64) -> u64 {
///     a + b
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// assert_eq!(add(2, 3).await, 5); // runs in-process
/// # }
/// ```
#[must_use = "a Call does nothing until it is awaited or sent to a pool with flame::spawn_on / call / cast"]
pub struct Call<R> {
    def: &'static TaskDef,
    args: Box<dyn CallArgs<R>>,
    /// Decodes the result: generated with the task, so byte vectors take the fast path.
    decode: Decode<R>,
    timeout: Option<Duration>,
    retries: u32,
}

/// The arguments of a call, still typed: encoded only if the call goes to a runner, so a
/// local `.await` costs what it cost before the attribute was added.
trait CallArgs<R>: Send {
    /// May take byte vectors out of the arguments, to send them without a copy: the arguments
    /// are not used again once encoded, but to name a culprit.
    fn encode(&mut self) -> Result<Encoded, postcard::Error>;
    /// Names the first argument that fails to encode (postcard's errors don't say which).
    fn culprit(&self) -> &'static str;
    fn run_local(self: Box<Self>) -> BoxFuture<'static, R>;
}

struct TypedArgs<A, R> {
    args: A,
    body: fn(A) -> BoxFuture<'static, R>,
    encode: fn(&mut A) -> Result<Encoded, postcard::Error>,
    culprit: fn(&A) -> &'static str,
}

impl<A, R> CallArgs<R> for TypedArgs<A, R>
where
    A: Send + 'static,
    R: 'static,
{
    fn encode(&mut self) -> Result<Encoded, postcard::Error> {
        (self.encode)(&mut self.args)
    }

    fn culprit(&self) -> &'static str {
        (self.culprit)(&self.args)
    }

    fn run_local(self: Box<Self>) -> BoxFuture<'static, R> {
        (self.body)(self.args)
    }
}

/// Builds the [`Call`] a `#[flame::task]` function returns: generated code's entry point, so
/// `Call` itself has no constructor in its public API.
pub fn new_call<A, R>(
    def: &'static TaskDef,
    args: A,
    body: fn(A) -> BoxFuture<'static, R>,
    encode: fn(&mut A) -> Result<Encoded, postcard::Error>,
    decode: fn(&[u8]) -> Result<R, postcard::Error>,
    culprit: fn(&A) -> &'static str,
) -> Call<R>
where
    A: Send + 'static,
    R: 'static,
{
    Call {
        def,
        args: Box::new(TypedArgs {
            args,
            body,
            encode,
            culprit,
        }),
        decode,
        timeout: None,
        retries: 0,
    }
}

impl<R> Call<R> {
    /// Sets a deadline for this call, counted from when it is sent to a pool: it covers waiting
    /// for a slot and running. The runner enforces it too (it drops the task's future at the
    /// deadline), so an expired task stops even if the parent is gone. Overrides the pool's
    /// default [`timeout`](crate::PoolBuilder::timeout). Does not apply to a local `.await`.
    pub fn timeout(mut self, timeout: Duration) -> Call<R> {
        self.timeout = Some(timeout);
        self
    }

    /// Lets the call run again, up to `retries` more times, when its runner is lost or no runner
    /// could boot for it ([`ErrorKind::RunnerLost`], [`ErrorKind::BootFailed`]), within its
    /// deadline. Only for idempotent tasks: a lost runner may have done part or all of the work.
    /// Calls are never retried otherwise (at most once, as in FLAME).
    pub fn retries(mut self, retries: u32) -> Call<R> {
        self.retries = retries;
        self
    }

    /// The task's id, `module::path::function`.
    pub fn task_id(&self) -> &'static str {
        self.def.id
    }

    /// Encodes the arguments, and collects the channel halves among them.
    fn encode(&mut self) -> (Result<Encoded, Error>, Vec<Attachment>) {
        let (encoded, chans, refused) = crate::channel::encoding(|| self.args.encode());
        let encoded = encoded.map_err(|e| {
            if let Some(why) = refused {
                return Error::new(
                    ErrorKind::Codec,
                    format!("a channel half in the arguments of {}: {why}", self.def.id),
                );
            }
            // Channel halves pass the probe: one of the other arguments is the culprit.
            let culprit = crate::channel::probing(|| self.args.culprit());
            Error::new(
                ErrorKind::Codec,
                format!(
                    "{culprit} of {} could not be encoded ({e}); arguments must serialize with \
                     postcard: no live handles, sequences and maps of known length, no \
                     serde_json::Value",
                    self.def.id
                ),
            )
        });
        if encoded.is_ok() && !chans.is_empty() && self.retries > 0 {
            return (
                Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "a call of {} carries channels, so it can't be retried (a stream can't be \
                         replayed); drop `.retries(..)` or pass the data by value",
                        self.def.id
                    ),
                )),
                chans,
            );
        }
        (encoded, chans)
    }
}

impl<R: 'static> IntoFuture for Call<R> {
    type Output = R;
    type IntoFuture = BoxFuture<'static, R>;

    /// Runs the task's body in this process.
    fn into_future(self) -> Self::IntoFuture {
        self.args.run_local()
    }
}

impl<R> fmt::Debug for Call<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("task", &self.def.id)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// Starts `call` on `pool` and returns at once, like `tokio::spawn`, with a handle to its result.
///
/// The call waits for a slot on a runner (booting one if the pool may grow), runs there, and
/// its result comes back through the [`JoinHandle`]. **Dropping the handle cancels the call**:
/// if it is still waiting it never starts, and if it is running the runner drops the task's
/// future. Use [`JoinHandle::detach`] to let it finish unobserved.
///
/// No task is spawned per call: the call starts on a free slot right here, or waits in the
/// pool's queue, and the handle is how it is cancelled.
///
/// # Panics
/// Outside a Tokio runtime when the pool must boot a runner for the call, like `tokio::spawn`.
pub fn spawn_on<R>(pool: &Pool, call: Call<R>) -> JoinHandle<R>
where
    R: DeserializeOwned + Send + 'static,
{
    let shared = pool.shared();
    let deadline = Deadline::starting_now(call.timeout.or(shared.config.timeout));
    let queue_until = deadline.queue_until(shared.config.boot_timeout);
    let mut call = call;
    let (encoded, chans) = call.encode();
    let checked = encoded.and_then(|args| shared.check(call.def, args.len()).map(|()| args));
    let (args, refused) = match checked {
        Ok(args) => (args, None),
        Err(error) => (Encoded::default(), Some(error)),
    };
    let ticket = Ticket::new(call.def.id, &shared.name, deadline, queue_until, args);
    match refused {
        None => shared.submit(QueuedCall {
            def: call.def,
            retries: call.retries,
            ticket: ticket.clone(),
            chans,
            trace: crate::trace::capture().map(Box::new),
        }),
        Some(error) => {
            ticket.resolve(Err(error));
        }
    }
    JoinHandle::new(ticket, call.decode)
}

/// Runs `call` on `pool` and waits for its result: `spawn_on(pool, call).await`.
pub async fn call<R>(pool: &Pool, call: Call<R>) -> Result<R, Error>
where
    R: DeserializeOwned + Send + 'static,
{
    spawn_on(pool, call).await
}

/// Starts `call` on `pool` and forgets it: `spawn_on(pool, call).detach()`. A failure is logged
/// with `tracing` at `warn` level, since no one is there to receive it.
pub fn cast<R>(pool: &Pool, call: Call<R>)
where
    R: DeserializeOwned + Send + 'static,
{
    let task = call.task_id();
    let handle = spawn_on(pool, call);
    tokio::spawn(async move {
        if let Err(error) = handle.await {
            tracing::warn!(task, %error, "flame::cast call failed");
        }
    });
}
