//! The task registry: every `#[flame::task]` registers itself at link time, and a runner finds
//! the body of a call here by the task's id.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::OnceLock;

use futures::future::BoxFuture;

use crate::error::{Error, ErrorKind};

/// A task body started on a runner: resolves to the encoded result, or why it could not be
/// encoded. Not public API.
#[doc(hidden)]
pub type RunningTask = BoxFuture<'static, Result<crate::payload::Encoded, crate::Error>>;

/// What `#[flame::task]` generates for one task. Not public API.
#[doc(hidden)]
pub struct TaskDef {
    /// `module_path!()::fn_name`.
    pub id: &'static str,
    /// Hash of the argument and return types as written, so that two builds which disagree on
    /// a task's signature refuse each other instead of mis-decoding.
    pub sig: u64,
    /// Decodes the arguments and returns the body's future, whose output is the encoded result.
    pub invoke: fn(&[u8]) -> Result<RunningTask, String>,
}

/// A `TaskDef` as collected by `inventory`. Not public API.
#[doc(hidden)]
pub struct Registration(pub &'static TaskDef);

inventory::collect!(Registration);

pub(crate) struct Registry {
    /// Looked up once per call on the runner: task ids are the app's own names, not attacker
    /// input, so FNV-1a serves where SipHash would cost more than the lookup.
    by_id: HashMap<&'static str, &'static TaskDef, BuildHasherDefault<FnvHasher>>,
    /// Sorted `(id, sig)` pairs.
    pub(crate) manifest: Vec<(String, u64)>,
    pub(crate) manifest_hash: u64,
}

impl Registry {
    pub(crate) fn get(&self, id: &str) -> Option<&'static TaskDef> {
        self.by_id.get(id).copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// The process's task registry, built on first use. Duplicate ids are an error every time it is
/// asked for, so every pool start and runner start reports them.
pub(crate) fn registry() -> Result<&'static Registry, Error> {
    static REGISTRY: OnceLock<Result<Registry, Error>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| build(inventory::iter::<Registration>.into_iter().map(|r| r.0)))
        .as_ref()
        .map_err(Clone::clone)
}

fn build(defs: impl Iterator<Item = &'static TaskDef>) -> Result<Registry, Error> {
    let mut by_id = HashMap::default();
    let mut duplicates = Vec::new();
    for def in defs {
        if by_id.insert(def.id, def).is_some() {
            duplicates.push(def.id);
        }
    }
    if !duplicates.is_empty() {
        duplicates.sort_unstable();
        duplicates.dedup();
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "task ids registered more than once: {}; two linked crates define the same \
                 `module::function` (often two versions of one crate): rename one task or unify the versions",
                duplicates.join(", ")
            ),
        ));
    }
    let mut manifest: Vec<(String, u64)> =
        by_id.values().map(|d| (d.id.to_string(), d.sig)).collect();
    manifest.sort_unstable();
    let manifest_hash = manifest_hash(&manifest);
    Ok(Registry {
        by_id,
        manifest,
        manifest_hash,
    })
}

pub(crate) fn manifest_hash(manifest: &[(String, u64)]) -> u64 {
    let mut h = FNV_OFFSET;
    for (id, sig) in manifest {
        h = fnv1a(h, id.as_bytes());
        h = fnv1a(h, &[0]);
        h = fnv1a(h, &sig.to_le_bytes());
    }
    h
}

/// Explains how two manifests differ, by task name.
pub(crate) fn manifest_diff(parent: &[(String, u64)], runner: &[(String, u64)]) -> String {
    let parent_map: HashMap<&str, u64> = parent.iter().map(|(id, s)| (id.as_str(), *s)).collect();
    let runner_map: HashMap<&str, u64> = runner.iter().map(|(id, s)| (id.as_str(), *s)).collect();
    let mut parts = Vec::new();
    fn only<'a>(a: &HashMap<&'a str, u64>, b: &HashMap<&str, u64>) -> Vec<&'a str> {
        let mut v: Vec<&str> = a.keys().filter(|k| !b.contains_key(*k)).copied().collect();
        v.sort_unstable();
        v
    }
    let missing = only(&parent_map, &runner_map);
    if !missing.is_empty() {
        parts.push(format!("the runner lacks {}", missing.join(", ")));
    }
    let extra = only(&runner_map, &parent_map);
    if !extra.is_empty() {
        parts.push(format!("the runner has extra {}", extra.join(", ")));
    }
    let mut changed: Vec<&str> = parent_map
        .iter()
        .filter(|(k, s)| runner_map.get(*k).is_some_and(|r| r != *s))
        .map(|(k, _)| *k)
        .collect();
    changed.sort_unstable();
    if !changed.is_empty() {
        parts.push(format!("signatures differ for {}", changed.join(", ")));
    }
    if parts.is_empty() {
        "the manifest hashes differ".to_string()
    } else {
        parts.join("; ")
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a as a `Hasher`, for the registry.
pub(crate) struct FnvHasher(u64);

impl Default for FnvHasher {
    fn default() -> Self {
        FnvHasher(FNV_OFFSET)
    }
}

impl std::hash::Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = fnv1a(self.0, bytes);
    }
}

