//! Tasks and helpers shared by the integration tests and the runner programs they boot.
//!
//! Every task the tests call lives here, so the test binaries (parents) and the runner
//! programs in `bin/` register the same task manifest.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod channels;
pub mod containers;
mod observability;
mod puppet;
pub use channels::*;
pub use observability::*;
pub use puppet::*;

/// Where a task ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whereabouts {
    /// The process that ran it.
    pub pid: u32,
    /// `flame::parent()`'s runner id there.
    pub runner: Option<String>,
}

fn here() -> Whereabouts {
    Whereabouts {
        pid: std::process::id(),
        runner: flame::parent().map(|p| p.runner_id().to_string()),
    }
}

/// `head`, then `n` as a byte, then `tail`: `bytes::Bytes` both ways, sliced out of the call's
/// arguments (and its result) when they cross in pieces.
#[flame::task]
pub async fn splice(head: bytes::Bytes, n: u8, tail: bytes::Bytes) -> bytes::Bytes {
    [&head[..], &[n], &tail[..]].concat().into()
}

/// An app's own type that happens to be called `Bytes`.
pub mod named {
    /// Not `bytes::Bytes`.
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Bytes(pub String);
}

/// Shouts the word.
#[flame::task]
pub async fn shout(word: named::Bytes) -> String {
    word.0.to_uppercase()
}

/// Adds two numbers.
#[flame::task]
pub async fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// Says where it ran.
#[flame::task]
pub async fn whereabouts() -> Whereabouts {
    here()
}

/// Prints `mib` MiB to stdout in 100-byte lines, then a line of `mib` MiB without a newline to
/// stderr: a chatty or broken task.
#[flame::task]
pub async fn chatter(mib: usize) -> usize {
    use std::io::Write;
    let line = [b'o'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
    let mut out = std::io::stdout().lock();
    for _ in 0..(mib << 20) / line.len() {
        let _ = out.write_all(&line);
    }
    let _ = out.flush();
    let _ = std::io::stderr().write_all(&vec![b'e'; mib << 20]);
    mib
}

/// What a process the task starts sees of its environment (`env`'s output), and whether the
/// task itself still knows it runs on a runner.
#[flame::task]
pub async fn child_env() -> Result<(String, bool), String> {
    let out = tokio::process::Command::new("env")
        .output()
        .await
        .map_err(|e| format!("running env: {e}"))?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        flame::parent().is_some(),
    ))
}

/// Sleeps, then says where it ran.
#[flame::task]
pub async fn sleep_ms(ms: u64) -> Whereabouts {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    here()
}

/// Holds its thread for `ms` without yielding, as a blocking library call does, then says where
/// it ran.
#[flame::task]
pub async fn block_thread_ms(ms: u64) -> Whereabouts {
    std::thread::sleep(Duration::from_millis(ms));
    here()
}

/// Computes on the CPU for `ms` without yielding; returns how many rounds it made and where.
#[flame::task]
pub async fn spin_ms(ms: u64) -> (u64, Whereabouts) {
    let start = std::time::Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < Duration::from_millis(ms) {
        rounds = std::hint::black_box(rounds + 1);
    }
    (rounds, here())
}

/// Writes `marker`, then computes on the CPU for `ms` without yielding: a test can cancel it once
/// it is sure the body runs.
#[flame::task]
pub async fn spin_after_marking(marker: PathBuf, ms: u64) -> u64 {
    write_atomically(&marker, b"spinning");
    spin_ms(ms).await.0
}

/// `spin_ms` on the blocking pool: it holds none of the app's workers.
#[flame::task(blocking)]
pub async fn spin_blocking_ms(ms: u64) -> (u64, Whereabouts) {
    spin_ms(ms).await
}

/// Returns its input.
#[flame::task]
pub async fn echo(data: Vec<u8>) -> Vec<u8> {
    data
}

/// Byte vectors in each shape the task macro encodes as one byte string: joins them, or fails.
#[flame::task]
pub async fn join_bytes(
    first: Option<Vec<u8>>,
    second: Box<[u8]>,
    fail: bool,
) -> Result<Vec<u8>, String> {
    if fail {
        return Err(format!("refused {} bytes", second.len()));
    }
    let mut joined = first.unwrap_or_default();
    joined.extend_from_slice(&second);
    Ok(joined)
}

