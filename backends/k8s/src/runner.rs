//! One runner pod: its boot (secret, pod, re-owned secret) and its deletion. What the pool
//! learns of it while it boots comes from the backend's watch (watch.rs).

use std::time::Duration;

use flame::{BootSpec, Error, ErrorKind, RunnerHandle};
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};

use crate::status::{api_error, is_code};
use crate::template::{Template, owned_by, pod_name};
use crate::watch::{Following, Watcher};

pub(crate) struct K8sRunner {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    name: String,
    following: Following,
    delete_grace: Duration,
}

/// What a boot needs from the backend.
pub(crate) struct Boot<'a> {
    pub(crate) pods: Api<Pod>,
    pub(crate) secrets: Api<Secret>,
    pub(crate) template: &'a Template,
    pub(crate) watcher: &'a Watcher,
    pub(crate) delete_grace: Duration,
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
                &flame::__private::random_hex::<2>(),
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
        // Followed before it exists, so the watch misses none of its events.
        let following = self.watcher.follow(&name);
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
        following.created();
        tracing::debug!(pod = %name, runner = spec.runner_id(), "flame: runner pod created");
        Ok(K8sRunner {
            pods: self.pods,
            secrets: self.secrets,
            name,
            following,
            delete_grace: self.delete_grace,
        })
    }
}

impl K8sRunner {
    /// Waits until the pod object is gone, for at most `within`. The watch says so first; a
    /// watch that is down or behind is checked by reading the pod, so that a pod already gone
    /// is not deleted again by force nor reported as left behind.
    async fn gone_within(&self, within: Duration) -> bool {
        let mut seen = self.following.seen.clone();
        if let Ok(Ok(_)) = tokio::time::timeout(within, seen.wait_for(|s| s.gone)).await {
            return true;
        }
        matches!(self.pods.get_opt(&self.name).await, Ok(None))
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
            let mut seen = self.following.seen.clone();
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
