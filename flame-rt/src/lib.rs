//! FLAME for Rust: run a piece of your app on a short-lived copy of *the same app*.
//!
//! FLAME (Fleeting Lambda Application for Modular Execution, after the Elixir `flame` library)
//! treats the whole application as the lambda. Mark an `async fn` with [`#[flame::task]`](task),
//! start a [`Pool`], and [`spawn_on`] it: the call runs on a runner, a copy of your own binary
//! booted on demand with its config, logging and connection pools, which idles away when the
//! work is done. No FaaS rewrite, no queues, no glue code.
//!
//! ```
//! use flame::{Pool, ProcessBackend};
//! use std::time::Duration;
//!
//! #[flame::task]
//! async fn checksum(data: Vec<u8>) -> u64 {
//!     data.iter().map(|b| u64::from(*b)).sum()
//! }
//!
//! #[flame::main]
//! async fn main() -> Result<(), flame::Error> {
//!     // Runners run this same `main`: they start the pool too (it runs calls locally there).
//!     let pool = Pool::builder("sums")
//!         .backend(ProcessBackend::new())
//!         .max(4)
//!         .max_concurrency(8)
//!         .idle_shutdown_after(Duration::from_secs(10))
//!         .start()
//!         .await?;
//!     if flame::parent().is_some() {
//!         return Ok(()); // a runner: skip parent-only work; it keeps serving calls
//!     }
//!
//!     let handle = flame::spawn_on(&pool, checksum(vec![1, 2, 3])); // returns at once
//!     assert_eq!(handle.await?, 6); // dropping `handle` instead would cancel the call
//!     assert_eq!(checksum(vec![4]).await, 4); // `.await` on the call runs it right here
//!     pool.shutdown().await;
//!     Ok(())
//! }
//! ```
//!
//! # The pieces
//!
//! | piece | where |
//! |---|---|
//! | [`#[flame::task]`](task): a task and its [`Call`] | `call/`, `task.rs` (the registry) |
//! | [`spawn_on`] / [`call()`] / [`cast`] and the [`JoinHandle`] (cancels on drop) | `call/` (`join.rs`), `ticket.rs` (a call's shared state and its cancel), `deadline.rs` |
//! | [`Pool`]: placement, growth, retries, idle shutdown | `pool/`: the decisions as plain data in `state.rs`, carried out by `shared.rs`; booting one runner: `boot.rs`; where a call waits for a slot: `queue.rs` |
//! | [`PoolBuilder`]: every knob and its default; lifecycle hooks | `pool/builder.rs`, `hooks.rs` |
//! | the parent's side of a runner connection | `pool/listener.rs` (dial-back, hello checks), `pool/connection/` (calls out, results in: `read.rs`) |
//! | the runner's side, and its failsafe | `runner/`: `service.rs` (its loop), `calls.rs` (one call's life), `terminator.rs` (who stops an orphaned runner) |
//! | [`#[flame::main]`](main), [`#[flame::test]`](test), [`parent()`] and the hand-off to runners | `runtime.rs`, `parent.rs` |
//! | graceful shutdown on SIGTERM/SIGINT, [`shutdown_all`] | `pool/shutdown.rs` |
//! | [`Backend`]: [`ProcessBackend`], [`LocalBackend`] | `backend/` |
//! | [`channel()`]: typed channels that cross to runners, streaming files | `channel/` (the halves; `routes.rs`, `pump.rs`: routes and credit; `bridge.rs`: a half as an argument) |
//! | what crosses the wire: messages, byte layouts, reading and writing frames, the handshake, TLS | `protocol/`; the thread it runs on, which tasks can't block: `io_runtime.rs` |
//!
//! No module imports another that imports it back, so each reads with only what is below it
//! in mind (checked by `tests/architecture.rs`).
//!
//! # Semantics in brief
//!
//! - **At most once.** A call runs at most once; nothing is retried behind your back. If its
//!   runner dies, the call fails with [`ErrorKind::RunnerLost`].
//! - **Cancel on drop.** Dropping a [`JoinHandle`] cancels the call: queued, it never starts;
//!   running, the runner drops its future (so `kill_on_drop` children die with it).
//! - **Deadlines** ([`Call::timeout`], [`PoolBuilder::timeout`]) cover queueing and running and
//!   are enforced by the runner too.
//! - **Runners never outlive their parent.** A runner exits when its parent connection ends or
//!   goes silent, dropping its tasks first (one already told to stop keeps the grace it was
//!   given to finish its calls).
//! - **Streams are arguments.** A [`channel()`] half passed to a task connects the caller and the
//!   task over the runner's connection, with backpressure end to end; it ends with its call.
//!   [`channel::stream_reader`] streams a file to a task in one line. See [`channel`](mod@channel).
//! - **Strangers are refused.** Each runner proves itself with a one-time 128-bit token before
//!   anything it says counts (a stranger naming a booting runner changes nothing and is not
//!   answered), and parent and runner compare their task manifests, so a different build is
//!   refused with a reason instead of mis-decoding arguments.
//! - **Heavy work is welcome.** The protocol runs on a thread of its own on both sides, so a task
//!   that computes for minutes without an `.await` never gets its runner taken for lost; see
//!   [`#[flame::task]`](task) for `blocking`, and [`PoolBuilder::cancel_grace`] for what happens
//!   to a cancelled task that never yields.
//! - **The app's state goes with it.** What `main` builds once — a database pool, a client, a
//!   model — is [`provide`]d, and tasks take it as a [`State<T>`] parameter that is not sent:
//!   each runner, running `main` too, has its own. See [`State`].
//! - **Bytes cross as bytes.** Arguments and results are encoded with postcard. A parameter or
//!   return type that is a byte vector — `Vec<u8>`, `Box<[u8]>`, either in an `Option`, or as the
//!   `Ok` of a `Result` return — is written as one byte string by the code `#[flame::task]`
//!   generates, as fast as `bytes::Bytes` (serde alone would write it a byte at a time, ~10×
//!   slower). `Bytes`, `serde_bytes::ByteBuf` and `String` are fast anywhere, and so are messages
//!   of type `Vec<u8>` or `Box<[u8]>` on a [`channel()`] (copied once, on arrival; `Bytes` messages
//!   are not copied at all); in a struct of your own, mark `Vec<u8>` fields `#[serde(with =
//!   "serde_bytes")]`. Fastest of all, with no copy in user space on either side, are these types
//!   as a task's own parameter or return type: the first big `Vec<u8>`, `Box<[u8]>` or `Bytes`
//!   parameter is sent from the caller's memory (a `Vec` is moved into the call, not copied), a big
//!   byte-vector or `Bytes` result from the task's, and on arrival a `Bytes` is a slice of the
//!   buffer the pieces were put together in, a `Vec<u8>` that buffer itself. Payloads above 256 KiB
//!   cross in pieces that take turns with other calls, at most 4 MiB of them unread by the other
//!   side (so a small call beside a 256 MiB one waits behind at most 4 MiB: 0.2–1.8 ms at the
//!   median on a 2-core VM), up to [`PoolBuilder::max_payload`] (1 GiB by default); data bigger
//!   than memory belongs in a [`channel()`], which streams it.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `tls` | off | [`PoolBuilder::tls`]: TLS to runners with the parent's self-signed certificate pinned by fingerprint (rustls, ring) |
//! | `opentelemetry` | off | the caller's OpenTelemetry trace context (kept by `tracing-opentelemetry` on the current span) travels with each call and parents the `flame.task` span the task runs in on the runner |
//! | `metrics` | off | counters, histograms and a gauge through the [`metrics`](https://docs.rs/metrics) facade: calls by outcome and their duration, queue waits, boots and their duration, runners up (names in `metrics.rs`; no exporter bundled) |
//! | `internals` | off | not for applications: exposes wire internals (in the hidden `__private` module) to the fuzz targets in `fuzz/`, the benches and the tests that play a compromised runner |
//!
//! # Tasks in a library crate
//!
//! Tasks register themselves at link time. If they live in a library crate that the binary
//! never names, the linker drops them: add `use my_tasks as _;` to the binary. A pool started in
//! a binary with no registered task fails with an error saying so.
//!
//! # Testing FLAME code
//!
//! - **Unit tests: [`LocalBackend`].** Runners are tasks in the test's own process, reached over
//!   a real loopback connection with the same encoding, handshake, deadlines and cancellation
//!   as remote ones, so a task whose arguments do not serialize fails in `cargo test` as it
//!   would in production. It needs nothing but `#[tokio::test]`:
//!
//!   ```
//!   #[flame::task]
//!   async fn double(x: u64) -> u64 {
//!       x * 2
//!   }
//!
//!   # #[tokio::main(flavor = "current_thread")] async fn main() {
//!   let pool = flame::Pool::builder("test").backend(flame::LocalBackend::new()).start().await.unwrap();
//!   assert_eq!(flame::call(&pool, double(21)).await.unwrap(), 42);
//!   # }
//!   ```
//!
//! - **Real processes: [`#[flame::test]`](test).** Like `#[tokio::test]`, but the test binary
//!   is its own runner: a pool started in the test with the default [`ProcessBackend`] boots
//!   runners by re-executing the test binary filtered to that one test, which then serves calls
//!   instead of running its body. Works with `cargo test` and `cargo nextest run`, tests in
//!   parallel each with their own runners. `examples/testing` in the repository is a small crate
//!   tested this way.
//!
//! - **A separate runner program: [`ProcessBackend::program`].** For tests that kill, freeze or
//!   replace runners, a `[[bin]]` whose `main` is `#[flame::main]` and which links the crate
//!   holding the tasks (`use my_tasks as _;`), pointed at with
//!   `ProcessBackend::new().program(env!("CARGO_BIN_EXE_my-runner"))`. This project's own
//!   integration tests (`tests/`) work this way.