/// What a task received in a byte vector: its checksum, and whether it is the buffer the
/// call's arguments were put together in (its capacity then exceeds its length by what lay in
/// front of it) rather than a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    /// [`containers::fnv`] of the bytes.
    pub fnv: u64,
    /// Handed the reassembled buffer.
    pub taken_over: bool,
}

impl Received {
    fn of(vec: &[u8], capacity: usize) -> Received {
        Received {
            fnv: containers::fnv(vec),
            taken_over: capacity > vec.len(),
        }
    }
}

/// Two byte vectors and a `Bytes` between them (an empty one holds no buffer): what each
/// received.
#[flame::task]
pub async fn byte_args(
    first: Vec<u8>,
    shared: bytes::Bytes,
    last: Vec<u8>,
) -> (Received, u64, Received) {
    (
        Received::of(&first, first.capacity()),
        containers::fnv(&shared),
        Received::of(&last, last.capacity()),
    )
}

/// `len` bytes made on the runner: a result much bigger than its arguments.
#[flame::task]
pub async fn make_bytes(len: usize) -> Vec<u8> {
    vec![0x5A; len]
}

/// A big argument and a stream together: the stream's first messages arrive while the argument
/// is still being decoded.
#[flame::task]
pub async fn big_and_streamed(
    blob: Vec<u8>,
    mut numbers: flame::channel::Receiver<u64>,
) -> (usize, Vec<u64>) {
    let mut got = Vec::new();
    while let Some(n) = numbers.recv().await {
        got.push(n);
    }
    (blob.len(), got)
}

/// A struct with byte fields of each kind a user's own type can hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ByteFields {
    /// Marked, so it is written as one byte string.
    #[serde(with = "serde_bytes")]
    pub marked: Vec<u8>,
    /// Fast by itself.
    pub shared: bytes::Bytes,
    /// Fast by itself.
    pub buf: serde_bytes::ByteBuf,
    /// Not bytes.
    pub name: String,
}

/// Returns the struct with each byte field reversed.
#[flame::task]
pub async fn reverse_byte_fields(mut blobs: ByteFields) -> ByteFields {
    blobs.marked.reverse();
    blobs.shared = blobs.shared.iter().rev().copied().collect();
    blobs.buf.reverse();
    blobs
}

/// The app's database, as `main` builds it: a pool of connections to one SQLite file.
pub struct Db(pub sqlx::SqlitePool);

/// Where [`open_db`] finds its file, when a test gives runners one.
pub const DB_ENV: &str = "FLAME_TEST_DB";
/// How long a runner's `main` takes before it provides its [`Db`], when a test says so.
pub const PROVIDE_AFTER_ENV: &str = "FLAME_TEST_PROVIDE_AFTER_MS";

/// Opens (creating if need be) the SQLite database at `path`, with the visits table.
pub async fn open_db(path: &Path) -> Db {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = sqlx::SqlitePool::connect_with(options)
        .await
        .expect("opening the test database");
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS visits (id INTEGER PRIMARY KEY, who TEXT NOT NULL, pid INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await
    .expect("creating the visits table");
    Db(pool)
}

/// What a runner's `main` does for the state tests: builds the app's database pool and
/// provides it, after a delay if asked.
pub async fn provide_db_if_asked() {
    let Ok(path) = std::env::var(DB_ENV) else {
        return;
    };
    if let Some(ms) = std::env::var(PROVIDE_AFTER_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    flame::provide(open_db(Path::new(&path)).await);
}

/// Records a visit in the app's database through the pool `main` provided, and returns how
/// many visits there are.
#[flame::task]
pub async fn record_visit(db: flame::State<Db>, who: String) -> i64 {
    sqlx::query("INSERT INTO visits (who, pid) VALUES (?, ?)")
        .bind(&who)
        .bind(i64::from(std::process::id()))
        .execute(&db.0)
        .await
        .expect("inserting a visit");
    sqlx::query_scalar("SELECT COUNT(*) FROM visits")
        .fetch_one(&db.0)
        .await
        .expect("counting visits")
}

/// Returns `x` after `ms`.
#[flame::task]
pub async fn delayed_echo(x: u64, ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    x
}

/// A task whose own error type stays inside its result.
#[flame::task]
pub async fn checked_div(a: u64, b: u64) -> Result<u64, String> {
    a.checked_div(b)
        .ok_or_else(|| format!("cannot divide {a} by zero"))
}

/// Panics with `message`.
#[flame::task]
pub async fn panic_with(message: String) -> u64 {
    panic!("{message}")
}

/// Starts `sleep 1000` with `kill_on_drop(true)`, writes `<runner pid> <child pid>` to
/// `dir/pids`, and waits on the child forever: only cancellation ends it. When its future is
/// dropped it writes `dir/dropped`.
#[flame::task]
pub async fn hold_child(dir: PathBuf) {
    struct OnDrop(PathBuf);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("dropped"), b"1");
        }
    }
    let _on_drop = OnDrop(dir.clone());
    let mut child = tokio::process::Command::new("sleep")
        .arg("1000")
        .kill_on_drop(true)
        .spawn()
        .expect("spawning sleep");
    let pids = format!("{} {}", std::process::id(), child.id().expect("child pid"));
    write_atomically(&dir.join("pids"), pids.as_bytes());
    let _ = child.wait().await;
}

