//! Docker backend for flame-rt: each runner is a container of the app's own image, on the app's
//! network, started through the Docker Engine API ([`bollard`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), flame::Error> {
//! let pool = flame::Pool::builder("thumbs")
//!     .backend(flame_backend_docker::DockerBackend::builder().memory_mb(512).build().await?)
//!     .max(10)
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Inside a container (with the engine's socket mounted, `-v
//! /var/run/docker.sock:/var/run/docker.sock`), [`DockerBackendBuilder::build`] finds the
//! parent's own container and takes from it everything runners need: the image (by id, so a
//! moved tag cannot split parent and runners), the entrypoint and command, the network, and the
//! parent's address on it, where runners dial back. Outside a container (a developer's machine),
//! name the image; runners then join the default `bridge` network and dial the host at the
//! network's gateway. Every value can be set on the builder.
//!
//! Runners get the hand-off variable flame needs and the `env` you set here; **the parent's own
//! environment is not copied**.
//!
//! Lifecycle: a runner exits by itself when its parent lets it go or goes silent (the failsafe),
//! and `AutoRemove` deletes its container. Beyond that, the backend force-removes every container
//! it created that did not dial back within the boot window, whose runner was lost, or that is
//! still there at pool shutdown — after giving it [`stop_grace`](DockerBackendBuilder::stop_grace)
//! to stop by itself, so a partitioned runner ends through its own failsafe rather than a
//! `SIGKILL`. Containers carry the labels [`LABEL_POOL`], [`LABEL_PARENT`] and [`LABEL_RUNNER`],
//! so [`DockerBackend::sweep_leftovers`] can remove the runners of a parent container that is
//! gone (a previous deploy's, say) while leaving a live sibling instance's alone.
//!
//! Errors from the engine (no such image, engine unreachable, out of resources) reach callers as
//! [`BootFailed`](flame::ErrorKind::BootFailed) with the engine's own message. Runners' stdout
//! and stderr reach the parent's, each line prefixed with the runner id (attached before the
//! container starts, as `AutoRemove` deletes its logs with it); a runner that exits before it
//! dials back fails the boot with its exit code and its last stderr line.
//! `docs/deploy-docker.md` in the repository shows a deployment.

#![warn(missing_docs, unreachable_pub)]

mod engine;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, ListContainersOptions};
use flame::{Backend, BootSpec, Error, ErrorKind, LastWords, RunnerHandle};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::oneshot;

pub use bollard;

use engine::{boot_failed, is_status};

/// The label naming a runner container's pool.
pub const LABEL_POOL: &str = "flame.pool";
/// The label naming the parent that created a runner container (its container id, or a random
/// id when the parent is not in a container).
pub const LABEL_PARENT: &str = "flame.parent";
/// The label naming a runner container's runner id.
pub const LABEL_RUNNER: &str = "flame.runner";

/// Boots runners as Docker containers. Build it with [`DockerBackend::builder`].
#[derive(Clone)]
pub struct DockerBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// None on a runner, where pools run calls in place and never boot.
    docker: Option<Docker>,
    image: String,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    network: String,
    listen: SocketAddr,
    /// The address runners dial (with the listener's port).
    advertise: IpAddr,
    parent_id: String,
    /// The builder's env as `KEY=value`, ready for each create.
    env: Vec<String>,
    /// The builder's labels and this parent's: each runner adds its pool and id.
    labels: HashMap<String, String>,
    memory_bytes: Option<i64>,
    nano_cpus: Option<i64>,
    binds: Vec<String>,
    gpus: Option<i64>,
    stop_grace: Duration,
}

/// Configures a [`DockerBackend`]; see the crate docs for what it detects by itself.
#[derive(Debug)]
pub struct DockerBackendBuilder {
    docker: Option<Docker>,
    image: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    network: Option<String>,
    listen: Option<SocketAddr>,
    parent_id: Option<String>,
    env: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    memory_mb: Option<u64>,
    cpus: Option<f64>,
    binds: Vec<String>,
    gpus: Option<i64>,
    stop_grace: Duration,
}

