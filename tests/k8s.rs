//! The Kubernetes backend against `flame-k8s-emulator`: an **emulator** of the API server (no
//! real cluster can run on these machines) whose pods are real containers on the local Docker
//! engine, on a network of their own. The parent is a pod made through the API from the
//! Deployment template of the deploy guide's manifest (`deploy/k8s/flame-app.yaml`), with
//! that file's service account and Role; it reaches the API as any pod does (in-cluster
//! config, over TLS, with its mounted token), and its runners are pods it clones from itself.
//! Faults are the cluster's and the engine's: `kubectl delete pod`, `docker kill`, a node
//! selector no node matches, an image that is not there, a Role without a verb.
//!
//! These tests need a running Docker engine and `kubectl`, and fail saying so when either is
//! missing.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use flame::ErrorKind;
use flame_backend_docker::bollard::{self, Docker};
use flame_backend_k8s::{K8sBackend, LABEL_PARENT, LABEL_POOL};
use flame_k8s_emulator::{Emulator, Fault, Options};
use flame_tests::containers::{
    Control, app_image, connect_control, engine, labelled, logs, random_id, runs, until,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams, WatchParams};
use serde_json::{Value, json};

/// The app every container runs, parent and runners.
const APP: &str = env!("CARGO_BIN_EXE_flame-test-container-app");
/// The deploy guide's manifest: service account, Role, RoleBinding, Deployment.
const MANIFEST: &str = include_str!("../deploy/k8s/flame-app.yaml");
/// The service account the manifest gives the parent.
const SERVICE_ACCOUNT: &str = "thumbs";
/// How long a whole test may take.
const BOUND: Duration = Duration::from_secs(180);
/// The parent app's heartbeat, and its runners' failsafe window (5 missed).
const HEARTBEAT: Duration = Duration::from_millis(200);
const FAILSAFE_WINDOW: Duration = Duration::from_millis(1000);
/// Boots the pool tries for a waiting call before telling it the pool cannot boot.
const BOOT_ATTEMPTS: usize = 3;
/// What the emulator's containers carry: the pod's namespace and name.
const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";

// ---- the cluster, a parent pod ------------------------------------------------------------

/// An emulated cluster, with the manifest's service account and Role in a namespace of the
/// test's own.
struct Cluster {
    emu: Emulator,
    namespace: String,
    admin: kube::Client,
    docker: Docker,
}

fn manifest() -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(MANIFEST).expect("deploy/k8s/flame-app.yaml parses")
}

fn of_kind(kind: &str) -> Value {
    manifest()
        .into_iter()
        .find(|doc| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("the manifest has no {kind}"))
}

impl Cluster {
    /// An emulated cluster and a namespace with nothing in it.
    async fn empty() -> Cluster {
        let docker = engine().await;
        let emu = Emulator::start(Options::default()).await;
        let namespace = format!("flame-{}", random_id());
        let admin = emu.client(&namespace);
        Cluster {
            emu,
            namespace,
            admin,
            docker,
        }
    }

