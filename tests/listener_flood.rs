//! A flood of strangers on the runner listener: thousands of idle connections and garbage
//! senders while a pool boots runners. Every boot succeeds, the parent's descriptors and memory
//! stay bounded, and the log says what was dropped in a few lines, with counts that add up.
//!
//! Its own test binary: it installs a global subscriber to read the listener's log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::{Pool, ProcessBackend};
use flame_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const FLOOD: &str = env!("CARGO_BIN_EXE_flame-test-flood");
const IDLE: usize = 5_000;
const GARBAGE: usize = 5_000;
/// The listener's ceiling on unproven connections, plus the pool's own descriptors.
const FD_BOUND: usize = 512 + 128;
const BOUND: Duration = Duration::from_secs(120);
const DROPPED: &str = "flame: dropped connections that did not prove to be runners of this parent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_keeps_no_runner_out() {
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(otel_subscriber(Some(recorder.clone()))).unwrap();
    bounded(BOUND, async {
        let addr = Arc::new(Mutex::new(None));
        let pool = Pool::builder("flooded")
            .backend(Spy {
                inner: ProcessBackend::new().program(RUNNER),
                addr: addr.clone(),
            })
            .max(8)
            .max_concurrency(1)
            .start()
            .await
            .unwrap();
        assert_eq!(flame::call(&pool, add(1, 1)).await.unwrap(), 2);
        let addr = addr.lock().unwrap().clone().unwrap();
        let (fds_before, rss_before) = (open_fds(), rss_kib());

        let mut flood = tokio::process::Command::new(FLOOD)
            .args([&addr, &IDLE.to_string(), &GARBAGE.to_string(), "3000"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(flood.stdout.take().unwrap()).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("flooding"));

        // Measured while the flood runs (a sample every 10 ms), to bound the peak.
        let peak = Arc::new(Mutex::new((0usize, 0u64)));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    {
                        let mut peak = peak.lock().unwrap();
                        peak.0 = peak.0.max(open_fds());
                        peak.1 = peak.1.max(rss_kib());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        // Seven more runners boot into the flood (one slot each, all busy at once).
        let calls: Vec<_> = (0..8)
            .map(|_| flame::spawn_on(&pool, sleep_ms(500)))
            .collect();
        let placed = futures::future::try_join_all(calls).await;
        let opened: usize = lines
            .next_line()
            .await
            .unwrap()
            .and_then(|l| l.strip_prefix("opened ").map(|n| n.parse().unwrap()))
            .expect("the flood says how many connections it opened");
        flood.wait().await.unwrap();
        sampler.abort();

        let ran_on = placed.expect("every call got a runner during the flood");
        let stats = pool.stats();
        let (peak_fds, peak_rss) = *peak.lock().unwrap();
        println!(
            "flood of {opened} connections: {} runners booted, {} failed; parent descriptors {fds_before} -> peak {peak_fds}, RSS {rss_before} KiB -> peak {peak_rss} KiB",
            stats.booted, stats.failed_boots,
        );
        assert_eq!(stats.failed_boots, 0);
        assert_eq!(stats.booted, 8);
        let mut pids: Vec<u32> = ran_on.iter().map(|w| w.pid).collect();
        pids.sort();
        pids.dedup();
        assert_eq!(pids.len(), 8, "the eight calls ran on eight runners at once");
        assert!(opened > (IDLE + GARBAGE) / 2, "the flood barely happened: {opened}");
        assert!(
            peak_fds <= fds_before + FD_BOUND,
            "the parent held {peak_fds} descriptors (from {fds_before})"
        );
        assert!(
            peak_rss <= rss_before + 64 * 1024,
            "the parent grew from {rss_before} KiB to {peak_rss} KiB"
        );

        // Every connection the flood opened is accounted for in the log, in a few lines.
        let last = recorder
            .wait_for_where(
                DROPPED,
                |e| e.fields["total"] == opened.to_string(),
                Duration::from_secs(20),
            )
            .await;
        let lines = recorder.count(DROPPED);
        println!("the listener's last drop line: {:?}; {lines} such lines", last.fields["what"]);
        assert!(lines <= 15, "{lines} lines logged for one flood");
        pool.shutdown().await;
    })
    .await;
}