/// Like `hold_child`, plus a second `sleep 1000` started the plain way, without `kill_on_drop`:
/// dropping the task leaves it running, so only its runner's process group can take it down.
/// Writes `<runner pid> <child pid> <plain child pid>` to `dir/pids`.
#[flame::task]
pub async fn hold_children(dir: PathBuf) {
    let plain = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("spawning sleep");
    let mut child = tokio::process::Command::new("sleep")
        .arg("1000")
        .kill_on_drop(true)
        .spawn()
        .expect("spawning sleep");
    let pids = format!(
        "{} {} {}",
        std::process::id(),
        child.id().expect("child pid"),
        plain.id()
    );
    write_atomically(&dir.join("pids"), pids.as_bytes());
    let _ = child.wait().await;
}

/// Starts a pool *inside* the runner and calls `add` on it: returns the sum and the pid that
/// computed it. A pool in a runner runs calls in-process instead of booting runners.
#[flame::task]
pub async fn nested_add(a: u64, b: u64) -> (u64, u32) {
    let pool = flame::Pool::builder("nested")
        .max(1)
        .start()
        .await
        .expect("nested pool");
    let sum = flame::call(&pool, add(a, b)).await.expect("nested call");
    let there = flame::call(&pool, whereabouts())
        .await
        .expect("nested call");
    pool.shutdown().await;
    (sum, there.pid)
}

/// Sleeps `ms`, then writes `path`.
#[flame::task]
pub async fn write_after(ms: u64, path: PathBuf) -> u32 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    write_atomically(&path, b"done");
    std::process::id()
}

static RUNNING: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

/// Counts the calls running at once on this runner while it sleeps `ms`; returns the count it
/// saw at its start, including itself. A cancelled probe (future dropped) still counts itself
/// out.
#[flame::task]
pub async fn concurrency_probe(ms: u64) -> usize {
    struct Running(String);
    impl Drop for Running {
        fn drop(&mut self) {
            *RUNNING
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .get_mut(&self.0)
                .unwrap() -= 1;
        }
    }
    let key = here().runner.unwrap_or_default();
    let seen = {
        let mut running = RUNNING.lock().unwrap();
        let count = running
            .get_or_insert_with(HashMap::new)
            .entry(key.clone())
            .or_default();
        *count += 1;
        *count
    };
    let _running = Running(key);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    seen
}

/// A value whose `Serialize` always fails, like a type holding a live handle would.
#[derive(Debug, Deserialize)]
pub struct Unserializable;

impl Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "an Unserializable cannot be serialized",
        ))
    }
}

/// Takes an argument that cannot be encoded.
#[flame::task]
pub async fn take_unserializable(value: Unserializable) -> u64 {
    drop(value);
    1
}

fn write_atomically(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("writing a test file");
    std::fs::rename(&tmp, path).expect("renaming a test file");
}

/// A fresh, empty directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flame-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch dir");
    dir
}

