//! One watch follows every runner pod of a backend (a label selector on the parent pod's uid),
//! rather than one API connection per runner: it tells each runner's handle when its pod can
//! never dial back, and when the pod is gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams, WatchEvent, WatchParams};
use tokio::sync::watch;
use tokio::time::Instant;

use flame::__private::Backoff;

use crate::status::{fatal, is_code};

/// How long the server keeps one watch open before the watch is resumed. Shorter than the
/// client's read timeout (config.rs), so only a server gone silent trips that.
pub(crate) const WATCH_SECONDS: u32 = 45;

/// The first pause after a failed watch or list, doubled up to [`MAX_BACKOFF`] while they fail.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A watch that lasts this long without an event was not refused: the backoff starts over.
const HEALTHY_WATCH: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How many of a dead runner's last lines are read to find its last words.
const LAST_LINES: i64 = 20;

/// The longest the watch waits for a dead runner's last words before reporting without them.
const LAST_WORDS_WITHIN: Duration = Duration::from_secs(3);

/// What the watch has seen of one runner pod.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    /// Why the runner will never dial back, or is gone.
    pub(crate) fatal: Option<String>,
    /// The pod object no longer exists.
    pub(crate) gone: bool,
}

/// The backend's watch over its runner pods. It runs while any pod is registered.
#[derive(Clone)]
pub(crate) struct Watcher {
    shared: Arc<Shared>,
}

struct Shared {
    pods: Api<Pod>,
    selector: String,
    container: String,
    unschedulable_grace: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    followed: HashMap<String, Followed>,
    /// Whether the watch task runs; it ends once nothing is followed.
    running: bool,
}

struct Followed {
    tx: watch::Sender<Seen>,
    /// The create call returned: from here, a pod missing from a list is really gone.
    created: bool,
    /// Since when the scheduler has found no node, while its grace runs.
    unschedulable_since: Option<Instant>,
}

/// One runner pod followed by the watch, until this is dropped.
pub(crate) struct Following {
    shared: Arc<Shared>,
    name: String,
    pub(crate) seen: watch::Receiver<Seen>,
}

