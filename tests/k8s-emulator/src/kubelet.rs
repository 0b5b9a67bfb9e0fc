//! The kubelet of the one node: scheduling, pod IPs, the environment, the Docker lifecycle of a
//! pod's containers, and the status a real kubelet would write at each step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, KillContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
    WaitContainerOptions,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::store::{self, meta, now};
use crate::{LABEL_EMULATOR, NODE, PodControl, Shared, lock};

const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Starts the kubelet's work on a new pod.
pub(crate) fn spawn(shared: Arc<Shared>, ns: String, name: String, uid: String) {
    let (delete, deletion) = watch::channel(None);
    lock(&shared.pods).insert(uid.clone(), PodControl { delete, task: None });
    let task = tokio::spawn(run(shared.clone(), ns, name, uid.clone(), deletion));
    if let Some(control) = lock(&shared.pods).get_mut(&uid) {
        control.task = Some(task);
    }
}

async fn run(
    shared: Arc<Shared>,
    ns: String,
    name: String,
    uid: String,
    mut deletion: watch::Receiver<Option<i64>>,
) {
    let ip = Arc::new(Mutex::new(None::<u8>));
    let grace = {
        let lifecycle = lifecycle(&shared, &ns, &name, &uid, ip.clone());
        tokio::pin!(lifecycle);
        tokio::select! {
            _ = &mut lifecycle => futures::future::pending::<i64>().await,
            grace = deleted(&mut deletion) => grace,
        }
    };
    terminate(&shared, &uid, grace, &mut deletion).await;
    {
        let mut store = lock(&shared.store);
        let same = store
            .get("pods", &ns, &name)
            .is_some_and(|p| meta(p, "uid").as_deref() == Some(uid.as_str()));
        if same {
            store.remove("pods", &ns, &name);
        }
    }
    if let Some(ip) = lock(&ip).take() {
        lock(&shared.ips).remove(&ip);
    }
    lock(&shared.pods).remove(&uid);
    store::removed_hook(&shared, &ns, &uid);
}

async fn deleted(deletion: &mut watch::Receiver<Option<i64>>) -> i64 {
    loop {
        if let Some(grace) = *deletion.borrow_and_update() {
            return grace;
        }
        if deletion.changed().await.is_err() {
            return futures::future::pending().await;
        }
    }
}

/// `docker stop -t grace` (SIGTERM, then SIGKILL), cut short by a later delete with less grace,
/// then the containers are removed.
async fn terminate(
    shared: &Shared,
    uid: &str,
    grace: i64,
    deletion: &mut watch::Receiver<Option<i64>>,
) {
    let ids = containers_of(shared, uid).await;
    let docker = &shared.docker;
    let stops = futures::future::join_all(ids.iter().map(|id| {
        docker.stop_container(
            id,
            Some(StopContainerOptions {
                t: Some(i32::try_from(grace).unwrap_or(i32::MAX)),
                signal: None,
            }),
        )
    }));
    let shorter = async {
        loop {
            if deletion.changed().await.is_err() {
                return futures::future::pending().await;
            }
            if deletion.borrow().is_some_and(|g| g < grace) {
                return;
            }
        }
    };
    tokio::select! {
        _ = stops => {}
        _ = shorter => {
            for id in &ids {
                let _ = docker
                    .kill_container(id, Some(KillContainerOptions { signal: "SIGKILL".into() }))
                    .await;
            }
        }
    }
    for id in &ids {
        let _ = docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
    }
}

/// The Docker ids of this emulator's containers that also carry every one of `labels`, oldest
/// first; none when Docker does not answer.
async fn container_ids(shared: &Shared, labels: &[String]) -> Vec<String> {
    let mut wanted = vec![format!("{LABEL_EMULATOR}={}", shared.run_id)];
    wanted.extend_from_slice(labels);
    let mut listed = shared
        .docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), wanted)])),
            ..Default::default()
        }))
        .await
        .unwrap_or_default();
    listed.sort_by_key(|c| c.created.unwrap_or_default());
    listed.into_iter().filter_map(|c| c.id).collect()
}

/// The Docker ids of a pod's containers, oldest first (the first container first).
pub(crate) async fn containers_of(shared: &Shared, uid: &str) -> Vec<String> {
    container_ids(shared, &[format!("io.kubernetes.pod.uid={uid}")]).await
}

