//! A parent process for the tests that kill, freeze or signal a parent. The mode says what it
//! sets up before it prints `READY` (or `DRAINING`) and waits for the test:
//!
//! - `orphans <pdeathsig: on|off>`: three runners, each holding two `sleep 1000` children, one
//!   of them started without `kill_on_drop`;
//! - `deadline`: one runner holding a `sleep 1000` child in a call with a 1.5 s timeout;
//! - `grace`: one runner writing `<dir>/marker` after 1.5 s, then the pool's shutdown begins;
//! - `graceful`: a cast and an awaited call in flight; it prints `RESULT ok` when the awaited
//!   call succeeds (a SIGTERM must let both finish);
//! - `returns`: a cast writing `<dir>/marker` after 800 ms in flight, then `main` returns at
//!   once, dropping its pool (the cast must still finish before the process exits);
//! - `returns-on-signal`: the same, but `main` returns when SIGTERM arrives, as an axum server
//!   with graceful shutdown does.
//!
//! - `chatty`: after `READY`, a call whose task floods stdout and writes one endless line to
//!   stderr, then another call; prints `RESULT ok <peak RSS in KiB>` to **stderr** (the test
//!   stops reading stdout after `READY`) and exits.
//!
//! Usage: `flame-test-parent <mode> <runner program> <scratch dir> [pdeathsig]`

use std::path::PathBuf;
use std::time::Duration;

use flame::{Pool, ProcessBackend};
use flame_tests::*;

#[flame::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, runner, dir, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: flame-test-parent <mode> <runner program> <scratch dir> [pdeathsig]");
    };
    let dir = PathBuf::from(dir);
    let pdeathsig = rest.first().is_none_or(|p| p == "on");
    let backend = ProcessBackend::new()
        .program(runner)
        .parent_death_signal(pdeathsig);
    let mut keep = Vec::new();
    // The pool lives until the process ends (or is signalled).
    let _pool = match mode.as_str() {
        "orphans" => {
            let pool = Pool::builder("orphans")
                .backend(backend)
                .min(3)
                .max(3)
                .max_concurrency(1)
                .start()
                .await?;
            for i in 0..3 {
                let sub = dir.join(i.to_string());
                std::fs::create_dir_all(&sub)?;
                keep.push(flame::spawn_on(&pool, hold_children(sub.clone())));
                held_all_pids(&sub).await;
            }
            println!("READY");
            pool
        }
        "deadline" => {
            let pool = Pool::builder("deadline")
                .backend(backend)
                .max(1)
                .start()
                .await?;
            keep.push(flame::spawn_on(
                &pool,
                hold_child(dir.clone()).timeout(Duration::from_millis(1500)),
            ));
            held_pids(&dir).await;
            println!("READY");
            pool
        }
        "grace" => {
            let pool = Pool::builder("grace")
                .backend(backend)
                .max(1)
                .shutdown_timeout(Duration::from_secs(10))
                .start()
                .await?;
            let there = flame::call(&pool, whereabouts()).await?;
            flame::spawn_on(&pool, write_after(1500, dir.join("marker"))).detach();
            while pool.stats().in_flight == 0 {
                tokio::task::yield_now().await;
            }
            let draining = pool.clone();
            tokio::spawn(async move { draining.shutdown().await });
            // The runner's receipt of the grace is not observable from here (the protocol does
            // not acknowledge it), so give the frame time to reach it before the test kills us;
            // the call has 1.5 s to run, the runner a 10 s grace.
            tokio::time::sleep(Duration::from_millis(300)).await;
            println!("RUNNER {}", there.pid);
            println!("DRAINING");
            pool
        }
        "graceful" => {
            let pool = Pool::builder("graceful")
                .backend(backend)
                .max(1)
                .shutdown_timeout(Duration::from_secs(10))
                .start()
                .await?;
            let there = flame::call(&pool, whereabouts()).await?;
            flame::cast(&pool, write_after(800, dir.join("marker")));
            let awaited = flame::spawn_on(&pool, sleep_ms(600));
            while pool.stats().in_flight < 2 {
                tokio::task::yield_now().await;
            }
            println!("RUNNER {}", there.pid);
            println!("READY");
            let result = awaited.await;
            println!(
                "RESULT {}",
                if result.is_ok() {
                    "ok".to_string()
                } else {
                    format!("{result:?}")
                }
            );
            pool
        }
        "returns" | "returns-on-signal" => {
            let pool = Pool::builder("returns")
                .backend(backend)
                .max(1)
                .shutdown_timeout(Duration::from_secs(10))
                .start()
                .await?;
            let there = flame::call(&pool, whereabouts()).await?;
            flame::cast(&pool, write_after(800, dir.join("marker")));
            while pool.stats().in_flight == 0 {
                tokio::task::yield_now().await;
            }
            println!("RUNNER {}", there.pid);
            if mode == "returns-on-signal" {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                println!("READY");
                term.recv().await;
            } else {
                println!("READY");
            }
            println!("RETURNING");
            return Ok(());
        }
        "chatty" => {
            let pool = Pool::builder("chatty")
                .backend(backend)
                .max(1)
                .start()
                .await?;
            println!("READY");
            flame::call(&pool, chatter(128)).await?;
            let sum = flame::call(&pool, add(1, 2)).await?;
            let status = std::fs::read_to_string("/proc/self/status")?;
            let peak = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                .unwrap_or(0);
            eprintln!("RESULT ok {peak} {sum}");
            pool.shutdown().await;
            return Ok(());
        }
        other => anyhow::bail!("unknown mode {other}"),
    };
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(keep);
    Ok(())
}
