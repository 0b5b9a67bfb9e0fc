//! The real kubectl against the emulator: `apply` (twice, the second a strategic merge patch),
//! `get -l -o json`, `get -o yaml` and `delete`, with server-side field validation on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flame_k8s_emulator::{Emulator, Options};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use tokio::sync::OnceCell;

const KUBECTL: &str = "/usr/bin/kubectl";
const LIMIT: Duration = Duration::from_secs(120);

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// The same image as `pods.rs` builds: `/bin/sh` as `/app`, with `sleep`, `cat` and `env`.
async fn image() -> &'static str {
    static IMAGE: OnceCell<String> = OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/docker-image.sh");
            let mut contents = std::fs::read(script).unwrap();
            let mut programs = vec!["sleep", "cat", "env"];
            // curl, where the host has it, lets a pod call the API the way incluster() does.
            if std::path::Path::new("/usr/bin/curl").exists() {
                programs.push("curl");
            }
            for program in ["/bin/sh".to_string()]
                .into_iter()
                .chain(programs.iter().map(|p| format!("/usr/bin/{p}")))
            {
                contents.extend(
                    std::fs::read(&program).unwrap_or_else(|e| panic!("reading {program}: {e}")),
                );
            }
            let tag = format!("flame-k8s-emu-test:{:016x}", fnv(&contents));
            let built = tokio::process::Command::new(script)
                .args([tag.as_str(), "/bin/sh"])
                .args(&programs)
                .output()
                .await
                .unwrap_or_else(|e| panic!("running {script}: {e}"));
            assert!(
                built.status.success(),
                "{script} failed: {}",
                String::from_utf8_lossy(&built.stderr)
            );
            tag
        })
        .await
}

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
    tokio::time::timeout(LIMIT, async {
        emu.write_kubeconfig(&dir.0.join("kubeconfig")).unwrap();
        let client = emu.client("default");
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/manifest.yaml");

        // First apply: every object is created, with server-side validation.
        let applied = kubectl(&dir.0, &["apply", "-f", manifest]).await;
        for line in [
            "serviceaccount/app created",
            "role.rbac.authorization.k8s.io/flame-runners created",
            "rolebinding.rbac.authorization.k8s.io/app-flame-runners created",
            "secret/app-config created",
            "deployment.apps/app created",
        ] {
            assert!(applied.contains(line), "{line:?} not in:\n{applied}");
        }
        Api::<ServiceAccount>::namespaced(client.clone(), "default").get("app").await.unwrap();
        Api::<Role>::namespaced(client.clone(), "default").get("flame-runners").await.unwrap();
        Api::<RoleBinding>::namespaced(client.clone(), "default").get("app-flame-runners").await.unwrap();
        let secret = Api::<Secret>::namespaced(client.clone(), "default").get("app-config").await.unwrap();
        assert_eq!(secret.data.unwrap()["API_KEY"].0, b"not-a-real-key");
        assert!(secret.string_data.is_none());
        let deployments = Api::<Deployment>::namespaced(client.clone(), "default");
        let first = deployments.get("app").await.unwrap();
        assert_eq!(first.spec.unwrap().replicas, Some(1));
        assert!(first.metadata.annotations.unwrap().contains_key("kubectl.kubernetes.io/last-applied-configuration"));

        // Unchanged: nothing is written. Changed: a strategic merge patch.
        let unchanged = kubectl(&dir.0, &["apply", "-f", manifest]).await;
        // The Secret is patched every time, as in a real cluster: its stringData is never read back.
        for line in [
            "serviceaccount/app unchanged",
            "role.rbac.authorization.k8s.io/flame-runners unchanged",
            "rolebinding.rbac.authorization.k8s.io/app-flame-runners unchanged",
            "deployment.apps/app unchanged",
        ] {
            assert!(unchanged.contains(line), "{line:?} not in:\n{unchanged}");
        }
        let changed_manifest = dir.0.join("changed.yaml");
        let text = std::fs::read_to_string(manifest).unwrap();
        std::fs::write(&changed_manifest, text.replace("replicas: 1", "replicas: 2").replace("image: app:1", "image: app:2")).unwrap();
        let reapplied = kubectl(&dir.0, &["apply", "-f", changed_manifest.to_str().unwrap()]).await;
        assert!(reapplied.contains("deployment.apps/app configured"), "{reapplied}");
        let second = deployments.get("app").await.unwrap();
        let spec = second.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let containers = spec.template.spec.unwrap().containers;
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0].image.as_deref(), Some("app:2"));
        assert_eq!(containers[0].env.as_ref().unwrap().len(), 2);

        // Pods: get by label as JSON, one as YAML, then delete one.
        let pods = Api::<Pod>::namespaced(client.clone(), "default");
        for (name, app) in [("x-1", "x"), ("x-2", "x"), ("y-1", "y")] {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "main", "image": image, "args": ["-c", "exec sleep 300"]}]}
            })).unwrap();
            pods.create(&PostParams::default(), &pod).await.unwrap();
        }
        let listed: serde_json::Value = serde_json::from_str(&kubectl(&dir.0, &["get", "pods", "-l", "app=x", "-o", "json"]).await).unwrap();
        let mut names: Vec<&str> = listed["items"].as_array().unwrap().iter().map(|p| p["metadata"]["name"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["x-1", "x-2"]);
        let yaml = kubectl(&dir.0, &["get", "pod", "x-1", "-o", "yaml"]).await;
        assert!(yaml.contains("kind: Pod") && yaml.contains("name: x-1"), "{yaml}");
        let table = kubectl(&dir.0, &["get", "pods"]).await;
        assert!(table.contains("x-1") && table.contains("y-1"), "{table}");

        // Wait for the container, so the delete has one to stop.
        let mut events = pods.watch(&WatchParams::default().fields("metadata.name=x-1"), "0").await.unwrap().boxed();
        loop {
            match events.try_next().await.unwrap().expect("the watch ended") {
                WatchEvent::Added(p) | WatchEvent::Modified(p)
                    if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") => break,
                _ => {}
            }
        }
        let container = emu.container_of("default", "x-1").await.unwrap();
        let deleted = kubectl(&dir.0, &["delete", "pod", "x-1"]).await;
        assert!(deleted.contains("pod \"x-1\" deleted"), "{deleted}");
        assert!(pods.get_opt("x-1").await.unwrap().is_none(), "kubectl returned before the pod was gone");
        let docker = bollard::Docker::connect_with_local_defaults().unwrap();
        assert!(docker.inspect_container(&container, None::<bollard::query_parameters::InspectContainerOptions>).await.is_err());
    })
    .await
    .expect("the test took too long");
    emu.shutdown().await;
}