/// Removes every container this emulator made.
pub(crate) async fn remove_all(shared: &Shared) {
    let removals = container_ids(shared, &[])
        .await
        .into_iter()
        .map(|id| async move {
            let _ = shared
                .docker
                .remove_container(
                    &id,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
        });
    futures::future::join_all(removals).await;
}

/// A container's output, stdout and stderr interleaved, as `kubectl logs` shows it.
pub(crate) async fn logs(
    shared: &Shared,
    uid: &str,
    container: &str,
    tail: Option<u64>,
) -> Option<String> {
    let labels = [
        format!("io.kubernetes.pod.uid={uid}"),
        format!("io.kubernetes.container.name={container}"),
    ];
    let id = container_ids(shared, &labels).await.into_iter().next()?;
    let mut stream = shared.docker.logs(
        &id,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: tail.map_or("all".to_string(), |t| t.to_string()),
            ..Default::default()
        }),
    );
    let mut text = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        match chunk {
            LogOutput::StdOut { message }
            | LogOutput::StdErr { message }
            | LogOutput::Console { message } => text.extend_from_slice(&message),
            LogOutput::StdIn { .. } => {}
        }
    }
    Some(String::from_utf8_lossy(&text).into_owned())
}

/// Applies `change` to the pod, if it is still the same pod, as one MODIFIED event.
fn update(shared: &Shared, ns: &str, name: &str, uid: &str, change: impl FnOnce(&mut Value)) {
    let mut store = lock(&shared.store);
    let Some(current) = store.get("pods", ns, name) else {
        return;
    };
    if meta(current, "uid").as_deref() != Some(uid) {
        return;
    }
    let mut pod = current.clone();
    change(&mut pod);
    if &pod != current {
        store.write("pods", ns, name, pod, "MODIFIED");
    }
}

