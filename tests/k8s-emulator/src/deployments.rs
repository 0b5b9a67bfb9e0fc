//! A minimal Deployment controller: it keeps `spec.replicas` pods of the current template
//! running, replaces pods of an older template surge-style, and writes a minimal status. It
//! skips ReplicaSets: pods are owned by the Deployment itself. See the crate docs for what it
//! simplifies.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::store::{self, FieldSelector, LabelSelector, meta};
use crate::{Shared, api, lock};

/// The label naming the template a pod was made from.
pub(crate) const HASH_LABEL: &str = "pod-template-hash";

/// Reconciles every Deployment whenever a Deployment or a pod changes, until the emulator
/// closes (its task is also aborted then).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut events = lock(&shared.store).subscribe();
    reconcile_all(&shared);
    loop {
        match events.recv().await {
            Ok(event) if !matches!(event.resource, "deployments" | "pods") => continue,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
        // One pass for a burst of events (including the ones this pass causes next time).
        while let Ok(_) | Err(TryRecvError::Lagged(_)) = events.try_recv() {}
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        reconcile_all(&shared);
    }
}

/// FNV-1a (64-bit) of the template's JSON, as 10 characters of the apiserver's name alphabet.
pub(crate) fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut hash = template
        .to_string()
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
    let mut out = String::with_capacity(10);
    for _ in 0..10 {
        out.push(ALPHABET[(hash % ALPHABET.len() as u64) as usize] as char);
        hash /= ALPHABET.len() as u64;
    }
    out
}

fn reconcile_all(shared: &Arc<Shared>) {
    let deployments = lock(&shared.store).list(
        "deployments",
        None,
        &LabelSelector::default(),
        &FieldSelector::default(),
    );
    for deployment in deployments {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        reconcile(shared, &deployment);
    }
}

fn phase(pod: &Value) -> &str {
    pod.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn hash_of(pod: &Value) -> &str {
    pod.pointer(&format!("/metadata/labels/{HASH_LABEL}"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Whether `uid` is the pod's controller.
fn controlled_by(pod: &Value, uid: &str) -> bool {
    pod.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter().any(|r| {
                r.get("uid").and_then(Value::as_str) == Some(uid)
                    && r.get("controller").and_then(Value::as_bool) == Some(true)
            })
        })
}

/// Deletes a pod through the clients' path, with its own grace.
fn delete_pod(shared: &Arc<Shared>, ns: &str, pod: &Value) {
    let (Some(name), Some(uid)) = (meta(pod, "name"), meta(pod, "uid")) else {
        return;
    };
    store::delete_in_background(shared, "pods", ns, &name, &uid);
}

/// Newest first, pods not Running before Running ones: the order pods are scaled down in.
fn scale_down_order(pods: &mut [Value]) {
    pods.sort_by(|a, b| {
        let key = |p: &Value| {
            (
                phase(p) == "Running",
                std::cmp::Reverse(meta(p, "creationTimestamp").unwrap_or_default()),
                std::cmp::Reverse(meta(p, "name").unwrap_or_default()),
            )
        };
        key(a).cmp(&key(b))
    });
}

fn reconcile(shared: &Arc<Shared>, deployment: &Value) {
    let (Some(ns), Some(name), Some(uid)) = (
        meta(deployment, "namespace"),
        meta(deployment, "name"),
        meta(deployment, "uid"),
    ) else {
        return;
    };
    if deployment.pointer("/metadata/deletionTimestamp").is_some() {
        return;
    }
    let template = deployment
        .pointer("/spec/template")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let replicas = deployment
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0) as usize;
    let hash = template_hash(&template);
    let owned: Vec<Value> = lock(&shared.store)
        .list(
            "pods",
            Some(&ns),
            &LabelSelector::default(),
            &FieldSelector::default(),
        )
        .into_iter()
        .filter(|p| controlled_by(p, &uid))
        .collect();
    let live: Vec<Value> = owned
        .into_iter()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .collect();
    let (mut current, old): (Vec<Value>, Vec<Value>) =
        live.into_iter().partition(|p| hash_of(p) == hash);

    // Too few of the current template: make them.
    let mut created = 0;
    while current.len() + created < replicas {
        // Shutdown aborts this task only at an await: make no pods once it has begun.
        if shared.closed.load(Ordering::SeqCst)
            || create_pod(shared, &ns, &name, &uid, &hash, &template).is_err()
        {
            break;
        }
        created += 1;
    }
    // Too many: scale down.
    if current.len() > replicas {
        scale_down_order(&mut current);
        let extra = current.len() - replicas;
        for pod in current.drain(..extra) {
            delete_pod(shared, &ns, &pod);
        }
    }
    // The old template's pods: those not Running go at once; a Running one only as a new pod
    // is Running in its place (never fewer Running pods than wanted).
    let running_current = current.iter().filter(|p| phase(p) == "Running").count();
    let (old_running, old_other): (Vec<Value>, Vec<Value>) =
        old.into_iter().partition(|p| phase(p) == "Running");
    for pod in &old_other {
        delete_pod(shared, &ns, pod);
    }
    let mut old_running = old_running;
    scale_down_order(&mut old_running);
    let removable = (running_current.min(replicas) + old_running.len())
        .saturating_sub(replicas)
        .min(old_running.len());
    for pod in old_running.drain(..removable) {
        delete_pod(shared, &ns, &pod);
    }

    let status = json!({
        "replicas": current.len() + created + old_running.len(),
        "readyReplicas": running_current,
        "availableReplicas": running_current,
        "updatedReplicas": current.len() + created,
    });
    let mut store = lock(&shared.store);
    let Some(stored) = store.get("deployments", &ns, &name) else {
        return;
    };
    if meta(stored, "uid").as_deref() != Some(uid.as_str()) {
        return;
    }
    let mut object = stored.clone();
    // Counts of zero are left out, as the apiserver's encoder does (omitempty).
    let mut status_map = serde_json::Map::new();
    for (key, value) in status.as_object().expect("an object") {
        if value.as_u64() != Some(0) {
            status_map.insert(key.clone(), value.clone());
        }
    }
    let mut merged = object
        .get("status")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for key in [
        "replicas",
        "readyReplicas",
        "availableReplicas",
        "updatedReplicas",
    ] {
        merged.remove(key);
    }
    merged.extend(status_map);
    object["status"] = Value::Object(merged);
    if &object != stored {
        store.write("deployments", &ns, &name, object, "MODIFIED");
    }
}

fn create_pod(
    shared: &Arc<Shared>,
    ns: &str,
    deployment: &str,
    uid: &str,
    hash: &str,
    template: &Value,
) -> Result<(), Value> {
    let mut labels = template
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    labels.insert(HASH_LABEL.into(), json!(hash));
    let mut metadata = json!({
        "generateName": format!("{deployment}-{hash}-"),
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment,
            "uid": uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }],
    });
    if let Some(annotations) = template.pointer("/metadata/annotations") {
        metadata["annotations"] = annotations.clone();
    }
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    });
    let body = serde_json::to_vec(&pod).expect("JSON");
    api::create(
        shared,
        store::kind_by_resource("pods"),
        ns,
        &Default::default(),
        &body,
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_ten_name_characters_and_follows_the_template() {
        let a = template_hash(&json!({"spec": {"containers": []}}));
        let b = template_hash(
            &json!({"metadata": {"annotations": {"x": "1"}}, "spec": {"containers": []}}),
        );
        assert_eq!(a.len(), 10);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(a, b);
        assert_eq!(a, template_hash(&json!({"spec": {"containers": []}})));
    }
}
