//! Pods as real containers on the local Docker engine: environment, hostname, IPs, the
//! service-account mount and the HTTPS API, image and scheduling failures, deletion, garbage
//! collection, and containers dying under the emulator. The image is `support::image()`'s.

mod support;

use std::time::{Duration, Instant};

use flame_k8s_emulator::{Emulator, LABEL_EMULATOR, Options};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ContainerState, Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};
use support::{bounded, container_exists, docker, image, phase, pod, until};

/// Waits for the pod's DELETED event (or finds it already gone).
async fn until_deleted(pods: &Api<Pod>, name: &str) {
    let Some(current) = pods.get_opt(name).await.unwrap() else {
        return;
    };
    let rv = current.metadata.resource_version.unwrap();
    let params = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(60);
    let mut events = pods.watch(&params, &rv).await.unwrap().boxed();
    while let Some(event) = events.try_next().await.unwrap() {
        if let WatchEvent::Deleted(_) = event {
            return;
        }
    }
    panic!("no DELETED event for {name}");
}

/// The state of the pod's first container.
fn state(p: &Pod) -> Option<&ContainerState> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()
}

fn waiting_reason(p: &Pod) -> Option<(String, String)> {
    let waiting = state(p)?.waiting.as_ref()?;
    Some((
        waiting.reason.clone()?,
        waiting.message.clone().unwrap_or_default(),
    ))
}

fn terminated(p: &Pod) -> Option<(i32, String)> {
    let t = state(p)?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

/// The pod's log once it contains `marker`.
async fn log_with(pods: &Api<Pod>, name: &str, marker: &str) -> String {
    loop {
        let log = pods.logs(name, &LogParams::default()).await.unwrap();
        if log.contains(marker) {
            return log;
        }
        // Output has no event to wait for.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nothing of the emulator's run is left in Docker: no container with its label, nor its network.
async fn assert_nothing_left(run: &str, network: &str) {
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![format!("{LABEL_EMULATOR}={run}")],
    )]);
    let left = docker()
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        docker()
            .inspect_network(
                network,
                None::<bollard::query_parameters::InspectNetworkOptions>
            )
            .await
            .is_err()
    );
}