impl Watcher {
    pub(crate) fn new(
        pods: Api<Pod>,
        selector: String,
        container: String,
        unschedulable_grace: Duration,
    ) -> Watcher {
        Watcher {
            shared: Arc::new(Shared {
                pods,
                selector,
                container,
                unschedulable_grace,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Follows the pod `name` from before it is created, so no event of it is missed.
    pub(crate) fn follow(&self, name: &str) -> Following {
        let (tx, seen) = watch::channel(Seen::default());
        let mut state = self.shared.lock();
        state.followed.insert(
            name.to_string(),
            Followed {
                tx,
                created: false,
                unschedulable_since: None,
            },
        );
        if !state.running {
            state.running = true;
            tokio::spawn(run(self.shared.clone()));
        }
        Following {
            shared: self.shared.clone(),
            name: name.to_string(),
            seen,
        }
    }
}

impl Following {
    /// The pod's create call returned.
    pub(crate) fn created(&self) {
        if let Some(followed) = self.shared.lock().followed.get_mut(&self.name) {
            followed.created = true;
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.shared.lock().followed.remove(&self.name);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays whole whatever panicked while holding it: a map and flags.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the task when nothing is followed; `running` changes under the same lock as
    /// `follow` reads it, so a pod followed meanwhile finds a task running or starts one.
    fn idle(&self) -> bool {
        let mut state = self.lock();
        if state.followed.is_empty() {
            state.running = false;
        }
        !state.running
    }

    /// Publishes why the pod's runner will never dial back, the first time its status says so.
    async fn observe(&self, pod: &Pod) {
        let Some(name) = pod.metadata.name.as_deref() else {
            return;
        };
        let patient = !self.unschedulable_grace.is_zero();
        let reason = {
            let mut state = self.lock();
            let Some(followed) = state.followed.get_mut(name) else {
                return;
            };
            if followed.tx.borrow().fatal.is_some() {
                // Nothing left to wait for: no wake-up for an unschedulable grace either.
                followed.unschedulable_since = None;
                return;
            }
            let mut reason = fatal(pod, &self.container, patient);
            if reason.is_none() && patient {
                // Only an unschedulable pod is fatal now: fail once it has waited its grace.
                reason = fatal(pod, &self.container, false);
                match reason {
                    Some(_) => {
                        let since = *followed
                            .unschedulable_since
                            .get_or_insert_with(Instant::now);
                        if since.elapsed() < self.unschedulable_grace {
                            reason = None;
                        }
                    }
                    None => followed.unschedulable_since = None,
                }
            }
            if reason.is_some() {
                followed.unschedulable_since = None;
            }
            reason
        };
        let Some(mut reason) = reason else { return };
        if terminated(pod)
            && let Some(last) = self.last_words(name).await
        {
            reason = format!("{reason}; its last words: {last}");
        }
        if let Some(followed) = self.lock().followed.get(name) {
            followed.tx.send_if_modified(|seen| {
                let first = seen.fatal.is_none();
                seen.fatal.get_or_insert(reason);
                first
            });
        }
    }

    /// The last line the runner's container wrote, as the cluster keeps it: what a runner that
    /// exits before dialing back says about why. Needs `get` on `pods/log`; without it, nothing.
    async fn last_words(&self, name: &str) -> Option<String> {
        let params = LogParams {
            container: Some(self.container.clone()),
            tail_lines: Some(LAST_LINES),
            ..LogParams::default()
        };
        // Bounded: the one loop that follows every pod waits for it.
        let log = tokio::time::timeout(LAST_WORDS_WITHIN, self.pods.logs(name, &params))
            .await
            .ok()?
            .ok()?;
        log.lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(str::to_string)
    }

    fn gone(&self, name: &str) {
        if let Some(followed) = self.lock().followed.get_mut(name) {
            followed.unschedulable_since = None;
            followed.tx.send_modify(|seen| {
                seen.fatal
                    .get_or_insert_with(|| "its pod was deleted".into());
                seen.gone = true;
            });
        }
    }

    /// When the earliest unschedulable grace runs out.
    fn next_wake(&self) -> Option<Instant> {
        self.lock()
            .followed
            .values()
            .filter_map(|f| f.unschedulable_since)
            .min()
            // A grace too long to add ("wait for ever") never wakes the loop.
            .and_then(|since| since.checked_add(self.unschedulable_grace))
    }

    /// The names of the followed pods for which `wanted` holds.
    fn followed_where(&self, wanted: impl Fn(&str, &Followed) -> bool) -> Vec<String> {
        self.lock()
            .followed
            .iter()
            .filter(|(name, f)| wanted(name, f))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Reads again the pods whose unschedulable grace has run out.
    async fn wake_due(&self) {
        let due = self.followed_where(|_, f| {
            f.unschedulable_since
                .is_some_and(|since| since.elapsed() >= self.unschedulable_grace)
        });
        for name in due {
            self.recheck(&name).await;
        }
    }

    /// Reads one pod: observes it, or finds it gone. A failed read changes nothing.
    async fn recheck(&self, name: &str) {
        match self.pods.get_opt(name).await {
            Ok(Some(pod)) => self.observe(&pod).await,
            Ok(None) => self.gone(name),
            Err(_) => {}
        }
    }

    /// Takes in a full list: every pod in it is observed, and a created pod missing from it is
    /// read once more (the list may have been served before its create) and gone if absent.
    async fn resync(&self, pods: &[Pod]) {
        for pod in pods {
            self.observe(pod).await;
        }
        let missing = self.followed_where(|name, f| {
            f.created
                && !f.tx.borrow().gone
                && !pods
                    .iter()
                    .any(|p| p.metadata.name.as_deref() == Some(name))
        });
        for name in missing {
            self.recheck(&name).await;
        }
    }
}

/// The watch task: a list, then a watch from the list's version, resumed from a fresh list
/// when the server ends it (its timeout, a restart, a too-old version), so nothing between the
/// two is missed. Ends once no pod is followed.
async fn run(shared: Arc<Shared>) {
    // However else the task ends (a panic, its runtime shutting down), the next `follow`
    // starts another rather than trusting a task that is gone. Ending idle, `idle()` has
    // already said so under the lock, and a task started since must not be disowned.
    struct Stopped(Arc<Shared>, bool);
    impl Drop for Stopped {
        fn drop(&mut self) {
            if !self.1 {
                self.0.lock().running = false;
            }
        }
    }
    let mut stopped = Stopped(shared.clone(), false);
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    let mut warned = false;
    let mut pause = |e: &kube::Error, backoff: &mut Backoff| {
        // Not fatal to any runner, which may be up and serving: the pool still learns of its
        // end through its connection, only later for a pod that never dials.
        if !warned && (is_code(e, 401) || is_code(e, 403)) {
            warned = true;
            tracing::warn!(error = %e, "flame: the cluster refuses to let the parent list or watch its runner pods; boot failures are then found only at boot_timeout (the Role needs list and watch on pods, docs/deploy-kubernetes.md)");
        } else {
            tracing::debug!(error = %e, "flame: listing or watching runner pods failed; trying again");
        }
        backoff.step()
    };
    loop {
        if shared.idle() {
            stopped.1 = true;
            return;
        }
        let listed = shared
            .pods
            .list(&ListParams::default().labels(&shared.selector))
            .await;
        let version = match listed {
            Ok(list) => {
                shared.resync(&list.items).await;
                list.metadata.resource_version.unwrap_or_default()
            }
            Err(e) => {
                tokio::time::sleep(pause(&e, &mut backoff)).await;
                continue;
            }
        };
        let params = WatchParams::default()
            .labels(&shared.selector)
            .timeout(WATCH_SECONDS);
        let stream = match shared.pods.watch(&params, &version).await {
            Ok(stream) => stream,
            Err(e) => {
                tokio::time::sleep(pause(&e, &mut backoff)).await;
                continue;
            }
        };
        let opened = Instant::now();
        let heard = follow(&shared, stream).await;
        // A watch that served events, or lasted, was healthy; one that opened and ended at
        // once (a server that accepts and drops it) must not be reopened in a tight loop.
        if heard || opened.elapsed() >= HEALTHY_WATCH {
            backoff.reset();
        } else {
            tokio::time::sleep(backoff.step()).await;
        }
    }
}

/// Whether the pod's container has ended (rather than never started).
fn terminated(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .any(|s| {
            s.state
                .as_ref()
                .is_some_and(|state| state.terminated.is_some())
        })
}

/// Follows one watch until it ends (its timeout, a refusal, a too-old version); whether it
/// served any event. While a pod waits for a node, it wakes up when that pod's grace runs out.
async fn follow(
    shared: &Shared,
    stream: impl Stream<Item = Result<WatchEvent<Pod>, kube::Error>>,
) -> bool {
    let mut heard = false;
    let mut wake_backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    let mut stream = std::pin::pin!(stream);
    loop {
        // While a pod waits for a node, wake up when its grace runs out.
        let next = match shared.next_wake() {
            Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    shared.wake_due().await;
                    // A read that failed leaves the wake-up due: not again at once, and
                    // less often while it keeps failing.
                    if shared.next_wake().is_some_and(|at| at <= Instant::now()) {
                        tokio::time::sleep(wake_backoff.step()).await;
                    } else {
                        wake_backoff.reset();
                    }
                    continue;
                }
            },
            None => stream.next().await,
        };
        heard |= matches!(next, Some(Ok(ref event)) if !matches!(event, WatchEvent::Error(_)));
        match next {
            Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                shared.observe(&pod).await;
            }
            Some(Ok(WatchEvent::Deleted(pod))) => {
                if let Some(name) = pod.metadata.name.as_deref() {
                    shared.gone(name);
                }
            }
            Some(Ok(WatchEvent::Bookmark(_))) => {}
            // A too-old version (410) or any other refusal: start over from a list.
            Some(Ok(WatchEvent::Error(_))) | Some(Err(_)) | None => break,
        }
    }
    heard
}
