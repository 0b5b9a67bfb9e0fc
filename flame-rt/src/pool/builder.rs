//! `PoolBuilder`: every knob of a pool, its default, and the checks made before anything boots.

use std::sync::Arc;
use std::time::Duration;

use super::{Pool, Shared};
use crate::backend::{Backend, LocalBackend, ProcessBackend};
use crate::error::{Error, ErrorKind};
use crate::hooks::{GrowEnd, GrowStart, Hooks, Shrink};
use crate::parent::parent;
use crate::task::registry;

/// The settings fixed at start. `min` and `max` live in the pool's state: they can change at
/// run time.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) max_concurrency: usize,
    pub(crate) max_payload: usize,
    pub(crate) idle_shutdown_after: Option<Duration>,
    pub(crate) min_idle_shutdown_after: Option<Duration>,
    pub(crate) boot_timeout: Duration,
    pub(crate) timeout: Option<Duration>,
    pub(crate) single_use: bool,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) cancel_grace: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_miss_limit: u32,
    pub(crate) prewarm_at: Option<f64>,
    pub(crate) placement: Placement,
    #[cfg(feature = "tls")]
    pub(crate) tls: bool,
}

/// Where a pool places a call among its runners with a free slot; see
/// [`PoolBuilder::placement`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// The runner with the fewest calls: spreads the load (the default).
    #[default]
    LeastLoaded,
    /// The runner with the most calls that still has a free slot (the oldest among equals):
    /// keeps the fewest runners busy, so the others reach `idle_shutdown_after` (Elixir FLAME
    /// users asked for this to scale in under steady light traffic).
    Pack,
}

/// Configures and starts a [`Pool`]; from [`Pool::builder`].
///
/// | knob | default | meaning |
/// |---|---|---|
/// | [`backend`](Self::backend) | [`ProcessBackend`] | how runners are booted |
/// | [`min`](Self::min) | 0 | runners kept alive; booted by `start` |
/// | [`max`](Self::max) | 1 | most runners at once, booting and exiting ones included |
/// | [`max_concurrency`](Self::max_concurrency) | 100 (1 with `single_use`) | most calls one runner runs at once |
/// | [`idle_shutdown_after`](Self::idle_shutdown_after) | 30 s | a runner above `min` idle this long stops |
/// | [`min_idle_shutdown_after`](Self::min_idle_shutdown_after) | never | a `min` runner idle this long stops too |
/// | [`boot_timeout`](Self::boot_timeout) | 30 s | boot until handshake; also the longest wait for a slot of a call without timeout |
/// | [`timeout`](Self::timeout) | none | default deadline of every call |
/// | [`single_use`](Self::single_use) | false | each runner serves one call, then exits |
/// | [`shutdown_timeout`](Self::shutdown_timeout) | 30 s | how long [`Pool::shutdown`] waits for calls in flight |
/// | [`cancel_grace`](Self::cancel_grace) | 5 s | a cancelled call still running this long gets its runner recycled |
/// | [`max_payload`](Self::max_payload) | 1 GiB | largest encoded argument list or result of one call, or channel message |
/// | [`prewarm_at`](Self::prewarm_at) | off | boot the next runner early at this utilisation |
/// | [`placement`](Self::placement) | least loaded | which runner with a free slot a call goes to |
/// | `tls` (feature `tls`) | off | encrypt runner connections, parent certificate pinned by fingerprint |
/// | [`heartbeat_interval`](Self::heartbeat_interval) | 1 s | how often both sides say they are alive |
/// | [`heartbeat_miss_limit`](Self::heartbeat_miss_limit) | 5 | silent intervals before the other side is lost |
#[must_use = "a PoolBuilder does nothing until .start().await"]
pub struct PoolBuilder {
    name: String,
    backend: Option<Arc<dyn Backend>>,
    max_concurrency_set: bool,
    min: usize,
    max: usize,
    config: Config,
    hooks: Hooks,
}

impl PoolBuilder {
    pub(crate) fn new(name: String) -> PoolBuilder {
        PoolBuilder {
            name,
            backend: None,
            max_concurrency_set: false,
            min: 0,
            max: 1,
            config: Config {
                max_concurrency: 100,
                max_payload: 1 << 30,
                idle_shutdown_after: Some(Duration::from_secs(30)),
                min_idle_shutdown_after: None,
                boot_timeout: Duration::from_secs(30),
                timeout: None,
                single_use: false,
                shutdown_timeout: Duration::from_secs(30),
                cancel_grace: Duration::from_secs(5),
                heartbeat_interval: Duration::from_secs(1),
                heartbeat_miss_limit: 5,
                prewarm_at: None,
                placement: Placement::LeastLoaded,
                #[cfg(feature = "tls")]
                tls: false,
            },
            hooks: Hooks::default(),
        }
    }

