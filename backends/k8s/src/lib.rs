//! Kubernetes backend for flame-rt: each runner is a pod cloned from the parent's own pod,
//! through the API server ([`kube`], [`k8s_openapi`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), flame::Error> {
//! let pool = flame::Pool::builder("thumbs")
//!     .backend(flame_backend_k8s::K8sBackend::builder().build().await?)
//!     .max(10)
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! **A runner is the parent's pod, cloned.** [`K8sBackendBuilder::build`] reads the parent's
//! own pod (`POD_NAME` and `POD_NAMESPACE`, from the downward API) and takes from its app
//! container the image — by digest when the pod's status has it, so a rolling deploy never
//! pairs a parent with runners of another build — the command and arguments, env and envFrom,
//! resources, working directory and security context, the volumes it mounts that mean the same
//! in every pod (configMap, secret, projected, downwardAPI, inline CSI, a fresh emptyDir or
//! ephemeral claim), and from the pod its
//! service account, image pull secrets, node selector, tolerations, node affinity, priority and
//! runtime class, DNS settings and service links. Left behind: probes (a runner does not serve
//! the app's endpoints), ports, lifecycle hooks, the other containers, init containers (a
//! migration runs once, with the parent), claims and host paths, and the parent's labels. Every knob on the builder, then
//! [`pod_template`](K8sBackendBuilder::pod_template), has the last word.
//!
//! **Lifecycle.** Runner pods have `restartPolicy: Never` and a controller owner reference to
//! the parent's pod: deleting the parent (a rollout, `kubectl delete`) makes the cluster delete
//! its runners even if the parent never ran its cleanup, and no ReplicaSet can adopt them. A
//! runner also ends by itself when its parent lets it go or goes silent (the failsafe). The
//! backend watches each runner pod while it boots: an image that cannot be pulled, a pod no
//! node can take, a missing secret, a container that exited — each fails the boot at once
//! with the cluster's own reason, and API refusals (RBAC, quota, throttling) with the server's
//! message. Pools delete their runner pods (with [`delete_grace`](K8sBackendBuilder::delete_grace),
//! then by force) and wait until they are gone; [`K8sBackend::sweep_leftovers`] deletes the
//! runner pods of parents that no longer exist.
//!
//! **The hand-off token is in no pod object.** Each runner reads it from a `Secret` of its own,
//! through `secretKeyRef`; the secret is owned by the runner's pod, so it goes with it. Whoever
//! can `get pods` sees a reference, not the token. The parent needs no `get`, `list` or
//! `watch` on secrets, so it can read no secret, not even the ones it made.
//!
//! **RBAC** for the parent's service account (a Role in its namespace):
//!
//! | resource | verbs | why |
//! |---|---|---|
//! | `pods` | `get` | its own pod (the template), runner pods' status |
//! | `pods` | `list`, `watch` | following the runner pods (one watch per backend); the sweep |
//! | `pods` | `create`, `delete` | runners |
//! | `secrets` | `create`, `patch`, `delete` | hand-off secrets: made, re-owned by their pod, removed |
//! | `pods/log` | `get` | optional: the last line of a runner that died before dialing back |
//!
//! Runners need no API access: their pods get no service-account token unless
//! [`runner_api_access`](K8sBackendBuilder::runner_api_access) says so.
//! `docs/deploy-kubernetes.md` in the repository has the manifests.
//!
//! **TLS.** kube reaches the API server over rustls. When the app has not chosen a process-wide
//! rustls provider, the backend chooses `ring` (the one flame-rt uses) before it makes its
//! client: kube chooses one by itself only with its `aws-lc-rs` feature, and an app whose
//! dependencies compile both providers would otherwise panic at its first API call.
//!
//! **Versions.** Like every library on `k8s-openapi`, this crate leaves the Kubernetes API level
//! to the application: turn on one of `k8s-openapi`'s `v1_*` features in your binary (the
//! oldest, `v1_33`, works with any newer cluster), or set `K8S_OPENAPI_ENABLED_VERSION` when
//! building this crate alone.

#![warn(missing_docs, unreachable_pub)]

mod config;
mod runner;
mod status;
mod template;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use flame::{Backend, BootSpec, Error, ErrorKind, RunnerHandle};
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements, Secret, Toleration};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Preconditions};

