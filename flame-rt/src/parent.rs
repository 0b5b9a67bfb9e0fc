//! The parent hand-off: what a backend passes to a runner it boots (in one environment
//! variable), and [`parent()`], which tells code whether it runs in a runner.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// The environment variable that makes a process a runner. Backends set it to
/// [`BootSpec::handoff_env`](crate::BootSpec::handoff_env).
pub const HANDOFF_ENV: &str = "FLAME_PARENT";

/// Everything a runner needs to reach its parent and prove who it is.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Handoff {
    pub(crate) pool: String,
    pub(crate) runner_id: String,
    /// Where the runner dials, `host:port`.
    pub(crate) addr: String,
    pub(crate) token: [u8; 16],
    /// How long the runner may take to reach its parent before it gives up and exits.
    pub(crate) boot_timeout: Duration,
    /// The SHA-256 fingerprint (hex) of the parent's certificate, when the pool uses TLS.
    pub(crate) tls: Option<String>,
}

impl Handoff {
    pub(crate) fn encode(&self) -> String {
        let mut out = format!(
            "v1;pool={};runner={};addr={};token={};boot_ms={}",
            self.pool,
            self.runner_id,
            self.addr,
            hex(&self.token),
            crate::deadline::millis(self.boot_timeout)
        );
        if let Some(fingerprint) = &self.tls {
            out.push_str(";tls=");
            out.push_str(fingerprint);
        }
        out
    }

    pub(crate) fn decode(s: &str) -> Result<Handoff, Error> {
        let bad = |what: &str| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "{HANDOFF_ENV} is malformed ({what}); it is set by a flame backend, not by hand"
                ),
            )
        };
        let mut parts = s.split(';');
        if parts.next() != Some("v1") {
            return Err(bad("unknown version"));
        }
        let (mut pool, mut runner, mut addr, mut token, mut boot_ms, mut tls) =
            (None, None, None, None, None, None);
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad("a field without '='"))?;
            match k {
                "pool" => pool = Some(v.to_string()),
                "runner" => runner = Some(v.to_string()),
                "addr" => addr = Some(v.to_string()),
                "token" => token = Some(unhex::<16>(v).ok_or_else(|| bad("token"))?),
                "tls" => tls = Some(v.to_string()),
                "boot_ms" => boot_ms = Some(v.parse::<u64>().map_err(|_| bad("boot_ms"))?),
                _ => {} // fields from a newer parent are ignored
            }
        }
        Ok(Handoff {
            pool: pool.ok_or_else(|| bad("no pool"))?,
            runner_id: runner.ok_or_else(|| bad("no runner"))?,
            addr: addr.ok_or_else(|| bad("no addr"))?,
            token: token.ok_or_else(|| bad("no token"))?,
            boot_timeout: Duration::from_millis(boot_ms.ok_or_else(|| bad("no boot_ms"))?),
            tls,
        })
    }
}

/// Lower-case hex, as tokens and fingerprints travel in the hand-off.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` random bytes from the OS, in hex: how flame-rt's backends name what they create
/// (containers, Machines, pods, a parent's instance), so every such name has one shape.
pub fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    // Without the OS's randomness (never seen on Linux) the id is zeros: a name, not a secret.
    let _ = getrandom::fill(&mut bytes);
    hex(&bytes)
}

/// Parses exactly `N` bytes of hex.
pub(crate) fn unhex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Who this runner works for: returned by [`parent()`] inside a runner.
#[derive(Clone)]
pub struct Parent {
    handoff: Arc<Handoff>,
}

impl Parent {
    pub(crate) fn new(handoff: Arc<Handoff>) -> Parent {
        Parent { handoff }
    }

    /// The name of the pool this runner belongs to.
    pub fn pool(&self) -> &str {
        &self.handoff.pool
    }

    /// This runner's id, unique within its parent (`<pool>-<n>`).
    pub fn runner_id(&self) -> &str {
        &self.handoff.runner_id
    }
}

impl fmt::Debug for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token stays out of logs.
        f.debug_struct("Parent")
            .field("pool", &self.pool())
            .field("runner_id", &self.runner_id())
            .finish_non_exhaustive()
    }
}

tokio::task_local! {
    /// Set around every task a runner runs, so `parent()` answers for in-process
    /// ([`LocalBackend`](crate::LocalBackend)) runners too.
    pub(crate) static TASK_PARENT: Parent;
}

/// The hand-off this process was booted with, if it is a runner process.
pub(crate) fn process_handoff() -> Option<&'static Result<Arc<Handoff>, Error>> {
    static HANDOFF: OnceLock<Option<Result<Arc<Handoff>, Error>>> = OnceLock::new();
    HANDOFF
        .get_or_init(|| {
            let raw = std::env::var(HANDOFF_ENV).ok()?;
            Some(Handoff::decode(&raw).map(Arc::new))
        })
        .as_ref()
}

/// `Some` inside a runner (in a runner process, or in a task run by an in-process runner),
/// `None` in the parent.
///
/// A runner runs the app's whole `main`, so this is how the app skips parent-only work such as
/// starting its web server:
///
/// ```
/// if flame::parent().is_some() {
///     return; // a runner: serve tasks only
/// }
/// ```
pub fn parent() -> Option<Parent> {
    if let Ok(parent) = TASK_PARENT.try_with(Clone::clone) {
        return Some(parent);
    }
    match process_handoff()? {
        Ok(handoff) => Some(Parent::new(handoff.clone())),
        Err(_) => None,
    }
}

/// Set once a `#[flame::test]` runs in this process: it is a test binary.
static IN_TEST_BINARY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is a test binary running `#[flame::test]`s: re-executing it with its
/// own arguments would run the whole test suite, not a runner.
pub(crate) fn in_test_binary() -> bool {
    IN_TEST_BINARY.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// The libtest name of the `#[flame::test]` running on this thread.
    static CURRENT_TEST: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Names the `#[flame::test]` running on this thread (`None` once it ended): this process is
/// a test binary, whose runners re-execute it to serve that one test.
pub(crate) fn set_current_test(name: Option<&str>) {
    if name.is_some() {
        IN_TEST_BINARY.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    CURRENT_TEST.with(|t| *t.borrow_mut() = name.map(str::to_string));
}

/// The arguments that make this test binary run only the current `#[flame::test]`, if one runs
/// on this thread: a `ProcessBackend` runner re-executes the binary with them.
pub(crate) fn test_runner_args() -> Option<Vec<String>> {
    CURRENT_TEST.with(|t| t.borrow().clone()).map(|name| {
        // Accepted by libtest and by cargo-nextest's way of running one test.
        vec![
            name,
            "--exact".into(),
            "--nocapture".into(),
            "--test-threads".into(),
            "1".into(),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_round_trips() {
        let h = Handoff {
            pool: "thumbs".into(),
            runner_id: "thumbs-3".into(),
            addr: "[fdaa::3]:4000".into(),
            token: [0xab; 16],
            boot_timeout: Duration::from_secs(30),
            tls: None,
        };
        assert!(Handoff::decode(&h.encode()).ok() == Some(h.clone()));
        let with_tls = Handoff {
            tls: Some("ab".repeat(32)),
            ..h
        };
        assert!(Handoff::decode(&with_tls.encode()).ok() == Some(with_tls));
    }

    #[test]
    fn malformed_handoff_says_what() {
        let err = Handoff::decode("v1;pool=p;runner=r;addr=a;token=zz;boot_ms=1")
            .err()
            .unwrap();
        assert!(err.message().contains("token"), "{err}");
        assert!(Handoff::decode("v9").is_err());
    }
}
