//! Soak: the chaos workload — calls, heavy calls, cancels, channel streams — for
//! `FLAME_SOAK_MINUTES` (default 1) while runners are SIGKILLed and SIGSTOPped, then the figures a
//! long run must keep flat: calls by outcome, boots, the parent's RSS and open descriptors at
//! start and end, and runner processes left (0). Not for CI: `scripts/soak.sh MINUTES` runs it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flame::{Pool, ProcessBackend};
use flame_tests::*;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const IN_FLIGHT: usize = 64;
/// Growth allowed between the start and the end of a run, whatever its length.
const FD_GROWTH: usize = 16;
const RSS_GROWTH_KIB: u64 = 32 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a long run: scripts/soak.sh MINUTES"]
async fn soak() {
    let minutes: f64 = std::env::var("FLAME_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(1.0);
    let length = Duration::from_secs_f64(minutes * 60.0);
    let pool = Pool::builder("soak")
        .backend(ProcessBackend::new().program(RUNNER))
        .max(4)
        .max_concurrency(32)
        .timeout(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_millis(200))
        .heartbeat_miss_limit(3)
        .cancel_grace(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    // Warm up before the baseline: the first runner, the listener, the allocator's arenas.
    for _ in 0..200 {
        flame::call(&pool, add(1, 2)).await.unwrap();
    }
    let (fds_start, rss_start) = (open_fds(), rss_kib());
    let known: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let every_pid: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let killer = spawn_killer(known.clone(), done.clone(), Duration::from_millis(500));

    let started = Instant::now();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut running = FuturesUnordered::new();
    let mut next = 0u64;
    while started.elapsed() < length || !running.is_empty() {
        while started.elapsed() < length && running.len() < IN_FLIGHT {
            next += 1;
            let pool = pool.clone();
            let (every_pid, known) = (every_pid.clone(), known.clone());
            running.push(tokio::spawn(async move {
                let outcome = match next % 10 {
                    // A cancel: the handle is dropped while the call sleeps on its runner.
                    0 => {
                        let handle = flame::spawn_on(&pool, sleep_ms(1_000));
                        tokio::time::sleep(Duration::from_millis(5 + next % 40)).await;
                        drop(handle);
                        return "cancelled".to_string();
                    }
                    // A stream both ways through channels.
                    1 => {
                        let (tx, rx) = flame::channel(8);
                        let (back, mut back_rx) = flame::channel(8);
                        let call = flame::spawn_on(&pool, echo_stream(rx, back));
                        let feed = async {
                            for i in 0..100u64 {
                                if tx.send(i).await.is_err() {
                                    break;
                                }
                            }
                            drop(tx);
                        };
                        let drain = async { while back_rx.recv().await.is_some() {} };
                        let (result, (), ()) = futures::join!(call, feed, drain);
                        result.map(|_| None)
                    }
                    // Heavy work that never yields for a moment.
                    2 => flame::call(&pool, spin_ms(100))
                        .await
                        .map(|(_, w)| Some(w.pid)),
                    _ => flame::call(&pool, located_probe(5 + next % 30))
                        .await
                        .map(|(_, pid)| Some(pid)),
                }
                .map(|pid| {
                    // Every runner seen becomes a victim, however it was first seen.
                    if let Some(pid) = pid
                        && every_pid.lock().unwrap().insert(pid)
                    {
                        known.lock().unwrap().insert(pid);
                    }
                });
                match outcome {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("{:?}", e.kind()),
                }
            }));
        }
        let kind = running.next().await.unwrap().unwrap();
        *outcomes.entry(kind).or_default() += 1;
    }
    done.store(true, SeqCst);
    let (kills, stops) = killer.await.unwrap();
    let stats = pool.stats();
    pool.shutdown().await;
    // Stopped runners were lost and destroyed, but SIGSTOPped ones left in `known` may still
    // wait for their destroy: give every runner the failsafe window.
    let pids: Vec<u32> = every_pid.lock().unwrap().iter().copied().collect();
    for &pid in &pids {
        wait_gone(pid, Duration::from_secs(5)).await;
    }
    let left: Vec<u32> = pids.iter().copied().filter(|&p| !is_gone(p)).collect();
    for &pid in &left {
        kill(pid);
    }
    let (fds_end, rss_end) = (open_fds(), rss_kib());
    let total: u64 = outcomes.values().sum();
    println!(
        "soak of {:.1?}: {total} calls {outcomes:?}; {} SIGKILLs, {} SIGSTOPs; {} runners booted, {} failed boots, \
         {} recycled; parent RSS {rss_start} -> {rss_end} KiB, descriptors {fds_start} -> {fds_end}; runner processes left: {}",
        started.elapsed(),
        kills,
        stops,
        stats.booted,
        stats.failed_boots,
        stats.recycled,
        left.len()
    );
    assert_eq!(total, next, "every call resolved exactly once");
    let allowed: HashSet<&str> = ["ok", "cancelled", "RunnerLost", "TimedOut"].into();
    assert!(
        outcomes.keys().all(|k| allowed.contains(k.as_str())),
        "{outcomes:?}"
    );
    assert!(left.is_empty(), "runner processes left: {left:?}");
    assert!(
        fds_end <= fds_start + FD_GROWTH,
        "descriptors {fds_start} -> {fds_end}"
    );
    assert!(
        rss_end <= rss_start + RSS_GROWTH_KIB,
        "RSS {rss_start} -> {rss_end} KiB"
    );
}