pub use k8s_openapi;
pub use kube;

use status::{api_error, is_code};
use template::{Knobs, Template};

/// The label naming a runner pod's pool (cleaned to a label value; the
/// `flame.pool-name` annotation has it as given).
pub const LABEL_POOL: &str = "flame.pool";
/// The label holding the uid of the pod whose parent created a runner pod or secret.
pub const LABEL_PARENT: &str = "flame.parent";
/// The label naming a runner pod's runner id.
pub const LABEL_RUNNER: &str = "flame.runner";
/// The standard label marking what flame-rt made.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY: &str = "flame-rt";

/// Boots runners as pods of the parent's own pod spec. Build it with [`K8sBackend::builder`].
#[derive(Clone)]
pub struct K8sBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// None on a runner, where pools run calls in place and never boot.
    cluster: Option<Cluster>,
    listen: SocketAddr,
    delete_grace: Duration,
}

struct Cluster {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    namespace: String,
    template: Template,
    watcher: watch::Watcher,
}

/// Configures a [`K8sBackend`]; see the crate docs for what it takes from the parent's pod.
pub struct K8sBackendBuilder {
    client: Option<kube::Client>,
    namespace: Option<String>,
    pod: Option<String>,
    container: Option<String>,
    listen: Option<SocketAddr>,
    listen_port: u16,
    knobs: Knobs,
    delete_grace: Duration,
    unschedulable_grace: Duration,
}

impl fmt::Debug for K8sBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K8sBackendBuilder")
            .field("namespace", &self.namespace)
            .field("pod", &self.pod)
            .field("container", &self.container)
            .field("listen", &self.listen)
            .field("listen_port", &self.listen_port)
            .field("delete_grace", &self.delete_grace)
            .finish_non_exhaustive()
    }
}

impl K8sBackend {
    /// A builder that finds the cluster, the namespace and the parent's pod by itself.
    pub fn builder() -> K8sBackendBuilder {
        K8sBackendBuilder {
            client: None,
            namespace: None,
            pod: None,
            container: None,
            listen: None,
            listen_port: 0,
            knobs: Knobs::default(),
            delete_grace: Duration::from_secs(5),
            unschedulable_grace: Duration::ZERO,
        }
    }

    /// The namespace runner pods are created in (empty on a runner).
    pub fn namespace(&self) -> &str {
        self.inner
            .cluster
            .as_ref()
            .map_or("", |c| c.namespace.as_str())
    }

    /// The uid of the parent's pod, which runner pods carry in [`LABEL_PARENT`] (empty on a
    /// runner).
    pub fn parent_uid(&self) -> &str {
        self.inner
            .cluster
            .as_ref()
            .map_or("", |c| c.template.parent_uid())
    }

    /// Deletes the runner pods (and their secrets) whose parent pod no longer exists, such as
    /// a crashed parent's whose deletion the garbage collector has not reached. Returns the
    /// names of the pods deleted.
    ///
    /// Runners of a parent pod that still exists are left alone, so replicas of one app can
    /// share a namespace. Each deletion is conditional on the pod's uid, so a new pod that
    /// took a name is never touched.
    pub async fn sweep_leftovers(&self) -> Result<Vec<String>, Error> {
        let Some(cluster) = &self.inner.cluster else {
            return Ok(Vec::new());
        };
        let flame_made = ListParams::default()
            .labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_PARENT}"));
        let listing = |e: &kube::Error, what: &str| api_error(ErrorKind::BootFailed, what, e);
        let runners = cluster
            .pods
            .list(&flame_made)
            .await
            .map_err(|e| listing(&e, "listing runner pods"))?;
        let live: BTreeSet<String> = cluster
            .pods
            .list(&ListParams::default())
            .await
            .map_err(|e| listing(&e, "listing pods"))?
            .items
            .into_iter()
            .filter_map(|pod| pod.metadata.uid)
            .collect();
        let orphaned = |labels: &Option<BTreeMap<String, String>>| {
            let parent = labels.as_ref().and_then(|l| l.get(LABEL_PARENT));
            parent.is_some_and(|p| p != cluster.template.parent_uid() && !live.contains(p))
        };
        let mut removed = Vec::new();
        for pod in runners.items {
            let (Some(name), Some(uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone())
            else {
                continue;
            };
            if !orphaned(&pod.metadata.labels) {
                continue;
            }
            match cluster.pods.delete(&name, &delete_exactly(uid)).await {
                Ok(_) => {}
                Err(e) if is_code(&e, 404) || is_code(&e, 409) => continue,
                Err(e) => return Err(listing(&e, &format!("deleting runner pod {name}"))),
            }
            // Its secret carries its name; the collector would take it with the pod, this
            // only spares it the work. Secrets are never listed: a list returns their data.
            match cluster
                .secrets
                .delete(&name, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(e) if is_code(&e, 404) => {}
                Err(e) => {
                    tracing::debug!(secret = %name, error = %e, "flame: could not delete a swept runner's secret; the cluster collects it with its pod");
                }
            }
            removed.push(name);
        }
        if !removed.is_empty() {
            tracing::info!(
                count = removed.len(),
                "flame: deleted runner pods whose parent is gone"
            );
        }
        Ok(removed)
    }
}