/// Waits (up to `bound`) for a file to appear and returns its contents.
pub async fn wait_for_file(path: &Path, bound: Duration) -> Option<String> {
    let until = tokio::time::Instant::now() + bound;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return Some(s);
        }
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Reads the `<runner pid> <child pid>` a `hold_child` task wrote.
pub async fn held_pids(dir: &Path) -> (u32, u32) {
    let text = wait_for_file(&dir.join("pids"), Duration::from_secs(20))
        .await
        .expect("hold_child never started");
    let mut it = text.split_whitespace().map(|s| s.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// Reads the `<runner pid> <child pid> <plain child pid>` a `hold_children` task wrote.
pub async fn held_all_pids(dir: &Path) -> Vec<u32> {
    let text = wait_for_file(&dir.join("pids"), Duration::from_secs(20))
        .await
        .expect("hold_children never started");
    text.split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect()
}

/// How many descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// This process's resident set, in KiB.
pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// The resident memory of process `pid` (a number, or `self`), in KiB.
pub fn rss_kib_of(pid: impl std::fmt::Display) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most a process has had resident since it started (its `VmHWM`), in KiB.
pub fn peak_rss_kib_of(pid: impl std::fmt::Display) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: impl std::fmt::Display, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The chaos tests' killer: every `every`, takes a runner pid out of `victims` and SIGKILLs it,
/// or SIGSTOPs it one time in five, until `done`. Returns how many it killed and stopped.
pub fn spawn_killer(
    victims: std::sync::Arc<Mutex<std::collections::HashSet<u32>>>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    every: Duration,
) -> tokio::task::JoinHandle<(u32, u32)> {
    tokio::spawn(async move {
        let (mut kills, mut stops, mut tick) = (0u32, 0u32, 0u64);
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(every).await;
            tick += 1;
            let known: Vec<u32> = victims.lock().unwrap().iter().copied().collect();
            if known.is_empty() {
                continue;
            }
            let victim = known[(tick as usize * 7919) % known.len()];
            victims.lock().unwrap().remove(&victim);
            if tick.is_multiple_of(5) {
                // SAFETY: kill(2) on a runner pid the test's pool started.
                unsafe { libc::kill(victim as libc::pid_t, libc::SIGSTOP) };
                stops += 1;
            } else {
                kill(victim);
                kills += 1;
            }
        }
        (kills, stops)
    })
}

/// Whether a process is gone (a zombie nobody reaped yet counts as gone).
pub fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.trim().chars().next()),
            Some('Z' | 'X')
        ),
    }
}

/// Waits for the process to exit, up to `bound`, by watching a pidfd (an event, not a poll).
/// Returns whether it is gone.
pub async fn wait_gone(pid: u32, bound: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return true; // no such process
    }
    // SAFETY: the fd was just returned to us and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: we own the fd and keep it open as long as the AsyncFd lives.
    let Ok(fd) = (unsafe { tokio::io::unix::AsyncFd::register(fd) }) else {
        return is_gone(pid);
    };
    // A pidfd becomes readable when its process exits.
    match tokio::time::timeout(bound, fd.readable()).await {
        Ok(_) => true,
        Err(_) => is_gone(pid),
    }
}

/// Kills a process by pid if it is still there (test cleanup; never by name).
pub fn kill(pid: u32) {
    signal(pid, libc::SIGKILL);
}

/// Sends `sig` to a process the test started.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Sends `sig` to every process of the group `pgid` (a process the test started in a group of
/// its own), as a terminal's Ctrl-C or systemd's stop does.
pub fn signal_group(pgid: u32, sig: i32) {
    // SAFETY: kill(2) of a group we created; the minus sign names the group.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), sig);
    }
}

/// A pool lifecycle event, as recorded by an [`EventLog`].
#[derive(Debug, Clone)]
pub enum PoolEvent {
    /// A boot started.
    GrowStart(flame::GrowStart),
    /// A boot ended.
    GrowEnd(flame::GrowEnd),
    /// A runner left.
    Shrink(flame::Shrink),
}

/// Records a pool's hook events, so a test can await "a runner booted" instead of sleeping.
#[derive(Clone, Default)]
pub struct EventLog {
    inner: std::sync::Arc<(Mutex<Vec<PoolEvent>>, tokio::sync::Notify)>,
}

