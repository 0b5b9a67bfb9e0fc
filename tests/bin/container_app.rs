//! The app `tests/docker.rs` and `tests/k8s.rs` run in containers: as the parent it starts a
//! pool on the Docker backend (in a container, with the engine's socket mounted) or, with
//! `FLAME_TEST_BACKEND=k8s`, on the Kubernetes backend (in a pod), and takes commands from the
//! test on a TCP port, one per line, answering each with one JSON line; as a runner (booted by
//! that pool from the same image) it serves the tasks below.
//!
//! Commands: `id` (the backend's parent id), `whoami` (a call: the runner's hostname),
//! `spin MS` (a call that holds its thread for MS without yielding, then says where it ran),
//! `bulk MIB` (a call that sends MIB MiB and gets them back reversed, checked byte for byte),
//! `hold NAME` (spawn a task that runs `sleep 600` in its container, keep its handle),
//! `work NAME SECS` (spawn a task that runs `sleep SECS` and then succeeds), `read PATH` (a
//! call: the file at PATH in the runner's container), `await NAME`,
//! `drop NAME`, `shutdown` (the pool; then the app exits).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::{JoinHandle, Pool};
use flame_backend_docker::DockerBackend;
use flame_backend_k8s::K8sBackend;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The port the parent takes commands on (`FLAME_TEST_CONTROL_PORT` on a host, where 7000 may be
/// taken: 0 picks a free one).
const CONTROL_PORT: u16 = 7000;

#[flame::task]
async fn whoami() -> Result<String, String> {
    let hostname = std::fs::read_to_string("/etc/hostname").map_err(|e| e.to_string())?;
    Ok(hostname.trim().to_string())
}

/// `sleep SECS` as a child in the runner's container, killed if the task is dropped.
async fn sleep(secs: u64) -> Result<std::process::ExitStatus, String> {
    tokio::process::Command::new("sleep")
        .arg(secs.to_string())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("running sleep: {e}"))
}

/// Runs a child process in the runner's container until cancelled.
#[flame::task]
async fn sleep_child(secs: u64) -> Result<(), String> {
    let status = sleep(secs).await?;
    Err(format!("sleep ended by itself: {status}"))
}

/// The contents of a file in the runner's container.
#[flame::task]
async fn read_file(path: String) -> Result<String, String> {
    std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))
}

/// Works for `secs` (a `sleep` child in the runner's container), then succeeds.
#[flame::task]
async fn work(secs: u64) -> Result<(), String> {
    let status = sleep(secs).await?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("sleep failed: {status}"))
}

/// Returns `data` reversed: a big payload each way, every byte checked by the parent.
#[flame::task]
async fn reversed(mut data: Vec<u8>) -> Vec<u8> {
    data.reverse();
    data
}

/// Holds its worker thread for `ms` without yielding, as a codec or a model's inference does;
/// the runner must keep its heartbeats going meanwhile. Returns where it ran.
#[flame::task]
async fn spin(ms: u64) -> Result<String, String> {
    let end = std::time::Instant::now() + Duration::from_millis(ms);
    while std::time::Instant::now() < end {
        std::hint::spin_loop();
    }
    whoami().await
}

/// `len` bytes of a pattern that a shifted or truncated copy cannot match.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
}

