//! Chaos: 10 000 calls over a pool of real runner processes while a killer SIGKILLs a random
//! runner every ~200 ms and SIGSTOPs another now and then. Every call must resolve exactly once,
//! no caller may wait longer than its timeout plus the heartbeat window, and no runner process
//! may be left. Loopback only, bounded at 60 s; prints its figures.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flame::{Pool, ProcessBackend};
use flame_tests::*;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const CALLS: usize = 10_000;
const IN_FLIGHT: usize = 128;
const TIMEOUT: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_millis(200);
const MISSES: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_calls_under_kills_and_freezes() {
    bounded(Duration::from_secs(60), chaos()).await;
}

async fn chaos() {
    let backend = Counting::new(ProcessBackend::new().program(RUNNER));
    let (alive, peak) = (backend.alive.clone(), backend.peak.clone());
    let pool = Pool::builder("chaos")
        .backend(backend)
        .max(4)
        .max_concurrency(64)
        .timeout(TIMEOUT)
        .heartbeat_interval(HEARTBEAT)
        .heartbeat_miss_limit(MISSES)
        .start()
        .await
        .unwrap();
    let known: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let every_pid: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = spawn_killer(known.clone(), done.clone(), Duration::from_millis(200));

    let started = Instant::now();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(CALLS);
    let mut running = FuturesUnordered::new();
    let mut next = 0;
    while next < CALLS || !running.is_empty() {
        while next < CALLS && running.len() < IN_FLIGHT {
            let handle = flame::spawn_on(&pool, located_probe(20 + (next as u64 * 31) % 60));
            let sent = Instant::now();
            running.push(async move { (handle.await, sent.elapsed()) });
            next += 1;
        }
        let (result, waited) = running.next().await.unwrap();
        latencies.push(waited);
        let kind = match result {
            Ok((seen, pid)) => {
                assert!(seen <= 64, "{seen} calls at once on one runner");
                if every_pid.lock().unwrap().insert(pid) {
                    known.lock().unwrap().insert(pid);
                }
                "ok".to_string()
            }
            Err(e) => format!("{:?}", e.kind()),
        };
        *outcomes.entry(kind).or_default() += 1;
    }
    done.store(true, SeqCst);
    let (kills, stops) = killer.await.unwrap();
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    let stats = pool.stats();
    println!(
        "chaos: {CALLS} calls in {elapsed:.1?}: {outcomes:?}; {kills} SIGKILLs, {stops} SIGSTOPs; {} runners booted \
         ({} failed boots), peak {} alive; wait p50 {:?} p99 {:?} max {:?}",
        stats.booted,
        stats.failed_boots,
        peak.load(SeqCst),
        pct(0.5),
        pct(0.99),
        latencies.last().unwrap()
    );
    assert_eq!(
        outcomes.values().sum::<usize>(),
        CALLS,
        "every call resolved exactly once"
    );
    let allowed: HashSet<&str> = ["ok", "RunnerLost", "TimedOut"].into();
    assert!(
        outcomes.keys().all(|k| allowed.contains(k.as_str())),
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("ok").copied().unwrap_or(0) > CALLS / 2,
        "most calls succeed: {outcomes:?}"
    );
    assert!(kills + stops > 0, "the killer struck");
    let window = HEARTBEAT * MISSES;
    let max_wait = *latencies.last().unwrap();
    assert!(
        max_wait <= TIMEOUT + window + Duration::from_secs(1),
        "a caller waited {max_wait:?}, past its timeout plus the heartbeat window"
    );
    assert_eq!((stats.in_flight, stats.queued), (0, 0), "{stats:?}");
    assert!(
        stats.runners + stats.booting <= 4 && peak.load(SeqCst) <= 4,
        "{stats:?}"
    );
    assert!(stats.served as usize >= outcomes["ok"], "{stats:?}");

    pool.shutdown().await;
    let until = Instant::now() + Duration::from_secs(20);
    while alive.load(SeqCst) > 0 && Instant::now() < until {
        tokio::task::yield_now().await;
    }
    let pids = every_pid.lock().unwrap().clone();
    let left: Vec<u32> = pids.iter().copied().filter(|&p| !is_gone(p)).collect();
    for &pid in &left {
        kill(pid);
    }
    assert_eq!(
        left,
        Vec::<u32>::new(),
        "runner processes left after shutdown"
    );
    assert_eq!(alive.load(SeqCst), 0);
}
