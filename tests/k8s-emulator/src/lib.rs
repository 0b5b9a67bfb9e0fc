//! **An emulator, not Kubernetes.** The smallest faithful subset of kube-apiserver that flame-rt's
//! Kubernetes tests need, whose pods are real containers on the local Docker engine. It is test
//! support, not a product (see `docs/design/kubernetes-backend.md` §7).
//!
//! It serves one API over plain HTTP on 127.0.0.1 (for host-side kube clients) and over HTTPS on
//! the Docker network's gateway (for programs in pods, with `kube::Config::incluster()`, and for
//! kubectl, which the host reaches there too):
//!
//! - `/version` (v1.33), legacy discovery (`/api`, `/apis`, `/api/v1`, `/apis/apps/v1`,
//!   `/apis/rbac.authorization.k8s.io/v1`) and a schema-less `/openapi/v3`, enough for kubectl
//!   ≥ 1.29 to leave validation to the server.
//! - CRUD, list and watch for `v1` pods, secrets, serviceaccounts, configmaps and namespaces,
//!   `apps/v1` deployments, and `rbac.authorization.k8s.io/v1` roles and rolebindings, with one
//!   global resourceVersion, an event log of 1000 events (older watches get 410 Expired), label
//!   and field selectors, merge patches and a strategic-merge-patch subset, and full `Status`
//!   error bodies.
//! - A kubelet for pods on one node, `emu-node`: a scheduler (nodeSelector, resource requests), the
//!   environment (`fieldRef`, `secretKeyRef`, `envFrom`, `$(VAR)`), the service-account mount and
//!   `KUBERNETES_SERVICE_*`, status transitions from Docker, graceful deletion (`docker stop -t`),
//!   and `pods/log`.
//! - A Deployment controller: `spec.replicas` pods of `spec.template`, replaced on a template
//!   change (so `kubectl apply` and `kubectl rollout restart` work), and a minimal `status`.
//! - Garbage collection by ownerReferences, bearer tokens, and RBAC through Roles and RoleBindings.
//!
//! ```no_run
//! # async fn example() {
//! use flame_k8s_emulator::{Emulator, Options};
//! use k8s_openapi::api::core::v1::Pod;
//!
//! let emu = Emulator::start(Options::default()).await;
//! let pods = kube::Api::<Pod>::namespaced(emu.client("default"), "default");
//! // ... create pods (their containers run on Docker, on `emu.network()`), watch them, ...
//! emu.shutdown().await; // removes its containers, network and files
//! # }
//! ```
//!
//! Emulator translations and simplifications, which a real cluster does differently:
//!
//! - An image `<name>@sha256:<hex>` names the *local image whose id* is `sha256:<hex>`, and
//!   `containerStatuses[].imageID` reports `docker.io/library/<repo>@sha256:<local image id>`
//!   (`docker.io/<repo>@…` when the repository has a `/`). Images are never pulled: a missing one
//!   is `ErrImagePull`, then `ImagePullBackOff`, re-checked every 2 s.
//! - Every `restartPolicy` is treated as `Never`. Only `containers` are run; `initContainers`,
//!   probes, lifecycle hooks, volumes other than the service-account mount, resource limits and
//!   security contexts are ignored. A pod's later containers join the first one's network
//!   namespace (it holds the pod IP and the hostname). Pod specs are not immutable here.
//! - One node, `emu-node`, which is not served as an object. An unschedulable pod is re-checked
//!   every 500 ms, so it is scheduled once room is freed.
//! - Namespaces need not exist, and deleting one deletes nothing in it.
//! - Garbage collection runs when an object is *removed*: every object of that namespace whose
//!   ownerReferences name no live uid is then deleted in the background (through the same path
//!   as a client's delete, so containers are stopped). References that never named a live object
//!   are collected then too. `propagationPolicy: Foreground` is treated as `Background`; `Orphan`
//!   strips the references.
//! - `/version` is open to anyone (a real cluster's `system:public-info-viewer`): gcloud's
//!   kubectl dispatcher asks it without credentials. Everything else needs a bearer token;
//!   discovery and `/openapi` are open to any token.
//! - [`Emulator::write_kubeconfig`] points at the HTTPS URL: kubectl (client-go) sends no
//!   credentials over plain HTTP.
//! - Deployments have no ReplicaSets: the controller owns pods itself (ownerReferences
//!   `apps/v1` Deployment, `controller: true`, `blockOwnerDeletion: true`), names them
//!   `<deployment>-<hash>-<5 chars>` and labels them with the template's labels plus
//!   `pod-template-hash` (FNV-1a of the template's JSON, 10 characters; not the real hash). Its
//!   pods are those of its namespace it controls by uid; pods merely matching `spec.selector` are
//!   never adopted (the selector is not looked at), and pods of another controller are left alone.
//!   It reacts to every Deployment and pod event, while the emulator runs.
//! - Every strategy is a simplified surge rollout (`strategy`, `maxSurge`, `maxUnavailable`,
//!   `minReadySeconds`, `paused`, `revisionHistoryLimit` and `progressDeadlineSeconds` are
//!   ignored): all pods of the new template are created at once; an old pod that is not Running
//!   is deleted at once, and a Running one as a new pod is Running in its place (Running counts
//!   as ready: there are no probes). Scaling down deletes pods not Running first, then the
//!   newest. Deletions go through the clients' path with the pod's own grace. A rollout needs
//!   room on the node for both templates' pods at once, or it waits (new pods unschedulable,
//!   old pods kept). A pod of the current template whose containers have exited still counts
//!   (a real kubelet would restart them) and is not replaced.
//! - A Deployment's `status` has only `replicas`, `updatedReplicas`, and `readyReplicas` and
//!   `availableReplicas` (Running pods of the current template); no `observedGeneration` (no
//!   `metadata.generation` is kept) and no conditions, so `kubectl rollout status` is not
//!   supported.
//! - Authorization knows Roles and RoleBindings with ServiceAccount subjects only; a service
//!   account can do nothing at cluster scope.
//!
//! Not covered: ReplicaSets and every other controller, real scheduling and preemption, Services and DNS, NetworkPolicy, PVCs, image
//! pulls, admission webhooks, ResourceQuota objects (inject the 403 with [`Fault`]),
//! ClusterRoles and ClusterRoleBindings, server-side apply, JSON patch (415), `deletecollection`,
//! subresources other than `pods/log` (no `status`, `exec`, `attach`, `eviction`), Table output,
//! protobuf, aggregated discovery, `limit`/`continue` paging (every list is complete), dry runs,
//! and watch bookmarks (never sent; kube and kubectl do not need them).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod api;
mod auth;
mod deployments;
mod kubelet;
mod store;
mod tls;

