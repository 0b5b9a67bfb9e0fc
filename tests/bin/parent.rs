//! A parent for the "parent killed" tests: boots three runners, gives each a task holding a
//! `sleep 1000` child, prints `READY`, and waits to be killed.
//!
//! Usage: `flame-test-parent <runner program> <scratch dir> <pdeathsig: on|off>`

use std::path::PathBuf;
use std::time::Duration;

use flame::{Pool, ProcessBackend};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(runner), Some(dir), Some(pdeathsig)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!(
            "usage: flame-test-parent <runner program> <scratch dir> <pdeathsig: on|off>"
        );
    };
    let pool = Pool::builder("orphans")
        .backend(
            ProcessBackend::new()
                .program(runner)
                .parent_death_signal(pdeathsig == "on"),
        )
        .min(3)
        .max(3)
        .max_concurrency(1)
        .start()
        .await?;
    let dir = PathBuf::from(dir);
    let mut handles = Vec::new();
    for i in 0..3 {
        let sub = dir.join(i.to_string());
        std::fs::create_dir_all(&sub)?;
        handles.push(flame::spawn_on(&pool, flame_tests::hold_child(sub.clone())));
        flame_tests::held_pids(&sub).await;
    }
    println!("READY");
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(handles);
    Ok(())
}
