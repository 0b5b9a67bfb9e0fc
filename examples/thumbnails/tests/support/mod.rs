//! Starting the app and other programs for the showcase's tests.

#![allow(dead_code)] // each test file uses its part

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub(crate) const APP: &str = env!("CARGO_BIN_EXE_thumbnails");

/// A process started in its own process group, killed with the group when dropped (the app takes
/// its runners along; chromedriver its browser).
pub(crate) struct Group(pub(crate) Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            // SAFETY: kill(2) on the process group this test started.
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
        }
    }
}

/// Starts `command` in its own group and waits for a line of its stdout containing `ready`;
/// returns the process and that line.
pub(crate) async fn start(mut command: Command, ready: &str) -> (Group, String) {
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("the program starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let group = Group(child);
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains(ready) {
            // Keep reading (and echoing) what it prints, so it never blocks on a full pipe.
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    println!("{line}");
                }
            });
            return (group, line);
        }
    }
    panic!("the program exited before printing {ready:?}");
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The app, on its default Process backend, and its URL.
pub(crate) async fn app() -> (Group, String) {
    app_with(&[]).await
}

/// The app with more environment, and its URL. Its storage (and SQLite database) is a fresh
/// directory unless `env` names one in `THUMBS_DATA`.
pub(crate) async fn app_with(env: &[(&str, &str)]) -> (Group, String) {
    let mut command = Command::new(APP);
    command
        .env("PORT", free_port().to_string())
        .env("THUMBS_DATA", scratch_dir("data"))
        .envs(env.iter().copied());
    let (group, line) = start(command, "thumbnails: open ").await;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the app prints its URL")
        .to_string();
    (group, url)
}

/// The app's pool, from its `/stats`.
pub(crate) async fn stats(url: &str) -> serde_json::Value {
    reqwest::get(format!("{url}stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (up to `bound`) until the app's pool has no busy slot; returns how long that took.
pub(crate) async fn until_no_busy_slot(
    url: &str,
    bound: std::time::Duration,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    // The pool is behind an HTTP endpoint: there is no event to await from here.
    while stats(url).await["in_flight"] != 0 {
        assert!(
            started.elapsed() < bound,
            "a slot still busy after {bound:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// A new empty directory for this test process.
pub(crate) fn scratch_dir(what: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flame-thumbnails-{}/{what}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every file under `dir`, recursively.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A PostgreSQL server from Debian's `postgresql` package, private to one test: its own data
/// directory and port, trusting loopback. Killed with its process group when dropped.
pub(crate) struct Postgres {
    server: Option<Group>,
    dir: PathBuf,
    /// `postgres://...` for the app's `DATABASE_URL`.
    pub(crate) url: String,
}

impl Postgres {
    pub(crate) async fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|version| version.path().join("bin"))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .expect(
                "PostgreSQL's server is needed: apt-get install postgresql (scripts/deps.sh does)",
            );
        let dir = scratch_dir("postgres");
        // The server refuses to run as root: as root, run it as Debian's `postgres` user.
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            let chown = std::process::Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(chown.success(), "chown of {} failed", dir.display());
        }
        let shell = |script: String| {
            let mut command = if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--", "sh", "-c"]);
                c
            } else {
                let mut c = Command::new("sh");
                c.arg("-c");
                c
            };
            command.arg(script);
            command
        };
        let data = dir.join("data");
        let init = shell(format!(
            "{}/initdb -D {} -U flame --auth=trust -E UTF8 --no-sync 2>&1",
            bin.display(),
            data.display()
        ))
        .output()
        .await
        .unwrap();
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stdout)
        );
        let port = free_port();
        let server = shell(format!(
            "exec {}/postgres -D {} -p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off 2>&1",
            bin.display(),
            data.display(),
            dir.display()
        ));
        let (server, _) = start(server, "ready to accept connections").await;
        Postgres {
            server: Some(server),
            dir,
            url: format!("postgres://flame@127.0.0.1:{port}/postgres"),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The server and its backends go with their group, then their files.
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
