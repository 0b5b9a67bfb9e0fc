//! What a runner pod's status means for its boot, and how the API server's refusals read.
//!
//! The reasons are the kubelet's and the scheduler's own strings, so a cluster's words reach
//! the caller unchanged: a pod that can never start fails its boot at once with them, rather
//! than after the boot window.

use flame::{Error, ErrorKind};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// Waiting reasons after which a container never starts by itself (the kubelet's strings).
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Why this pod's runner will never dial back (or is gone), if the status says so.
///
/// `unschedulable_ok` keeps waiting on a pod the scheduler could not place, for clusters where
/// an autoscaler adds the node it needs.
pub(crate) fn fatal(pod: &Pod, container: &str, unschedulable_ok: bool) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("its pod is being deleted".into());
    }
    let status = pod.status.as_ref()?;
    let statuses = status.container_statuses.as_deref().unwrap_or_default();
    let own = statuses
        .iter()
        .find(|s| s.name == container)
        .or(statuses.first());
    if let Some(reason) = own.and_then(container_fatal) {
        return Some(reason);
    }
    if matches!(status.phase.as_deref(), Some("Failed" | "Succeeded")) {
        let why = [status.reason.as_deref(), status.message.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        return Some(if why.is_empty() {
            format!("its pod ended ({})", status.phase.as_deref().unwrap_or(""))
        } else {
            format!("its pod ended: {why}")
        });
    }
    if !unschedulable_ok {
        let unschedulable = status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        if let Some(condition) = unschedulable {
            return Some(format!(
                "Unschedulable: {}",
                condition.message.as_deref().unwrap_or("no node can run it")
            ));
        }
    }
    None
}

fn container_fatal(status: &ContainerStatus) -> Option<String> {
    let state = status.state.as_ref()?;
    if let Some(terminated) = &state.terminated {
        let reason = terminated.reason.as_deref().unwrap_or("Error");
        let mut said = format!(
            "container {} exited with code {} ({reason})",
            status.name, terminated.exit_code
        );
        if let Some(message) = terminated.message.as_deref().filter(|m| !m.is_empty()) {
            said.push_str(": ");
            said.push_str(message.trim());
        }
        return Some(said);
    }
    let waiting = state.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    STUCK
        .contains(&reason)
        .then(|| match waiting.message.as_deref() {
            Some(message) if !message.is_empty() => format!("{reason}: {message}"),
            _ => reason.to_string(),
        })
}

/// Whether the API server answered with this HTTP status.
pub(crate) fn is_code(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

/// An API refusal or an unreachable server, said with what was being done: the server's own
/// message and code when it answered, else how it could not be reached.
pub(crate) fn api_error(kind: ErrorKind, doing: &str, error: &kube::Error) -> Error {
    let said = match error {
        kube::Error::Api(status) => {
            let hint = match status.code {
                // RBAC's own wording; a quota or an admission webhook also answers 403.
                403 if status.reason == "Forbidden"
                    && status.message.contains(" cannot ")
                    && status.message.contains(" resource ") =>
                {
                    " (the parent's service account lacks this permission: docs/deploy-kubernetes.md lists the Role it needs)"
                }
                _ => "",
            };
            format!(
                "{doing}: {} (HTTP {} {}){hint}",
                status.message, status.code, status.reason
            )
        }
        kube::Error::SerdeError(e) => {
            format!("{doing}: the Kubernetes API's answer could not be read: {e}")
        }
        other => format!("{doing}: the Kubernetes API cannot be reached: {other}"),
    };
    Error::new(kind, said)
}

#[cfg(test)]
mod tests {
    use super::fatal;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "r"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn stuck_containers_and_unschedulable_pods_say_the_clusters_reason() {
        let pull = pod(json!({"phase": "Pending", "containerStatuses": [{
            "name": "app", "image": "nope:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImagePull",
                "message": "Failed to pull image \"nope:1\": not found"}}}]}));
        assert_eq!(
            fatal(&pull, "app", false).as_deref(),
            Some("ErrImagePull: Failed to pull image \"nope:1\": not found")
        );
        let unschedulable = pod(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}]}));
        assert_eq!(
            fatal(&unschedulable, "app", false).as_deref(),
            Some(
                "Unschedulable: 0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
            )
        );
        assert_eq!(fatal(&unschedulable, "app", true), None);
        let exited = pod(json!({"phase": "Failed", "containerStatuses": [{
            "name": "app", "image": "app:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}));
        assert_eq!(
            fatal(&exited, "app", false).as_deref(),
            Some("container app exited with code 137 (Error)")
        );
    }

    #[test]
    fn pods_still_coming_up_are_not_fatal() {
        let creating = pod(json!({"phase": "Pending", "containerStatuses": [{
            "name": "app", "image": "app:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        assert_eq!(fatal(&creating, "app", false), None);
        let running = pod(json!({"phase": "Running", "containerStatuses": [{
            "name": "app", "image": "app:1", "imageID": "", "ready": true, "restartCount": 0,
            "state": {"running": {}}}]}));
        assert_eq!(fatal(&running, "app", false), None);
        assert_eq!(fatal(&pod(json!(null)), "app", false), None);
    }
}
