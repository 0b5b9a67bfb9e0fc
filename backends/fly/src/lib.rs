//! Fly Machines backend for flame-rt: each runner is a new Fly Machine booted from the image the
//! parent runs, in the parent's region, dialing back to the parent over Fly's private network
//! (6PN).
//!
//! ```no_run
//! # async fn run() -> Result<(), flame::Error> {
//! let pool = flame::Pool::builder("thumbs")
//!     .backend(flame_backend_fly::FlyBackend::builder().memory_mb(1024).build()?)
//!     .max(10)
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Configuration comes from the environment Fly gives every Machine (`FLY_APP_NAME`,
//! `FLY_IMAGE_REF`, `FLY_REGION`, `FLY_PRIVATE_IP`, `FLY_MACHINE_ID`) and the API token from
//! `FLY_API_TOKEN` (a secret: `fly secrets set FLY_API_TOKEN="$(fly tokens create deploy)"`: an
//! app-scoped token, the least one that may create and delete the app's Machines; a
//! `machine-exec` token only runs commands on existing Machines);
//! every value can be set on the builder. A missing one is an error naming the variable.
//!
//! Runners get the hand-off variable flame needs and the `env` you set here; **the parent's own
//! environment is not copied** (Fly secrets reach every Machine of the app anyway).
//!
//! Lifecycle: a runner exits by itself when its parent lets it go or disappears, and
//! `auto_destroy` removes its Machine. Beyond that, this backend deletes (`?force=true`) every
//! Machine it created that did not dial back within the boot window, whose runner was lost, or
//! that is still there at pool shutdown; and Machines are tagged in `metadata` with the pool, the
//! runner, the parent's Machine id and version and the parent process, so
//! [`FlyBackend::sweep_leftovers`] can find and destroy the Machines of a parent that is gone
//! (Elixir FLAME's issue #49: runners orphaned by deploys) while leaving those of the app's other
//! live web Machines alone.
//!
//! Create requests that Fly answers with 429 (rate limit), 412, 409 or 422 (capacity, conflicts)
//! are retried with backoff within the boot window; then the call fails with
//! [`BootFailed`](flame::ErrorKind::BootFailed) and Fly's message. `docs/deploy-fly.md` in the
//! repository shows a deployment.

#![warn(missing_docs, unreachable_pub)]

mod api;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use flame::{Backend, BootSpec, Error, ErrorKind, RunnerHandle};
use futures::FutureExt;
use futures::future::BoxFuture;

pub use api::{CreateMachine, Guest, Machine, MachineConfig, MachineInit, Mount, RestartPolicy};

/// Metadata keys on the Machines this backend creates.
pub const META_POOL: &str = "flame_pool";
/// The id of the parent (its Fly Machine id) that created the Machine.
pub const META_PARENT: &str = "flame_parent";
/// The runner id.
pub const META_RUNNER: &str = "flame_runner";
/// The parent Machine's version when it created the Machine (`FLY_MACHINE_VERSION`): a deploy
/// gives the parent a new one, and its previous process's runners are then orphans.
pub const META_PARENT_VERSION: &str = "flame_parent_version";
/// The parent process that created the Machine (random per process): a parent restarted on the
/// same Machine and version knows its earlier process's runners by it.
pub const META_PARENT_INSTANCE: &str = "flame_parent_instance";

/// Boots runners as Fly Machines. Build it with [`FlyBackend::builder`].
#[derive(Clone)]
pub struct FlyBackend {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    host: String,
    app: String,
    token: String,
    image: String,
    region: Option<String>,
    parent_id: String,
    parent_version: Option<String>,
    parent_instance: String,
    listen: SocketAddr,
    guest: Guest,
    env: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
    mounts: Vec<Mount>,
    init: Option<MachineInit>,
    boot_timeout: Duration,
    retry_backoff: Duration,
}

/// Configures a [`FlyBackend`]; starts from the environment of a Fly Machine.
#[derive(Debug, Clone)]
pub struct FlyBackendBuilder {
    host: String,
    app: Option<String>,
    token: Option<String>,
    image: Option<String>,
    region: Option<String>,
    parent_id: Option<String>,
    parent_version: Option<String>,
    parent_instance: Option<String>,
    private_ip: Option<String>,
    listen: Option<SocketAddr>,
    guest: Guest,
    env: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
    mounts: Vec<Mount>,
    init: Option<MachineInit>,
    boot_timeout: Duration,
    retry_backoff: Duration,
}

impl FlyBackend {
    /// A builder with every value Fly's environment gives (see the crate docs).
    pub fn builder() -> FlyBackendBuilder {
        FlyBackend::builder_from(|name| std::env::var(name).ok())
    }

    /// A builder whose `FLY_*` values come from `vars` instead of this process's environment.
    pub fn builder_from(vars: impl Fn(&str) -> Option<String>) -> FlyBackendBuilder {
        let var = |name: &str| vars(name).filter(|v| !v.is_empty());
        FlyBackendBuilder {
            host: "https://api.machines.dev".to_string(),
            app: var("FLY_APP_NAME"),
            token: var("FLY_API_TOKEN"),
            image: var("FLY_IMAGE_REF"),
            region: var("FLY_REGION"),
            parent_id: var("FLY_MACHINE_ID"),
            parent_version: var("FLY_MACHINE_VERSION"),
            parent_instance: None,
            private_ip: var("FLY_PRIVATE_IP"),
            listen: None,
            guest: Guest::default(),
            env: BTreeMap::new(),
            metadata: BTreeMap::new(),
            mounts: Vec::new(),
            init: None,
            boot_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(1),
        }
    }

    /// This parent's id in the Machines' metadata.
    pub fn parent_id(&self) -> &str {
        &self.inner.parent_id
    }

    /// Destroys the runner Machines whose parent is verifiably gone, and returns their ids:
    /// runners of an earlier process of this parent (a restart: same Machine, another process),
    /// and runners of another parent Machine that no longer runs (destroyed, stopped, or
    /// redeployed: its version changed). Runners of other live parents — a Fly app usually runs
    /// several web Machines, each a parent — are left alone. Runners stop by themselves anyway
    /// once their parent is gone (the failsafe); sweeping at start frees them sooner.
    pub async fn sweep_leftovers(&self) -> Result<Vec<String>, Error> {
        let machines = self.inner.list().await?;
        // Each other parent is looked up once per sweep.
        let mut parents: HashMap<String, Option<Machine>> = HashMap::new();
        let mut destroyed = Vec::new();
        for machine in machines {
            let meta = &machine.config.metadata;
            let Some(parent) = meta.get(META_PARENT) else {
                continue;
            };
            let orphan = if *parent == self.inner.parent_id {
                meta.get(META_PARENT_INSTANCE)
                    .is_some_and(|instance| *instance != self.inner.parent_instance)
            } else {
                if !parents.contains_key(parent) {
                    let found = self.inner.get(parent).await?;
                    parents.insert(parent.clone(), found);
                }
                match &parents[parent] {
                    None => true,
                    Some(p)
                        if matches!(
                            p.state.as_str(),
                            "stopped" | "suspended" | "destroying" | "destroyed"
                        ) =>
                    {
                        true
                    }
                    Some(p) => meta
                        .get(META_PARENT_VERSION)
                        .is_some_and(|v| !p.instance_id.is_empty() && *v != p.instance_id),
                }
            };
            if orphan {
                self.inner.destroy(&machine.id).await?;
                destroyed.push(machine.id);
            }
        }
        if !destroyed.is_empty() {
            tracing::info!(
                count = destroyed.len(),
                "flame: destroyed runner Machines whose parent is gone"
            );
        }
        Ok(destroyed)
    }
}

impl FlyBackendBuilder {
    /// The Machines API, `https://api.machines.dev` by default (`http://_api.internal:4280`
    /// inside 6PN also works).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into().trim_end_matches('/').to_string();
        self
    }

    /// This parent Machine's version (`FLY_MACHINE_VERSION`), tagged on its runners so a sweep
    /// can tell they belong to a deploy that is gone.
    pub fn parent_version(mut self, version: impl Into<String>) -> Self {
        self.parent_version = Some(version.into());
        self
    }

    /// This parent process's id, tagged on its runners (random per process by default).
    pub fn parent_instance(mut self, instance: impl Into<String>) -> Self {
        self.parent_instance = Some(instance.into());
        self
    }

    /// Mounts a Fly Volume in every runner Machine (a Volume attaches to one Machine at a
    /// time: this suits pools of one runner, or use `init` to mount per runner).
    pub fn mount(mut self, volume: impl Into<String>, path: impl Into<String>) -> Self {
        self.mounts.push(Mount {
            volume: volume.into(),
            path: path.into(),
        });
        self
    }

    /// Gives each runner Machine `count` GPUs of `kind` (`a10`, `l40s`, `a100-pcie-40gb`,
    /// `a100-sxm4-80gb`; GPUs exist in a few regions only, see Fly's GPU docs).
    pub fn gpus(mut self, kind: impl Into<String>, count: u32) -> Self {
        self.guest.gpu_kind = Some(kind.into());
        self.guest.gpus = Some(count);
        self
    }

    /// Overrides what the runner Machine's init runs (the image's entrypoint and command by
    /// default, which is the app itself: a runner must run the same app).
    pub fn init(mut self, init: MachineInit) -> Self {
        self.init = Some(init);
        self
    }

    /// The app the runners belong to (`FLY_APP_NAME`).
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = Some(app.into());
        self
    }

    /// The API token (`FLY_API_TOKEN`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The image runners boot (`FLY_IMAGE_REF`: the parent's own).
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// The region runners boot in (`FLY_REGION`: the parent's).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// This parent's id in the runners' metadata (`FLY_MACHINE_ID`).
    pub fn parent_id(mut self, id: impl Into<String>) -> Self {
        self.parent_id = Some(id.into());
        self
    }

    /// The parent's 6PN address (`FLY_PRIVATE_IP`), where runners dial back.
    pub fn private_ip(mut self, ip: impl Into<String>) -> Self {
        self.private_ip = Some(ip.into());
        self
    }

    /// Where the parent listens for runners, instead of `[FLY_PRIVATE_IP]:0`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// `shared` (default) or `performance`.
    pub fn cpu_kind(mut self, kind: impl Into<String>) -> Self {
        self.guest.cpu_kind = kind.into();
        self
    }

    /// CPUs per runner (default 1).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.guest.cpus = cpus;
        self
    }

    /// Memory per runner, a multiple of 256 (default 256).
    pub fn memory_mb(mut self, memory_mb: u32) -> Self {
        self.guest.memory_mb = memory_mb;
        self
    }

    /// A GPU kind, such as `a100-pcie-40gb`.
    pub fn gpu_kind(mut self, kind: impl Into<String>) -> Self {
        self.guest.gpu_kind = Some(kind.into());
        self
    }

    /// An environment variable for runners (the parent's environment is not copied).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Metadata on runner Machines, besides flame's own tags.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// How long create requests are retried (rate limits, capacity). Default 30 s; give the
    /// pool's `boot_timeout` at least as much.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// The first pause before retrying a create; it doubles each time, up to 8 s. Default 1 s
    /// (Fly allows about one create per second).
    pub fn retry_backoff(mut self, backoff: Duration) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// Checks the configuration: a missing value is a [`Config`](ErrorKind::Config) error that
    /// names its variable.
    pub fn build(self) -> Result<FlyBackend, Error> {
        let required = |value: Option<String>, var: &str, setter: &str| {
            value.ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "the Fly backend needs {var} (set on every Fly Machine; elsewhere set it \
                         or call FlyBackendBuilder::{setter})"
                    ),
                )
            })
        };
        let app = required(self.app, "FLY_APP_NAME", "app")?;
        let token = required(self.token, "FLY_API_TOKEN", "token")?;
        let image = required(self.image, "FLY_IMAGE_REF", "image")?;
        if self.guest.memory_mb == 0 || self.guest.memory_mb % 256 != 0 {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "memory_mb must be a multiple of 256, not {}",
                    self.guest.memory_mb
                ),
            ));
        }
        let listen = match (self.listen, &self.private_ip) {
            (Some(addr), _) => addr,
            (None, Some(ip)) => {
                let ip: IpAddr = ip.parse().map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!("FLY_PRIVATE_IP {ip:?} is not an IP address: {e}"),
                    )
                })?;
                SocketAddr::new(ip, 0)
            }
            (None, None) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "the Fly backend needs FLY_PRIVATE_IP, the parent's 6PN address runners dial \
                     back to (set on every Fly Machine; elsewhere call FlyBackendBuilder::listen)",
                ));
            }
        };
        let parent_id = self
            .parent_id
            .unwrap_or_else(flame::__private::random_hex::<8>);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::new(ErrorKind::Config, format!("HTTP client: {e}")))?;
        Ok(FlyBackend {
            inner: Arc::new(Inner {
                http,
                host: self.host,
                app,
                token,
                image,
                region: self.region,
                parent_id,
                parent_version: self.parent_version,
                parent_instance: self.parent_instance.unwrap_or_else(process_instance),
                listen,
                guest: self.guest,
                env: self.env,
                metadata: self.metadata,
                mounts: self.mounts,
                init: self.init,
                boot_timeout: self.boot_timeout,
                retry_backoff: self.retry_backoff,
            }),
        })
    }
}

