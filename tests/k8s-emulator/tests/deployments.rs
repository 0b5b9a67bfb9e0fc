//! The Deployment controller: pods of the template, a rollout restart, scaling and garbage
//! collection, with real containers. The image is `support::image()`'s.

mod support;

use std::time::Duration;

use flame_k8s_emulator::{Emulator, Options};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::{bounded, container_exists, image, phase, pod, until};

/// The pods whose controller is `uid`, each with its deletion mark.
async fn owned(pods: &Api<Pod>, uid: &str) -> Vec<Pod> {
    pods.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.uid == uid && r.controller == Some(true))
        })
        .collect()
}

/// Polls until `done` holds for the Deployment's pods; those pods.
async fn until_owned(pods: &Api<Pod>, uid: &str, done: impl Fn(&[Pod]) -> bool) -> Vec<Pod> {
    loop {
        let now = owned(pods, uid).await;
        if done(&now) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn hash(p: &Pod) -> String {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
        .cloned()
        .unwrap_or_default()
}

fn running_of(pods: &[Pod], n: usize, not_hash: Option<&str>) -> bool {
    pods.len() == n
        && pods.iter().all(|p| {
            phase(p) == "Running"
                && p.metadata.deletion_timestamp.is_none()
                && not_hash.is_none_or(|h| hash(p) != h)
        })
}

#[tokio::test]
async fn deployment_runs_rolls_scales_and_is_collected() {
    let image = image().await;
    let emu = Emulator::start(Options::default()).await;
    bounded(async {
        let client = emu.client("web");
        let pods = Api::<Pod>::namespaced(client.clone(), "web");
        let deployments = Api::<Deployment>::namespaced(client.clone(), "web");
        // A pod matching the selector but controlled by something else (a live object, so the
        // garbage collector keeps it).
        let holder: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "holder"}})).unwrap();
        let holder = Api::<ConfigMap>::namespaced(client.clone(), "web")
            .create(&PostParams::default(), &holder).await.unwrap();
        let foreign = pod("foreign", image, "exec sleep 600", json!({"metadata": {"ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "holder",
            "uid": holder.metadata.uid.clone().unwrap(), "controller": true,
        }]}, "spec": {"terminationGracePeriodSeconds": 1}}));
        pods.create(&PostParams::default(), &foreign).await.unwrap();
        until(&pods, "foreign", |p| phase(p) == "Running").await;

        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "x"}},
                "template": {
                    "metadata": {"labels": {"app": "x"}, "annotations": {"note": "n"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "main", "image": image, "args": ["-c", "exec sleep 600"]}],
                    },
                },
            },
        })).unwrap();
        let created = deployments.create(&PostParams::default(), &deployment).await.unwrap();
        let uid = created.metadata.uid.clone().unwrap();
        let first = until_owned(&pods, &uid, |p| running_of(p, 2, None)).await;
        let old_hash = hash(&first[0]);
        assert_eq!(old_hash.len(), 10);
        for p in &first {
            assert_eq!(hash(p), old_hash);
            let name = p.metadata.name.clone().unwrap();
            assert!(name.starts_with(&format!("web-{old_hash}-")) && name.len() == "web-".len() + 10 + 6, "{name}");
            let labels = p.metadata.labels.clone().unwrap();
            assert_eq!(labels.get("app").map(String::as_str), Some("x"));
            assert_eq!(p.metadata.annotations.as_ref().unwrap().get("note").map(String::as_str), Some("n"));
            let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.api_version.as_str()), ("Deployment", "web", "apps/v1"));
            assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));
        }
        // The foreign pod is neither adopted nor counted nor deleted.
        let status = loop {
            let d = deployments.get("web").await.unwrap();
            let s = d.status.clone().unwrap_or_default();
            if s.ready_replicas == Some(2) {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!((status.replicas, status.updated_replicas), (Some(2), Some(2)));
        let foreign = pods.get("foreign").await.unwrap();
        assert!(foreign.metadata.deletion_timestamp.is_none());
        assert_eq!(foreign.metadata.owner_references.as_ref().unwrap().len(), 1);
        let mut old_containers = Vec::new();
        for p in &first {
            old_containers.push(emu.container_of("web", p.metadata.name.as_deref().unwrap()).await.unwrap());
        }

        // What `kubectl rollout restart deployment/web` sends.
        let restart = json!({"spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}}}}});
        deployments.patch("web", &PatchParams::default(), &Patch::Strategic(&restart)).await.unwrap();
        let second = until_owned(&pods, &uid, |p| running_of(p, 2, Some(&old_hash))).await;
        let new_hash = hash(&second[0]);
        assert!(second.iter().all(|p| hash(p) == new_hash));
        assert!(second[0].metadata.annotations.as_ref().unwrap().contains_key("kubectl.kubernetes.io/restartedAt"));
        for p in &first {
            assert!(pods.get_opt(p.metadata.name.as_deref().unwrap()).await.unwrap().is_none());
        }
        for id in &old_containers {
            assert!(!container_exists(id).await, "old container {id} is left");
        }
        assert!(pods.get("foreign").await.unwrap().metadata.deletion_timestamp.is_none());

        // Scale down to one.
        deployments.patch("web", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"replicas": 1}}))).await.unwrap();
        let third = until_owned(&pods, &uid, |p| running_of(p, 1, Some(&old_hash))).await;
        assert_eq!(hash(&third[0]), new_hash);
        let last = emu.container_of("web", third[0].metadata.name.as_deref().unwrap()).await.unwrap();

        // Deleting the Deployment collects its pods (and their containers).
        deployments.delete("web", &DeleteParams::default()).await.unwrap();
        until_owned(&pods, &uid, <[Pod]>::is_empty).await;
        assert!(!container_exists(&last).await);
        assert!(pods.get("foreign").await.unwrap().metadata.deletion_timestamp.is_none());
    })
    .await;
    emu.shutdown().await;
}