/// The label on every Docker container and network an emulator makes, valued with its run id.
pub const LABEL_EMULATOR: &str = "flame.test.k8s-emulator";

/// The node every pod is scheduled on.
pub(crate) const NODE: &str = "emu-node";

/// The emulated node.
#[derive(Debug, Clone)]
pub struct Options {
    /// Allocatable CPU, in millicores (default 2000).
    pub node_cpu_millis: u64,
    /// Allocatable memory, in bytes (default 8 GiB).
    pub node_memory_bytes: u64,
    /// Labels added to the node's defaults (`kubernetes.io/hostname=emu-node`,
    /// `kubernetes.io/os=linux`, `kubernetes.io/arch=amd64`), for nodeSelector tests.
    pub node_labels: BTreeMap<String, String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            node_cpu_millis: 2000,
            node_memory_bytes: 8 << 30,
            node_labels: BTreeMap::new(),
        }
    }
}

impl Options {
    pub(crate) fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), NODE.to_string()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        ]);
        labels.extend(self.node_labels.clone());
        labels
    }
}

/// A failure the emulator answers with instead of doing the work.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The next `times` requests matching `verb` ("create", "get", "list", "watch", "delete",
    /// "patch", "update") and `resource` ("pods", "secrets", ...) get this Status.
    Status {
        /// The RBAC verb to match.
        verb: &'static str,
        /// The resource to match (without subresource).
        resource: &'static str,
        /// The HTTP status and `Status.code`.
        code: u16,
        /// `Status.reason`, such as `Forbidden` or `TooManyRequests`.
        reason: String,
        /// `Status.message`.
        message: String,
        /// How many requests get it.
        times: usize,
        /// A `Retry-After` header and `details.retryAfterSeconds`.
        retry_after: Option<u32>,
    },
    /// The next `times` watches on `resource` are accepted and then end at once with an
    /// `ERROR` event (410 Expired), as an API server does when etcd compacted past the version
    /// asked: a watch that "works" but never lasts.
    ExpiredWatch {
        /// The resource to match.
        resource: &'static str,
        /// How many watches get it.
        times: usize,
    },
}