impl EventLog {
    /// Registers the log's hooks on a pool builder.
    pub fn attach(&self, builder: flame::PoolBuilder) -> flame::PoolBuilder {
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        builder
            .on_grow_start(move |e| a.push(PoolEvent::GrowStart(e.clone())))
            .on_grow_end(move |e| b.push(PoolEvent::GrowEnd(e.clone())))
            .on_shrink(move |e| c.push(PoolEvent::Shrink(e.clone())))
    }

    fn push(&self, event: PoolEvent) {
        self.inner.0.lock().unwrap().push(event);
        self.inner.1.notify_waiters();
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<PoolEvent> {
        self.inner.0.lock().unwrap().clone()
    }

    /// Boots that ended, with their outcome.
    pub fn grow_ends(&self) -> Vec<flame::GrowEnd> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                PoolEvent::GrowEnd(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// Runners that left, with why.
    pub fn shrinks(&self) -> Vec<flame::Shrink> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                PoolEvent::Shrink(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// Waits until `check` finds what it looks for in the events, up to `bound`.
    pub async fn wait_for<T>(
        &self,
        bound: Duration,
        mut check: impl FnMut(&EventLog) -> Option<T>,
    ) -> T {
        let until = tokio::time::Instant::now() + bound;
        loop {
            let changed = self.inner.1.notified();
            if let Some(found) = check(self) {
                return found;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                panic!(
                    "the awaited pool event never came; events: {:#?}",
                    self.events()
                );
            }
        }
    }
}

/// Wraps a backend and counts the runners it has alive (booted and not yet destroyed or
/// dropped), and the most ever alive at once.
pub struct Counting<B> {
    inner: B,
    /// Runners alive now.
    pub alive: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The most runners alive at once.
    pub peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<B> Counting<B> {
    /// Counts the runners `inner` boots.
    pub fn new(inner: B) -> Self {
        Counting {
            inner,
            alive: Default::default(),
            peak: Default::default(),
        }
    }
}

struct Counted {
    inner: Option<Box<dyn flame::RunnerHandle>>,
    alive: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        // Dropping a process handle kills the process; a destroyed one is already gone.
        drop(self.inner.take());
        self.alive.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl flame::RunnerHandle for Counted {
    fn describe(&self) -> String {
        self.inner
            .as_ref()
            .map(|h| h.describe())
            .unwrap_or_default()
    }

    fn exited(&mut self) -> futures::future::BoxFuture<'_, String> {
        self.inner.as_mut().expect("handle").exited()
    }

    fn destroy(mut self: Box<Self>) -> futures::future::BoxFuture<'static, ()> {
        let inner = self.inner.take().expect("handle");
        Box::pin(async move {
            inner.destroy().await;
            drop(self);
        })
    }
}

impl<B: flame::Backend> flame::Backend for Counting<B> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn boot(
        &self,
        spec: flame::BootSpec,
    ) -> futures::future::BoxFuture<'static, Result<Box<dyn flame::RunnerHandle>, flame::Error>>
    {
        use std::sync::atomic::Ordering::SeqCst;
        let boot = self.inner.boot(spec);
        let (alive, peak) = (self.alive.clone(), self.peak.clone());
        Box::pin(async move {
            let inner = boot.await?;
            let now = alive.fetch_add(1, SeqCst) + 1;
            peak.fetch_max(now, SeqCst);
            let handle: Box<dyn flame::RunnerHandle> = Box::new(Counted {
                inner: Some(inner),
                alive,
            });
            Ok(handle)
        })
    }
}

/// Appends `line` to the file at `path` (one call at a time per file: tests serialise them).
#[flame::task]
pub async fn append_line(path: PathBuf, line: String) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("opening a test file");
    writeln!(f, "{line}").expect("appending to a test file");
}

/// [`concurrency_probe`] that also says which process it ran in.
#[flame::task]
pub async fn located_probe(ms: u64) -> (usize, u32) {
    (concurrency_probe(ms).await, std::process::id())
}

/// A backend that boots a runner program with a doctored hand-off, as an attacker, a stale
/// runner or a man in the middle would present it. Written against the public `Backend` trait.
pub struct Doctored {
    program: PathBuf,
    doctor: std::sync::Arc<dyn Fn(&str) -> String + Send + Sync>,
    /// The pids of the runners it started.
    pub pids: std::sync::Arc<Mutex<Vec<u32>>>,
}

impl Doctored {
    /// Boots `program` with the hand-off rewritten by `doctor`.
    pub fn new(
        program: impl Into<PathBuf>,
        doctor: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Self {
        Doctored {
            program: program.into(),
            doctor: std::sync::Arc::new(doctor),
            pids: Default::default(),
        }
    }
}

struct ChildHandle(tokio::process::Child);

impl flame::RunnerHandle for ChildHandle {
    fn describe(&self) -> String {
        format!("pid {:?}", self.0.id())
    }