type Held = Arc<Mutex<HashMap<String, JoinHandle<Result<(), String>>>>>;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[flame::main]
async fn main() -> anyhow::Result<()> {
    let grace = Duration::from_millis(env_or("FLAME_TEST_STOP_GRACE_MS", 5000));
    let (pool, parent_id) = if std::env::var("FLAME_TEST_BACKEND").as_deref() == Ok("k8s") {
        let backend = K8sBackend::builder()
            .env("FLAME_TEST_ROLE", "runner")
            .delete_grace(grace)
            .build()
            .await?;
        let parent_id = backend.parent_uid().to_string();
        (Pool::builder("k8s-test").backend(backend), parent_id)
    } else {
        let mut builder = DockerBackend::builder();
        if let Ok(bind) = std::env::var("FLAME_TEST_BIND") {
            builder = builder.bind(bind);
        }
        let backend = builder
            .memory_mb(256)
            .cpus(0.5)
            .env("FLAME_TEST_ROLE", "runner")
            .stop_grace(grace)
            .build()
            .await?;
        let parent_id = backend.parent_id().to_string();
        (Pool::builder("docker-test").backend(backend), parent_id)
    };
    let pool = pool
        .max(env_or("FLAME_TEST_MAX", 2))
        // One call per runner: two held calls mean two runner containers.
        .max_concurrency(1)
        .heartbeat_interval(Duration::from_millis(env_or(
            "FLAME_TEST_HEARTBEAT_MS",
            200,
        )))
        .heartbeat_miss_limit(5)
        .boot_timeout(Duration::from_secs(30))
        .start()
        .await?;
    let port = env_or("FLAME_TEST_CONTROL_PORT", CONTROL_PORT);
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    let port = listener.local_addr()?.port();
    eprintln!("container-app: parent {parent_id} ready on port {port}");
    let held: Held = Arc::default();
    loop {
        let (stream, _) = listener.accept().await?;
        let (pool, held, parent_id) = (pool.clone(), held.clone(), parent_id.clone());
        tokio::spawn(async move {
            if let Err(e) = serve(stream, pool, held, parent_id).await {
                eprintln!("container-app: control connection: {e}");
            }
        });
    }
}

async fn serve(stream: TcpStream, pool: Pool, held: Held, parent_id: String) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let (command, name) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let name = name.to_string();
        let answer = match command {
            "id" => json!({ "ok": parent_id }),
            "whoami" => outcome(flame::call(&pool, whoami()).await),
            "spin" => outcome(flame::call(&pool, spin(name.parse().unwrap_or(1000))).await),
            "bulk" => {
                let len = name.parse::<usize>().unwrap_or(1) << 20;
                let mut expected = pattern(len);
                let started = std::time::Instant::now();
                match flame::call(&pool, reversed(pattern(len))).await {
                    Ok(back) => {
                        let secs = started.elapsed().as_secs_f64();
                        expected.reverse();
                        if back == expected {
                            json!({ "ok": { "bytes": len, "secs": secs } })
                        } else {
                            json!({ "err": format!("{} bytes came back, not the {len} sent, reversed", back.len()) })
                        }
                    }
                    Err(e) => json!({ "err": e.to_string(), "kind": format!("{:?}", e.kind()) }),
                }
            }
            "read" => outcome(flame::call(&pool, read_file(name.clone())).await),
            "hold" => {
                let handle = flame::spawn_on(&pool, sleep_child(600));
                held.lock().unwrap().insert(name, handle);
                json!({ "ok": "held" })
            }
            "work" => {
                let (name, secs) = name.split_once(' ').unwrap_or((name.as_str(), "1"));
                let handle = flame::spawn_on(&pool, work(secs.parse().unwrap_or(1)));
                held.lock().unwrap().insert(name.to_string(), handle);
                json!({ "ok": "working" })
            }
            "await" => {
                let handle = held.lock().unwrap().remove(&name);
                match handle {
                    Some(handle) => outcome(handle.await),
                    None => json!({ "err": format!("nothing held as {name:?}") }),
                }
            }
            "drop" => {
                drop(held.lock().unwrap().remove(&name));
                json!({ "ok": "dropped" })
            }
            "shutdown" => {
                pool.shutdown().await;
                write.write_all(b"{\"ok\":\"shut down\"}\n").await?;
                std::process::exit(0);
            }
            other => json!({ "err": format!("unknown command {other:?}") }),
        };
        write.write_all(format!("{answer}\n").as_bytes()).await?;
    }
    Ok(())
}

fn outcome<T: serde::Serialize>(
    result: Result<Result<T, String>, flame::Error>,
) -> serde_json::Value {
    match result {
        Ok(Ok(value)) => json!({ "ok": value }),
        Ok(Err(task_error)) => json!({ "err": task_error, "kind": "Task" }),
        Err(e) => json!({ "err": e.to_string(), "kind": format!("{:?}", e.kind()) }),
    }
}