/// This process's id among the parents (random, fixed for the process's life).
fn process_instance() -> String {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(flame::__private::random_hex::<8>)
        .clone()
}

impl Backend for FlyBackend {
    fn name(&self) -> &str {
        "fly"
    }

    fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    fn advertise_addr(&self, bound: SocketAddr) -> String {
        if bound.ip().is_unspecified() {
            // Bound to every address: runners need a real one.
            return SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bound.port()).to_string();
        }
        bound.to_string()
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, Error>> {
        let inner = self.inner.clone();
        async move {
            let machine = inner.create(&spec).await?;
            tracing::info!(machine = %machine.id, runner = spec.runner_id(), "flame: fly machine created");
            let handle: Box<dyn RunnerHandle> = Box::new(FlyRunner {
                inner,
                id: machine.id,
            });
            Ok(handle)
        }
        .boxed()
    }
}

impl Inner {
    fn url(&self, path: &str) -> String {
        format!("{}/v1/apps/{}/machines{path}", self.host, self.app)
    }

    async fn create(&self, spec: &BootSpec) -> Result<Machine, Error> {
        let (key, value) = spec.handoff_env();
        let mut env = self.env.clone();
        env.insert(key.to_string(), value.to_string());
        let mut metadata = self.metadata.clone();
        metadata.insert(META_POOL.into(), spec.pool().into());
        metadata.insert(META_PARENT.into(), self.parent_id.clone());
        metadata.insert(META_PARENT_INSTANCE.into(), self.parent_instance.clone());
        if let Some(version) = &self.parent_version {
            metadata.insert(META_PARENT_VERSION.into(), version.clone());
        }
        metadata.insert(META_RUNNER.into(), spec.runner_id().into());
        let body = CreateMachine {
            name: Some(spec.runner_id().to_string()),
            region: self.region.clone(),
            config: MachineConfig {
                image: self.image.clone(),
                env,
                guest: Some(self.guest.clone()),
                auto_destroy: Some(true),
                restart: Some(RestartPolicy {
                    policy: "no".into(),
                }),
                metadata,
                mounts: self.mounts.clone(),
                init: self.init.clone(),
            },
        };
        let deadline = tokio::time::Instant::now() + self.boot_timeout;
        let mut backoff =
            flame::__private::Backoff::new(self.retry_backoff, Duration::from_secs(8));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let response = self
                .http
                .post(self.url(""))
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await
                .map_err(|e| boot_failed(format!("creating a Fly Machine: {e}")))?;
            let status = response.status();
            if status.is_success() {
                return response
                    .json::<Machine>()
                    .await
                    .map_err(|e| boot_failed(format!("Fly's create response: {e}")));
            }
            let message = api::error_message(response).await;
            let retryable = matches!(status.as_u16(), 409 | 412 | 422 | 429);
            if !retryable || tokio::time::Instant::now() + backoff.peek() > deadline {
                return Err(boot_failed(format!(
                    "Fly refused to create a Machine for {} after {attempts} attempt(s): {} {message}",
                    spec.runner_id(),
                    status.as_u16()
                )));
            }
            let pause = backoff.step();
            tracing::debug!(status = status.as_u16(), %message, ?pause, "flame: fly create refused; retrying");
            tokio::time::sleep(pause).await;
        }
    }

    async fn destroy(&self, id: &str) -> Result<(), Error> {
        let response = self
            .http
            .delete(self.url(&format!("/{id}?force=true")))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("destroying Fly Machine {id}: {e}")))?;
        match response.status().as_u16() {
            200..=299 | 404 => Ok(()),
            status => Err(Error::new(
                ErrorKind::Io,
                format!(
                    "destroying Fly Machine {id}: {status} {}",
                    api::error_message(response).await
                ),
            )),
        }
    }

    /// One Machine, `None` if Fly has no such Machine.
    async fn get(&self, id: &str) -> Result<Option<Machine>, Error> {
        let response = self
            .http
            .get(self.url(&format!("/{id}")))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("looking up Fly Machine {id}: {e}")))?;
        match response.status().as_u16() {
            404 => Ok(None),
            200..=299 => response.json().await.map(Some).map_err(|e| {
                Error::new(ErrorKind::Io, format!("Fly's answer for Machine {id}: {e}"))
            }),
            status => Err(Error::new(
                ErrorKind::Io,
                format!(
                    "looking up Fly Machine {id}: {status} {}",
                    api::error_message(response).await
                ),
            )),
        }
    }

    async fn list(&self) -> Result<Vec<Machine>, Error> {
        let response = self
            .http
            .get(self.url(""))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("listing Fly Machines: {e}")))?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "listing Fly Machines: {status} {}",
                    api::error_message(response).await
                ),
            ));
        }
        response
            .json()
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("Fly's machine list: {e}")))
    }
}

fn boot_failed(message: String) -> Error {
    Error::new(ErrorKind::BootFailed, message)
}

struct FlyRunner {
    inner: Arc<Inner>,
    id: String,
}

impl RunnerHandle for FlyRunner {
    fn describe(&self) -> String {
        format!("fly machine {}", self.id)
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        // The runner's connection tells the pool when it is gone; the API would only add polling.
        futures::future::pending().boxed()
    }

    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            if let Err(e) = self.inner.destroy(&self.id).await {
                tracing::warn!(machine = %self.id, error = %e, "flame: could not destroy a fly machine");
            }
        }
        .boxed()
    }
}
