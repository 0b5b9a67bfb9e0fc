//! One runner pod: its boot (secret, pod, re-owned secret), the watch that tells the pool when
//! it can never dial back or is gone, and its deletion.

use std::time::Duration;

use flame::{BootSpec, Error, ErrorKind, RunnerHandle};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{
    DeleteParams, LogParams, Patch, PatchParams, PostParams, PropagationPolicy, WatchEvent,
    WatchParams,
};
use tokio::sync::watch;

use crate::status::{api_error, fatal, is_code};
use crate::template::{Template, owned_by, pod_name};

/// What the watch has seen of a runner pod.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// Why the runner will never dial back, or is gone.
    fatal: Option<String>,
    /// The pod object no longer exists.
    gone: bool,
}

pub(crate) struct K8sRunner {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    name: String,
    seen: watch::Receiver<Seen>,
    watcher: tokio::task::JoinHandle<()>,
    delete_grace: Duration,
}

/// What a boot needs from the backend.
pub(crate) struct Boot<'a> {
    pub(crate) pods: Api<Pod>,
    pub(crate) secrets: Api<Secret>,
    pub(crate) template: &'a Template,
    pub(crate) delete_grace: Duration,
    pub(crate) unschedulable_grace: Duration,
}

impl Boot<'_> {
    pub(crate) async fn start(self, spec: &BootSpec) -> Result<K8sRunner, Error> {
        let (key, value) = spec.handoff_env();
        let labels = self.template.labels(spec.pool(), spec.runner_id());
        let post = PostParams::default();
        // A parent restarted under the same pod name counts runners from 1 again while its
        // predecessor's may still be ending: a random tail keeps the names apart, and a clash
        // all the same is tried once more under another.
        let mut attempt = 0;
        let name = loop {
            attempt += 1;
            let name = pod_name(
                self.template.parent_name(),
                spec.runner_id(),
                &random_tail(),
            );
            let secret = self.template.secret(&name, labels.clone(), key, value);
            match self.secrets.create(&post, &secret).await {
                Ok(_) => break name,
                Err(e) if attempt < 2 && is_code(&e, 409) => continue,
                Err(e) => {
                    return Err(api_error(
                        ErrorKind::BootFailed,
                        &format!("creating the hand-off secret of runner pod {name}"),
                        &e,
                    ));
                }
            }
        };
        let pod = self.template.pod(&name, spec.pool(), spec.runner_id(), key);
        let created = match self.pods.create(&post, &pod).await {
            Ok(created) => created,
            Err(e) => {
                let _ = self.secrets.delete(&name, &DeleteParams::default()).await;
                return Err(api_error(
                    ErrorKind::BootFailed,
                    &format!("creating runner pod {name}"),
                    &e,
                ));
            }
        };
        // The token now lives exactly as long as its runner: any deletion of the pod takes the
        // secret with it. Until this lands the parent's pod owns it, which also cleans up.
        let owner = serde_json::json!({"metadata": {"ownerReferences": [owned_by(&created)]}});
        if let Err(e) = self
            .secrets
            .patch(&name, &PatchParams::default(), &Patch::Merge(&owner))
            .await
        {
            tracing::warn!(pod = %name, error = %e, "flame: could not hand a runner's secret to its pod; it goes with the parent's pod instead");
        }
        let (tx, seen) = watch::channel(Seen::default());
        let watcher = tokio::spawn(watch_pod(
            self.pods.clone(),
            name.clone(),
            self.template.container.clone(),
            created
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default(),
            self.unschedulable_grace,
            tx,
        ));
        tracing::debug!(pod = %name, runner = spec.runner_id(), "flame: runner pod created");
        Ok(K8sRunner {
            pods: self.pods,
            secrets: self.secrets,
            name,
            seen,
            watcher,
            delete_grace: self.delete_grace,
        })
    }
}

fn random_tail() -> String {
    let mut tail = [0u8; 2];
    let _ = getrandom::fill(&mut tail);
    tail.iter().map(|b| format!("{b:02x}")).collect()
}

/// Follows one runner pod for the backend, publishing the first fatal state and its end.
struct PodWatch {
    pods: Api<Pod>,
    name: String,
    container: String,
    unschedulable_grace: Duration,
    /// Since when the scheduler has found no node, while its grace runs.
    unschedulable_since: Option<tokio::time::Instant>,
    tx: watch::Sender<Seen>,
}

/// How long the server keeps one watch open before the watch is resumed. Shorter than the
/// client's read timeout (config.rs), so only a server gone silent trips that.
pub(crate) const WATCH_SECONDS: u32 = 45;

