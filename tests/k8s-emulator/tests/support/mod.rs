//! What the test files share: a time limit, the test image, and pods on the local Docker engine.
//!
//! The image is `FROM scratch` with `/bin/sh` as `/app` and `sleep`, `cat`, `env` and `curl` in
//! `/usr/bin`, built by `scripts/docker-image.sh` (nothing can be pulled).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, WatchEvent, WatchParams};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

const LIMIT: Duration = Duration::from_secs(120);

/// `f`, or a panic once it has taken longer than a test may.
pub(crate) async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("the test took too long")
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// Builds the test image once per test binary, tagged by the contents that go into it.
pub(crate) async fn image() -> &'static str {
    static IMAGE: OnceCell<String> = OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            // A pod calls the API with curl, the way kube::Config::incluster() does.
            assert!(
                Path::new("/usr/bin/curl").exists(),
                "/usr/bin/curl is missing (pods call the API with it): apt-get install curl"
            );
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/docker-image.sh");
            let mut contents = std::fs::read(script).unwrap();
            let programs = ["sleep", "cat", "env", "curl"];
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
                .args(programs)
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

pub(crate) fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults().unwrap()
}

pub(crate) async fn container_exists(id: &str) -> bool {
    docker()
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .is_ok()
}

/// A pod labelled `app: x` whose one container runs `sh -c script`, with `extra` merged in.
pub(crate) fn pod(name: &str, image: &str, script: &str, extra: Value) -> Pod {
    let mut pod = json!({
        "metadata": {"name": name, "labels": {"app": "x"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": image, "args": ["-c", script]}],
        },
    });
    merge(&mut pod, &extra);
    serde_json::from_value(pod).unwrap()
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Watches one pod until `done` holds for it; the pod as it then is.
pub(crate) async fn until(pods: &Api<Pod>, name: &str, done: impl Fn(&Pod) -> bool) -> Pod {
    loop {
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(60);
        let mut events = pods.watch(&params, "0").await.unwrap().boxed();
        while let Some(event) = events.try_next().await.unwrap() {
            match event {
                WatchEvent::Added(p) | WatchEvent::Modified(p) if done(&p) => return p,
                WatchEvent::Deleted(p) => panic!("{name} was deleted: {p:?}"),
                WatchEvent::Error(e) => panic!("watch error {e:?}"),
                _ => {}
            }
        }
    }
}

pub(crate) fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}