    /// The backend that boots runners. Default: [`ProcessBackend::new()`].
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// Runners kept alive at all times: booted by [`start`](PoolBuilder::start), and booted
    /// again if one dies. Default 0.
    pub fn min(mut self, min: usize) -> Self {
        self.min = min;
        self
    }

    /// The most runners the pool may have at once, counting runners still booting and runners
    /// not yet confirmed gone. Default 1.
    pub fn max(mut self, max: usize) -> Self {
        self.max = max;
        self
    }

    /// The most calls one runner runs at once. Default 100.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.config.max_concurrency = n;
        self.max_concurrency_set = true;
        self
    }

    /// A runner above `min` with no calls for this long stops. Default 30 s; `None`: never
    /// (runners then stop only with the pool, or when lost).
    pub fn idle_shutdown_after(mut self, after: impl Into<Option<Duration>>) -> Self {
        self.config.idle_shutdown_after = after.into();
        self
    }

    /// Which runner with a free slot a call goes to. Default [`Placement::LeastLoaded`], which
    /// spreads calls; [`Placement::Pack`] fills the busiest runner first, so under a steady
    /// trickle the others idle out and the pool scales in.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.config.placement = placement;
        self
    }

    /// Lets `min` runners stop too once idle this long (`None`, the default: never). The pool
    /// then boots again on demand, and keeps `min` from then on.
    pub fn min_idle_shutdown_after(mut self, after: Option<Duration>) -> Self {
        self.config.min_idle_shutdown_after = after;
        self
    }

    /// How long a runner may take from boot to a completed handshake; also how long a call
    /// without a timeout may wait for a slot. Default 30 s.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.config.boot_timeout = timeout;
        self
    }

    /// The default deadline of every call on this pool ([`Call::timeout`](crate::Call::timeout)
    /// overrides it). Default: none, as a Rust future has no implicit deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = Some(timeout);
        self
    }

    /// Each runner serves a single call and then exits. Needs `max_concurrency(1)`, which is
    /// implied when `max_concurrency` is not set.
    pub fn single_use(mut self, single_use: bool) -> Self {
        self.config.single_use = single_use;
        self
    }

    /// How long [`Pool::shutdown`] lets in-flight calls finish. Default 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// How long a cancelled or timed-out call may go on running on its runner. Default 5 s.
    ///
    /// Cancelling drops the task's future on the runner, which stops it at its next `.await`;
    /// a task that never gets there (a tight CPU loop, a blocking call) would hold its slot and
    /// a core for ever. When a cancelled call is still running after `cancel_grace` (noticed
    /// within a heartbeat interval), the pool recycles its runner: the call's slot is freed, no
    /// new call goes to that runner, its other calls get
    /// [`shutdown_timeout`](Self::shutdown_timeout) to finish (past it they fail with
    /// [`ErrorKind::RunnerLost`](crate::ErrorKind::RunnerLost)), then the runner is stopped —
    /// its process, and the process group its tasks' children are in, killed if need be — and a
    /// replacement boots when calls need one. Logged at `warn` and counted in
    /// [`PoolStats::recycled`](crate::PoolStats::recycled). (Work a task handed to
    /// `spawn_blocking` is another matter: the task's future drops at once, and the blocking
    /// thread runs on until its closure returns.)
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.config.cancel_grace = grace;
        self
    }

    /// The largest a call's encoded arguments, or its encoded result, may be. Default 1 GiB.
    ///
    /// A payload above 256 KiB crosses in pieces that take turns with other calls' frames, so a
    /// big upload holds up the small calls beside it by about a millisecond, not its whole
    /// transfer; each side allocates the whole payload once (a payload costs about twice its
    /// size at peak on each side: the encoded bytes and the decoded value). Over the limit, the
    /// call fails with [`ErrorKind::Codec`](crate::ErrorKind::Codec) naming both sizes; data
    /// larger than memory belongs in a [`channel`](crate::channel()), which streams it.
    ///
    /// It bounds one message on the pool's channels too: a bigger one fails the sending half
    /// with `Codec`, and a runner that sends one anyway (a compromised runner) ends its channel
    /// with `Protocol` before the parent buffers more than this.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.config.max_payload = bytes;
        self
    }

    /// Boots the next runner before the pool is full: as soon as the share of busy slots on the
    /// running runners reaches `utilisation` (0.0 to 1.0), so a burst does not wait for a cold
    /// start. Off by default.
    pub fn prewarm_at(mut self, utilisation: f64) -> Self {
        self.config.prewarm_at = Some(utilisation);
        self
    }

    /// Encrypts the connections to this pool's runners with TLS (feature `tls`). No
    /// configuration: the parent makes a self-signed certificate and each runner trusts exactly
    /// that one, by the fingerprint handed to it at boot. For runners on networks that are not
    /// private; a runner speaking plaintext to a TLS pool is refused. Default off.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, enabled: bool) -> Self {
        self.config.tls = enabled;
        self
    }

    /// How often parent and runner tell each other they are alive. Default 1 s.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self
    }

    /// How many heartbeat intervals of silence declare the other side lost: the parent fails
    /// the runner's calls with [`ErrorKind::RunnerLost`], the runner exits. Default 5.
    pub fn heartbeat_miss_limit(mut self, misses: u32) -> Self {
        self.config.heartbeat_miss_limit = misses;
        self
    }

    /// Called when the pool starts booting a runner.
    pub fn on_grow_start(mut self, hook: impl Fn(&GrowStart) + Send + Sync + 'static) -> Self {
        self.hooks.grow_start = Some(Arc::new(hook));
        self
    }

    /// Called when a boot ends, with its duration and, if it failed, why.
    pub fn on_grow_end(mut self, hook: impl Fn(&GrowEnd) + Send + Sync + 'static) -> Self {
        self.hooks.grow_end = Some(Arc::new(hook));
        self
    }

    /// Called when a runner leaves the pool, with why.
    pub fn on_shrink(mut self, hook: impl Fn(&Shrink) + Send + Sync + 'static) -> Self {
        self.hooks.shrink = Some(Arc::new(hook));
        self
    }

    /// Starts the pool: boots `min` runners and returns once they are connected, or fails with
    /// the reason the first of them could not boot.
    ///
    /// Inside a runner, pools never boot runners of their own: a pool started there runs its
    /// calls in-process (through [`LocalBackend`]), with `min` 0.
    pub async fn start(self) -> Result<Pool, Error> {
        let PoolBuilder {
            name,
            backend,
            max_concurrency_set,
            mut min,
            max,
            mut config,
            hooks,
        } = self;
        let config_error = |msg: String| {
            Err(Error::new(
                ErrorKind::Config,
                format!("pool {name:?}: {msg}"),
            ))
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return config_error(
                "a pool name is made of ASCII letters, digits, '-', '_' and '.'".into(),
            );
        }
        if config.single_use && !max_concurrency_set {
            config.max_concurrency = 1;
        }
        if max == 0 || config.max_concurrency == 0 {
            return config_error("max and max_concurrency must be at least 1".into());
        }
        if min > max {
            return config_error(format!("min ({min}) is larger than max ({max})"));
        }
        if config.single_use && config.max_concurrency != 1 {
            return config_error(
                "single_use(true) serves one call per runner: use max_concurrency(1)".into(),
            );
        }
        if config.heartbeat_interval.is_zero() || config.heartbeat_miss_limit == 0 {
            return config_error(
                "heartbeat_interval and heartbeat_miss_limit must be above zero".into(),
            );
        }
        if let Some(p) = config.prewarm_at
            && !(0.0..=1.0).contains(&p)
        {
            return config_error(format!(
                "prewarm_at({p}) is a utilisation between 0.0 and 1.0"
            ));
        }
        let registry = registry()?;
        if registry.len() == 0 {
            return config_error(
                "no #[flame::task] is registered in this binary. Tasks defined in a library crate are \
                 dropped by the linker unless the binary references that crate: add `use my_tasks as _;` \
                 to the binary"
                    .into(),
            );
        }
        let backend: Arc<dyn Backend> = if parent().is_some() {
            min = 0;
            Arc::new(LocalBackend::new())
        } else {
            backend.unwrap_or_else(|| Arc::new(ProcessBackend::new()))
        };
        let shared = Shared::new(name, config, min, max, backend, hooks);
        let pool = Pool::new(shared);
        pool.shared().wait_for_min().await?;
        Ok(pool)
    }
}
