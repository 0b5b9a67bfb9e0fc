//! The app's own state on runners: what `main` builds once — a database pool, an HTTP client, a
//! loaded model — [`provide`]d by type, and handed to every task that takes a [`State<T>`].
//!
//! A runner runs the app's `main` too, so it builds its own pool just like the parent does;
//! `provide` makes it reachable from tasks. Runners serve calls while `main` is still starting,
//! so a call that needs a state not provided yet waits for it (up to the pool's `boot_timeout`)
//! instead of racing `main`; one that is never provided fails with
//! [`ErrorKind::StateMissing`] naming the type.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// A handle to a value given to [`provide`]: cheap to clone, derefs to the value.
///
/// As a task parameter it is not an argument: the caller leaves it out, and the process that
/// runs the task (a runner, or this one for a local `.await`) passes its own. Runners serve
/// calls while `main` is still starting, so a call that needs a state not provided yet waits for
/// it (up to the pool's `boot_timeout`); one never provided fails with
/// [`ErrorKind::StateMissing`](crate::ErrorKind::StateMissing) naming the type. A local `.await`
/// has no error to return, and panics with that message instead.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// /// Stands in for a database pool.
/// #[derive(Default)]
/// struct Counter(AtomicU64);
///
/// #[flame::task]
/// async fn bump(counter: flame::State<Counter>, by: u64) -> u64 {
///     counter.0.fetch_add(by, Ordering::SeqCst) + by
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// flame::provide(Counter::default());
/// // The caller passes only the serialized arguments; the state is found where the task runs.
/// assert_eq!(bump(2).await, 2);
/// assert_eq!(bump(3).await, 5);
/// # }
/// ```
pub struct State<T: ?Sized>(Arc<T>);

impl<T: ?Sized> Clone for State<T> {
    fn clone(&self) -> Self {
        State(self.0.clone())
    }
}

impl<T: ?Sized> Deref for State<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for State<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: ?Sized> State<T> {
    /// The shared value itself.
    pub fn arc(&self) -> &Arc<T> {
        &self.0
    }
}

type Values = HashMap<TypeId, Arc<dyn Any + Send + Sync>>;

struct Store {
    values: Mutex<Values>,
    /// Woken on every `provide`, for calls waiting for a state.
    provided: tokio::sync::Notify,
}

fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| Store {
        values: Mutex::new(HashMap::new()),
        provided: tokio::sync::Notify::new(),
    })
}

/// Makes `value` this process's state of type `T`, for the tasks that take a [`State<T>`] and
/// for [`state`]. Call it in `main`, once the value is built: it runs in the parent and in every
/// runner alike. Providing a `T` again replaces it for what asks afterwards.
pub fn provide<T: Send + Sync + 'static>(value: T) {
    let store = store();
    store
        .values
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(TypeId::of::<T>(), Arc::new(value));
    store.provided.notify_waiters();
}

/// This process's state of type `T`, if it has been [`provide`]d.
pub fn state<T: Send + Sync + 'static>() -> Option<State<T>> {
    let value = store()
        .values
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&TypeId::of::<T>())?
        .clone();
    Some(State(
        value.downcast::<T>().expect("stored under its own type id"),
    ))
}

/// Waits up to `within` for the state of type `T` to be provided.
pub(crate) async fn wait_for<T: Send + Sync + 'static>(
    within: Duration,
) -> Result<State<T>, Error> {
    let wait = async {
        loop {
            let provided = store().provided.notified();
            if let Some(state) = state::<T>() {
                return state;
            }
            provided.await;
        }
    };
    tokio::time::timeout(within, wait).await.map_err(|_| {
        Error::new(
            ErrorKind::StateMissing,
            format!(
                "no {} was provided within {within:?}: call flame::provide(value) in main, in \
                 every process that runs this task (the runners run main too), before or while \
                 they serve",
                std::any::type_name::<T>()
            ),
        )
    })
}

/// How long a task waits for its state: the pool's boot timeout on a runner (its `main` may
/// still be starting), the default boot timeout elsewhere.
pub(crate) fn wait_bound() -> Duration {
    match crate::parent::process_handoff() {
        Some(Ok(handoff)) => handoff.boot_timeout,
        _ => Duration::from_secs(30),
    }
}

/// The state a task parameter asks for (generated code calls this). Not public API.
#[doc(hidden)]
pub async fn task_state<T: Send + Sync + 'static>() -> Result<State<T>, Error> {
    if let Some(state) = state::<T>() {
        return Ok(state);
    }
    wait_for::<T>(wait_bound()).await
}

/// The same for a local `.await`, which has no error to return: a missing state panics with
/// the message. Not public API.
#[doc(hidden)]
pub async fn local_state<T: Send + Sync + 'static>() -> State<T> {
    task_state::<T>().await.unwrap_or_else(|e| panic!("{e}"))
}

/// Compile-time check generated for every `State<T>` parameter. Not public API.
#[doc(hidden)]
pub const fn assert_state<T: Send + Sync + 'static>() {}
