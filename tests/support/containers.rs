//! Containers on the local Docker engine, for the tests of the container backends (Docker,
//! Kubernetes): the app's image, and waiting on what the engine shows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bollard::query_parameters::ListContainersOptions;
use flame_backend_docker::bollard::{self, Docker};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

/// The repository of the container app's images.
const APP_REPOSITORY: &str = "flame-test-container-app";

/// The local engine, or a panic saying how to get one.
pub async fn engine() -> Docker {
    let connected = match Docker::connect_with_defaults() {
        Ok(docker) => docker.negotiate_version().await,
        Err(e) => Err(e),
    };
    connected.unwrap_or_else(|e| {
        panic!(
            "these tests need a running Docker engine (`docker info` must work; start dockerd): {e}"
        )
    })
}

/// The image of the container app (`flame-test-container-app`, whose path only a test binary
/// knows: pass `env!("CARGO_BIN_EXE_flame-test-container-app")`), built once per test binary
/// with the script the deployment docs use (`scripts/docker-image.sh`: `FROM scratch`, the app
/// as `/app`, `sleep` in `/usr/bin`, and the libraries `ldd` names), tagged by the app's
/// contents.
pub async fn app_image(app: &'static str) -> &'static str {
    static IMAGE: OnceCell<String> = OnceCell::const_new();
    IMAGE.get_or_init(|| build_image(app)).await
}

async fn build_image(app: &str) -> String {
    let contents = std::fs::read(app).unwrap_or_else(|e| panic!("reading {app}: {e}"));
    let tag = format!("{APP_REPOSITORY}:{:016x}", fnv(&contents));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/docker-image.sh");
    let built = tokio::process::Command::new(script)
        .args([tag.as_str(), app, "sleep"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        built.status.success(),
        "{script} failed ({}): {}",
        built.status,
        String::from_utf8_lossy(&built.stderr)
    );
    // Earlier builds of the app are of no further use (an image a container still uses stays).
    let docker = engine().await;
    let filters = HashMap::from([("reference".to_string(), vec![APP_REPOSITORY.to_string()])]);
    let images = docker
        .list_images(Some(bollard::query_parameters::ListImagesOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default();
    for image in images {
        if !image.repo_tags.contains(&tag) {
            let _ = docker
                .remove_image(
                    &image.id,
                    None::<bollard::query_parameters::RemoveImageOptions>,
                    None,
                )
                .await;
        }
    }
    tag
}

/// FNV-1a: a content tag that needs no hashing crate.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// 12 random hex digits, to keep one run's names and labels apart from another's.
pub fn random_id() -> String {
    flame::__private::random_hex::<6>()
}

/// The ids of the containers, running or not, with `label=value`.
pub async fn labelled(docker: &Docker, label: &str, value: &str) -> Vec<String> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{label}={value}")])]);
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// What the engine says of a container that must exist.
pub async fn inspect(docker: &Docker, id: &str) -> bollard::models::ContainerInspectResponse {
    docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .unwrap_or_else(|e| panic!("inspecting container {id}: {e}"))
}

/// The container's address on `network`.
pub async fn container_ip(docker: &Docker, id: &str, network: &str) -> IpAddr {
    let ip = inspect(docker, id)
        .await
        .network_settings
        .and_then(|n| n.networks)
        .and_then(|mut n| n.remove(network))
        .and_then(|e| e.ip_address)
        .unwrap_or_default();
    ip.parse()
        .unwrap_or_else(|_| panic!("container {id} has no address on {network}"))
}

/// The container's hostname.
pub async fn hostname(docker: &Docker, id: &str) -> String {
    inspect(docker, id)
        .await
        .config
        .and_then(|c| c.hostname)
        .unwrap_or_default()
}

/// The connection a test commands the container app's parent by (`tests/bin/container_app.rs`
/// lists the commands).
pub struct Control(BufReader<TcpStream>);

impl Control {
    /// Sends one command; its answer's `ok`, or the error's kind and message.
    pub async fn command(&mut self, line: &str) -> Result<Value, (String, String)> {
        let stream = self.0.get_mut();
        stream
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        self.0.read_line(&mut answer).await.unwrap();
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("the parent's answer to {line:?} is {answer:?}: {e}"));
        match answer.get("ok") {
            Some(ok) => Ok(ok.clone()),
            None => Err((
                answer["kind"].as_str().unwrap_or("").to_string(),
                answer["err"].as_str().unwrap_or("").to_string(),
            )),
        }
    }

    /// Awaits the call held as `name`, which must have failed with `RunnerLost`.
    pub async fn expect_lost(&mut self, name: &str) {
        let (kind, message) = self
            .command(&format!("await {name}"))
            .await
            .expect_err("the call survived");
        assert_eq!(kind, "RunnerLost", "{message}");
    }

    /// Sends one command whose answer must be `ok`, and returns that.
    pub async fn ok(&mut self, line: &str) -> Value {
        match self.command(line).await {
            Ok(value) => value,
            Err((kind, message)) => panic!("{line}: {kind}: {message}"),
        }
    }
}

/// Connects to the parent's control port once the parent says it listens (following its
/// output); if it exits first, or stays silent, fails with what it printed.
pub async fn connect_control(docker: &Docker, id: &str, ip: IpAddr) -> Control {
    let mut output = logs(docker, id, true);
    let mut printed = String::new();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = output.next().await {
            printed.push_str(&chunk);
            if printed.contains("ready on port") {
                return true;
            }
        }
        false
    })
    .await;
    match ready {
        Ok(true) => Control(BufReader::new(
            TcpStream::connect((ip, 7000))
                .await
                .unwrap_or_else(|e| panic!("the parent is ready but refuses commands: {e}")),
        )),
        _ => panic!("the parent container never took commands; its output:\n{printed}"),
    }
}

/// The container's output: what it printed so far, and, with `follow`, until it exits.
pub fn logs(
    docker: &Docker,
    id: &str,
    follow: bool,
) -> impl futures::Stream<Item = String> + use<> {
    let options = bollard::query_parameters::LogsOptions {
        follow,
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    docker
        .logs(id, Some(options))
        .take_while(|chunk| std::future::ready(chunk.is_ok()))
        .filter_map(|chunk| std::future::ready(chunk.ok().map(|c| c.to_string())))
}

/// What the container printed so far.
pub async fn output(docker: &Docker, id: &str) -> String {
    logs(docker, id, false).collect().await
}

/// Polls the engine until `check` holds, for at most `limit`; returns how long it took.
pub async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Whether a process running `name` is in the container.
pub async fn runs(docker: &Docker, id: &str, name: &str) -> bool {
    let top = docker
        .top_processes(id, None::<bollard::query_parameters::TopOptions>)
        .await;
    let Ok(top) = top else { return false };
    top.processes
        .unwrap_or_default()
        .iter()
        .any(|row| row.iter().any(|cell| cell.contains(name)))
}
