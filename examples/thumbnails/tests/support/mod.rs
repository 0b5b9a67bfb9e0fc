//! Starting the app and other programs for the showcase's tests.

#![allow(dead_code)] // each test file uses its part

use std::process::Stdio;

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

/// The app with more environment, and its URL.
pub(crate) async fn app_with(env: &[(&str, &str)]) -> (Group, String) {
    let mut command = Command::new(APP);
    command
        .env("PORT", free_port().to_string())
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
