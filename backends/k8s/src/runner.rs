//! One runner pod: its boot (secret, pod, re-owned secret), the watch that tells the pool when
//! it can never dial back or is gone, and its deletion.

use std::time::Duration;

use flame::{BootSpec, Error, ErrorKind, RunnerHandle};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{
    DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy, WatchEvent, WatchParams,
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

/// Follows one pod from `resource_version` on, publishing the first fatal state and its end.
/// A watch the server ends (its timeout, a restart, a too-old version) is resumed from a fresh
/// read, so nothing between the two is missed.
async fn watch_pod(
    pods: Api<Pod>,
    name: String,
    container: String,
    mut resource_version: String,
    unschedulable_grace: Duration,
    tx: watch::Sender<Seen>,
) {
    let mut unschedulable_since: Option<tokio::time::Instant> = None;
    let observe = |pod: &Pod, since: &mut Option<tokio::time::Instant>| {
        let patient = !unschedulable_grace.is_zero();
        let reason = fatal(pod, &container, patient).or_else(|| {
            if !patient {
                return None;
            }
            let unschedulable = fatal(pod, &container, false)?;
            let first = *since.get_or_insert_with(tokio::time::Instant::now);
            (first.elapsed() >= unschedulable_grace).then_some(unschedulable)
        });
        if reason.is_none() {
            *since = None;
        }
        if let Some(reason) = reason {
            tx.send_if_modified(|seen| {
                let first = seen.fatal.is_none();
                seen.fatal.get_or_insert(reason);
                first
            });
        }
    };
    let gone = |tx: &watch::Sender<Seen>| {
        tx.send_modify(|seen| {
            seen.fatal
                .get_or_insert_with(|| "its pod was deleted".into());
            seen.gone = true;
        });
    };
    loop {
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(290);
        match pods.watch(&params, &resource_version).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                loop {
                    // While the pod waits for a node, wake up when its grace runs out.
                    let wake = unschedulable_since.map(|since| since + unschedulable_grace);
                    let next = match wake {
                        Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                            Ok(next) => next,
                            Err(_) => {
                                if let Ok(Some(pod)) = pods.get_opt(&name).await {
                                    observe(&pod, &mut unschedulable_since);
                                }
                                continue;
                            }
                        },
                        None => stream.next().await,
                    };
                    match next {
                        Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                            if let Some(rv) = &pod.metadata.resource_version {
                                resource_version = rv.clone();
                            }
                            observe(&pod, &mut unschedulable_since);
                        }
                        Some(Ok(WatchEvent::Deleted(_))) => {
                            gone(&tx);
                            return;
                        }
                        Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                            resource_version = bookmark.metadata.resource_version;
                        }
                        // A too-old version (410) or any other refusal: start over from a read.
                        Some(Ok(WatchEvent::Error(_))) | Some(Err(_)) | None => break,
                    }
                }
            }
            Err(e) => {
                tracing::debug!(pod = %name, error = %e, "flame: watching a runner pod failed; reading it instead");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        match pods.get_opt(&name).await {
            Ok(Some(pod)) => {
                resource_version = pod.metadata.resource_version.clone().unwrap_or_default();
                observe(&pod, &mut unschedulable_since);
            }
            Ok(None) => {
                gone(&tx);
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
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