/// A pod's kubelet task, and how it is told the pod is being deleted (with this grace).
pub(crate) struct PodControl {
    pub(crate) delete: watch::Sender<Option<i64>>,
    pub(crate) task: Option<JoinHandle<()>>,
}

/// What the API and the kubelet share.
pub(crate) struct Shared {
    pub(crate) docker: Docker,
    pub(crate) run_id: String,
    pub(crate) network: String,
    pub(crate) subnet: [u8; 3],
    pub(crate) gateway: Ipv4Addr,
    pub(crate) https_port: u16,
    pub(crate) ca_pem: String,
    pub(crate) dir: PathBuf,
    pub(crate) options: Options,
    pub(crate) store: Mutex<store::Store>,
    pub(crate) tokens: Mutex<auth::Tokens>,
    pub(crate) faults: Mutex<Vec<Fault>>,
    pub(crate) start_delay: Mutex<Duration>,
    pub(crate) pods: Mutex<HashMap<String, PodControl>>,
    pub(crate) ips: Mutex<BTreeSet<u8>>,
    /// Uids deleted with `propagationPolicy: Orphan`: their dependents lose the reference.
    pub(crate) orphaning: Mutex<HashSet<String>>,
    /// Watches open now, by resource.
    pub(crate) watches: Mutex<HashMap<&'static str, usize>>,
    /// Requests let through by RBAC so far, by verb and resource (refused by a fault or not).
    pub(crate) requests: Mutex<HashMap<(String, String), usize>>,
    pub(crate) closed: AtomicBool,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking handler must not take the whole emulator down with it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The Status of an injected fault matching this request, if one is left.
    /// Whether this watch on `resource` is to expire at once (an injected `ExpiredWatch`).
    pub(crate) fn take_expired_watch(&self, resource: &str) -> bool {
        let mut faults = lock(&self.faults);
        let found = faults.iter_mut().any(|f| match f {
            Fault::ExpiredWatch { resource: r, times } if *r == resource && *times > 0 => {
                *times -= 1;
                true
            }
            _ => false,
        });
        faults.retain(|f| !matches!(f, Fault::ExpiredWatch { times: 0, .. }));
        found
    }

    pub(crate) fn take_fault(&self, verb: &str, resource: &str) -> Option<(Value, Option<u32>)> {
        let mut faults = lock(&self.faults);
        let index = faults.iter().position(|f| match f {
            Fault::Status {
                verb: v,
                resource: r,
                times,
                ..
            } => *v == verb && *r == resource && *times > 0,
            Fault::ExpiredWatch { .. } => false,
        })?;
        let Fault::Status {
            code,
            reason,
            message,
            times,
            retry_after,
            ..
        } = &mut faults[index]
        else {
            unreachable!("found as a Status")
        };
        *times -= 1;
        let mut details = serde_json::json!({"kind": resource});
        if let Some(after) = retry_after {
            details["retryAfterSeconds"] = (*after).into();
        }
        let body = auth::status(*code, reason, message, Some(details));
        let after = *retry_after;
        if *times == 0 {
            faults.remove(index);
        }
        Some((body, after))
    }
}

/// A running emulator. Stop it with [`Emulator::shutdown`]; dropping it cleans up too, on a
/// best-effort basis, with the Docker CLI.
pub struct Emulator {
    shared: Arc<Shared>,
    http: SocketAddr,
    https: SocketAddr,
    ca_der: Vec<u8>,
    admin: String,
    servers: Vec<JoinHandle<()>>,
    done: bool,
}

fn random_octets() -> [u8; 2] {
    let b = store::random_bytes::<2>();
    // 10.128.0.0/9 and up: clear of Docker's default pools (172.17-31, 192.168) and usual LANs.
    [128 + b[0] % 120, b[1]]
}