#![warn(missing_docs, unreachable_pub)]

mod backend;
mod backoff;
mod call;
pub mod channel;
mod deadline;
mod error;
mod hooks;
mod io_runtime;
mod metrics;
mod parent;
mod payload;
mod pool;
mod protocol;
mod runner;
mod runtime;
mod state;
mod task;
mod ticket;
mod trace;

pub use backend::{
    Backend, BootSpec, LastWords, LocalBackend, ProcessBackend, RunnerHandle, RunnerOutput,
};
pub use call::join::JoinHandle;
pub use call::map::{Map, map};
pub use call::{Call, call, cast, spawn_on};
pub use channel::channel;
pub use error::{Error, ErrorKind};
pub use hooks::{GrowEnd, GrowReason, GrowStart, Shrink, ShrinkReason};
pub use parent::{Parent, parent};
pub use pool::shutdown::shutdown_all;
pub use pool::{Placement, PoolBuilder};
pub use pool::{Pool, PoolStats};
pub use state::{State, provide, state};

/// Turns an `async fn` into a FLAME task.
///
/// Calling the function then returns a [`Call`] instead of running the body: `.await` it to run
/// here, or send it to a [`Pool`] with [`spawn_on`], [`call()`] or [`cast`].
///
/// Arguments must be owned values that are `Serialize + DeserializeOwned + Send + 'static`, and
/// so must the return type. A parameter of type [`State<T>`] is not an argument: the caller
/// leaves it out, and the process that runs the task passes the value `main` gave to
/// [`provide`] there (see [`State`]). The task is registered under `module_path!()::fn_name` with a hash
/// of its signature. With a renamed dependency, say where flame is:
/// `#[flame::task(crate = "my_flame")]`.
///
/// # Heavy work
///
/// A task may compute for minutes without yielding or call a blocking library: its runner keeps
/// answering heartbeats and cancels regardless, since the protocol runs on a thread of its own.
/// But such a body holds one of the app's worker threads while it runs, so the app's other async
/// work on that runner (a web server, a DB pool's housekeeping) waits. Mark it
/// `#[flame::task(blocking)]` and the body runs on Tokio's blocking pool instead (it may still
/// `.await`); or wrap just the heavy part in [`tokio::task::spawn_blocking`]. Either way a
/// cancel takes effect at the body's next `.await`: work that never awaits runs to its end.
///
/// ```
/// #[flame::task(blocking)]
/// async fn checksum(data: Vec<u8>) -> u64 {
///     data.iter().fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(*b)) // pure CPU, no .await
/// }
/// ```
pub use flame_rt_macros::task;

