//! `JoinHandle`: the caller's side of a spawned call. Unlike `tokio::task::JoinHandle`, dropping
//! it cancels the call.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind};

/// A handle to a call started with [`spawn_on`](crate::spawn_on).
///
/// Await it for the task's result (`Result<R, flame::Error>`). Awaiting `&mut handle` is
/// cancel-safe: if that await is dropped (say, in a `select!`), the call keeps running and the
/// handle can be awaited again.
///
/// **Dropping an unfinished handle cancels the call**: a call still waiting for a slot never
/// starts, and a running one has its future dropped on the runner, so child processes spawned
/// with `kill_on_drop(true)` die with it. [`detach`](JoinHandle::detach) opts out.
#[must_use = "dropping a flame::JoinHandle cancels the call; use .detach() to let it run"]
pub struct JoinHandle<R> {
    driver: Option<tokio::task::JoinHandle<Result<Bytes, Error>>>,
    _result: PhantomData<fn() -> R>,
}

impl<R> JoinHandle<R> {
    pub(crate) fn new(driver: tokio::task::JoinHandle<Result<Bytes, Error>>) -> JoinHandle<R> {
        JoinHandle {
            driver: Some(driver),
            _result: PhantomData,
        }
    }

    /// Cancels the call, as dropping the handle would, but keeps the handle: awaiting it
    /// afterwards gives an error with [`ErrorKind::Cancelled`] (or the result, if the call had
    /// already finished).
    pub fn abort(&self) {
        if let Some(driver) = &self.driver {
            driver.abort();
        }
    }

    /// Whether the call has ended (with a result, an error, or cancellation).
    pub fn is_finished(&self) -> bool {
        self.driver.as_ref().is_none_or(|d| d.is_finished())
    }

    /// Lets the call run to completion without anyone waiting for it; its result is discarded.
    pub fn detach(mut self) {
        // Dropping a tokio JoinHandle detaches its task.
        self.driver.take();
    }
}

impl<R: DeserializeOwned> Future for JoinHandle<R> {
    type Output = Result<R, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let driver = self
            .driver
            .as_mut()
            .expect("flame::JoinHandle polled after it completed");
        let joined = ready!(Pin::new(driver).poll(cx));
        self.driver = None;
        Poll::Ready(match joined {
            Ok(Ok(bytes)) => postcard::from_bytes(&bytes).map_err(|e| {
                Error::new(
                    ErrorKind::Codec,
                    format!(
                        "the task's result could not be decoded: {e}; parent and runner must agree \
                         on the return type, and it must not use serde features postcard lacks \
                         (untagged or internally tagged enums, flatten)"
                    ),
                )
            }),
            Ok(Err(e)) => Err(e),
            Err(e) if e.is_cancelled() => {
                Err(Error::new(ErrorKind::Cancelled, "the call was aborted"))
            }
            Err(e) => Err(Error::new(
                ErrorKind::Panicked,
                format!("flame's call driver panicked (a bug in flame-rt): {e}"),
            )),
        })
    }
}

impl<R> Drop for JoinHandle<R> {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.abort();
        }
    }
}

impl<R> fmt::Debug for JoinHandle<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}