fn condition(kind: &str, status: bool) -> Value {
    json!({"type": kind, "status": if status { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": now()})
}

/// Millicores of a CPU quantity.
fn cpu_millis(quantity: &str) -> u64 {
    if let Some(m) = quantity.strip_suffix('m') {
        return m.parse().unwrap_or(0);
    }
    quantity
        .parse::<f64>()
        .map_or(0, |c| (c * 1000.0).round() as u64)
}

/// Bytes of a memory quantity.
fn memory_bytes(quantity: &str) -> u64 {
    const SUFFIXES: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<f64>().map_or(0, |n| (n * *factor as f64) as u64);
        }
    }
    quantity.parse::<f64>().map_or(0, |n| n as u64)
}

/// The sum of a pod's container requests: (millicores, bytes).
fn requests(pod: &Value) -> (u64, u64) {
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    containers.iter().fold((0, 0), |(cpu, memory), c| {
        let requests = c.pointer("/resources/requests");
        let get = |k: &str| {
            requests
                .and_then(|r| r.get(k))
                .and_then(Value::as_str)
                .unwrap_or("0")
        };
        (
            cpu + cpu_millis(get("cpu")),
            memory + memory_bytes(get("memory")),
        )
    })
}

/// Binds the pod to the node if it fits, as one step under the store's lock so two pods cannot
/// both take the last room. `Err` is the scheduler's message.
fn schedule(shared: &Shared, ns: &str, name: &str, uid: &str) -> Result<(), String> {
    let mut store = lock(&shared.store);
    let Some(pod) = store.get("pods", ns, name).cloned() else {
        return Ok(());
    };
    if meta(&pod, "uid").as_deref() != Some(uid) {
        return Ok(());
    }
    let labels = shared.options.labels();
    let selector_ok = pod
        .pointer("/spec/nodeSelector")
        .and_then(Value::as_object)
        .is_none_or(|s| {
            s.iter()
                .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        });
    if !selector_ok {
        return Err("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. \
                    preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
            .to_string());
    }
    let (cpu, memory) = requests(&pod);
    let everything =
        store::FieldSelector::parse(&format!("spec.nodeName={NODE}")).expect("a selector");
    let (used_cpu, used_memory) = store
        .list("pods", None, &store::LabelSelector::default(), &everything)
        .iter()
        .filter(|p| {
            !matches!(
                p.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            )
        })
        .map(requests)
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    let mut short = Vec::new();
    if used_cpu + cpu > shared.options.node_cpu_millis {
        short.push("1 Insufficient cpu");
    }
    if used_memory + memory > shared.options.node_memory_bytes {
        short.push("1 Insufficient memory");
    }
    if !short.is_empty() {
        return Err(format!(
            "0/1 nodes are available: {}. preemption: 0/1 nodes are available: 1 No preemption \
             victims found for incoming pod.",
            short.join(", ")
        ));
    }
    let mut pod = pod;
    pod["spec"]["nodeName"] = json!(NODE);
    pod["status"]["conditions"] = json!([condition("PodScheduled", true)]);
    store.write("pods", ns, name, pod, "MODIFIED");
    Ok(())
}

/// The id Docker knows an image by, and the imageID reported for it. `<repo>@sha256:<hex>` names
/// the local image with id `sha256:<hex>` (the emulator's translation: nothing is pulled).
async fn resolve_image(shared: &Shared, image: &str) -> Result<(String, String), String> {
    let lookup = match image.split_once("@sha256:") {
        Some((_, hex)) => format!("sha256:{hex}"),
        None => image.to_string(),
    };
    let inspected = shared.docker.inspect_image(&lookup).await.map_err(|e| {
        let said = match &e {
            bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
            other => other.to_string(),
        };
        format!("Failed to pull image \"{image}\": Error response from daemon: {said}")
    })?;
    let id = inspected.id.unwrap_or(lookup);
    let repo = image.split('@').next().unwrap_or(image);
    let repo = match repo.rfind(':') {
        Some(i) if !repo[i..].contains('/') => &repo[..i],
        _ => repo,
    };
    let image_id = if repo.contains('/') {
        format!("docker.io/{repo}@{id}")
    } else {
        format!("docker.io/library/{repo}@{id}")
    };
    Ok((id, image_id))
}

/// `$(VAR)` expansion as the kubelet does it: defined names are replaced, `$$` is a `$`, and
/// anything else stays as written.
fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(more) = after.strip_prefix('$') {
            out.push('$');
            rest = more;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn decode(data: &Value) -> String {
    serde_json::from_value::<k8s_openapi::ByteString>(data.clone())
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

/// `value[key]` as text; empty when it is absent.
fn text_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The items of the array `value[key]`; none when it is absent.
fn items_at<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    value
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The secret or configmap a reference (`secretRef`, `configMapKeyRef`...) names; `Err` is the
/// kubelet's message. `Ok(None)`: optional and absent.
fn referenced(
    shared: &Shared,
    ns: &str,
    resource: &'static str,
    reference: &Value,
) -> Result<Option<Value>, String> {
    let name = text_at(reference, "name");
    let optional = reference.get("optional").and_then(Value::as_bool) == Some(true);
    match lock(&shared.store).get(resource, ns, name).cloned() {
        Some(object) => Ok(Some(object)),
        None if optional => Ok(None),
        None if resource == "secrets" => Err(format!("secret \"{name}\" not found")),
        None => Err(format!("configmap \"{name}\" not found")),
    }
}

/// A value of a secret's (base64) or a configmap's (text) `data`, as text.
fn data_text(resource: &str, value: &Value) -> String {
    if resource == "secrets" {
        decode(value)
    } else {
        value.as_str().unwrap_or_default().to_string()
    }
}

/// A key of a secret or configmap; `Err` is the kubelet's message. `Ok(None)`: optional and absent.
fn key_of(
    shared: &Shared,
    ns: &str,
    resource: &'static str,
    reference: &Value,
) -> Result<Option<String>, String> {
    let Some(object) = referenced(shared, ns, resource, reference)? else {
        return Ok(None);
    };
    let key = text_at(reference, "key");
    let optional = reference.get("optional").and_then(Value::as_bool) == Some(true);
    match object.get("data").and_then(|d| d.get(key)) {
        Some(value) => Ok(Some(data_text(resource, value))),
        None if optional => Ok(None),
        None => {
            let kind = if resource == "secrets" {
                "Secret"
            } else {
                "ConfigMap"
            };
            let name = text_at(reference, "name");
            Err(format!("couldn't find key {key} in {kind} {ns}/{name}"))
        }
    }
}

fn field_ref(pod: &Value, path: &str, ip: &str, host_ip: &str) -> Result<String, String> {
    let label = |prefix: &str, field: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(|k| {
                pod.pointer(&format!("/metadata/{field}"))
                    .and_then(|m| m.get(k))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
    };
    if let Some(value) = label("metadata.labels['", "labels") {
        return Ok(value);
    }
    if let Some(value) = label("metadata.annotations['", "annotations") {
        return Ok(value);
    }
    let text = |pointer: &str| {
        pod.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match path {
        "metadata.name" => Ok(text("/metadata/name")),
        "metadata.namespace" => Ok(text("/metadata/namespace")),
        "metadata.uid" => Ok(text("/metadata/uid")),
        "spec.nodeName" => Ok(NODE.to_string()),
        "spec.serviceAccountName" => Ok(text("/spec/serviceAccountName")),
        "status.podIP" | "status.podIPs" => Ok(ip.to_string()),
        "status.hostIP" | "status.hostIPs" => Ok(host_ip.to_string()),
        other => Err(format!("unsupported fieldRef path {other}")),
    }
}

/// A container's environment, in the kubelet's order: service variables, `envFrom`, `env`.
fn environment(
    shared: &Shared,
    pod: &Value,
    container: &Value,
    ip: &str,
) -> Result<Vec<(String, String)>, String> {
    let ns = meta(pod, "namespace").unwrap_or_default();
    let host_ip = shared.gateway.to_string();
    let port = shared.https_port.to_string();
    let mut vars: Vec<(String, String)> = vec![
        ("KUBERNETES_SERVICE_HOST".into(), host_ip.clone()),
        ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.clone()),
        ("KUBERNETES_PORT".into(), format!("tcp://{host_ip}:{port}")),
    ];
    let set = |vars: &mut Vec<(String, String)>, name: String, value: String| {
        vars.retain(|(n, _)| *n != name);
        vars.push((name, value));
    };
    for source in items_at(container, "envFrom") {
        let prefix = text_at(source, "prefix");
        let (resource, reference) = match (source.get("secretRef"), source.get("configMapRef")) {
            (Some(r), _) => ("secrets", r),
            (_, Some(r)) => ("configmaps", r),
            _ => continue,
        };
        let Some(object) = referenced(shared, &ns, resource, reference)? else {
            continue;
        };
        for (key, value) in object
            .get("data")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            set(
                &mut vars,
                format!("{prefix}{key}"),
                data_text(resource, value),
            );
        }
    }
    for entry in items_at(container, "env") {
        let name = text_at(entry, "name").to_string();
        let known: HashMap<String, String> = vars.iter().cloned().collect();
        let value = if let Some(value) = entry.get("value").and_then(Value::as_str) {
            Some(expand(value, &known))
        } else if let Some(from) = entry.get("valueFrom") {
            if let Some(field) = from.get("fieldRef") {
                Some(field_ref(pod, text_at(field, "fieldPath"), ip, &host_ip)?)
            } else if let Some(reference) = from.get("secretKeyRef") {
                key_of(shared, &ns, "secrets", reference)?
            } else if let Some(reference) = from.get("configMapKeyRef") {
                key_of(shared, &ns, "configmaps", reference)?
            } else {
                None
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            set(&mut vars, name, value);
        }
    }
    Ok(vars)
}

/// The service account directory to mount, unless automounting is off (pod first, then the
/// ServiceAccount object).
fn service_account_dir(shared: &Shared, pod: &Value) -> Option<std::path::PathBuf> {
    let ns = meta(pod, "namespace").unwrap_or_default();
    let account = pod
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let automount = match pod
        .pointer("/spec/automountServiceAccountToken")
        .and_then(Value::as_bool)
    {
        Some(decided) => decided,
        None => lock(&shared.store)
            .get("serviceaccounts", &ns, &account)
            .and_then(|sa| sa.get("automountServiceAccountToken"))
            .and_then(Value::as_bool)
            .unwrap_or(true),
    };
    if !automount {
        return None;
    }
    let token = lock(&shared.tokens).service_account(&ns, &account);
    let dir = shared.dir.join("sa").join(&ns).join(&account);
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("token"), &token))
        .and_then(|()| std::fs::write(dir.join("ca.crt"), &shared.ca_pem))
        .and_then(|()| std::fs::write(dir.join("namespace"), &ns));
    written.ok().map(|()| dir)
}

fn waiting(name: &str, image: &str, reason: &str, message: Option<&str>) -> Value {
    let mut state = json!({"reason": reason});
    if let Some(message) = message {
        state["message"] = json!(message);
    }
    json!({
        "name": name, "image": image, "imageID": "", "ready": false, "started": false,
        "restartCount": 0, "state": {"waiting": state},
    })
}

fn docker_time(t: Option<&str>) -> String {
    match t {
        Some(t) if t.len() >= 19 && !t.starts_with("0001") => format!("{}Z", &t[..19]),
        _ => now(),
    }
}

/// The pod's phase from its containers' states.
fn phase(statuses: &[Value]) -> &'static str {
    let terminated: Vec<&Value> = statuses
        .iter()
        .filter_map(|s| s.pointer("/state/terminated"))
        .collect();
    if terminated.len() < statuses.len() {
        if statuses
            .iter()
            .any(|s| s.pointer("/state/running").is_some())
        {
            return "Running";
        }
        return "Pending";
    }
    if terminated
        .iter()
        .all(|t| t.get("exitCode").and_then(Value::as_i64) == Some(0))
    {
        "Succeeded"
    } else {
        "Failed"
    }
}

fn write_statuses(
    shared: &Shared,
    ns: &str,
    name: &str,
    uid: &str,
    ip: &str,
    started: &str,
    statuses: &[Value],
) {
    let phase = phase(statuses);
    let running = phase == "Running";
    let all_ready = statuses.iter().all(|s| s["ready"] == json!(true));
    let gateway = shared.gateway.to_string();
    update(shared, ns, name, uid, |pod| {
        let mut status = json!({
            "phase": phase,
            "hostIP": gateway,
            "hostIPs": [{"ip": gateway}],
            "startTime": started,
            "qosClass": pod.pointer("/status/qosClass").cloned().unwrap_or(json!("BestEffort")),
            "containerStatuses": statuses,
            "conditions": [
                condition("PodReadyToStartContainers", !ip.is_empty()),
                condition("Initialized", true),
                condition("Ready", running && all_ready),
                condition("ContainersReady", running && all_ready),
                condition("PodScheduled", true),
            ],
        });
        if !ip.is_empty() {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        // Keep the first transition times: a real kubelet only moves them on a change.
        if let Some(old) = pod.pointer("/status/conditions").and_then(Value::as_array) {
            for c in status["conditions"].as_array_mut().expect("conditions") {
                if let Some(previous) = old
                    .iter()
                    .find(|o| o["type"] == c["type"] && o["status"] == c["status"])
                {
                    c["lastTransitionTime"] = previous["lastTransitionTime"].clone();
                }
            }
        }
        pod["status"] = status;
    });
}

/// Everything up to the containers' exits; it never returns (deletion cancels it).
async fn lifecycle(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    uid: &str,
    ip_slot: Arc<Mutex<Option<u8>>>,
) {
    // Scheduling: retried, as the scheduler does when the node's load changes.
    let mut reported = None;
    loop {
        match schedule(shared, ns, name, uid) {
            Ok(()) => break,
            Err(message) => {
                if reported.as_ref() != Some(&message) {
                    let mut c = condition("PodScheduled", false);
                    c["reason"] = json!("Unschedulable");
                    c["message"] = json!(message);
                    update(shared, ns, name, uid, |pod| {
                        pod["status"]["phase"] = json!("Pending");
                        pod["status"]["conditions"] = json!([c]);
                    });
                    reported = Some(message);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let Some(pod) = lock(&shared.store).get("pods", ns, name).cloned() else {
        return futures::future::pending().await;
    };
    let octet = {
        let mut ips = lock(&shared.ips);
        let free = (2..=254u8).find(|o| !ips.contains(o));
        if let Some(o) = free {
            ips.insert(o);
        }
        free
    };
    *lock(&ip_slot) = octet;
    let [a, b, c] = shared.subnet;
    let ip = octet
        .map(|o| format!("{a}.{b}.{c}.{o}"))
        .unwrap_or_default();
    let started = now();
    let containers: Vec<Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<String> = containers
        .iter()
        .map(|c| text_at(c, "name").to_string())
        .collect();
    let images: Vec<String> = containers
        .iter()
        .map(|c| text_at(c, "image").to_string())
        .collect();
    let creating = |statuses: &mut Vec<Value>| {
        *statuses = names
            .iter()
            .zip(&images)
            .map(|(n, i)| waiting(n, i, "ContainerCreating", None))
            .collect();
    };
    let mut statuses = Vec::new();
    creating(&mut statuses);
    write_statuses(shared, ns, name, uid, &ip, &started, &statuses);

    // Images: never pulled. A missing one is ErrImagePull, then ImagePullBackOff, re-checked
    // as a kubelet's back-off would, so an image built late still starts.
    let mut resolved = Vec::new();
    let mut failures = 0;
    loop {
        let mut missing = None;
        resolved.clear();
        for (i, image) in images.iter().enumerate() {
            match resolve_image(shared, image).await {
                Ok(r) => resolved.push(r),
                Err(message) => {
                    missing = Some((i, message));
                    break;
                }
            }
        }
        let Some((i, message)) = missing else { break };
        let (reason, message) = if failures % 2 == 0 {
            ("ErrImagePull", message)
        } else {
            (
                "ImagePullBackOff",
                format!("Back-off pulling image \"{}\"", images[i]),
            )
        };
        creating(&mut statuses);
        statuses[i] = waiting(&names[i], &images[i], reason, Some(&message));
        write_statuses(shared, ns, name, uid, &ip, &started, &statuses);
        failures += 1;
        tokio::time::sleep(Duration::from_millis(if failures == 1 {
            1000
        } else {
            2000
        }))
        .await;
    }

    // The environment: a missing secret or key is retried, as the kubelet does.
    let envs = loop {
        let pod = lock(&shared.store)
            .get("pods", ns, name)
            .cloned()
            .unwrap_or(pod.clone());
        let mut envs = Vec::new();
        let mut failed = None;
        for (i, container) in containers.iter().enumerate() {
            match environment(shared, &pod, container, &ip) {
                Ok(env) => envs.push(env),
                Err(message) => {
                    failed = Some((i, message));
                    break;
                }
            }
        }
        let Some((i, message)) = failed else {
            break envs;
        };
        creating(&mut statuses);
        statuses[i] = waiting(
            &names[i],
            &images[i],
            "CreateContainerConfigError",
            Some(&message),
        );
        write_statuses(shared, ns, name, uid, &ip, &started, &statuses);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    creating(&mut statuses);
    write_statuses(shared, ns, name, uid, &ip, &started, &statuses);

    let delay = *lock(&shared.start_delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if shared.closed.load(std::sync::atomic::Ordering::SeqCst) {
        return futures::future::pending().await;
    }
    let sa_dir = service_account_dir(shared, &pod);
    let mut ids: Vec<Option<String>> = Vec::new();
    for (i, container) in containers.iter().enumerate() {
        let vars: HashMap<String, String> = envs[i].iter().cloned().collect();
        let strings = |field: &str| {
            container.get(field).and_then(Value::as_array).map(|items| {
                items
                    .iter()
                    .map(|s| expand(s.as_str().unwrap_or_default(), &vars))
                    .collect::<Vec<String>>()
            })
        };
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            ("io.kubernetes.pod.namespace".to_string(), ns.to_string()),
            ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
            ("io.kubernetes.container.name".to_string(), names[i].clone()),
            (LABEL_EMULATOR.to_string(), shared.run_id.clone()),
        ]);
        // Later containers share the first one's network, as containers in a pod share its sandbox.
        let first = ids.first().cloned().flatten();
        let (network_mode, networking, hostname) = match &first {
            Some(id) => (format!("container:{id}"), None, None),
            None => (
                shared.network.clone(),
                Some(NetworkingConfig {
                    endpoints_config: Some(HashMap::from([(
                        shared.network.clone(),
                        EndpointSettings {
                            ipam_config: Some(EndpointIpamConfig {
                                ipv4_address: Some(ip.clone()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    )])),
                }),
                Some(name.to_string()),
            ),
        };
        let body = ContainerCreateBody {
            image: Some(resolved[i].0.clone()),
            hostname,
            env: Some(envs[i].iter().map(|(k, v)| format!("{k}={v}")).collect()),
            entrypoint: strings("command"),
            cmd: strings("args"),
            working_dir: container
                .get("workingDir")
                .and_then(Value::as_str)
                .map(str::to_string),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some(network_mode),
                binds: sa_dir
                    .as_ref()
                    .map(|d| vec![format!("{}:{SA_MOUNT}:ro", d.display())]),
                ..Default::default()
            }),
            networking_config: networking,
            ..Default::default()
        };
        let created = shared
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(format!("k8s_{}_{name}_{ns}_{uid}_0", names[i])),
                    ..Default::default()
                }),
                body,
            )
            .await;
        let id = match created {
            Ok(created) => created.id,
            Err(e) => {
                statuses[i] =
                    start_error(&names[i], &images[i], &resolved[i].1, "", &e.to_string());
                ids.push(None);
                continue;
            }
        };
        if let Err(e) = shared
            .docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
        {
            statuses[i] = start_error(&names[i], &images[i], &resolved[i].1, &id, &e.to_string());
            ids.push(Some(id));
            continue;
        }
        statuses[i] = json!({
            "name": names[i], "image": images[i], "imageID": resolved[i].1,
            "containerID": format!("docker://{id}"), "ready": true, "started": true, "restartCount": 0,
            "state": {"running": {"startedAt": now()}},
        });
        ids.push(Some(id));
    }
    write_statuses(shared, ns, name, uid, &ip, &started, &statuses);

    // Exits, from Docker's wait: every restartPolicy is treated as Never.
    let statuses = Arc::new(Mutex::new(statuses));
    let waits = ids.iter().enumerate().filter_map(|(i, id)| {
        let id = id.clone()?;
        let running = lock(&statuses)[i].pointer("/state/running").is_some();
        running.then(|| {
            let statuses = statuses.clone();
            let ip = ip.clone();
            let started = started.clone();
            async move {
                let wait = shared.docker.wait_container(
                    &id,
                    Some(WaitContainerOptions {
                        condition: "not-running".into(),
                    }),
                );
                let _ = Box::pin(wait).next().await;
                let inspected = shared
                    .docker
                    .inspect_container(&id, None::<InspectContainerOptions>)
                    .await;
                let Ok(inspected) = inspected else {
                    return;
                };
                let state = inspected.state.unwrap_or_default();
                let code = state.exit_code.unwrap_or(-1);
                let reason = if state.oom_killed == Some(true) {
                    "OOMKilled"
                } else if code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                let snapshot = {
                    let mut statuses = lock(&statuses);
                    let status = &mut statuses[i];
                    let mut terminated = json!({
                        "exitCode": code,
                        "reason": reason,
                        "startedAt": docker_time(state.started_at.as_deref()),
                        "finishedAt": docker_time(state.finished_at.as_deref()),
                        "containerID": format!("docker://{id}"),
                    });
                    if let Some(error) = state.error.filter(|e| !e.is_empty()) {
                        terminated["message"] = json!(error);
                    }
                    status["state"] = json!({"terminated": terminated});
                    status["ready"] = json!(false);
                    status["started"] = json!(false);
                    statuses.clone()
                };
                write_statuses(shared, ns, name, uid, &ip, &started, &snapshot);
            }
        })
    });
    futures::future::join_all(waits.collect::<Vec<_>>()).await;
    futures::future::pending().await
}

fn start_error(name: &str, image: &str, image_id: &str, id: &str, message: &str) -> Value {
    let at = now();
    let mut terminated = json!({
        "exitCode": 128, "reason": "StartError", "message": message, "startedAt": at, "finishedAt": at,
    });
    if !id.is_empty() {
        terminated["containerID"] = json!(format!("docker://{id}"));
    }
    json!({
        "name": name, "image": image, "imageID": image_id, "ready": false, "started": false,
        "restartCount": 0, "state": {"terminated": terminated},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion() {
        let vars = HashMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "x-$(B)-$(A)-$");
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("250m"), 250);
        assert_eq!(cpu_millis("1.5"), 1500);
        assert_eq!(memory_bytes("128Mi"), 128 << 20);
        assert_eq!(memory_bytes("1G"), 1_000_000_000);
    }
}