    fn exited(&mut self) -> futures::future::BoxFuture<'_, String> {
        Box::pin(async move { format!("{:?}", self.0.wait().await) })
    }

    fn destroy(mut self: Box<Self>) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let _ = self.0.start_kill();
            let _ = self.0.wait().await;
        })
    }
}

impl flame::Backend for Doctored {
    fn name(&self) -> &str {
        "doctored"
    }

    fn boot(
        &self,
        spec: flame::BootSpec,
    ) -> futures::future::BoxFuture<'static, Result<Box<dyn flame::RunnerHandle>, flame::Error>>
    {
        let (key, value) = spec.handoff_env();
        let child = tokio::process::Command::new(&self.program)
            .env(key, (self.doctor)(value))
            .kill_on_drop(true)
            .spawn()
            .expect("spawning the test runner");
        self.pids.lock().unwrap().push(child.id().unwrap());
        let handle: Box<dyn flame::RunnerHandle> = Box::new(ChildHandle(child));
        Box::pin(async move { Ok(handle) })
    }
}

/// Records where the parent listens, then boots with `inner`.
pub struct Spy {
    /// The backend that boots the runners.
    pub inner: flame::ProcessBackend,
    /// The parent's listener address, once a boot has started.
    pub addr: std::sync::Arc<Mutex<Option<String>>>,
}

impl flame::Backend for Spy {
    fn name(&self) -> &str {
        "spy"
    }

    fn boot(
        &self,
        spec: flame::BootSpec,
    ) -> futures::future::BoxFuture<'static, Result<Box<dyn flame::RunnerHandle>, flame::Error>>
    {
        *self.addr.lock().unwrap() = Some(spec.parent_addr().to_string());
        self.inner.boot(spec)
    }
}

/// The hand-off with `field` set to `value` (added if absent, removed if `value` is `None`).
pub fn with_field(handoff: &str, field: &str, value: Option<&str>) -> String {
    let mut parts: Vec<String> = handoff
        .split(';')
        .filter(|part| part.split_once('=').is_none_or(|(k, _)| k != field))
        .map(str::to_string)
        .collect();
    if let Some(value) = value {
        parts.push(format!("{field}={value}"));
    }
    parts.join(";")
}

/// A field of the hand-off.
pub fn field<'a>(handoff: &'a str, field: &str) -> Option<&'a str> {
    handoff.split(';').find_map(|part| {
        part.split_once('=')
            .filter(|(k, _)| *k == field)
            .map(|(_, v)| v)
    })
}

static MAIN_THREAD_PDEATHSIG: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
static PDEATHSIG_RECORDED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Records the parent-death signal of the calling thread: the runner program calls it from its
/// `main` body, which runs on the process's main thread, where flame-rt arms the signal (the
/// kernel keeps it per thread; it fires for the process when any thread has it).
pub fn record_parent_death_signal() {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer we pass.
    unsafe {
        libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int);
    }
    let _ = MAIN_THREAD_PDEATHSIG.set(signal);
    PDEATHSIG_RECORDED.notify_waiters();
}

/// The parent-death signal armed on the runner's main thread (0 for none). A runner serves
/// calls while its `main` still runs, so this waits for `main` to have recorded it.
#[flame::task]
pub async fn parent_death_signal() -> i32 {
    loop {
        let recorded = PDEATHSIG_RECORDED.notified();
        if let Some(signal) = MAIN_THREAD_PDEATHSIG.get() {
            return *signal;
        }
        recorded.await;
    }
}

/// Runs a test's body within `bound`, so no test can hang: past it, the test fails saying so.
pub async fn bounded<T>(bound: Duration, body: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(bound, body).await {
        Ok(output) => output,
        Err(_) => panic!("the test did not finish within its bound of {bound:?}"),
    }
}