/// Like `#[tokio::main]`, plus runner mode: when the process was booted as a runner, it
/// connects back to its parent and serves calls, while `main`'s body runs too (it is the whole
/// app). The runner process exits when its parent lets it go, whatever the body is doing; if the
/// body returns `Err` in a runner, the parent's waiting callers get
/// [`ErrorKind::BootFailed`] with that error.
///
/// In the parent, SIGTERM and SIGINT shut every pool down gracefully ([`shutdown_all`]) and
/// then end the process with status 128 + the signal number; a second signal ends it at once.
/// When the body returns (on such a signal or otherwise), every pool drains the same way before
/// the process exits, pools the body dropped included: the work it started — a cast, a
/// detached call — is not cut off. `graceful_shutdown = false` leaves signals and exits alone.
///
/// Accepts `flavor = "current_thread" | "multi_thread"`, `worker_threads = N`,
/// `graceful_shutdown = true | false` and `crate = "..."`.
pub use flame_rt_macros::main;

/// Like `#[tokio::test]`, but the test binary can be its own runner, so pools with the default
/// [`ProcessBackend`] work in a crate's tests, with `cargo test` and `cargo nextest run`, in
/// parallel.
///
/// A pool started on the test's thread boots runners by re-executing the test binary filtered
/// to this one test; there, the test does not run its body but serves as the runner. Each test
/// gets its own runners. Accepts `flavor` and `worker_threads` as `#[tokio::test]` does (default
/// `current_thread`) and `crate = "..."`.
///
/// ```no_run
/// #[flame::task]
/// async fn pid() -> u32 {
///     std::process::id()
/// }
///
/// #[flame::test]
/// async fn runs_in_another_process() {
///     let pool = flame::Pool::builder("test").start().await.unwrap();
///     assert_ne!(flame::call(&pool, pid()).await.unwrap(), std::process::id());
/// }
/// ```
pub use flame_rt_macros::test;