fn delete_exactly(uid: String) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

impl K8sBackendBuilder {
    /// The API client to use instead of the in-cluster config (or, outside a pod, the
    /// kubeconfig).
    pub fn client(mut self, client: kube::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// The namespace of the parent's pod and its runners: by default `POD_NAMESPACE`, else the
    /// client's (the service account's namespace in a pod).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The parent's pod, which runners are cloned from: by default `POD_NAME`, else the
    /// hostname.
    pub fn pod(mut self, name: impl Into<String>) -> Self {
        self.pod = Some(name.into());
        self
    }

    /// The container of the parent's pod that runs the app: needed when the pod has several.
    pub fn container(mut self, name: impl Into<String>) -> Self {
        self.container = Some(name.into());
        self
    }

    /// Where the parent listens for runners: by default its pod IP (`POD_IP`, else the pod's
    /// status), on a port of the system's choosing.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// The port the parent listens on for runners, on its pod IP, instead of one the system
    /// picks: for a NetworkPolicy that admits runners to that port only.
    pub fn listen_port(mut self, port: u16) -> Self {
        self.listen_port = port;
        self
    }

    /// A label on runner pods and secrets, besides flame's own.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.knobs.labels.insert(key.into(), value.into());
        self
    }

    /// An annotation on runner pods.
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.knobs.annotations.insert(key.into(), value.into());
        self
    }

    /// An environment variable for runners, replacing the parent's of that name in its place
    /// (so the parent's later variables that refer to it as `$(NAME)` see the new value). The
    /// value is taken literally: a `$(` in it is not expanded.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.knobs.env.insert(key.into(), value.into());
        self
    }

    /// Runner containers' requests and limits, instead of the parent container's.
    pub fn resources(mut self, resources: ResourceRequirements) -> Self {
        self.knobs.resources = Some(resources);
        self
    }

    /// A node label runner pods must match, besides the parent's node selector.
    pub fn node_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.knobs.node_selector.insert(key.into(), value.into());
        self
    }

    /// A toleration for runner pods, besides the parent's (a tainted GPU pool, say).
    pub fn toleration(mut self, toleration: Toleration) -> Self {
        self.knobs.tolerations.push(toleration);
        self
    }

    /// The runtime class of runner pods (`nvidia`, `gvisor`), instead of the parent's.
    pub fn runtime_class(mut self, name: impl Into<String>) -> Self {
        self.knobs.runtime_class = Some(name.into());
        self
    }

    /// Mounts the service account's API token in runner pods. Off by default: runners talk
    /// only to their parent.
    pub fn runner_api_access(mut self, on: bool) -> Self {
        self.knobs.runner_api_access = on;
        self
    }

    /// Mounts the parent's volume `name` in runners whatever its kind: a `ReadWriteMany` claim
    /// or a host path the app shares with its runners. (The configMap, secret, projected,
    /// downwardAPI and emptyDir volumes the app container mounts are always kept.)
    pub fn share_volume(mut self, name: impl Into<String>) -> Self {
        self.knobs.shared_volumes.push(name.into());
        self
    }

    /// Changes each runner pod just before it is created, after everything else: the way to
    /// add a claim, a sidecar, an affinity this builder has no knob for. The pod's name,
    /// namespace, owner and flame-rt's labels are put back after it: they are how the parent
    /// watches the pod and how the cluster removes it with the parent.
    pub fn pod_template(mut self, hook: impl Fn(&mut Pod) + Send + Sync + 'static) -> Self {
        self.knobs.hook = Some(Arc::new(hook));
        self
    }

    /// How long a runner pod that is to go gets to end by itself before it is deleted by
    /// force. Default 5 s: more than a runner's failsafe needs once its parent let it go.
    pub fn delete_grace(mut self, grace: Duration) -> Self {
        self.delete_grace = grace;
        self
    }

    /// How long a runner pod no node can take may wait for one (a cluster autoscaler adding
    /// it) before its boot fails. Default zero: fail at once with the scheduler's reason.
    pub fn unschedulable_grace(mut self, grace: Duration) -> Self {
        self.unschedulable_grace = grace;
        self
    }

    /// Connects to the cluster and reads the parent's own pod.
    ///
    /// On a runner (which runs the app's `main` too) it contacts nothing: a pool there runs
    /// calls in place and never boots, and runner pods have no API token.
    ///
    /// A pod, namespace or container that cannot be found, or a permission the parent lacks,
    /// is a [`Config`](ErrorKind::Config) error saying what to set.
    pub async fn build(self) -> Result<K8sBackend, Error> {
        if flame::parent().is_some() {
            return Ok(K8sBackend {
                inner: Arc::new(Inner {
                    cluster: None,
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    delete_grace: self.delete_grace,
                }),
            });
        }
        let client = match self.client {
            Some(client) => client,
            None => config::client().await?,
        };
        let namespace = self
            .namespace
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|n| !n.is_empty())
            })
            .unwrap_or_else(|| client.default_namespace().to_string());
        let pod_name = self.pod.or_else(config::own_pod_name).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "the Kubernetes backend clones the parent's pod, but neither POD_NAME nor the \
                 hostname names it (set POD_NAME from the downward API, or call \
                 K8sBackendBuilder::pod)",
            )
        })?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let secrets: Api<Secret> = Api::namespaced(client, &namespace);
        let own = config::own_pod(&pods, &pod_name, &namespace).await?;
        let handoff_key = flame::__private::HANDOFF_ENV;
        let template = Template::new(&own, self.container.as_deref(), &self.knobs, handoff_key)?;
        let listen = match self.listen {
            Some(addr) => addr,
            None => {
                let ip = std::env::var("POD_IP")
                    .ok()
                    .or_else(|| own.status.as_ref().and_then(|s| s.pod_ip.clone()));
                let ip: IpAddr = ip.and_then(|ip| ip.parse().ok()).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "the parent's pod {pod_name:?} has no IP to listen on for runners \
                             (set POD_IP from the downward API, or call K8sBackendBuilder::listen)"
                        ),
                    )
                })?;
                SocketAddr::new(ip, self.listen_port)
            }
        };
        Ok(K8sBackend {
            inner: Arc::new(Inner {
                cluster: Some(Cluster {
                    watcher: watch::Watcher::new(
                        pods.clone(),
                        format!(
                            "{LABEL_PARENT}={},{LABEL_MANAGED_BY}={MANAGED_BY}",
                            template.parent_uid()
                        ),
                        template.container.clone(),
                        self.unschedulable_grace,
                    ),
                    pods,
                    secrets,
                    namespace,
                    template,
                }),
                listen,
                delete_grace: self.delete_grace,
            }),
        })
    }
}

impl Backend for K8sBackend {
    fn name(&self) -> &str {
        "k8s"
    }

    fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, Error>> {
        let inner = self.inner.clone();
        async move {
            let cluster = inner.cluster.as_ref().ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "a Kubernetes backend built on a runner boots nothing",
                )
            })?;
            let runner = runner::Boot {
                pods: cluster.pods.clone(),
                secrets: cluster.secrets.clone(),
                template: &cluster.template,
                watcher: &cluster.watcher,
                delete_grace: inner.delete_grace,
            }
            .start(&spec)
            .await?;
            let handle: Box<dyn RunnerHandle> = Box::new(runner);
            Ok(handle)
        }
        .boxed()
    }
}