impl Emulator {
    /// Starts an emulator: a Docker network of its own (labelled [`LABEL_EMULATOR`] = run id, with
    /// a /24 subnet so pods get fixed IPs), the plain HTTP API on 127.0.0.1 and the HTTPS API on
    /// the network's gateway. Panics if Docker cannot be reached.
    pub async fn start(options: Options) -> Emulator {
        // kube picks a rustls provider by itself only for aws-lc-rs; with both providers
        // compiled in (a workspace-wide build), the clients this emulator hands out need one
        // chosen, as flame-backend-k8s chooses ring.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let connected = match Docker::connect_with_local_defaults() {
            Ok(docker) => docker.negotiate_version().await,
            Err(e) => Err(e),
        };
        let docker = connected.unwrap_or_else(|e| {
            panic!("the k8s emulator needs a Docker engine (`docker info` must work): {e}")
        });
        if let Err(e) = docker.ping().await {
            panic!("the k8s emulator needs a Docker engine (`docker info` must work): {e}");
        }
        let run_id = store::random_hex(12);
        let network = format!("flame-k8s-emu-{run_id}");
        let mut subnet = [10, 0, 0];
        for attempt in 0.. {
            let [b, c] = random_octets();
            subnet = [10, b, c];
            let created = docker
                .create_network(NetworkCreateRequest {
                    name: network.clone(),
                    labels: Some(HashMap::from([(
                        LABEL_EMULATOR.to_string(),
                        run_id.clone(),
                    )])),
                    ipam: Some(Ipam {
                        config: Some(vec![IpamConfig {
                            subnet: Some(format!("10.{b}.{c}.0/24")),
                            gateway: Some(format!("10.{b}.{c}.1")),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => break,
                Err(e) if attempt < 30 && e.to_string().to_lowercase().contains("overlap") => {
                    continue;
                }
                Err(e) => panic!("the k8s emulator could not create Docker network {network}: {e}"),
            }
        }
        let gateway = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1);
        let dir = std::env::temp_dir().join(format!("flame-k8s-emu-{run_id}"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the emulator's HTTP port");
        let https = tokio::net::TcpListener::bind((IpAddr::V4(gateway), 0))
            .await
            .unwrap_or_else(|e| panic!("binding the emulator's HTTPS port on {gateway}: {e}"));
        let (http_addr, https_addr) = (http.local_addr().unwrap(), https.local_addr().unwrap());
        let certificates = tls::certificates(IpAddr::V4(gateway));
        let tokens = auth::Tokens::new();
        let admin = tokens.admin().to_string();
        let shared = Arc::new(Shared {
            docker,
            run_id,
            network,
            subnet,
            gateway,
            https_port: https_addr.port(),
            ca_pem: certificates.ca_pem.clone(),
            dir,
            options,
            store: Mutex::new(store::Store::new()),
            tokens: Mutex::new(tokens),
            faults: Mutex::new(Vec::new()),
            start_delay: Mutex::new(Duration::ZERO),
            pods: Mutex::new(HashMap::new()),
            ips: Mutex::new(BTreeSet::new()),
            orphaning: Mutex::new(HashSet::new()),
            watches: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let router = api::router(shared.clone());
        let plain = router.clone();
        let ca_der = certificates.ca_der.clone();
        let servers = vec![
            tokio::spawn(async move {
                let _ = axum::serve(http, plain).await;
            }),
            tokio::spawn(async move { tls::serve(https, &certificates, router).await }),
            tokio::spawn(deployments::run(shared.clone())),
        ];
        Emulator {
            shared,
            http: http_addr,
            https: https_addr,
            ca_der,
            admin,
            servers,
            done: false,
        }
    }

    /// This emulator's run id, the value of [`LABEL_EMULATOR`] on what it made.
    pub fn run_id(&self) -> &str {
        &self.shared.run_id
    }

    /// The plain HTTP API: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The HTTPS API on the network's gateway: `https://GATEWAY:PORT`.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.https)
    }

    /// The CA that signed the HTTPS certificate, in PEM.
    pub fn ca_pem(&self) -> String {
        self.shared.ca_pem.clone()
    }

    /// The token with full access.
    pub fn admin_token(&self) -> &str {
        &self.admin
    }

    /// A client with the admin token over plain HTTP, with `namespace` as its default and
    /// kube's retries off.
    pub fn client(&self, namespace: &str) -> kube::Client {
        self.client_with_token(namespace, &self.admin)
    }

    /// A client with `token` over plain HTTP, with `namespace` as its default and kube's
    /// retries off.
    pub fn client_with_token(&self, namespace: &str, token: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("the emulator's URL"));
        config.default_namespace = namespace.into();
        config.auth_info.token = Some(secrecy::SecretString::from(token));
        config.default_retry = false;
        kube::Client::try_from(config).expect("a kube client for the emulator")
    }

    /// The token a pod of service account `namespace/name` gets mounted (minted on first use;
    /// the ServiceAccount object need not exist).
    pub fn service_account_token(&self, namespace: &str, name: &str) -> String {
        lock(&self.shared.tokens).service_account(namespace, name)
    }

    /// Writes a kubeconfig for the admin, with namespace `default`. Its server is the HTTPS
    /// URL (with the CA inline), not the plain one: kubectl (client-go) sends no credentials
    /// over plain HTTP, so it would be refused.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> std::io::Result<()> {
        let ca = serde_json::to_value(k8s_openapi::ByteString(
            self.shared.ca_pem.clone().into_bytes(),
        ))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {}\n\
             contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: admin\n    \
             namespace: default\ncurrent-context: emulator\n",
            self.https_url(),
            self.admin
        );
        std::fs::write(path, config)
    }

    /// The Docker network pods join.
    pub fn network(&self) -> &str {
        &self.shared.network
    }

    /// The CA certificate in DER, for `kube::Config::root_cert`.
    pub fn ca_der(&self) -> Vec<u8> {
        self.ca_der.clone()
    }

    /// How many watches on `resource` ("pods") are open now, from every client.
    pub fn open_watches(&self, resource: &str) -> usize {
        lock(&self.shared.watches)
            .get(resource)
            .copied()
            .unwrap_or(0)
    }

    /// How many of the injected failures for `verb` on `resource` are still to be served.
    pub fn faults_left(&self, verb: &str, resource: &str) -> usize {
        lock(&self.shared.faults)
            .iter()
            .map(|f| match f {
                Fault::Status {
                    verb: v,
                    resource: r,
                    times,
                    ..
                } if *v == verb && *r == resource => *times,
                Fault::ExpiredWatch { resource: r, times } if verb == "watch" && *r == resource => {
                    *times
                }
                _ => 0,
            })
            .sum()
    }

    /// Answers matching requests with a failure from now on.
    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).push(fault);
    }

    /// Drops every injected failure still to be served.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// How many `verb` requests on `resource` RBAC let through so far, from every client,
    /// whether an injected failure then answered them or not.
    pub fn requests(&self, verb: &str, resource: &str) -> usize {
        lock(&self.shared.requests)
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Containers are started this much later than they could be (slow starts).
    pub fn set_start_delay(&self, delay: Duration) {
        *lock(&self.shared.start_delay) = delay;
    }

    /// The Docker container id of a pod's (first) container, once it has one.
    pub async fn container_of(&self, namespace: &str, pod: &str) -> Option<String> {
        let uid = {
            let store = lock(&self.shared.store);
            store::meta(store.get("pods", namespace, pod)?, "uid")?
        };
        kubelet::containers_of(&self.shared, &uid)
            .await
            .into_iter()
            .next()
    }

    /// Stops everything: removes every container it created, the network and its temp files.
    pub async fn shutdown(mut self) {
        self.done = true;
        self.shared.closed.store(true, Ordering::SeqCst);
        for server in &self.servers {
            server.abort();
        }
        let tasks: Vec<JoinHandle<()>> = lock(&self.shared.pods)
            .values_mut()
            .filter_map(|p| p.task.take())
            .collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        // A create already sent when its task was aborted may still land: the network cannot
        // be removed while such a container is on it, so that is the sign to sweep again.
        for _ in 0..5 {
            kubelet::remove_all(&self.shared).await;
            if self
                .shared
                .docker
                .remove_network(&self.shared.network)
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = std::fs::remove_dir_all(&self.shared.dir);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.shared.closed.store(true, Ordering::SeqCst);
        for server in &self.servers {
            server.abort();
        }
        for pod in lock(&self.shared.pods).values_mut() {
            if let Some(task) = pod.task.take() {
                task.abort();
            }
        }
        let label = format!("label={LABEL_EMULATOR}={}", self.shared.run_id);
        let network = self.shared.network.clone();
        let dir = self.shared.dir.clone();
        // Drop may run inside a runtime (which cannot be blocked on) or during a panic: the
        // Docker CLI on a thread of its own does not care.
        let cleanup = std::thread::spawn(move || {
            let docker = |args: &[&str]| std::process::Command::new("docker").args(args).output();
            // As in shutdown: a container created after the sweep keeps the network busy.
            for _ in 0..5 {
                if let Ok(listed) = docker(&["ps", "-aq", "--filter", &label]) {
                    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
                    let ids: Vec<&str> = listed.split_whitespace().collect();
                    if !ids.is_empty() {
                        let _ = docker(&[&["rm", "-f"][..], &ids].concat());
                    }
                }
                match docker(&["network", "rm", &network]) {
                    Ok(out) if out.status.success() => break,
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            }
            let _ = std::fs::remove_dir_all(dir);
        });
        let _ = cleanup.join();
    }
}