#[cfg(any(test, feature = "internals"))]
mod fuzz;

#[doc(hidden)]
pub mod __private {
    /// For the backend crates of this workspace.
    pub use crate::backoff::Backoff;
    pub use crate::call::new_call;
    /// Wire internals for the fuzz targets, the benches and the tests that play a compromised
    /// runner (feature `internals`).
    #[cfg(any(test, feature = "internals"))]
    pub mod fuzz {
        pub use crate::fuzz::*;
    }
    /// The variable a runner reads its hand-off from: for the Kubernetes backend, whose runner
    /// pods must not inherit the parent's own, and tests that look at a runner's environment.
    /// Applications never need it, and other backends pass `BootSpec::handoff_env` on.
    pub use crate::parent::HANDOFF_ENV;
    /// For the backend crates of this workspace.
    pub use crate::parent::random_hex;
    pub use crate::payload::{
        ArgsWriter, AsBytes, Encoded, FromBytes, Shared, decode_value, encode_args, encode_body,
        encode_body_or, encode_result, encode_shared,
    };
    pub use crate::runtime::{MainOutput, run_main, run_test};
    pub use crate::state::{assert_state, local_state, task_state};
    pub use crate::task::{
        Registration, RunningTask, TaskDef, assert_arg, assert_ret, decode_args, encodes,
        run_blocking, sig_hash,
    };
    pub use bytes::Bytes;
    pub use futures::future::BoxFuture;
    pub use inventory;
    pub use postcard::Error as PostcardError;
    pub use tokio;
}