    async fn start() -> Cluster {
        let Cluster {
            emu,
            namespace,
            admin,
            docker,
        } = Cluster::empty().await;
        let post = PostParams::default();
        let mut account: ServiceAccount =
            serde_json::from_value(of_kind("ServiceAccount")).unwrap();
        account.metadata.namespace = Some(namespace.clone());
        Api::<ServiceAccount>::namespaced(admin.clone(), &namespace)
            .create(&post, &account)
            .await
            .unwrap();
        let role: Role = serde_json::from_value(of_kind("Role")).unwrap();
        Api::<Role>::namespaced(admin.clone(), &namespace)
            .create(&post, &role)
            .await
            .unwrap();
        let mut binding: RoleBinding = serde_json::from_value(of_kind("RoleBinding")).unwrap();
        for subject in binding.subjects.iter_mut().flatten() {
            subject.namespace = Some(namespace.clone());
        }
        Api::<RoleBinding>::namespaced(admin.clone(), &namespace)
            .create(&post, &binding)
            .await
            .unwrap();
        Cluster {
            emu,
            namespace,
            admin,
            docker,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.admin.clone(), &self.namespace)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.admin.clone(), &self.namespace)
    }

    /// A pod of the manifest's Deployment template, running `image`, with `env` added.
    fn template_pod(&self, image: &str, env: &[(&str, String)]) -> Pod {
        let template = of_kind("Deployment")["spec"]["template"].clone();
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": template["metadata"],
            "spec": template["spec"],
        }))
        .unwrap();
        pod.metadata.name = Some(format!("thumbs-{}", &random_id()[..8]));
        let container = &mut pod.spec.as_mut().unwrap().containers[0];
        container.image = Some(image.to_string());
        let vars = container.env.get_or_insert_with(Vec::new);
        for (name, value) in env {
            vars.push(serde_json::from_value(json!({"name": name, "value": value})).unwrap());
        }
        pod
    }

    /// Creates `pod` and waits until its container runs.
    async fn run_pod(&self, pod: &Pod) -> Pod {
        let created = self
            .pods()
            .create(&PostParams::default(), pod)
            .await
            .unwrap();
        let name = created.metadata.name.unwrap();
        until_pod(&self.pods(), &name, "the pod runs", |pod| {
            pod.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
        })
        .await
        .unwrap()
    }

    /// A parent pod running the container app on the Kubernetes backend, and its control line.
    async fn start_parent(&self, max: usize) -> Parent {
        let image = app_image(APP).await;
        let pod = self.template_pod(
            image,
            &[
                ("FLAME_TEST_BACKEND", "k8s".into()),
                ("FLAME_TEST_MAX", max.to_string()),
                ("FLAME_TEST_HEARTBEAT_MS", HEARTBEAT.as_millis().to_string()),
            ],
        );
        let running = self.run_pod(&pod).await;
        self.parent_of(&running).await
    }

    /// The control line of a running parent pod.
    async fn parent_of(&self, running: &Pod) -> Parent {
        let name = running.metadata.name.clone().unwrap();
        let ip: IpAddr = running
            .status
            .as_ref()
            .unwrap()
            .pod_ip
            .as_ref()
            .unwrap()
            .parse()
            .unwrap();
        let container = self.emu.container_of(&self.namespace, &name).await.unwrap();
        let control = connect_control(&self.docker, &container, ip).await;
        Parent {
            name,
            uid: running.metadata.uid.clone().unwrap(),
            pod: running.clone(),
            control,
        }
    }

    /// A parent pod that only sleeps, for a parent process on the host: the pod is what its
    /// backend clones.
    async fn idle_parent(&self) -> Pod {
        let mut pod = self.template_pod(app_image(APP).await, &[]);
        sleep_instead(&mut pod, "600");
        self.run_pod(&pod).await
    }

    /// A backend in this process, cloning `parent`, with the service account's token.
    fn backend(&self, parent: &Pod, account: &str) -> flame_backend_k8s::K8sBackendBuilder {
        let token = self.emu.service_account_token(&self.namespace, account);
        K8sBackend::builder()
            .client(self.emu.client_with_token(&self.namespace, &token))
            .namespace(&self.namespace)
            .pod(parent.metadata.name.clone().unwrap())
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The runner pods of the parent with pod uid `parent`.
    async fn runner_pods(&self, parent: &str) -> Vec<Pod> {
        self.pods()
            .list(&ListParams::default().labels(&format!("{LABEL_PARENT}={parent}")))
            .await
            .unwrap()
            .items
    }

    async fn runner_secrets(&self, parent: &str) -> Vec<Secret> {
        self.secrets()
            .list(&ListParams::default().labels(&format!("{LABEL_PARENT}={parent}")))
            .await
            .unwrap()
            .items
    }

    /// The containers of this namespace's pods other than `except`, as the engine lists them.
    async fn containers_except(&self, except: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for id in labelled(&self.docker, POD_NAMESPACE_LABEL, &self.namespace).await {
            let inspected = self
                .docker
                .inspect_container(
                    &id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await;
            let pod = inspected
                .ok()
                .and_then(|c| c.config)
                .and_then(|c| c.labels)
                .and_then(|l| l.get(POD_NAME_LABEL).cloned());
            if pod.as_deref() != Some(except) {
                ids.push(id);
            }
        }
        ids
    }

    /// `kubectl` with the emulator's admin kubeconfig, in this namespace: its stdout.
    async fn kubectl(&self, args: &[&str]) -> String {
        let dir = flame_tests::scratch_dir("k8s-kubectl");
        let config = dir.join("kubeconfig");
        self.emu.write_kubeconfig(&config).unwrap();
        let out = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&config)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(["--namespace", &self.namespace])
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| {
                panic!("these tests run kubectl (apt-get install kubernetes-client): {e}")
            });
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// A parent pod running the container app, and the line the test commands it by.
struct Parent {
    name: String,
    uid: String,
    pod: Pod,
    control: Control,
}

impl Parent {
    /// Holds a call as `name`, and returns the runner pod and container it runs in once the
    /// call's `sleep` runs there (the first such pod not in `busy`).
    async fn hold(&mut self, cluster: &Cluster, name: &str, busy: &[&str]) -> (String, String) {
        self.start(cluster, &format!("hold {name}"), busy).await
    }

    /// Sends `line` (`hold` or `work`), and returns the runner pod and container its call
    /// runs in once its `sleep` runs there (the first such pod not in `busy`).
    async fn start(&mut self, cluster: &Cluster, line: &str, busy: &[&str]) -> (String, String) {
        self.control.ok(line).await;
        let started = Instant::now();
        loop {
            for pod in cluster.runner_pods(&self.uid).await {
                let pod_name = pod.metadata.name.unwrap();
                if busy.contains(&pod_name.as_str()) {
                    continue;
                }
                let Some(id) = cluster
                    .emu
                    .container_of(&cluster.namespace, &pod_name)
                    .await
                else {
                    continue;
                };
                if runs(&cluster.docker, &id, "sleep").await {
                    return (pod_name, id);
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the held call's sleep never ran in a runner pod"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Follows the pod through the API until `check` holds for it (`None`: it does not exist), for
/// at most 60 s.
async fn until_pod(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    check: impl Fn(Option<&Pod>) -> bool,
) -> Option<Pod> {
    let selected = ListParams::default().fields(&format!("metadata.name={name}"));
    let found = until_pods(pods, &selected, &format!("{what} ({name})"), |pods| {
        check(pods.first())
    })
    .await;
    found.into_iter().next()
}

/// Follows the pods `selected` through the API (a list, then a watch from its version, again
/// after every change) until `check` holds for them, for at most 60 s.
async fn until_pods(
    pods: &Api<Pod>,
    selected: &ListParams,
    what: &str,
    check: impl Fn(&[Pod]) -> bool,
) -> Vec<Pod> {
    let followed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let listed = pods.list(selected).await.unwrap();
            if check(&listed.items) {
                return listed.items;
            }
            let version = listed.metadata.resource_version.unwrap_or_default();
            let mut params = WatchParams::default().timeout(20);
            params.label_selector = selected.label_selector.clone();
            params.field_selector = selected.field_selector.clone();
            let mut events = std::pin::pin!(pods.watch(&params, &version).await.unwrap());
            // Any change: list again and look.
            let _ = events.next().await;
        }
    })
    .await;
    followed.unwrap_or_else(|_| panic!("not within 60 s: {what}"))
}

/// A call on a pool of `backend` that cannot boot: its error, and how long it took.
async fn failed_call(pool: &str, backend: K8sBackend) -> (flame::Error, Duration) {
    let pool = flame::Pool::builder(pool)
        .backend(backend)
        .boot_timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    let started = Instant::now();
    let err = flame::call(&pool, flame_tests::add(1, 2))
        .await
        .expect_err("the call succeeded");
    let took = started.elapsed();
    pool.shutdown().await;
    (err, took)
}

/// The engine serves every test, so the many containers of one do not starve another's
/// parent of its heartbeats: these tests run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    let _alone = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(BOUND, test)
        .await
        .expect("the test ran past its bound")
}

/// Makes the pod's app container run `sleep <arg>` instead of the app.
fn sleep_instead(pod: &mut Pod, arg: &str) {
    let container = &mut pod.spec.as_mut().unwrap().containers[0];
    container.command = Some(vec!["/usr/bin/sleep".into()]);
    container.args = Some(vec![arg.into()]);
}

fn env_of(pod: &Pod) -> Vec<Value> {
    let container = &pod.spec.as_ref().unwrap().containers[0];
    serde_json::to_value(container.env.clone().unwrap_or_default())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

// ---- the tests ---------------------------------------------------------------------------

#[tokio::test]
async fn calls_run_in_runner_pods_cloned_from_the_parent_and_shutdown_deletes_them() {
    bounded(async {
        let cluster = Cluster::start().await;
        let mut parent = cluster.start_parent(2).await;
        let host = parent.control.ok("whoami").await;
        let runners = cluster.runner_pods(&parent.uid).await;
        assert_eq!(runners.len(), 1, "one call, one runner pod");
        let runner = &runners[0];
        let runner_name = runner.metadata.name.clone().unwrap();
        assert_eq!(host.as_str().unwrap(), runner_name, "the call ran in the runner pod");
        assert_ne!(runner_name, parent.name);

        // A clone of the parent's pod, owned by it, pinned to the image it runs.
        let labels = runner.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(LABEL_POOL).map(String::as_str), Some("k8s-test"));
        assert!(!labels.contains_key("app"), "the Deployment's labels would let it adopt runners");
        let owner = &runner.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), (parent.uid.as_str(), Some(true)));
        let spec = runner.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.service_account_name.as_deref(), Some(SERVICE_ACCOUNT));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let parent_image_id = &parent.pod.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0].image_id;
        let digest = parent_image_id.split_once("@sha256:").unwrap().1;
        let spec_image = parent.pod.spec.as_ref().unwrap().containers[0].image.clone().unwrap();
        let repository = spec_image.rsplit_once(':').map_or(spec_image.as_str(), |(repository, _tag)| repository);
        assert_eq!(
            spec.containers[0].image.clone(),
            Some(format!("{repository}@sha256:{digest}")),
            "the parent's repository, pinned by the digest it runs"
        );
        let env = env_of(runner);
        assert!(env.contains(&json!({"name": "FLAME_TEST_ROLE", "value": "runner"})), "{env:?}");
        assert!(
            env.contains(&json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})),
            "{env:?}"
        );

        // The hand-off token is in the runner's secret, owned by the runner pod, and in no pod.
        let secret = cluster.secrets().get(&runner_name).await.unwrap();
        assert_eq!(
            secret.metadata.owner_references.as_ref().unwrap()[0].uid,
            runner.metadata.uid.clone().unwrap()
        );
        let handoff = String::from_utf8(secret.data.unwrap()["FLAME_PARENT"].0.clone()).unwrap();
        assert!(handoff.len() > 20, "{handoff}");
        let all = cluster.kubectl(&["get", "pods", "-o", "yaml"]).await;
        assert!(all.contains(&runner_name), "{all}");
        assert!(!all.contains(&handoff), "a pod object holds the hand-off token");
        let one = cluster.kubectl(&["get", "pod", &runner_name, "-o", "yaml"]).await;
        assert!(one.contains("secretKeyRef"), "{one}");
        assert!(!one.contains(&handoff));

        parent.control.ok("shutdown").await;
        assert!(cluster.runner_pods(&parent.uid).await.is_empty(), "runner pods left");
        assert!(cluster.runner_secrets(&parent.uid).await.is_empty(), "runner secrets left");
        assert_eq!(cluster.containers_except(&parent.name).await, Vec::<String>::new());
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn refusals_that_pass_are_retried_and_a_refused_watch_fails_nothing() {
    bounded(async {
        let cluster = Cluster::start().await;
        let mut parent = cluster.start_parent(1).await;
        // The API server throttles the parent's first create, as a busy one does.
        cluster.emu.inject(Fault::Status {
            verb: "create",
            resource: "pods",
            code: 429,
            reason: "TooManyRequests".into(),
            message: "Too many requests, please try again later.".into(),
            times: 1,
            retry_after: Some(1),
        });
        // And refuses the watch on the runner pods: the boot goes on (the watch is tried again,
        // backing off) and ends when the runner dials back.
        cluster.emu.inject(Fault::Status {
            verb: "watch",
            resource: "pods",
            code: 403,
            reason: "Forbidden".into(),
            message: "pods is forbidden: cannot watch resource \"pods\"".into(),
            times: 3,
            retry_after: None,
        });
        let host = parent.control.ok("whoami").await;
        assert_eq!(
            cluster.emu.faults_left("create", "pods"),
            0,
            "the create was never refused"
        );
        assert!(
            cluster.emu.faults_left("watch", "pods") < 3,
            "the watch was never refused"
        );
        let runners = cluster.runner_pods(&parent.uid).await;
        assert_eq!(runners.len(), 1, "the refused boot left nothing behind");
        assert_eq!(runners[0].metadata.name.as_deref(), host.as_str());
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_runner_pod_gone_while_its_watch_is_refused_is_not_deleted_again() {
    bounded(async {
        let cluster = Cluster::start().await;
        let parent = cluster.idle_parent().await;
        let uid = parent.metadata.uid.clone().unwrap();
        let silent = cluster
            .backend(&parent, SERVICE_ACCOUNT)
            .delete_grace(Duration::from_secs(1))
            // Never dials back: each boot times out and its pod is deleted.
            .pod_template(|pod| sleep_instead(pod, "600"))
            .build()
            .await
            .unwrap();
        let created_before = cluster.emu.requests("create", "pods");
        // From now on the parent learns nothing from a list or a watch: whether a pod is gone
        // it must find out by reading it.
        for verb in ["list", "watch"] {
            cluster.emu.inject(Fault::Status {
                verb,
                resource: "pods",
                code: 403,
                reason: "Forbidden".into(),
                message: format!("pods is forbidden: cannot {verb} resource \"pods\""),
                times: usize::MAX,
                retry_after: None,
            });
        }
        let pool = flame::Pool::builder("silent")
            .backend(silent)
            .boot_timeout(Duration::from_secs(2))
            .start()
            .await
            .unwrap();
        // The call waits out the boots (its slot wait is otherwise one boot_timeout).
        let call = flame_tests::add(1, 2).timeout(Duration::from_secs(120));
        let err = flame::call(&pool, call)
            .await
            .expect_err("a runner that never dials back served the call");
        pool.shutdown().await;
        cluster.emu.clear_faults();
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        let created = cluster.emu.requests("create", "pods") - created_before;
        assert!(created >= 1, "no runner pod was created");
        assert_eq!(
            cluster.emu.requests("delete", "pods"),
            created,
            "a runner pod already gone was deleted again, by force"
        );
        assert!(
            cluster.runner_pods(&uid).await.is_empty(),
            "runner pods left"
        );
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_watch_that_ends_as_soon_as_it_opens_is_reopened_with_backoff() {
    bounded(async {
        let cluster = Cluster::start().await;
        let parent = cluster.idle_parent().await;
        let waiting = cluster
            .backend(&parent, SERVICE_ACCOUNT)
            // Never dials back: its pod stays followed while the boot waits.
            .pod_template(|pod| sleep_instead(pod, "600"))
            .build()
            .await
            .unwrap();
        // Every watch is accepted and ends at once: the list before it succeeds, so nothing
        // looks like an error to back off from but the watch's brevity.
        cluster.emu.inject(Fault::ExpiredWatch {
            resource: "pods",
            times: usize::MAX,
        });
        let pool = flame::Pool::builder("waiting")
            .backend(waiting)
            .boot_timeout(Duration::from_secs(60))
            .start()
            .await
            .unwrap();
        let created_before = cluster.emu.requests("create", "pods");
        let handle = flame::spawn_on(&pool, flame_tests::add(1, 2));
        tokio::time::timeout(Duration::from_secs(30), async {
            while cluster.emu.requests("create", "pods") == created_before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("no runner pod was created");
        let before = cluster.emu.requests("watch", "pods");
        let window = Duration::from_secs(4);
        tokio::time::sleep(window).await;
        let watches = cluster.emu.requests("watch", "pods") - before;
        eprintln!("watches opened in {window:?} while each ended at once: {watches}");
        // Backing off from 0.5 s doubling: 3 or 4. Reopened at once, as before: about 90.
        assert!(
            (1..=6).contains(&watches),
            "{watches} watches in {window:?}"
        );
        drop(handle);
        pool.shutdown().await;
        cluster.emu.clear_faults();
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn runner_pods_take_big_payloads_and_tasks_that_never_yield() {
    bounded(async {
        let cluster = Cluster::start().await;
        let mut parent = cluster.start_parent(1).await;
        // 8 s without yielding, against a failsafe of 5 missed 200 ms heartbeats.
        let host = parent.control.ok("spin 8000").await;
        let runners = cluster.runner_pods(&parent.uid).await;
        assert_eq!(runners.len(), 1, "the runner was lost and replaced");
        assert_eq!(runners[0].metadata.name.as_deref(), host.as_str());
        // 256 MiB to the runner pod and back, over the pod network, every byte checked.
        let bulk = parent.control.ok("bulk 256").await;
        eprintln!("256 MiB each way through a runner pod: {bulk}");
        assert_eq!(bulk["bytes"], 256 << 20);
        assert_eq!(cluster.runner_pods(&parent.uid).await.len(), 1);
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn dropping_a_handle_kills_the_child_in_the_runner_pod() {
    bounded(async {
        let cluster = Cluster::start().await;
        let mut parent = cluster.start_parent(1).await;
        let (_pod, container) = parent.hold(&cluster, "a", &[]).await;
        parent.control.ok("drop a").await;
        let took = until(
            "sleep is gone from the runner container",
            Duration::from_secs(10),
            || async { !runs(&cluster.docker, &container, "sleep").await },
        )
        .await;
        eprintln!("child gone {took:?} after the drop");
        assert!(
            runs(&cluster.docker, &container, "app").await,
            "the runner itself stays up"
        );
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_deleted_or_killed_runner_fails_its_call_and_is_replaced() {
    bounded(async {
        let cluster = Cluster::start().await;
        let mut parent = cluster.start_parent(1).await;

        // `kubectl delete pod`: the kubelet stops the container (SIGTERM, then SIGKILL).
        let (deleted, _) = parent.hold(&cluster, "a", &[]).await;
        cluster
            .kubectl(&["delete", "pod", &deleted, "--grace-period=1"])
            .await;
        parent.control.expect_lost("a").await;

        // The engine kills the container under the cluster's feet.
        let (killed_pod, killed) = parent.hold(&cluster, "b", &[&deleted]).await;
        assert_ne!(
            killed_pod, deleted,
            "a new runner pod replaced the deleted one"
        );
        cluster
            .docker
            .kill_container(
                &killed,
                None::<bollard::query_parameters::KillContainerOptions>,
            )
            .await
            .unwrap();
        parent.control.expect_lost("b").await;

        let host = parent.control.ok("whoami").await;
        let host = host.as_str().unwrap();
        assert!(host != deleted && host != killed_pod, "ran on {host}");
        let live: Vec<String> = cluster
            .runner_pods(&parent.uid)
            .await
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter_map(|p| p.metadata.name)
            .collect();
        assert_eq!(live, [host.to_string()]);
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_deploy_guide_applied_with_kubectl_runs_and_rolls_out() {
    bounded(async {
        let cluster = Cluster::empty().await;
        // The guide's manifest as a user edits it: their image and namespace, one replica; and
        // the test's settings for the app.
        let dir = flame_tests::scratch_dir("k8s-apply");
        let image = app_image(APP).await;
        for (i, mut doc) in manifest().into_iter().enumerate() {
            match doc["kind"].as_str() {
                Some("RoleBinding") => doc["subjects"][0]["namespace"] = json!(cluster.namespace),
                Some("Deployment") => {
                    doc["spec"]["replicas"] = json!(1);
                    let app = &mut doc["spec"]["template"]["spec"]["containers"][0];
                    app["image"] = json!(image);
                    let env = app["env"].as_array_mut().unwrap();
                    env.push(json!({"name": "FLAME_TEST_BACKEND", "value": "k8s"}));
                    env.push(json!({"name": "FLAME_TEST_MAX", "value": "1"}));
                    env.push(json!({"name": "FLAME_TEST_HEARTBEAT_MS", "value": HEARTBEAT.as_millis().to_string()}));
                }
                _ => {}
            }
            std::fs::write(dir.join(format!("{i}.json")), doc.to_string()).unwrap();
        }
        let applied = cluster.kubectl(&["apply", "-f", dir.to_str().unwrap()]).await;
        assert!(applied.contains("deployment.apps/thumbs created"), "{applied}");

        let parents = ListParams::default().labels("app=thumbs");
        let running = |pods: &[Pod]| {
            pods.iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .cloned()
                .collect::<Vec<_>>()
        };
        let first = until_pods(&cluster.pods(), &parents, "the Deployment's parent pod runs", |pods| {
            running(pods).len() == 1
        })
        .await;
        let mut old = cluster.parent_of(&running(&first)[0]).await;
        let host = old.control.ok("whoami").await;
        let runners = cluster.runner_pods(&old.uid).await;
        assert_eq!(runners.len(), 1);
        assert_eq!(runners[0].metadata.name.as_deref(), host.as_str());

        // A rollout: a new parent pod comes up, the old one goes, and its runner pods with it.
        cluster.kubectl(&["rollout", "restart", "deployment/thumbs"]).await;
        let old_name = old.name.clone();
        let rolled = until_pods(&cluster.pods(), &parents, "the rollout replaces the parent pod", |pods| {
            let running = running(pods);
            pods.iter().all(|p| p.metadata.name.as_deref() != Some(&old_name))
                && running.len() == 1
        })
        .await;
        let uid = old.uid.clone();
        until("the old parent's runner pods are gone", Duration::from_secs(30), || async {
            cluster.runner_pods(&uid).await.is_empty()
        })
        .await;
        let mut new = cluster.parent_of(&running(&rolled)[0]).await;
        let host = new.control.ok("whoami").await;
        let runners = cluster.runner_pods(&new.uid).await;
        assert_eq!(runners.len(), 1, "the new parent's runner");
        assert_eq!(runners[0].metadata.name.as_deref(), host.as_str());
        assert_eq!(
            until_pods(&cluster.pods(), &parents, "the runner pod is no replica", |pods| running(pods).len() == 1).await.len(),
            1,
            "the Deployment counts a runner pod as its own"
        );
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_rollout_lets_the_parent_finish_its_calls_then_deletes_its_runner_pods() {
    bounded(async {
        let cluster = Cluster::start().await;
        let mut parent = cluster.start_parent(1).await;
        parent.start(&cluster, "work a 3", &[]).await;
        // A rollout deletes the old parent pod with its grace: SIGTERM, then time to drain.
        let (finished, _) = tokio::join!(parent.control.command("await a"), async {
            cluster
                .kubectl(&["delete", "pod", &parent.name, "--wait=false"])
                .await
        });
        assert_eq!(
            finished,
            Ok(Value::Null),
            "the call in flight did not finish"
        );
        until_pod(
            &cluster.pods(),
            &parent.name,
            "the parent pod is gone",
            |pod| pod.is_none(),
        )
        .await;
        assert!(
            cluster.runner_pods(&parent.uid).await.is_empty(),
            "runner pods left"
        );
        assert!(
            cluster.runner_secrets(&parent.uid).await.is_empty(),
            "runner secrets left"
        );
        assert_eq!(cluster.containers_except("").await, Vec::<String>::new());
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn deleting_the_parent_pod_takes_its_runner_pods_with_it() {
    bounded(async {
        let cluster = Cluster::start().await;
        let mut parent = cluster.start_parent(2).await;
        let (first, _) = parent.hold(&cluster, "a", &[]).await;
        let (_, stopping) = parent.hold(&cluster, "b", &[&first]).await;
        assert_eq!(cluster.runner_pods(&parent.uid).await.len(), 2);
        assert_eq!(
            cluster.emu.open_watches("pods"),
            1,
            "one watch follows both runner pods"
        );
        // One runner is being stopped by its platform (a node drain, say): it finishes its
        // call for its parent's sake, which must not outlast the parent.
        cluster
            .docker
            .kill_container(
                &stopping,
                Some(bollard::query_parameters::KillContainerOptions {
                    signal: "SIGTERM".into(),
                }),
            )
            .await
            .unwrap();
        let mut said = logs(&cluster.docker, &stopping, true);
        let mut printed = String::new();
        while !printed.contains("stopped by its platform") {
            printed.push_str(
                &said
                    .next()
                    .await
                    .expect("the runner ended instead of draining"),
            );
        }

        // The parent dies without any cleanup (an OOM kill, its node lost), then its pod is
        // deleted: its runners must not wait for it, and the cluster deletes their pods.
        let parent_container = cluster
            .emu
            .container_of(&cluster.namespace, &parent.name)
            .await
            .unwrap();
        let killed = Instant::now();
        cluster
            .docker
            .kill_container(
                &parent_container,
                None::<bollard::query_parameters::KillContainerOptions>,
            )
            .await
            .unwrap();
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        cluster.pods().delete(&parent.name, &now).await.unwrap();
        let uid = parent.uid.clone();
        until(
            "the runner pods are gone",
            FAILSAFE_WINDOW + Duration::from_secs(10),
            || async { cluster.runner_pods(&uid).await.is_empty() },
        )
        .await;
        until(
            "the runner containers are gone",
            FAILSAFE_WINDOW + Duration::from_secs(10),
            || async { cluster.containers_except("").await.is_empty() },
        )
        .await;
        eprintln!(
            "runner pods and containers gone {:?} after the parent was killed",
            killed.elapsed()
        );
        assert!(
            cluster.runner_secrets(&uid).await.is_empty(),
            "runner secrets left"
        );
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn pods_that_cannot_start_fail_the_boot_at_once_with_the_clusters_reason() {
    bounded(async {
        let cluster = Cluster::start().await;
        let parent = cluster.idle_parent().await;
        let uid = parent.metadata.uid.clone().unwrap();

        let no_image = cluster
            .backend(&parent, SERVICE_ACCOUNT)
            .pod_template(|pod| {
                pod.spec.as_mut().unwrap().containers[0].image =
                    Some("flame-test-no-such-image:0".into());
            })
            .build()
            .await
            .unwrap();
        let (err, took) = failed_call("no-image", no_image).await;
        eprintln!("missing image: {took:?}: {err}");
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(err.to_string().contains("ErrImagePull"), "{err}");
        assert!(
            err.to_string().contains("flame-test-no-such-image:0"),
            "{err}"
        );
        assert!(took < Duration::from_secs(5), "not at once: {took:?}");

        let nowhere = cluster
            .backend(&parent, SERVICE_ACCOUNT)
            .node_selector("accelerator", "tpu-v9")
            .build()
            .await
            .unwrap();
        let (err, took) = failed_call("unschedulable", nowhere).await;
        eprintln!("unschedulable: {took:?}: {err}");
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(
            err.to_string()
                .contains("Unschedulable: 0/1 nodes are available"),
            "{err}"
        );
        assert!(took < Duration::from_secs(5), "not at once: {took:?}");

        // A runner that dies before dialing back: its code and its last words.
        let dies = cluster
            .backend(&parent, SERVICE_ACCOUNT)
            .pod_template(|pod| sleep_instead(pod, "not-a-number"))
            .build()
            .await
            .unwrap();
        let (err, took) = failed_call("dies", dies).await;
        eprintln!("dies: {took:?}: {err}");
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(
            err.to_string().contains("exited with code 1 (Error)"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("its last words: Try '/usr/bin/sleep --help' for more information."),
            "{err}"
        );

        // With a grace for the autoscaler, an unschedulable pod fails only once it has run out.
        let grace = Duration::from_millis(1500);
        let patient = cluster
            .backend(&parent, SERVICE_ACCOUNT)
            .node_selector("accelerator", "tpu-v9")
            .unschedulable_grace(grace)
            .build()
            .await
            .unwrap();
        let (err, took) = failed_call("patient", patient).await;
        assert!(err.to_string().contains("Unschedulable"), "{err}");
        assert!(took >= grace, "failed after {took:?}, within its grace");

        assert!(
            cluster.runner_pods(&uid).await.is_empty(),
            "failed runner pods left"
        );
        assert!(
            cluster.runner_secrets(&uid).await.is_empty(),
            "failed runner secrets left"
        );
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn api_refusals_fail_the_boot_with_the_servers_message() {
    bounded(async {
        let cluster = Cluster::start().await;
        let parent = cluster.idle_parent().await;
        let uid = parent.metadata.uid.clone().unwrap();

        // A Role that forgot `create` on pods.
        let post = PostParams::default();
        let role: Role = serde_json::from_value(json!({
            "metadata": {"name": "no-create"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
                      {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch", "delete"]}]
        }))
        .unwrap();
        Api::<Role>::namespaced(cluster.admin.clone(), &cluster.namespace).create(&post, &role).await.unwrap();
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "no-create"},
            "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": cluster.namespace}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "no-create"}
        }))
        .unwrap();
        Api::<RoleBinding>::namespaced(cluster.admin.clone(), &cluster.namespace).create(&post, &binding).await.unwrap();
        let limited = cluster.backend(&parent, "limited").build().await.unwrap();
        let (err, took) = failed_call("rbac", limited).await;
        eprintln!("RBAC: {took:?}: {err}");
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        let expected = format!(
            "cannot create resource \"pods\" in API group \"\" in the namespace \"{}\"",
            cluster.namespace
        );
        assert!(err.to_string().contains(&expected), "{err}");
        assert!(err.to_string().contains("HTTP 403 Forbidden"), "{err}");
        assert!(took < Duration::from_secs(5), "not at once: {took:?}");

        // A quota, and a throttled server, refusing every boot the pool tries for a waiting call.
        let quota = "pods \"x\" is forbidden: exceeded quota: q1, requested: pods=1, used: pods=4, limited: pods=4";
        let throttled = "Too many requests, please try again later.";
        for (code, reason, message) in [(403, "Forbidden", quota), (429, "TooManyRequests", throttled)] {
            cluster.emu.inject(Fault::Status {
                verb: "create",
                resource: "pods",
                code,
                reason: reason.into(),
                message: message.into(),
                times: BOOT_ATTEMPTS,
                retry_after: (code == 429).then_some(1),
            });
            let backend = cluster.backend(&parent, SERVICE_ACCOUNT).build().await.unwrap();
            let (err, _) = failed_call("refused", backend).await;
            assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
            assert!(err.to_string().contains(message), "{err}");
            assert!(err.to_string().contains(&format!("HTTP {code} {reason}")), "{err}");
        }
        assert!(cluster.runner_pods(&uid).await.is_empty(), "refused runner pods left");
        assert!(cluster.runner_secrets(&uid).await.is_empty(), "secrets of refused pods left");
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_sweep_deletes_runner_pods_of_gone_parents_only() {
    bounded(async {
        let cluster = Cluster::start().await;
        let parent = cluster.idle_parent().await;
        let sibling = cluster.idle_parent().await;
        let backend = cluster.backend(&parent, SERVICE_ACCOUNT).build().await.unwrap();

        // Runner pods and secrets as a parent leaves them when the cluster did not collect them
        // (`kubectl delete --cascade=orphan`, say): one of a parent that is gone, one of a live
        // sibling, each with a running container.
        let image = app_image(APP).await;
        let gone_uid = "00000000-0000-0000-0000-00000000dead";
        let sibling_uid = sibling.metadata.uid.clone().unwrap();
        for (name, parent_uid) in [("orphan", gone_uid), ("siblings", sibling_uid.as_str())] {
            let labels = BTreeMap::from([
                (LABEL_PARENT.to_string(), parent_uid.to_string()),
                (LABEL_POOL.to_string(), "p".to_string()),
                ("app.kubernetes.io/managed-by".to_string(), "flame-rt".to_string()),
            ]);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"name": "app", "image": image, "command": ["/usr/bin/sleep"], "args": ["600"]}],
                         "restartPolicy": "Never", "terminationGracePeriodSeconds": 1}
            }))
            .unwrap();
            cluster.run_pod(&pod).await;
            let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "stringData": {"k": "v"}})).unwrap();
            cluster.secrets().create(&PostParams::default(), &secret).await.unwrap();
        }
        let orphan_container = cluster.emu.container_of(&cluster.namespace, "orphan").await.unwrap();
        let siblings_container = cluster.emu.container_of(&cluster.namespace, "siblings").await.unwrap();
        let removed = backend.sweep_leftovers().await.unwrap();
        assert_eq!(removed, ["orphan"]);
        until_pod(&cluster.pods(), "orphan", "the orphan is deleted", |pod| pod.is_none()).await;
        let left = labelled(&cluster.docker, POD_NAME_LABEL, "orphan").await;
        assert!(!left.contains(&orphan_container), "the orphan's container is still there");
        assert!(cluster.secrets().get_opt("orphan").await.unwrap().is_none(), "the orphan's secret stays");
        assert!(cluster.pods().get_opt("siblings").await.unwrap().is_some(), "a live parent's runner was swept");
        assert!(cluster.secrets().get_opt("siblings").await.unwrap().is_some());
        assert!(runs(&cluster.docker, &siblings_container, "sleep").await, "a live parent's runner was stopped");
        assert_eq!(backend.sweep_leftovers().await.unwrap(), Vec::<String>::new());

        // The sweep needs no read of secrets, and the guide's Role grants none.
        let token = cluster.emu.service_account_token(&cluster.namespace, SERVICE_ACCOUNT);
        let as_parent: Api<Secret> = Api::namespaced(cluster.emu.client_with_token(&cluster.namespace, &token), &cluster.namespace);
        for refused in [as_parent.list(&ListParams::default()).await.map(drop), as_parent.get("siblings").await.map(drop)] {
            let err = refused.expect_err("the parent's account reads secrets");
            assert!(err.to_string().contains("403"), "{err}");
        }
        cluster.emu.shutdown().await;
    })
    .await;
}

/// The container app run on this host, as a parent outside any pod: its stderr once it says
/// it is ready or has exited.
async fn app_on_the_host(env: &[(&str, String)]) -> (Option<std::process::ExitStatus>, String) {
    let mut app = tokio::process::Command::new(APP)
        .env("FLAME_TEST_BACKEND", "k8s")
        .env("FLAME_TEST_CONTROL_PORT", "0")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(app.stderr.take().unwrap());
    let mut said = String::new();
    loop {
        let mut line = String::new();
        let read = tokio::io::AsyncBufReadExt::read_line(&mut stderr, &mut line)
            .await
            .unwrap();
        said.push_str(&line);
        if read == 0 {
            return (Some(app.wait().await.unwrap()), said);
        }
        if line.contains("ready on port") {
            app.kill().await.unwrap();
            return (None, said);
        }
    }
}

#[tokio::test]
async fn outside_a_pod_the_kubeconfig_is_used() {
    bounded(async {
        let cluster = Cluster::start().await;
        let parent = cluster.idle_parent().await;
        let dir = flame_tests::scratch_dir("k8s-kubeconfig");
        let kubeconfig = dir.join("kubeconfig");
        cluster.emu.write_kubeconfig(&kubeconfig).unwrap();
        let pod = [
            ("POD_NAME", parent.metadata.name.clone().unwrap()),
            ("POD_NAMESPACE", cluster.namespace.clone()),
            ("POD_IP", "127.0.0.1".to_string()),
        ];
        let mut env = vec![("KUBECONFIG", kubeconfig.display().to_string())];
        env.extend(pod.iter().cloned());
        let (exited, said) = app_on_the_host(&env).await;
        assert_eq!(exited, None, "the app did not start: {said}");

        let mut env = vec![("KUBECONFIG", dir.join("missing").display().to_string())];
        env.extend(pod.iter().cloned());
        let (exited, said) = app_on_the_host(&env).await;
        assert!(exited.is_some_and(|status| !status.success()), "{said}");
        assert!(
            said.contains("no usable kubeconfig ($KUBECONFIG or ~/.kube/config)"),
            "{said}"
        );
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_parent_outside_any_pod_says_what_to_set() {
    bounded(async {
        let cluster = Cluster::start().await;
        let err = K8sBackend::builder()
            .client(cluster.admin.clone())
            .namespace(&cluster.namespace)
            .pod("no-such-pod")
            .build()
            .await
            .err()
            .expect("a backend without a pod to clone");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains("POD_NAME"), "{err}");
        cluster.emu.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_parent_listens_on_its_pod_ip_on_the_port_asked() {
    bounded(async {
        let cluster = Cluster::start().await;
        let parent = cluster.idle_parent().await;
        let pod_ip: IpAddr = parent
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .unwrap()
            .parse()
            .unwrap();
        let token = cluster
            .emu
            .service_account_token(&cluster.namespace, SERVICE_ACCOUNT);
        let builder = || {
            K8sBackend::builder()
                .client(cluster.emu.client_with_token(&cluster.namespace, &token))
                .namespace(&cluster.namespace)
                .pod(parent.metadata.name.clone().unwrap())
        };
        let chosen = builder().build().await.unwrap();
        assert_eq!(
            flame::Backend::listen_addr(&chosen),
            SocketAddr::new(pod_ip, 0)
        );
        let fixed = builder().listen_port(4040).build().await.unwrap();
        assert_eq!(
            flame::Backend::listen_addr(&fixed),
            SocketAddr::new(pod_ip, 4040)
        );
        cluster.emu.shutdown().await;
    })
    .await;
}
