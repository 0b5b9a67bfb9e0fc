//! The Docker backend on the real engine: the parent and its runners are containers of one image
//! (`flame-test-container-app` with its shared libraries and `sleep`, `FROM scratch`, built by
//! `scripts/docker-image.sh`: nothing can be pulled), on a network of the test's own. Faults are the engine's: `kill`,
//! `network disconnect`.
//!
//! These tests need a running Docker engine, and fail saying so when there is none.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EventMessage, HostConfig, NetworkCreateRequest, NetworkDisconnectRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, KillContainerOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use flame::ErrorKind;
use flame_backend_docker::{DockerBackend, LABEL_PARENT, LABEL_POOL, bollard};
use flame_tests::containers::{
    Control, connect_control, container_ip, engine, hostname, labelled, output, random_id, runs,
    until,
};
use futures::StreamExt;
use serde_json::Value;

/// The label on everything a test run creates (network, parent), valued with the run's id.
const LABEL_RUN: &str = "flame.test.run";
/// How long a whole test may take.
const BOUND: Duration = Duration::from_secs(180);
/// The app every container runs, parent and runners.
const APP: &str = env!("CARGO_BIN_EXE_flame-test-container-app");
/// The parent app's heartbeat, and its runners' failsafe window (5 missed).
const HEARTBEAT: Duration = Duration::from_millis(200);
const FAILSAFE_WINDOW: Duration = Duration::from_millis(1000);

// ---- the engine, the image, a scenario -------------------------------------------------------

/// A parent container on a network of its own, and the connection the test commands it by.
struct Scenario {
    docker: Docker,
    cleanup: Cleanup,
    parent_host: String,
    control: Control,
}

/// Removes what a test made, by ids and labels, even when the test panics: containers (a
/// scenario's parent), the containers labelled with each `(label, value)` (a parent's runners),
/// and a network.
struct Cleanup {
    containers: Vec<String>,
    labels: Vec<(&'static str, String)>,
    network: Option<String>,
}

impl Cleanup {
    /// Removes the containers labelled `label=value`.
    fn labelled(label: &'static str, value: impl Into<String>) -> Cleanup {
        Cleanup {
            containers: Vec::new(),
            labels: vec![(label, value.into())],
            network: None,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let containers = std::mem::take(&mut self.containers);
        let labels = std::mem::take(&mut self.labels);
        let network = self.network.take();
        // Drop may run inside the test's runtime, which cannot be blocked on.
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let docker = engine().await;
                let mut ids = containers;
                for (label, value) in &labels {
                    ids.extend(labelled(&docker, label, value).await);
                }
                for id in &ids {
                    let _ = docker.remove_container(id, Some(force())).await;
                }
                if let Some(network) = &network {
                    let _ = docker.remove_network(network).await;
                }
            });
        });
        let _ = cleaned.join();
    }
}

fn force() -> RemoveContainerOptions {
    RemoveContainerOptions {
        force: true,
        ..Default::default()
    }
}

impl Scenario {
    async fn start(max: usize) -> Scenario {
        Scenario::start_with(max, &[]).await
    }

