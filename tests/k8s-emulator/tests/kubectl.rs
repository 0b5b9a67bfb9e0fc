//! The real kubectl against the emulator, with server-side field validation on: `apply` of the
//! deploy guide's manifest (`deploy/k8s/flame-app.yaml`) with a Secret beside it, again unchanged,
//! and again changed (a strategic merge patch), `rollout restart`; then `get -l -o json`,
//! `get -o yaml` and `delete`.

mod support;

use std::path::{Path, PathBuf};

use flame_k8s_emulator::{Emulator, Options};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::{bounded, container_exists, image, phase, pod, until};

const KUBECTL: &str = "/usr/bin/kubectl";
/// The manifest the deploy guide (docs/deploy-kubernetes.md) has users apply, as it is.
const DEPLOY_GUIDE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/k8s/flame-app.yaml"
);
const SECRET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/secret.yaml");

/// A directory of the test's own, removed at the end (even on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let mut suffix = [0u8; 6];
        getrandom::fill(&mut suffix).unwrap();
        let name: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("flame-k8s-emu-kubectl-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs kubectl with its own kubeconfig and discovery cache; its stdout, or a panic with stderr.
async fn kubectl(dir: &Path, args: &[&str]) -> String {
    assert!(
        Path::new(KUBECTL).exists(),
        "{KUBECTL} is missing: apt-get install kubernetes-client"
    );
    let kubeconfig = dir.join("kubeconfig");
    let cache = dir.join("kcache");
    let output = tokio::process::Command::new(KUBECTL)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--cache-dir={}", cache.display()))
        .args(args)
        .args(
            std::env::var("EMU_KV")
                .map(|v| vec![format!("-v={v}")])
                .unwrap_or_default(),
        )
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {KUBECTL}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if std::env::var("EMU_KV").is_ok() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    }
    assert!(
        output.status.success(),
        "kubectl {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn kubectl_apply_get_delete() {
    let image = image().await;
    let emu = Emulator::start(Options::default()).await;
    let dir = TempDir::new();
    bounded(async {
        emu.write_kubeconfig(&dir.0.join("kubeconfig")).unwrap();
        let client = emu.client("default");

        // First apply: every object is created, with server-side validation.
        let applied = kubectl(&dir.0, &["apply", "-f", DEPLOY_GUIDE, "-f", SECRET]).await;
        let deploy_guide_objects = [
            "serviceaccount/thumbs",
            "role.rbac.authorization.k8s.io/flame-runners",
            "rolebinding.rbac.authorization.k8s.io/thumbs-flame-runners",
            "deployment.apps/thumbs",
        ];
        for object in deploy_guide_objects
            .into_iter()
            .chain(["secret/app-config"])
        {
            assert!(
                applied.contains(&format!("{object} created")),
                "{object} not created:\n{applied}"
            );
        }
        Api::<ServiceAccount>::namespaced(client.clone(), "default")
            .get("thumbs")
            .await
            .unwrap();
        let role: Value = serde_json::from_str(
            &kubectl(&dir.0, &["get", "role", "flame-runners", "-o", "json"]).await,
        )
        .unwrap();
        // The rules as the file has them (kubectl keeps what it applied), the runners' among them.
        let last_applied =
            role["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
                .as_str()
                .unwrap();
        let from_file: Value = serde_json::from_str(last_applied).unwrap();
        assert_eq!(role["rules"], from_file["rules"], "{role}");
        for resource in ["pods", "secrets"] {
            let rules = role["rules"].as_array().unwrap();
            assert!(
                rules
                    .iter()
                    .any(|r| r["apiGroups"] == json!([""]) && r["resources"] == json!([resource])),
                "no {resource} rule: {role}"
            );
        }
        let binding = Api::<RoleBinding>::namespaced(client.clone(), "default")
            .get("thumbs-flame-runners")
            .await
            .unwrap();
        assert_eq!(binding.role_ref.name, "flame-runners");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            ("ServiceAccount", "thumbs", Some("default"))
        );
        let secret = Api::<Secret>::namespaced(client.clone(), "default")
            .get("app-config")
            .await
            .unwrap();
        assert_eq!(secret.data.unwrap()["API_KEY"].0, b"not-a-real-key");
        assert!(secret.string_data.is_none());
        let deployments = Api::<Deployment>::namespaced(client.clone(), "default");
        let first = deployments.get("thumbs").await.unwrap();
        assert_eq!(first.spec.unwrap().replicas, Some(2));
        assert!(
            first
                .metadata
                .annotations
                .unwrap()
                .contains_key("kubectl.kubernetes.io/last-applied-configuration")
        );

        // Unchanged: nothing is written. Changed: a strategic merge patch.
        let unchanged = kubectl(&dir.0, &["apply", "-f", DEPLOY_GUIDE, "-f", SECRET]).await;
        // The Secret is patched every time, as in a real cluster: its stringData is never read back.
        for object in deploy_guide_objects {
            assert!(
                unchanged.contains(&format!("{object} unchanged")),
                "{object} changed:\n{unchanged}"
            );
        }
        let changed_manifest = dir.0.join("changed.yaml");
        let text = std::fs::read_to_string(DEPLOY_GUIDE).unwrap();
        assert!(
            text.contains("replicas: 2") && text.contains("thumbs:1.0"),
            "{DEPLOY_GUIDE} changed: change this test with it"
        );
        std::fs::write(
            &changed_manifest,
            text.replace("replicas: 2", "replicas: 3")
                .replace("thumbs:1.0", "thumbs:1.1"),
        )
        .unwrap();
        let reapplied = kubectl(&dir.0, &["apply", "-f", changed_manifest.to_str().unwrap()]).await;
        assert!(
            reapplied.contains("deployment.apps/thumbs configured"),
            "{reapplied}"
        );
        assert!(
            reapplied.contains("role.rbac.authorization.k8s.io/flame-runners unchanged"),
            "{reapplied}"
        );
        let second = deployments.get("thumbs").await.unwrap();
        let spec = second.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let template = spec.template.spec.unwrap();
        assert_eq!(template.service_account_name.as_deref(), Some("thumbs"));
        assert_eq!(template.containers.len(), 1);
        assert_eq!(
            template.containers[0].image.as_deref(),
            Some("registry.example.com/thumbs:1.1")
        );
        assert_eq!(template.containers[0].env.as_ref().unwrap().len(), 3);

        // `rollout restart`: a strategic merge patch of the template's annotations.
        let restarted = kubectl(&dir.0, &["rollout", "restart", "deployment/thumbs"]).await;
        assert!(
            restarted.contains("deployment.apps/thumbs restarted"),
            "{restarted}"
        );
        let third = deployments.get("thumbs").await.unwrap();
        let annotations = third.spec.unwrap().template.metadata.unwrap().annotations;
        assert!(
            annotations.is_some_and(|a| a.contains_key("kubectl.kubernetes.io/restartedAt")),
            "no restartedAt annotation"
        );

        // Pods: get by label as JSON, one as YAML, then delete one.
        let pods = Api::<Pod>::namespaced(client.clone(), "default");
        for (name, app) in [("x-1", "x"), ("x-2", "x"), ("y-1", "y")] {
            let labels = json!({"metadata": {"labels": {"app": app}}});
            pods.create(
                &PostParams::default(),
                &pod(name, image, "exec sleep 300", labels),
            )
            .await
            .unwrap();
        }
        let listed: Value = serde_json::from_str(
            &kubectl(&dir.0, &["get", "pods", "-l", "app=x", "-o", "json"]).await,
        )
        .unwrap();
        let mut names: Vec<&str> = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["x-1", "x-2"]);
        let yaml = kubectl(&dir.0, &["get", "pod", "x-1", "-o", "yaml"]).await;
        assert!(
            yaml.contains("kind: Pod") && yaml.contains("name: x-1"),
            "{yaml}"
        );
        let table = kubectl(&dir.0, &["get", "pods"]).await;
        assert!(table.contains("x-1") && table.contains("y-1"), "{table}");

        // Wait for the container, so the delete has one to stop.
        until(&pods, "x-1", |p| phase(p) == "Running").await;
        let container = emu.container_of("default", "x-1").await.unwrap();
        let deleted = kubectl(&dir.0, &["delete", "pod", "x-1"]).await;
        assert!(deleted.contains("pod \"x-1\" deleted"), "{deleted}");
        assert!(
            pods.get_opt("x-1").await.unwrap().is_none(),
            "kubectl returned before the pod was gone"
        );
        assert!(
            !container_exists(&container).await,
            "the container outlived its pod"
        );
    })
    .await;
    emu.shutdown().await;
}