impl DockerBackend {
    /// A builder that connects to the engine as the `docker` CLI does (`DOCKER_HOST`, else
    /// `/var/run/docker.sock`) and detects the rest from the parent's container.
    pub fn builder() -> DockerBackendBuilder {
        DockerBackendBuilder {
            docker: None,
            image: None,
            entrypoint: None,
            cmd: None,
            network: None,
            listen: None,
            parent_id: None,
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            memory_mb: None,
            cpus: None,
            binds: Vec::new(),
            gpus: None,
            stop_grace: Duration::from_secs(5),
        }
    }

    /// This parent's id in the runners' [`LABEL_PARENT`] (empty on a runner).
    pub fn parent_id(&self) -> &str {
        &self.inner.parent_id
    }

    /// The image runners are created from (empty on a runner).
    pub fn image(&self) -> &str {
        &self.inner.image
    }

    /// The network runners join (empty on a runner).
    pub fn network(&self) -> &str {
        &self.inner.network
    }

    /// Removes the runner containers whose parent container no longer runs (the runners a
    /// previous deploy's parent left behind, say). Returns the ids removed.
    ///
    /// Runners of a parent that is still running are left alone, so instances of one app can
    /// share an engine; so are runners whose parent was not in a container (its liveness cannot
    /// be told), which their own failsafe ends.
    pub async fn sweep_leftovers(&self) -> Result<Vec<String>, Error> {
        let Some(docker) = &self.inner.docker else {
            return Ok(Vec::new());
        };
        let filters = HashMap::from([("label".to_string(), vec![LABEL_PARENT.to_string()])]);
        let listed = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine::error("listing flame's containers", &e))?;
        let mut removed = Vec::new();
        let mut parents: HashMap<String, bool> = HashMap::new();
        for container in listed {
            let parent = container.labels.as_ref().and_then(|l| l.get(LABEL_PARENT));
            let (Some(parent), Some(id)) = (parent, container.id) else {
                continue;
            };
            if *parent == self.inner.parent_id {
                continue;
            }
            let orphaned = match parents.get(parent) {
                Some(orphaned) => *orphaned,
                None => {
                    let orphaned = engine::parent_gone(docker, parent).await?;
                    parents.insert(parent.clone(), orphaned);
                    orphaned
                }
            };
            if orphaned {
                engine::force_remove(docker, &id).await?;
                removed.push(id);
            }
        }
        if !removed.is_empty() {
            tracing::info!(
                count = removed.len(),
                "flame: removed runner containers whose parent is gone"
            );
        }
        Ok(removed)
    }
}

impl DockerBackendBuilder {
    /// The engine client to use instead of the default connection (another socket, TCP with
    /// TLS, a version pinned).
    pub fn engine(mut self, docker: Docker) -> Self {
        self.docker = Some(docker);
        self
    }

    /// The image runners boot: by default the parent container's own; required when the parent
    /// is not in a container.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// The entrypoint runners start with, instead of the parent container's (or the image's).
    pub fn entrypoint(mut self, entrypoint: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.entrypoint = Some(entrypoint.into_iter().map(Into::into).collect());
        self
    }

    /// The command runners start with, instead of the parent container's (or the image's).
    /// Runners only need to run the same program: `#[flame::main]` turns it into a runner.
    pub fn cmd(mut self, cmd: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.cmd = Some(cmd.into_iter().map(Into::into).collect());
        self
    }