    /// `start`, with more environment for the parent (its backend settings).
    async fn start_with(max: usize, env: &[String]) -> Scenario {
        let docker = engine().await;
        let image = flame_tests::containers::app_image(APP).await;
        let run = random_id();
        let network = format!("flame-test-{run}");
        let labels = HashMap::from([(LABEL_RUN.to_string(), run.clone())]);
        docker
            .create_network(NetworkCreateRequest {
                name: network.clone(),
                labels: Some(labels.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("creating network {network}: {e}"));
        let mut cleanup = Cleanup {
            containers: Vec::new(),
            labels: Vec::new(),
            network: Some(network.clone()),
        };
        let created = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(format!("flame-test-parent-{run}")),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(image.to_string()),
                    env: Some(
                        [
                            format!("FLAME_TEST_MAX={max}"),
                            format!("FLAME_TEST_HEARTBEAT_MS={}", HEARTBEAT.as_millis()),
                        ]
                        .into_iter()
                        .chain(env.iter().cloned())
                        .collect(),
                    ),
                    labels: Some(labels),
                    host_config: Some(HostConfig {
                        network_mode: Some(network.clone()),
                        binds: Some(vec!["/var/run/docker.sock:/var/run/docker.sock".into()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("creating the parent container: {e}"));
        cleanup.containers.push(created.id.clone());
        cleanup.labels.push((LABEL_PARENT, created.id.clone()));
        docker
            .start_container(
                &created.id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .unwrap_or_else(|e| panic!("starting the parent container: {e}"));
        let ip = container_ip(&docker, &created.id, &network).await;
        let control = connect_control(&docker, &created.id, ip).await;
        Scenario {
            parent_host: hostname(&docker, &created.id).await,
            docker,
            cleanup,
            control,
        }
    }

    fn parent(&self) -> &str {
        &self.cleanup.containers[0]
    }

    fn network(&self) -> &str {
        self.cleanup.network.as_deref().unwrap()
    }

    async fn expect_lost(&mut self, name: &str) {
        self.control.expect_lost(name).await
    }

    async fn ok(&mut self, line: &str) -> Value {
        self.control.ok(line).await
    }

    /// Holds a call as `name` on the only runner, and returns that runner's container once the
    /// call's `sleep` runs in it.
    async fn hold_on_one_runner(&mut self, name: &str) -> String {
        self.ok(&format!("hold {name}")).await;
        let runner = self.only_runner().await;
        until(
            "sleep runs in the runner container",
            Duration::from_secs(30),
            || runs(&self.docker, &runner, "sleep"),
        )
        .await;
        runner
    }

    /// The ids of the runner containers this parent created that still exist.
    async fn runners(&self) -> Vec<String> {
        labelled(&self.docker, LABEL_PARENT, self.parent()).await
    }

    /// Waits until this parent has exactly one runner container, and returns its id.
    async fn only_runner(&self) -> String {
        until("one runner container", Duration::from_secs(30), || async {
            self.runners().await.len() == 1
        })
        .await;
        self.runners().await.remove(0)
    }
}

/// The containers' events (die, kill, destroy, ...) from now on, even those that happen before
/// the stream is first polled: the engine replays them from `since`.
fn events(docker: &Docker, ids: &[String]) -> impl futures::Stream<Item = EventMessage> + use<> {
    let filters = HashMap::from([("container".to_string(), ids.to_vec())]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    docker
        .events(Some(EventsOptions {
            since: Some(format!("{}.{:09}", now.as_secs(), now.subsec_nanos())),
            filters: Some(filters),
            ..Default::default()
        }))
        .filter_map(|event| async move { event.ok() })
}

/// Collects `events` as (action, exit code) until `containers` of them were destroyed; `Err`
/// with what came if that takes longer than `limit`.
async fn until_destroyed(
    events: impl futures::Stream<Item = EventMessage>,
    containers: usize,
    limit: Duration,
) -> Result<Vec<(String, Option<String>)>, Vec<(String, Option<String>)>> {
    let mut events = Box::pin(events);
    let mut seen = Vec::new();
    let all = tokio::time::timeout(limit, async {
        let mut destroyed = 0;
        while let Some(event) = events.next().await {
            let action = event.action.clone().unwrap_or_default();
            let exit_code = event
                .actor
                .as_ref()
                .and_then(|a| a.attributes.as_ref())
                .and_then(|a| a.get("exitCode").cloned());
            destroyed += usize::from(action == "destroy");
            seen.push((action, exit_code));
            if destroyed == containers {
                return;
            }
        }
    })
    .await;
    match all {
        Ok(()) => Ok(seen),
        Err(_) => Err(seen),
    }
}

/// Asserts the containers ended by themselves, through their runners' failsafe (exit code 1:
/// parent lost), and that nothing killed them.
fn assert_ended_by_failsafe(seen: &[(String, Option<String>)]) {
    assert!(
        seen.iter().all(|(action, _)| action != "kill"),
        "a runner container was killed, not ended by its failsafe: {seen:?}"
    );
    let codes: Vec<_> = seen
        .iter()
        .filter(|(action, _)| action == "die")
        .map(|(_, code)| code.as_deref())
        .collect();
    assert!(
        !codes.is_empty() && codes.iter().all(|code| *code == Some("1")),
        "the failsafe exits with 1: {seen:?}"
    );
}

/// The sweep removes the runners of any parent container that is gone, engine-wide: it runs
/// alone, so it cannot take another test's runners (and pass that test for it).
static ENGINE_WIDE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    let _shared = ENGINE_WIDE.read().await;
    tokio::time::timeout(BOUND, test)
        .await
        .expect("the test ran past its bound")
}

/// `bounded`, with no other test of this file running.
async fn alone<F: std::future::Future>(test: F) -> F::Output {
    let _alone = ENGINE_WIDE.write().await;
    tokio::time::timeout(BOUND, test)
        .await
        .expect("the test ran past its bound")
}

// ---- the tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn calls_run_in_runner_containers_and_shutdown_removes_them() {
    bounded(async {
        let mut scenario = Scenario::start(2).await;
        let host = scenario.ok("whoami").await;
        let runner = scenario.only_runner().await;
        assert_eq!(
            host.as_str().unwrap(),
            hostname(&scenario.docker, &runner).await
        );
        assert_ne!(
            host.as_str().unwrap(),
            scenario.parent_host,
            "ran in the parent"
        );
        let inspected = scenario
            .docker
            .inspect_container(
                &runner,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .unwrap();
        let labels = inspected
            .config
            .clone()
            .and_then(|c| c.labels)
            .unwrap_or_default();
        assert_eq!(
            labels.get(LABEL_POOL).map(String::as_str),
            Some("docker-test")
        );
        let parent_image = scenario
            .docker
            .inspect_container(
                scenario.parent(),
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .unwrap()
            .image;
        assert_eq!(
            inspected.image, parent_image,
            "runners boot the parent's own image"
        );
        let limits = inspected.host_config.unwrap_or_default();
        assert_eq!(limits.memory, Some(256 << 20));
        assert_eq!(limits.nano_cpus, Some(500_000_000));
        assert_eq!(limits.network_mode.as_deref(), Some(scenario.network()));
        // The backend's env and the hand-off reach runners; the parent's own env does not.
        let env = inspected
            .config
            .clone()
            .unwrap_or_default()
            .env
            .unwrap_or_default();
        assert!(env.iter().any(|v| v == "FLAME_TEST_ROLE=runner"), "{env:?}");
        assert!(
            env.iter().any(|v| v.starts_with("FLAME_PARENT=")),
            "{env:?}"
        );
        assert!(
            !env.iter().any(|v| v.starts_with("FLAME_TEST_MAX=")),
            "{env:?}"
        );

        scenario.ok("shutdown").await;
        assert!(
            scenario.runners().await.is_empty(),
            "runner containers left after shutdown: {:?}",
            scenario.runners().await
        );
    })
    .await;
}

#[tokio::test]
async fn dropping_a_handle_kills_the_child_in_the_runner_container() {
    bounded(async {
        let mut scenario = Scenario::start(1).await;
        let runner = scenario.hold_on_one_runner("a").await;
        let docker = scenario.docker.clone();
        scenario.ok("drop a").await;
        let took = until(
            "sleep is gone from the runner container",
            Duration::from_secs(10),
            || async { !runs(&docker, &runner, "sleep").await },
        )
        .await;
        eprintln!("child gone {took:?} after the drop");
        assert!(
            runs(&docker, &runner, "app").await,
            "the runner itself stays up"
        );
    })
    .await;
}

#[tokio::test]
async fn a_killed_runner_fails_its_callers_and_is_replaced() {
    bounded(async {
        let mut scenario = Scenario::start(1).await;
        let killed = scenario.hold_on_one_runner("a").await;
        let docker = scenario.docker.clone();
        docker
            .kill_container(&killed, None::<KillContainerOptions>)
            .await
            .unwrap();
        scenario.expect_lost("a").await;

        let host = scenario.ok("whoami").await;
        let replacement = scenario.only_runner().await;
        assert_ne!(replacement, killed);
        assert_eq!(
            host.as_str().unwrap(),
            hostname(&docker, &replacement).await
        );
    })
    .await;
}

#[tokio::test]
async fn a_runner_stopped_by_its_platform_finishes_its_call_and_takes_no_more() {
    bounded(async {
        let mut scenario = Scenario::start(2).await;
        scenario.ok("work a 3").await;
        let stopped = scenario.only_runner().await;
        let docker = scenario.docker.clone();
        until(
            "the call's sleep runs in the runner container",
            Duration::from_secs(30),
            || runs(&docker, &stopped, "sleep"),
        )
        .await;
        let stopped_host = hostname(&docker, &stopped).await;
        // `docker stop -t 10`: SIGTERM, then SIGKILL after 10 s if it is still there.
        let seen = events(&docker, std::slice::from_ref(&stopped));
        let stop = {
            let (docker, id) = (docker.clone(), stopped.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                docker
                    .stop_container(
                        &id,
                        Some(StopContainerOptions {
                            t: Some(10),
                            ..Default::default()
                        }),
                    )
                    .await
                    .unwrap();
                t.elapsed()
            })
        };
        // The call in flight completes.
        scenario.ok("await a").await;
        // A new call goes to another runner.
        let host = scenario.ok("whoami").await;
        assert_ne!(host.as_str().unwrap(), stopped_host);
        // The stopped runner exited by itself once its call was done (status 0), well within
        // the 10 s after which the engine would have killed it (status 137).
        let took = stop.await.unwrap();
        let seen = until_destroyed(seen, 1, Duration::from_secs(30))
            .await
            .unwrap_or_else(|seen| panic!("not removed: {seen:?}"));
        let codes: Vec<_> = seen
            .iter()
            .filter(|(action, _)| action == "die")
            .map(|(_, code)| code.as_deref())
            .collect();
        assert_eq!(codes, [Some("0")], "{seen:?}");
        eprintln!("the stopped runner finished its call and exited {took:?} after docker stop");
        assert!(took < Duration::from_secs(9), "{took:?}");
    })
    .await;
}

#[tokio::test]
async fn runner_containers_get_the_backends_bind_mounts() {
    bounded(async {
        // A directory of the engine's host, as models or a cache would be.
        let dir = std::env::temp_dir().join(format!("flame-test-bind-{}", random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.txt"), "weights v7").unwrap();
        let bind = format!("FLAME_TEST_BIND={}:/models:ro", dir.display());
        let mut scenario = Scenario::start_with(1, &[bind]).await;
        let read = scenario.ok("read /models/model.txt").await;
        assert_eq!(read.as_str(), Some("weights v7"));
        let runner = scenario.only_runner().await;
        let binds = scenario
            .docker
            .inspect_container(
                &runner,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .unwrap()
            .host_config
            .and_then(|h| h.binds)
            .unwrap_or_default();
        assert_eq!(binds, [format!("{}:/models:ro", dir.display())]);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test]
async fn a_partitioned_runner_is_lost_and_exits_by_itself() {
    bounded(async {
        let mut scenario = Scenario::start(1).await;
        let runner = scenario.hold_on_one_runner("a").await;
        let docker = scenario.docker.clone();
        let events = events(&docker, std::slice::from_ref(&runner));
        docker
            .disconnect_network(
                scenario.network(),
                NetworkDisconnectRequest {
                    container: Some(runner.clone()),
                    force: Some(true),
                },
            )
            .await
            .unwrap();
        let cut = Instant::now();
        scenario.expect_lost("a").await;
        let detected = cut.elapsed();

        // The container ends by itself (the backend waits its stop grace before forcing).
        let seen = match until_destroyed(events, 1, Duration::from_secs(30)).await {
            Ok(seen) => seen,
            Err(seen) => panic!(
                "the runner container is still there; events: {seen:?}; its output:\n{}",
                output(&docker, &runner).await
            ),
        };
        let exited = cut.elapsed();
        assert_ended_by_failsafe(&seen);
        eprintln!("partition: lost after {detected:?}, container gone after {exited:?}");
        assert!(scenario.runners().await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_killed_parent_takes_its_runners_with_it() {
    bounded(async {
        let mut scenario = Scenario::start(2).await;
        scenario.ok("hold a").await;
        scenario.ok("hold b").await;
        let docker = scenario.docker.clone();
        let parent = scenario.parent().to_string();
        // Both runners connected and serving: each runs its task's `sleep`.
        until(
            "two runner containers running sleep",
            Duration::from_secs(30),
            || async {
                let runners = labelled(&docker, LABEL_PARENT, &parent).await;
                let mut serving = 0;
                for runner in &runners {
                    serving += usize::from(runs(&docker, runner, "sleep").await);
                }
                serving == 2
            },
        )
        .await;
        let runners = labelled(&docker, LABEL_PARENT, &parent).await;
        let events = events(&docker, &runners);
        docker
            .kill_container(&parent, None::<KillContainerOptions>)
            .await
            .unwrap();
        let killed = Instant::now();
        // No one is left to remove them: they end by themselves.
        let seen = until_destroyed(events, 2, FAILSAFE_WINDOW + Duration::from_secs(10))
            .await
            .unwrap_or_else(|seen| panic!("not both runner containers gone: {seen:?}"));
        let took = killed.elapsed();
        assert_ended_by_failsafe(&seen);
        assert!(labelled(&docker, LABEL_PARENT, &parent).await.is_empty());
        eprintln!("runners gone {took:?} after the parent was killed");
    })
    .await;
}

// ---- the backend's own errors, from a parent on the host -------------------------------------

/// Starts a pool on `backend`, with this test process as the parent, and makes a call that
/// must fail.
async fn failed_call(
    pool: &str,
    backend: DockerBackend,
    boot_timeout: Duration,
) -> (flame::Pool, flame::Error) {
    let pool = flame::Pool::builder(pool)
        .backend(backend)
        .boot_timeout(boot_timeout)
        .start()
        .await
        .unwrap();
    let err = flame::call(&pool, flame_tests::add(1, 2))
        .await
        .expect_err("the call succeeded");
    (pool, err)
}

#[tokio::test]
async fn a_missing_image_is_a_boot_failure_with_the_engines_message() {
    bounded(async {
        engine().await;
        let backend = DockerBackend::builder()
            .image("flame-test-no-such-image:0")
            .build()
            .await
            .unwrap();
        let _cleanup = Cleanup::labelled(LABEL_PARENT, backend.parent_id().to_string());
        let (pool, err) = failed_call("no-image", backend, Duration::from_secs(10)).await;
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        let message = err.to_string();
        assert!(message.contains("No such image"), "{message}");
        assert!(message.contains("build or load it"), "{message}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn gpus_on_an_engine_without_a_gpu_driver_fail_the_boot_with_its_message() {
    bounded(async {
        engine().await;
        let backend = DockerBackend::builder()
            .image(flame_tests::containers::app_image(APP).await)
            .gpus(1)
            .build()
            .await
            .unwrap();
        let _cleanup = Cleanup::labelled(LABEL_PARENT, backend.parent_id().to_string());
        let (pool, err) = failed_call("gpus", backend, Duration::from_secs(10)).await;
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        // The engine's own words: it has no driver for the device request.
        let message = err.to_string();
        eprintln!("{message}");
        assert!(message.contains("device driver"), "{message}");
        pool.shutdown().await;
    })
    .await;
}

/// A backend whose containers run `sleep ARGS` from the test image instead of the app: they
/// never become runners.
async fn sleep_instead_of_the_app(args: &[&str]) -> DockerBackend {
    DockerBackend::builder()
        .image(flame_tests::containers::app_image(APP).await)
        .entrypoint(["/usr/bin/sleep"])
        .cmd(args.iter().copied())
        .stop_grace(Duration::from_millis(200))
        .build()
        .await
        .unwrap()
}

async fn until_no_container_of(docker: &Docker, parent: &str) {
    until(
        "no container of this parent",
        Duration::from_secs(10),
        || async { labelled(docker, LABEL_PARENT, parent).await.is_empty() },
    )
    .await;
}

#[tokio::test]
async fn a_runner_that_never_dials_back_is_removed() {
    bounded(async {
        let docker = engine().await;
        let backend = sleep_instead_of_the_app(&["600"]).await;
        let parent = backend.parent_id().to_string();
        let _cleanup = Cleanup::labelled(LABEL_PARENT, parent.clone());
        let (pool, err) = failed_call("silent", backend, Duration::from_secs(2)).await;
        // The call's wait for a slot ends with the boot window it waited on.
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        // Every container it made was removed when its boot window closed.
        until_no_container_of(&docker, &parent).await;
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_runner_container_that_dies_before_dialing_back_fails_the_boot_with_its_last_words() {
    bounded(async {
        let docker = engine().await;
        // A program that refuses its arguments, as an app refuses a bad config.
        let backend = sleep_instead_of_the_app(&["--no-such-option"]).await;
        let parent = backend.parent_id().to_string();
        let _cleanup = Cleanup::labelled(LABEL_PARENT, parent.clone());
        let (pool, err) = failed_call("dies", backend, Duration::from_secs(20)).await;
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        // The exit code from the engine, the reason from the container's own stderr: it is
        // removed with its logs, so this is the only place the user can read them.
        let message = err.to_string();
        assert!(message.contains("exited with code 1"), "{message}");
        assert!(
            message.contains("its last words: Try '/usr/bin/sleep --help'"),
            "{message}"
        );
        until_no_container_of(&docker, &parent).await;
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_engine_says_so() {
    bounded(async {
        // A socket file nobody listens on: what a stopped daemon leaves behind.
        let path = std::env::temp_dir().join(format!("flame-test-no-engine-{}.sock", random_id()));
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let nowhere =
            Docker::connect_with_unix(path.to_str().unwrap(), 5, bollard::API_DEFAULT_VERSION)
                .unwrap();
        let err = DockerBackend::builder()
            .engine(nowhere)
            .image("whatever")
            .build()
            .await
            .err()
            .expect("built a backend without an engine");
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        let message = err.to_string();
        assert!(message.contains("cannot be reached"), "{message}");
        assert!(message.contains("is the daemon running"), "{message}");
        let _ = std::fs::remove_file(&path);
    })
    .await;
}

#[tokio::test]
async fn the_sweep_removes_runners_whose_parent_is_gone_only() {
    alone(async {
        let docker = engine().await;
        let image = flame_tests::containers::app_image(APP).await;
        let backend = DockerBackend::builder().image(image).build().await.unwrap();
        let run = random_id();
        let _cleanup = Cleanup::labelled(LABEL_RUN, run.clone());
        let make = |labels: Vec<(&str, String)>| {
            let docker = docker.clone();
            let labels: HashMap<String, String> = labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .chain([(LABEL_RUN.to_string(), run.clone())])
                .collect();
            async move {
                let created = docker
                    .create_container(
                        None::<CreateContainerOptions>,
                        ContainerCreateBody {
                            image: Some(image.to_string()),
                            entrypoint: Some(vec!["/usr/bin/sleep".into(), "60".into()]),
                            labels: Some(labels),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                docker
                    .start_container(
                        &created.id,
                        None::<bollard::query_parameters::StartContainerOptions>,
                    )
                    .await
                    .unwrap();
                created.id
            }
        };
        // Two "parents" (containers), one of which is then gone, each with a "runner".
        let live_parent = make(vec![]).await;
        let gone_parent = make(vec![]).await;
        let live_runner = make(vec![(LABEL_PARENT, live_parent.clone())]).await;
        let orphan = make(vec![(LABEL_PARENT, gone_parent.clone())]).await;
        docker
            .remove_container(&gone_parent, Some(force()))
            .await
            .unwrap();

        let sweeping = std::time::Instant::now();
        let removed = backend.sweep_leftovers().await.unwrap();
        // The figure docs/RELIABILITY.md quotes for a deploy's sweep.
        eprintln!("sweep took {:?}", sweeping.elapsed());
        let left = labelled(&docker, LABEL_RUN, &run).await;
        assert!(removed.contains(&orphan), "{removed:?}");
        assert!(!removed.contains(&live_runner), "{removed:?}");
        assert!(
            !left.contains(&orphan) && left.contains(&live_runner),
            "{left:?}"
        );
    })
    .await;
}