/// FNV-1a: stable across Rust versions and platforms, unlike `DefaultHasher`, which matters
/// because parent and runner may be different builds. `const` so signature hashes cost nothing
/// at run time.
const fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// Hashes a task's signature as the macro wrote it down (generated code calls this in a const).
#[doc(hidden)]
pub const fn sig_hash(signature: &str) -> u64 {
    fnv1a(FNV_OFFSET, signature.as_bytes())
}

/// Decodes a task's arguments (generated code calls this on the runner).
#[doc(hidden)]
pub fn decode_args<A: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<A, String> {
    postcard::from_bytes(bytes).map_err(|e| {
        format!(
            "the arguments could not be decoded: {e}; if a type uses #[serde(untagged)], \
             #[serde(flatten)], internally tagged enums or skip_serializing_if, it cannot be sent to a runner"
        )
    })
}

/// Compile-time check generated for every task argument: the error points at the argument.
#[doc(hidden)]
pub const fn assert_arg<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static>() {}

/// Compile-time check generated for a task's return type.
#[doc(hidden)]
pub const fn assert_ret<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static>() {}

/// Whether one argument encodes (generated code uses it to name a failing argument).
#[doc(hidden)]
pub fn encodes<T: serde::Serialize>(value: &T) -> bool {
    postcard::to_stdvec(value).is_ok()
}

/// Runs a `#[flame::task(blocking)]` body on Tokio's blocking pool, driven by the current
/// runtime, so heavy work holds a blocking thread instead of one of the app's workers. Dropping
/// the returned future (a cancel) stops the body at its next `.await`; a body that never awaits
/// runs to its end. A panic in the body resumes here. Not public API.
pub async fn run_blocking<F>(body: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    use futures::future::{AbortHandle, Abortable};
    struct AbortOnDrop(AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let runtime = tokio::runtime::Handle::current();
    let (abort, registration) = AbortHandle::new_pair();
    let _abort_on_drop = AbortOnDrop(abort);
    let blocking =
        tokio::task::spawn_blocking(move || runtime.block_on(Abortable::new(body, registration)));
    match blocking.await {
        Ok(Ok(output)) => output,
        // Aborted only once this future is dropped, so never seen here.
        Ok(Err(futures::future::Aborted)) => std::future::pending().await,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The runtime is shutting down: nothing will poll this future again.
            Err(_) => std::future::pending().await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: &[u8]) -> Result<RunningTask, String> {
        Err("not run in these tests".into())
    }

    static A: TaskDef = TaskDef {
        id: "app::a",
        sig: 1,
        invoke: never,
    };
    static B: TaskDef = TaskDef {
        id: "app::b",
        sig: 2,
        invoke: never,
    };
    static A_AGAIN: TaskDef = TaskDef {
        id: "app::a",
        sig: 3,
        invoke: never,
    };

    #[test]
    fn duplicate_ids_are_a_startup_error() {
        let err = build([&A, &B, &A_AGAIN].into_iter())
            .err()
            .expect("duplicates refused");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("app::a"), "{err}");
        assert!(!err.message().contains("app::b"), "{err}");
    }

    #[test]
    fn manifests_are_sorted_and_their_differences_named() {
        let reg = build([&B, &A].into_iter()).unwrap();
        assert_eq!(
            reg.manifest,
            vec![("app::a".to_string(), 1), ("app::b".to_string(), 2)]
        );
        let other = vec![("app::a".to_string(), 9), ("app::c".to_string(), 2)];
        let diff = manifest_diff(&reg.manifest, &other);
        assert_eq!(
            diff,
            "the runner lacks app::b; the runner has extra app::c; signatures differ for app::a"
        );
        assert_ne!(manifest_hash(&reg.manifest), manifest_hash(&other));
    }

    #[test]
    fn signature_hashes_are_stable() {
        // FNV-1a of the empty string and of "a": fixed forever, whatever the Rust version.
        assert_eq!(sig_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(sig_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