#[tokio::test]
async fn pod_runs_as_a_container_with_its_environment() {
    let image = image().await;
    let emu = Emulator::start(Options::default()).await;
    bounded(async {
        let client = emu.client("apps");
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "creds"}, "stringData": {"TOKEN": "s3cret", "OTHER": "o"}
        })).unwrap();
        Api::<Secret>::namespaced(client.clone(), "apps").create(&PostParams::default(), &secret).await.unwrap();
        let pods = Api::<Pod>::namespaced(client.clone(), "apps");
        // The service account may list pods: the pod asks the API about itself.
        let role: Role = serde_json::from_value(json!({"metadata": {"name": "reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})).unwrap();
        Api::<Role>::namespaced(client.clone(), "apps").create(&PostParams::default(), &role).await.unwrap();
        let binding: RoleBinding = serde_json::from_value(json!({"metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "apps"}]})).unwrap();
        Api::<RoleBinding>::namespaced(client.clone(), "apps").create(&PostParams::default(), &binding).await.unwrap();
        let script = "echo host=$(cat /etc/hostname); env; SA=/var/run/secrets/kubernetes.io/serviceaccount; \
            for f in token ca.crt namespace; do test -s $SA/$f && echo has-$f; done; \
            echo ns-file=$(cat $SA/namespace); \
            curl -sS --cacert $SA/ca.crt -H \"Authorization: Bearer $(cat $SA/token)\" -o /tmp/pods \
              \"https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/$POD_NAMESPACE/pods?fieldSelector=metadata.name%3D$POD_NAME\"; \
            echo api=$(cat /tmp/pods); \
            echo done; exec sleep 300";
        let spec = pod("web-1", image, script, json!({"spec": {"containers": [{
            "name": "main", "image": image, "args": ["-c", script],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
                {"name": "COMBINED", "value": "$(POD_NAME)@$(POD_IP)"},
            ],
            "envFrom": [{"secretRef": {"name": "creds"}, "prefix": "FROM_"}],
        }]}}));
        let created = pods.create(&PostParams::default(), &spec).await.unwrap();
        let uid = created.metadata.uid.clone().unwrap();
        let running = until(&pods, "web-1", |p| phase(p) == "Running").await;
        let status = running.status.clone().unwrap();
        let ip = status.pod_ip.clone().unwrap();
        let gateway = status.host_ip.clone().unwrap();
        assert_eq!(status.pod_ips.unwrap()[0].ip, ip);
        assert!(status.start_time.is_some());
        assert_eq!(running.spec.as_ref().unwrap().node_name.as_deref(), Some("emu-node"));
        let container = &status.container_statuses.unwrap()[0];
        assert!(container.ready && container.started == Some(true));
        let id = container.container_id.clone().unwrap();
        let id = id.strip_prefix("docker://").unwrap();
        assert_eq!(emu.container_of("apps", "web-1").await.as_deref(), Some(id));
        assert!(container.image_id.starts_with("docker.io/library/flame-k8s-emu-test@sha256:"), "{}", container.image_id);
        let conditions: Vec<(String, String)> = status.conditions.unwrap().into_iter().map(|c| (c.type_, c.status)).collect();
        for kind in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            assert!(conditions.contains(&(kind.to_string(), "True".to_string())), "{conditions:?}");
        }

        // The container, as Docker sees it.
        let inspected = docker().inspect_container(id, None::<bollard::query_parameters::InspectContainerOptions>).await.unwrap();
        assert_eq!(inspected.name.as_deref(), Some(format!("/k8s_main_web-1_apps_{uid}_0").as_str()));
        let labels = inspected.config.as_ref().unwrap().labels.clone().unwrap();
        assert_eq!(labels["io.kubernetes.pod.name"], "web-1");
        assert_eq!(labels["io.kubernetes.pod.namespace"], "apps");
        assert_eq!(labels["io.kubernetes.pod.uid"], uid);
        assert_eq!(labels["io.kubernetes.container.name"], "main");
        assert_eq!(labels[LABEL_EMULATOR], emu.run_id());
        let networks = inspected.network_settings.unwrap().networks.unwrap();
        assert_eq!(networks[emu.network()].ip_address.as_deref(), Some(ip.as_str()));

        let log = log_with(&pods, "web-1", "done").await;
        let lines: Vec<&str> = log.lines().collect();
        let https_port = emu.https_url().rsplit(':').next().unwrap().to_string();
        for expected in [
            "host=web-1".to_string(),
            "POD_NAME=web-1".into(),
            "POD_NAMESPACE=apps".into(),
            format!("POD_UID={uid}"),
            format!("POD_IP={ip}"),
            format!("HOST_IP={gateway}"),
            "NODE=emu-node".into(),
            "SA=default".into(),
            "APP=x".into(),
            "TOKEN=s3cret".into(),
            "FROM_OTHER=o".into(),
            format!("COMBINED=web-1@{ip}"),
            format!("KUBERNETES_SERVICE_HOST={gateway}"),
            format!("KUBERNETES_SERVICE_PORT={https_port}"),
            format!("KUBERNETES_SERVICE_PORT_HTTPS={https_port}"),
            "has-token".into(),
            "has-ca.crt".into(),
            "has-namespace".into(),
            "ns-file=apps".into(),
        ] {
            assert!(lines.contains(&expected.as_str()), "{expected} is not in the log:\n{log}");
        }
        assert!(emu.https_url().starts_with(&format!("https://{gateway}:")));
        // In the pod: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT with the mounted
        // ca.crt and token, as kube::Config::incluster() builds it.
        let answer = lines.iter().find_map(|l| l.strip_prefix("api=")).unwrap_or_else(|| panic!("no api= line in:\n{log}"));
        let answer: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}\n{log}"));
        assert_eq!(answer["items"][0]["metadata"]["name"], "web-1", "{answer}");
        let tail = pods.logs("web-1", &LogParams { tail_lines: Some(1), ..Default::default() }).await.unwrap();
        assert_eq!(tail, "done\n");

        // What a program in the pod does with Config::incluster(): the gateway over HTTPS, the
        // mounted CA and the service account's token.
        let mut config = kube::Config::new(emu.https_url().parse().unwrap());
        config.root_cert = Some(vec![emu.ca_der()]);
        config.auth_info.token = Some(emu.service_account_token("apps", "default").as_str().into());
        config.default_namespace = "apps".into();
        config.default_retry = false;
        let incluster = kube::Client::try_from(config).unwrap();
        let listed = Api::<Pod>::namespaced(incluster, "apps").list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        assert!(emu.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));

        // Deleting stops and removes the container, then the object goes (DELETED).
        let deleting = pods.delete("web-1", &DeleteParams { grace_period_seconds: Some(1), ..Default::default() }).await.unwrap();
        let deleting = deleting.left().expect("the pod, being deleted");
        assert!(deleting.metadata.deletion_timestamp.is_some());
        assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(1));
        until_deleted(&pods, "web-1").await;
        assert!(!container_exists(id).await, "the container outlived its pod");
    })
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn failures_show_in_the_status() {
    let image = image().await;
    let options = Options {
        node_labels: [("disk".to_string(), "hdd".to_string())].into(),
        ..Options::default()
    };
    let emu = Emulator::start(options).await;
    bounded(async {
        let pods = Api::<Pod>::namespaced(emu.client("f"), "f");
        // A missing image: ErrImagePull within 2 s, then ImagePullBackOff.
        let began = Instant::now();
        pods.create(&PostParams::default(), &pod("nope", "flame-k8s-emu-nope:1", "true", json!({}))).await.unwrap();
        let pulled = until(&pods, "nope", |p| waiting_reason(p).is_some_and(|(r, _)| r == "ErrImagePull")).await;
        assert!(began.elapsed() < Duration::from_secs(2), "{:?}", began.elapsed());
        let (_, message) = waiting_reason(&pulled).unwrap();
        assert!(message.starts_with("Failed to pull image \"flame-k8s-emu-nope:1\": "), "{message}");
        until(&pods, "nope", |p| waiting_reason(p).is_some_and(|(r, _)| r == "ImagePullBackOff")).await;

        // nodeSelector mismatch, and more CPU than the node has.
        let selector = json!({"spec": {"nodeSelector": {"disk": "ssd"}}});
        pods.create(&PostParams::default(), &pod("picky", image, "true", selector)).await.unwrap();
        let pending = until(&pods, "picky", |p| {
            p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.reason.as_deref() == Some("Unschedulable")))
        }).await;
        assert_eq!(phase(&pending), "Pending");
        let condition = pending.status.unwrap().conditions.unwrap().into_iter().find(|c| c.type_ == "PodScheduled").unwrap();
        assert_eq!(condition.status, "False");
        assert_eq!(condition.message.unwrap(), "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.");
        let fits = json!({"spec": {"nodeSelector": {"disk": "hdd", "kubernetes.io/os": "linux"}}});
        pods.create(&PostParams::default(), &pod("fits", image, "exit 0", fits)).await.unwrap();
        until(&pods, "fits", |p| phase(p) == "Succeeded").await;
        let big = json!({"spec": {"containers": [{"name": "main", "image": image, "args": ["-c", "true"], "resources": {"requests": {"cpu": "3"}}}]}});
        pods.create(&PostParams::default(), &pod("big", image, "true", big)).await.unwrap();
        let big = until(&pods, "big", |p| p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| !c.is_empty())).await;
        let message = big.status.unwrap().conditions.unwrap()[0].message.clone().unwrap();
        assert!(message.starts_with("0/1 nodes are available: 1 Insufficient cpu."), "{message}");

        // A missing secret, then created: the pod starts (the kubelet retries).
        let env = json!({"spec": {"containers": [{"name": "main", "image": image, "args": ["-c", "echo got=$LATE; exec sleep 300"],
            "env": [{"name": "LATE", "valueFrom": {"secretKeyRef": {"name": "late", "key": "K"}}}]}]}});
        pods.create(&PostParams::default(), &pod("waits", image, "", env)).await.unwrap();
        let blocked = until(&pods, "waits", |p| waiting_reason(p).is_some_and(|(r, _)| r == "CreateContainerConfigError")).await;
        assert_eq!(waiting_reason(&blocked).unwrap().1, "secret \"late\" not found");
        let secrets = Api::<Secret>::namespaced(emu.client("f"), "f");
        let wrong_key: Secret = serde_json::from_value(json!({"metadata": {"name": "late"}, "stringData": {"J": "1"}})).unwrap();
        secrets.create(&PostParams::default(), &wrong_key).await.unwrap();
        until(&pods, "waits", |p| waiting_reason(p).is_some_and(|(_, m)| m == "couldn't find key K in Secret f/late")).await;
        secrets.patch("late", &Default::default(), &kube::api::Patch::Merge(json!({"stringData": {"K": "v"}}))).await.unwrap();
        until(&pods, "waits", |p| phase(p) == "Running").await;
        log_with(&pods, "waits", "got=v").await;

        // Exits: 0 is Succeeded/Completed, 3 is Failed/Error.
        pods.create(&PostParams::default(), &pod("ok", image, "exit 0", json!({}))).await.unwrap();
        let ok = until(&pods, "ok", |p| phase(p) == "Succeeded").await;
        assert_eq!(terminated(&ok).unwrap(), (0, "Completed".to_string()));
        pods.create(&PostParams::default(), &pod("bad", image, "exit 3", json!({}))).await.unwrap();
        let bad = until(&pods, "bad", |p| phase(p) == "Failed").await;
        assert_eq!(terminated(&bad).unwrap(), (3, "Error".to_string()));

        // A command that cannot start: StartError, 128, Failed.
        let missing = json!({"spec": {"containers": [{"name": "main", "image": image, "command": ["/no/such/program"]}]}});
        pods.create(&PostParams::default(), &pod("unstartable", image, "", missing)).await.unwrap();
        let unstartable = until(&pods, "unstartable", |p| phase(p) == "Failed").await;
        assert_eq!(terminated(&unstartable).unwrap(), (128, "StartError".to_string()));

        // docker kill from outside: exit 137, Failed.
        pods.create(&PostParams::default(), &pod("victim", image, "exec sleep 300", json!({}))).await.unwrap();
        until(&pods, "victim", |p| phase(p) == "Running").await;
        let id = emu.container_of("f", "victim").await.unwrap();
        docker().kill_container(&id, None::<bollard::query_parameters::KillContainerOptions>).await.unwrap();
        let killed = until(&pods, "victim", |p| phase(p) == "Failed").await;
        assert_eq!(terminated(&killed).unwrap(), (137, "Error".to_string()));

        // Slow starts.
        emu.set_start_delay(Duration::from_millis(1500));
        let began = Instant::now();
        pods.create(&PostParams::default(), &pod("slow", image, "exit 0", json!({}))).await.unwrap();
        let creating = until(&pods, "slow", |p| waiting_reason(p).is_some_and(|(r, _)| r == "ContainerCreating")).await;
        assert!(creating.status.unwrap().pod_ip.is_some(), "the pod IP is known before the start");
        until(&pods, "slow", |p| phase(p) == "Succeeded").await;
        assert!(began.elapsed() >= Duration::from_millis(1500), "{:?}", began.elapsed());
        emu.set_start_delay(Duration::ZERO);

        // A pinned digest names the local image by id.
        let id = docker().inspect_image(image).await.unwrap().id.unwrap();
        let pinned = format!("flame-k8s-emu-test@{id}");
        pods.create(&PostParams::default(), &pod("pinned", &pinned, "exit 0", json!({}))).await.unwrap();
        let pinned = until(&pods, "pinned", |p| phase(p) == "Succeeded").await;
        let status = &pinned.status.unwrap().container_statuses.unwrap()[0];
        assert_eq!(status.image_id, format!("docker.io/library/flame-k8s-emu-test@{id}"));
    })
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn deletion_grace_and_garbage_collection() {
    let image = image().await;
    let emu = Emulator::start(Options::default()).await;
    bounded(async {
        let client = emu.client("gc");
        let pods = Api::<Pod>::namespaced(client.clone(), "gc");
        // A container that exits on SIGTERM ends its grace period early.
        let polite = json!({"spec": {"terminationGracePeriodSeconds": 60}});
        pods.create(&PostParams::default(), &pod("polite", image, "trap 'exit 0' TERM; sleep 300 & wait", polite)).await.unwrap();
        until(&pods, "polite", |p| phase(p) == "Running").await;
        let began = Instant::now();
        pods.delete("polite", &DeleteParams::default()).await.unwrap();
        until_deleted(&pods, "polite").await;
        assert!(began.elapsed() < Duration::from_secs(20), "{:?}", began.elapsed());

        // An owner pod, and a pod and a secret it owns.
        pods.create(&PostParams::default(), &pod("owner", image, "exec sleep 300", json!({}))).await.unwrap();
        let owner = until(&pods, "owner", |p| phase(p) == "Running").await;
        let reference = json!([{"apiVersion": "v1", "kind": "Pod", "name": "owner",
            "uid": owner.metadata.uid.clone().unwrap(), "controller": true}]);
        let dependent = json!({"metadata": {"ownerReferences": reference}});
        pods.create(&PostParams::default(), &pod("dependent", image, "exec sleep 300", dependent)).await.unwrap();
        until(&pods, "dependent", |p| phase(p) == "Running").await;
        let secrets = Api::<Secret>::namespaced(client.clone(), "gc");
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "dependent", "ownerReferences": reference},
            "stringData": {"k": "v"}})).unwrap();
        secrets.create(&PostParams::default(), &secret).await.unwrap();
        let owner_container = emu.container_of("gc", "owner").await.unwrap();
        let dependent_container = emu.container_of("gc", "dependent").await.unwrap();
        pods.delete("owner", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
        until_deleted(&pods, "owner").await;
        until_deleted(&pods, "dependent").await;
        assert!(secrets.get_opt("dependent").await.unwrap().is_none());
        assert!(!container_exists(&owner_container).await);
        assert!(!container_exists(&dependent_container).await);

        // Orphan: the dependents stay, without the reference.
        pods.create(&PostParams::default(), &pod("owner2", image, "exec sleep 300", json!({}))).await.unwrap();
        let owner2 = until(&pods, "owner2", |p| phase(p) == "Running").await;
        let reference = json!([{"apiVersion": "v1", "kind": "Pod", "name": "owner2", "uid": owner2.metadata.uid.clone().unwrap()}]);
        let kept: Secret = serde_json::from_value(json!({"metadata": {"name": "kept", "ownerReferences": reference}})).unwrap();
        secrets.create(&PostParams::default(), &kept).await.unwrap();
        pods.delete("owner2", &DeleteParams { grace_period_seconds: Some(0), propagation_policy: Some(kube::api::PropagationPolicy::Orphan), ..Default::default() }).await.unwrap();
        until_deleted(&pods, "owner2").await;
        let kept = secrets.get("kept").await.unwrap();
        assert!(kept.metadata.owner_references.is_none());

        // After shutdown, nothing of the emulator is left in Docker.
        pods.create(&PostParams::default(), &pod("left", image, "exec sleep 300", json!({}))).await.unwrap();
        until(&pods, "left", |p| phase(p) == "Running").await;
    })
    .await;
    let run = emu.run_id().to_string();
    let network = emu.network().to_string();
    emu.shutdown().await;
    assert_nothing_left(&run, &network).await;
}

#[tokio::test]
async fn dropping_the_emulator_cleans_up() {
    let image = image().await;
    let emu = Emulator::start(Options::default()).await;
    let run = emu.run_id().to_string();
    let network = emu.network().to_string();
    bounded(async {
        let pods = Api::<Pod>::namespaced(emu.client("d"), "d");
        pods.create(
            &PostParams::default(),
            &pod("orphan", image, "exec sleep 300", json!({})),
        )
        .await
        .unwrap();
        until(&pods, "orphan", |p| phase(p) == "Running").await;
    })
    .await;
    // No shutdown(): Drop removes what it made with the Docker CLI.
    drop(emu);
    assert_nothing_left(&run, &network).await;
}