/// The first pause after a failed watch or read, doubled up to [`MAX_BACKOFF`] while they fail.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Follows one pod from `resource_version` on. A watch the server ends (its timeout, a restart,
/// a too-old version) is resumed from a fresh read, so nothing between the two is missed.
async fn watch_pod(
    pods: Api<Pod>,
    name: String,
    container: String,
    mut resource_version: String,
    unschedulable_grace: Duration,
    tx: watch::Sender<Seen>,
) {
    let mut watch = PodWatch {
        pods,
        name,
        container,
        unschedulable_grace,
        unschedulable_since: None,
        tx,
    };
    let fields = format!("metadata.name={}", watch.name);
    let mut backoff = FIRST_BACKOFF;
    let mut warned = false;
    loop {
        let params = WatchParams::default()
            .fields(&fields)
            .timeout(WATCH_SECONDS);
        match watch.pods.watch(&params, &resource_version).await {
            Ok(stream) => {
                backoff = FIRST_BACKOFF;
                let mut stream = std::pin::pin!(stream);
                loop {
                    // While the pod waits for a node, wake up when its grace runs out.
                    let wake = watch
                        .unschedulable_since
                        .map(|since| since + unschedulable_grace);
                    let next = match wake {
                        Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                            Ok(next) => next,
                            // The read below looks at the pod again.
                            Err(_) => break,
                        },
                        None => stream.next().await,
                    };
                    match next {
                        Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                            if let Some(rv) = &pod.metadata.resource_version {
                                resource_version = rv.clone();
                            }
                            watch.observe(&pod).await;
                        }
                        Some(Ok(WatchEvent::Deleted(_))) => return watch.gone(),
                        Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                            resource_version = bookmark.metadata.resource_version;
                        }
                        // A too-old version (410) or any other refusal: start over from a read.
                        Some(Ok(WatchEvent::Error(_))) | Some(Err(_)) | None => break,
                    }
                }
            }
            Err(e) => {
                // Not fatal to the runner, which may be up and serving: the pool still learns
                // of its end through its connection, only later for a pod that never dials.
                if !warned && (is_code(&e, 401) || is_code(&e, 403)) {
                    warned = true;
                    tracing::warn!(pod = %watch.name, error = %e, "flame: the cluster refuses to let the parent watch its runner pods; boot failures are then found only at boot_timeout (the Role needs watch on pods, docs/deploy-kubernetes.md)");
                } else {
                    tracing::debug!(pod = %watch.name, error = %e, "flame: watching a runner pod failed; reading it instead");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        match watch.pods.get_opt(&watch.name).await {
            Ok(Some(pod)) => {
                resource_version = pod.metadata.resource_version.clone().unwrap_or_default();
                watch.observe(&pod).await;
            }
            Ok(None) => return watch.gone(),
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

impl PodWatch {
    /// Publishes why the pod's runner will never dial back, the first time its status says so.
    async fn observe(&mut self, pod: &Pod) {
        if self.tx.borrow().fatal.is_some() {
            // Nothing left to wait for: no wake-up for an unschedulable grace either.
            self.unschedulable_since = None;
            return;
        }
        let patient = !self.unschedulable_grace.is_zero();
        let mut reason = fatal(pod, &self.container, patient);
        if reason.is_none() && patient {
            // Only an unschedulable pod is fatal now: fail once it has waited its grace.
            reason = fatal(pod, &self.container, false);
            match reason {
                Some(_) => {
                    let since = *self
                        .unschedulable_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() < self.unschedulable_grace {
                        reason = None;
                    }
                }
                None => self.unschedulable_since = None,
            }
        }
        let Some(mut reason) = reason else { return };
        self.unschedulable_since = None;
        if terminated(pod)
            && let Some(last) = self.last_words().await
        {
            reason = format!("{reason}; its last words: {last}");
        }
        self.tx.send_if_modified(|seen| {
            let first = seen.fatal.is_none();
            seen.fatal.get_or_insert(reason);
            first
        });
    }

    /// The last line the runner's container wrote, as the cluster keeps it: what a runner that
    /// exits before dialing back says about why. Needs `get` on `pods/log`; without it, nothing.
    async fn last_words(&self) -> Option<String> {
        let params = LogParams {
            container: Some(self.container.clone()),
            tail_lines: Some(LAST_LINES),
            ..LogParams::default()
        };
        let log = self.pods.logs(&self.name, &params).await.ok()?;
        log.lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(str::to_string)
    }

    fn gone(&self) {
        self.tx.send_modify(|seen| {
            seen.fatal
                .get_or_insert_with(|| "its pod was deleted".into());
            seen.gone = true;
        });
    }
}

/// How many of a dead runner's last lines are read to find its last words.
const LAST_LINES: i64 = 20;

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

impl K8sRunner {
    /// Waits until the pod object is gone, for at most `within`.
    async fn gone_within(&self, within: Duration) -> bool {
        let mut seen = self.seen.clone();
        matches!(
            tokio::time::timeout(within, seen.wait_for(|s| s.gone)).await,
            Ok(Ok(_))
        )
    }

    async fn delete(&self, grace: Duration) -> bool {
        let params = DeleteParams {
            grace_period_seconds: Some(grace.as_secs().try_into().unwrap_or(u32::MAX)),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        match self.pods.delete(&self.name, &params).await {
            Ok(_) => true,
            Err(e) if is_code(&e, 404) => true,
            Err(e) => {
                tracing::warn!(pod = %self.name, error = %e, "flame: could not delete a runner pod");
                false
            }
        }
    }
}

impl RunnerHandle for K8sRunner {
    fn describe(&self) -> String {
        format!("pod {}", self.name)
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        async move {
            let mut seen = self.seen.clone();
            let verdict = seen
                .wait_for(|s| s.fatal.is_some())
                .await
                .map(|seen| seen.fatal.clone().unwrap_or_default());
            match verdict {
                Ok(verdict) => verdict,
                // The watch ended without a verdict: the backend cannot tell.
                Err(_) => futures::future::pending().await,
            }
        }
        .boxed()
    }

    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            // The grace lets a runner that is still up end through its own shutdown (dropping
            // its tasks and their children) rather than a SIGKILL.
            if self.delete(self.delete_grace).await
                && !self.gone_within(self.delete_grace + Duration::from_secs(5)).await
                && self.delete(Duration::ZERO).await
                && !self.gone_within(Duration::from_secs(10)).await
            {
                tracing::warn!(pod = %self.name, "flame: a runner pod is still there after a forced delete");
            }
            self.watcher.abort();
            // Normally garbage-collected with the pod; deleting it too spares the collector.
            match self.secrets.delete(&self.name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_code(&e, 404) => {}
                Err(e) => {
                    tracing::debug!(secret = %self.name, error = %e, "flame: could not delete a runner's secret; the cluster collects it with its pod");
                }
            }
        }
        .boxed()
    }
}

impl Drop for K8sRunner {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}