    /// The network runners join: by default the parent container's (it must have one), else
    /// `bridge`.
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.network = Some(network.into());
        self
    }

    /// Where the parent listens for runners, instead of its address on the network (or the
    /// network's gateway, outside a container).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// This parent's id in [`LABEL_PARENT`]: by default its container id, else a random one.
    pub fn parent_id(mut self, id: impl Into<String>) -> Self {
        self.parent_id = Some(id.into());
        self
    }

    /// An environment variable for runners (the parent's environment is not copied).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// A label on runner containers, besides flame's own.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// A memory limit per runner container.
    pub fn memory_mb(mut self, memory_mb: u64) -> Self {
        self.memory_mb = Some(memory_mb);
        self
    }

    /// A CPU limit per runner container, such as `0.5` or `2`.
    pub fn cpus(mut self, cpus: f64) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// Mounts a host path or a named volume in every runner container, as `docker run -v` does:
    /// `"/srv/models:/models:ro"`, `"cache:/cache"`. Host paths are the engine's, not the
    /// parent container's.
    pub fn bind(mut self, bind: impl Into<String>) -> Self {
        self.binds.push(bind.into());
        self
    }

    /// Gives each runner container `count` GPUs (`-1`: all), as `docker run --gpus` does; the
    /// engine needs NVIDIA's container toolkit, or the runner fails to boot with its message.
    pub fn gpus(mut self, count: i64) -> Self {
        self.gpus = Some(count);
        self
    }

    /// How long a runner container that is to go gets to stop by itself before it is
    /// force-removed. Default 5 s: more than a runner's failsafe needs after its parent has
    /// declared it lost, since both sides count the same heartbeats.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Connects to the engine and fills in what was not set from the parent's own container.
    ///
    /// On a runner (which runs the app's `main` too) it contacts nothing: a pool there runs
    /// calls in place and never boots, and runner containers have no engine socket.
    ///
    /// An engine that cannot be reached is a [`BootFailed`](ErrorKind::BootFailed) error with
    /// the reason; a value that can be neither detected nor defaulted is a
    /// [`Config`](ErrorKind::Config) error naming the builder method that sets it.
    pub async fn build(self) -> Result<DockerBackend, Error> {
        if flame::parent().is_some() {
            return Ok(DockerBackend::on_a_runner(self.stop_grace));
        }
        if let Some(cpus) = self.cpus.filter(|cpus| !cpus.is_finite() || *cpus <= 0.0) {
            return Err(Error::new(
                ErrorKind::Config,
                format!("cpus must be above zero, not {cpus}"),
            ));
        }
        let docker = engine_connection(self.docker).await?;
        let own = engine::own_container(&docker).await?;

        let image = match (self.image, &own) {
            (Some(image), _) => image,
            (None, Some(own)) => own.image.clone(),
            (None, None) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "the Docker backend needs an image: the parent is not in a container of this \
                     engine, so its own cannot be used (call DockerBackendBuilder::image)",
                ));
            }
        };
        // Runners of the parent's own image run its entrypoint and command; of another image,
        // that image's.
        let own_image = own.as_ref().filter(|own| own.image == image);
        let entrypoint = self
            .entrypoint
            .or_else(|| own_image.and_then(|own| own.entrypoint.clone()));
        let cmd = self
            .cmd
            .or_else(|| own_image.and_then(|own| own.cmd.clone()));
        let network = match self.network {
            Some(network) => network,
            None => own_network(own.as_ref())?,
        };
        // Runners need a real address to dial: the parent's on the network (the gateway outside
        // a container), unless `listen` names one.
        let advertise = match self.listen {
            Some(addr) if !addr.ip().is_unspecified() => addr.ip(),
            _ => parent_address(&docker, own.as_ref(), &network).await?,
        };
        let listen = self.listen.unwrap_or(SocketAddr::new(advertise, 0));
        let parent_id = self
            .parent_id
            .or_else(|| own.as_ref().map(|own| own.id.clone()))
            .unwrap_or_else(flame::__private::random_hex::<8>);
        let env = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut labels: HashMap<String, String> = self.labels.into_iter().collect();
        labels.insert(LABEL_PARENT.into(), parent_id.clone());
        let memory_bytes = self.memory_mb.map(|mb| (mb * 1024 * 1024) as i64);
        let nano_cpus = self.cpus.map(|cpus| (cpus * 1e9) as i64);
        Ok(DockerBackend {
            inner: Arc::new(Inner {
                docker: Some(docker),
                image,
                entrypoint,
                cmd,
                network,
                listen,
                advertise,
                parent_id,
                env,
                labels,
                memory_bytes,
                nano_cpus,
                binds: self.binds,
                gpus: self.gpus,
                stop_grace: self.stop_grace,
            }),
        })
    }
}

