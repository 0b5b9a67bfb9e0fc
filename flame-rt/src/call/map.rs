//! Fan-out: one call per item on a pool, results as a stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{BoxStream, Stream, StreamExt};
use serde::de::DeserializeOwned;

use crate::call::{Call, spawn_on};
use crate::error::Error;
use crate::pool::Pool;

/// Runs `task(item)` on `pool` for every item, and yields the results **in input order** as a
/// [`Stream`] of `Result<R, flame::Error>`.
///
/// At most [`buffered`](Map::buffered) calls are in flight at once — by default the pool's
/// capacity, `max` × `max_concurrency` at the time the stream starts — and the next item's call
/// starts as one finishes, so a long list never floods the pool's queue. [`unordered`](Map::unordered)
/// yields results as they finish instead. **Dropping the stream cancels every call still in
/// flight** (their runners drop the tasks' futures), and starts no more.
///
/// ```no_run
/// use futures::StreamExt;
///
/// #[flame::task]
/// async fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// # async fn run(pool: flame::Pool) -> Result<(), flame::Error> {
/// let squares: Vec<u64> = flame::map(&pool, 1..=100, square)
///     .buffered(8)
///     .map(|r| r.unwrap())
///     .collect()
///     .await;
/// assert_eq!(squares[9], 100);
/// # Ok(()) }
/// ```
pub fn map<I, F, R>(pool: &Pool, items: I, mut task: F) -> Map<R>
where
    I: IntoIterator,
    I::IntoIter: Send + 'static,
    F: FnMut(I::Item) -> Call<R> + Send + 'static,
    R: DeserializeOwned + Send + 'static,
{
    let items = items.into_iter();
    let for_calls = pool.clone();
    Map {
        pool: pool.clone(),
        limit: None,
        ordered: true,
        build: Some(Box::new(move |limit, ordered| {
            let calls = futures::stream::iter(items).map(move |item| {
                // Spawned when the stream first polls it, so no more than `limit` run at once.
                let (pool, call) = (for_calls.clone(), task(item));
                async move { spawn_on(&pool, call).await }
            });
            if ordered {
                calls.buffered(limit).boxed()
            } else {
                calls.buffer_unordered(limit).boxed()
            }
        })),
        stream: None,
    }
}

type Build<R> = Box<dyn FnOnce(usize, bool) -> BoxStream<'static, Result<R, Error>> + Send>;

/// The stream [`map`] returns; see there.
#[must_use = "streams do nothing unless polled; dropping a Map cancels its calls"]
pub struct Map<R> {
    /// Whose capacity is the default limit, read when the stream starts.
    pool: Pool,
    limit: Option<usize>,
    ordered: bool,
    build: Option<Build<R>>,
    stream: Option<BoxStream<'static, Result<R, Error>>>,
}

impl<R> Map<R> {
    /// Runs at most `n` calls at once (at least one).
    pub fn buffered(mut self, n: usize) -> Self {
        self.limit = Some(n.max(1));
        self
    }

    /// Yields results as calls finish rather than in input order.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }
}

impl<R> Stream for Map<R> {
    type Item = Result<R, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.stream.is_none() {
            let limit = this.limit.unwrap_or_else(|| {
                let capacity = this.pool.stats().max * this.pool.shared().config.max_concurrency;
                capacity.max(1)
            });
            let build = this.build.take().expect("a map's stream is built once");
            this.stream = Some(build(limit, this.ordered));
        }
        this.stream
            .as_mut()
            .expect("built above")
            .poll_next_unpin(cx)
    }
}