impl DockerBackend {
    /// The backend as a runner holds it: it contacts nothing, since a pool there runs calls in
    /// place and never boots.
    fn on_a_runner(stop_grace: Duration) -> DockerBackend {
        DockerBackend {
            inner: Arc::new(Inner {
                docker: None,
                image: String::new(),
                entrypoint: None,
                cmd: None,
                network: String::new(),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: IpAddr::from([127, 0, 0, 1]),
                parent_id: String::new(),
                env: Vec::new(),
                labels: HashMap::new(),
                memory_bytes: None,
                nano_cpus: None,
                binds: Vec::new(),
                gpus: None,
                stop_grace,
            }),
        }
    }
}

/// The engine the builder was given, or the one `DOCKER_HOST` (or the default socket) names,
/// with the API version agreed.
async fn engine_connection(given: Option<Docker>) -> Result<Docker, Error> {
    let docker = match given {
        Some(docker) => docker,
        None => Docker::connect_with_defaults().map_err(|e| match e {
            bollard::errors::Error::SocketNotFoundError(_) => engine::unreachable(&e),
            e => Error::new(
                ErrorKind::Config,
                format!("the Docker engine address (DOCKER_HOST) is not usable: {e}"),
            ),
        })?,
    };
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|e| engine::unreachable(&e))?;
    Ok(docker)
}

/// The network runners join when the builder names none: the parent container's only one, or
/// `bridge` outside a container.
fn own_network(own: Option<&engine::Own>) -> Result<String, Error> {
    let Some(own) = own else {
        return Ok("bridge".to_string());
    };
    match own.networks.as_slice() {
        [(name, _)] => Ok(name.clone()),
        [] => Err(Error::new(
            ErrorKind::Config,
            "the parent's container is on no network runners could join (call \
             DockerBackendBuilder::network)",
        )),
        several => {
            let names: Vec<&str> = several.iter().map(|(n, _)| n.as_str()).collect();
            Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the parent's container is on several networks ({}): say which one \
                     runners join with DockerBackendBuilder::network",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// Where runners dial the parent: its address on `network` in a container, else the
/// network's gateway.
async fn parent_address(
    docker: &Docker,
    own: Option<&engine::Own>,
    network: &str,
) -> Result<IpAddr, Error> {
    let Some(own) = own else {
        return engine::gateway(docker, network).await;
    };
    let on_network = (own.networks.iter())
        .find(|(name, _)| name == network)
        .and_then(|(_, ip)| *ip);
    on_network.ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!(
                "the parent's container has no address on network {network:?}, where runners \
                 dial back (connect it, or call DockerBackendBuilder::listen)"
            ),
        )
    })
}

impl Backend for DockerBackend {
    fn name(&self) -> &str {
        "docker"
    }

    fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    fn advertise_addr(&self, bound: SocketAddr) -> String {
        SocketAddr::new(self.inner.advertise, bound.port()).to_string()
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, Error>> {
        let inner = self.inner.clone();
        async move {
            let (id, (last_words, output_ended)) = inner.create(&spec).await?;
            tracing::debug!(container = %short(&id), runner = spec.runner_id(), "flame: runner container started");
            let handle: Box<dyn RunnerHandle> = Box::new(DockerRunner {
                docker: inner.docker()?.clone(),
                id,
                stop_grace: inner.stop_grace,
                last_words,
                output_ended: Some(output_ended),
            });
            Ok(handle)
        }
        .boxed()
    }
}

impl Inner {
    fn docker(&self) -> Result<&Docker, Error> {
        self.docker.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "a Docker backend built on a runner boots nothing",
            )
        })
    }

    /// What a runner container is made of: the app's image and command, the hand-off in its
    /// environment, the pool's labels, its limits and devices. Removed by the engine when it
    /// exits.
    fn container_body(&self, spec: &BootSpec) -> ContainerCreateBody {
        let (key, value) = spec.handoff_env();
        let mut env = self.env.clone();
        env.push(format!("{key}={value}"));
        let mut labels = self.labels.clone();
        labels.insert(LABEL_POOL.into(), spec.pool().into());
        labels.insert(LABEL_RUNNER.into(), spec.runner_id().into());
        ContainerCreateBody {
            image: Some(self.image.clone()),
            entrypoint: self.entrypoint.clone(),
            cmd: self.cmd.clone(),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(HostConfig {
                auto_remove: Some(true),
                network_mode: Some(self.network.clone()),
                memory: self.memory_bytes,
                nano_cpus: self.nano_cpus,
                binds: (!self.binds.is_empty()).then(|| self.binds.clone()),
                // `--gpus N`: the engine asks its GPU driver (NVIDIA's container toolkit).
                device_requests: self.gpus.map(|count| {
                    vec![DeviceRequest {
                        count: Some(count),
                        capabilities: Some(vec![vec!["gpu".to_string()]]),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn create(
        &self,
        spec: &BootSpec,
    ) -> Result<(String, (LastWords, oneshot::Receiver<()>)), Error> {
        let docker = self.docker()?;
        let body = self.container_body(spec);
        // A parent restarted in the same container counts runners from 1 again, while the
        // previous one's may still be ending: a random tail keeps their names apart.
        let name = container_name(
            &self.parent_id,
            spec.runner_id(),
            &flame::__private::random_hex::<2>(),
        );
        let created = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| {
                let hint = if is_status(&e, 404) {
                    " (images are not pulled: build or load it on this engine first)"
                } else {
                    ""
                };
                boot_failed(
                    format!("creating a runner container from image {}", self.image),
                    &e,
                    hint,
                )
            })?;
        let output = match engine::follow_output(docker, &created.id, spec.runner_id()).await {
            Ok(output) => output,
            Err(e) => {
                let _ = engine::force_remove(docker, &created.id).await;
                return Err(boot_failed(
                    format!("attaching to runner container {}", short(&created.id)),
                    &e,
                    "",
                ));
            }
        };
        if let Err(e) = docker
            .start_container(
                &created.id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            let _ = engine::force_remove(docker, &created.id).await;
            return Err(boot_failed(
                format!(
                    "starting runner container {} on network {}",
                    short(&created.id),
                    self.network
                ),
                &e,
                "",
            ));
        }
        Ok((created.id, output))
    }
}

/// `flame-<parent>-<runner>-<tail>`, readable in `docker ps`, restricted to the characters
/// Docker accepts in a name.
fn container_name(parent_id: &str, runner_id: &str, tail: &str) -> String {
    let parent: String = parent_id.chars().take(12).collect();
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!("flame-{}-{}-{tail}", clean(&parent), clean(runner_id))
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

struct DockerRunner {
    docker: Docker,
    id: String,
    stop_grace: Duration,
    last_words: LastWords,
    /// Resolves when the container's output has ended.
    output_ended: Option<oneshot::Receiver<()>>,
}

impl RunnerHandle for DockerRunner {
    fn describe(&self) -> String {
        format!("container {}", short(&self.id))
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        async move {
            let status = engine::exited(&self.docker, &self.id).await;
            // Its last lines may still be on their way.
            if let Some(ended) = self.output_ended.take() {
                let _ = tokio::time::timeout(Duration::from_millis(500), ended).await;
            }
            self.last_words.after(status)
        }
        .boxed()
    }

    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            let DockerRunner {
                docker,
                id,
                stop_grace,
                ..
            } = *self;
            // The runner stops by itself when told to or when its failsafe fires; waiting for
            // that first lets it drop its tasks (and their children) instead of being killed.
            if engine::removed_within(&docker, &id, stop_grace).await {
                return;
            }
            if let Err(e) = engine::force_remove(&docker, &id).await {
                tracing::warn!(container = %short(&id), error = %e, "flame: could not remove a runner container");
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::container_name;

    #[test]
    fn container_names_keep_to_dockers_alphabet() {
        assert_eq!(
            container_name("0123456789abcdef", "thumbs/ü 3", "a1b2"),
            "flame-0123456789ab-thumbs---3-a1b2"
        );
    }
}
