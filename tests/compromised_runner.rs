//! A runner that holds the right token but breaks the rules (compromised, or a broken build):
//! the parent believes no answer it did not ask for, and buffers no more than it granted.

use std::time::Duration;

use flame::__private::fuzz::impostor::{chan_message, chan_part, done};
use flame_tests::*;

const BOUND: Duration = Duration::from_secs(60);

/// Counts what the parent holds for what a runner sent.
#[global_allocator]
static HEAP: flame::__private::fuzz::HeapCounter = flame::__private::fuzz::HeapCounter;

/// The counter counts the whole process, so the test that measures runs alone: every other
/// test of this file holds a read guard (CI once saw 1 GiB "held" by a test running alongside).
static MEASURING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_for_calls_nobody_made_change_no_count() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        let puppet = Puppet::default();
        let pool = puppet.pool("forger").await;
        let first = flame::spawn_on(&pool, add(1, 2));
        let mut runner = puppet.impostor().await;
        let id = runner.next_run().await;
        let forged: Vec<u8> = (1..=10_000).flat_map(|n| done(id + n, &99u64)).collect();
        runner.send(&forged).await.unwrap();
        runner.send(&done(id, &3u64)).await.unwrap();
        // A second answer to a call already answered.
        runner.send(&done(id, &4u64)).await.unwrap();
        assert_eq!(first.await.unwrap(), 3);

        // Frames are read in order: once this call is answered, all of the above were read.
        let second = flame::spawn_on(&pool, add(2, 2));
        let id = runner.next_run().await;
        runner.send(&done(id, &4u64)).await.unwrap();
        assert_eq!(second.await.unwrap(), 4);
        let stats = pool.stats();
        assert_eq!(
            (stats.served, stats.runners, stats.in_flight),
            (2, 1, 0),
            "{stats:?}"
        );
        pool.shutdown().await;
    })
    .await;
}

/// Plays a runner of `reverse_blobs` that sends `frames` on its channel back to the parent
/// (capacity 4, so a window of 4 MiB, in a pool whose max_payload is 8 MiB) while the app reads
/// nothing, then answers the call. Returns the most the parent held meanwhile, what the app's
/// receiver got, and why it ended.
async fn greedy_runner(frames: impl Fn(u64) -> Vec<u8>) -> (isize, Vec<Vec<u8>>, String) {
    let puppet = Puppet::default();
    let pool = puppet
        .builder("greedy")
        .max_payload(8 << 20)
        .start()
        .await
        .unwrap();
    let (_to_runner, blobs) = flame::channel::<Vec<u8>>(4);
    let (back, mut from_runner) = flame::channel::<Vec<u8>>(4);
    let call = flame::spawn_on(&pool, reverse_blobs(blobs, back));
    let mut runner = puppet.impostor().await;
    let id = runner.next_run().await;

    let frames = frames(id);
    flame::__private::fuzz::HeapCounter::counting(true);
    let before = flame::__private::fuzz::HeapCounter::net();
    runner.send(&frames).await.unwrap();
    runner.send(&done(id, &0u64)).await.unwrap();
    // Frames are read in order: with the result in, all of the above was read.
    assert_eq!(call.await.unwrap(), 0);
    let held = flame::__private::fuzz::HeapCounter::peak() - before;
    flame::__private::fuzz::HeapCounter::counting(false);

    let mut got = Vec::new();
    while let Some(message) = from_runner.recv().await {
        got.push(message);
    }
    let why = from_runner
        .error()
        .map(|e| e.to_string())
        .unwrap_or_default();
    pool.shutdown().await;
    (held, got, why)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_sending_past_its_channel_credit_is_cut_off_in_bounded_memory() {
    let _alone = MEASURING.write().await;
    bounded(BOUND, async {
        // One message that never ends: 64 MiB of chunks.
        let chunk = vec![1; 256 << 10];
        let (held, got, why) =
            greedy_runner(|id| (0..256).flat_map(|_| chan_part(id, 1, &chunk)).collect()).await;
        eprintln!("an endless message: {} MiB held at most", held >> 20);
        // The 8 MiB reassembled before the refusal, and a buffer growing to it.
        assert!(held < 24 << 20, "{} MiB held at most", held >> 20);
        assert!(got.is_empty());
        assert!(
            why.contains("more than 8388608 bytes (the pool's max_payload)"),
            "{why}"
        );

        // Whole 3 MiB messages, 16 of them, none of them taken by the app: the second one
        // overruns the 4 MiB window. (Before the window, the parent took 8 of them.)
        let message = serde_bytes::ByteBuf::from(vec![2; 3 << 20]);
        let (held, got, why) = greedy_runner(|id| {
            (0..16)
                .flat_map(|_| chan_message(id, 1, &message))
                .collect()
        })
        .await;
        eprintln!("messages past the window: {} MiB held at most", held >> 20);
        assert!(held < 16 << 20, "{} MiB held at most", held >> 20);
        assert_eq!(
            got,
            [message.into_vec()],
            "what came within the credit is delivered"
        );
        assert!(
            why.contains("sent more bytes than this channel's credit allows"),
            "{why}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_hangs_up_as_it_connects_is_never_kept() {
    let _alone = MEASURING.read().await;
    bounded(BOUND, async {
        // The connection may end before the boot has added the runner to the pool; it must
        // not be added then, or calls wait on it for ever. Found by the property test below.
        for _ in 0..30 {
            let puppet = Puppet::default();
            let pool = puppet.pool("hangup").await;
            let call = flame::spawn_on(&pool, add(1, 2));
            puppet.hang_up_after_hello().await;
            // The pool has no public event for this: look until the boot is over one way or
            // the other, with no runner left.
            let give_up = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let stats = pool.stats();
                if stats.runners == 0 && stats.booted + stats.failed_boots > 0 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < give_up,
                    "a runner that hung up is kept: {stats:?}"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(call);
            pool.shutdown().await;
        }
    })
    .await;
}

/// Three calls, the second with a channel each way and a message big enough to go in chunks.
async fn three_calls(pool: flame::Pool) {
    let first = flame::spawn_on(&pool, add(1, 2));
    let (to_runner, blobs) = flame::channel(2);
    let (back, mut from_runner) = flame::channel(2);
    let second = flame::spawn_on(&pool, reverse_blobs(blobs, back));
    let third = flame::spawn_on(&pool, add(3, 4));
    let _ = to_runner.send(vec![7; 300 << 10]).await;
    drop(to_runner);
    let _ = (first.await, second.await, third.await);
    while from_runner.recv().await.is_some() {}
}

static SESSION: std::sync::OnceLock<flame::__private::fuzz::Session> = std::sync::OnceLock::new();

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..Default::default()
    })]

    /// The property twin of the `runner` fuzz target (fuzz/fuzz_targets/runner.rs): whatever
    /// a stranger sends while a runner boots, and whatever that runner then says, the runner is
    /// welcomed, every call is resolved and every slot given back.
    #[test]
    fn any_runner_script_leaves_every_call_resolved_and_every_slot_free(
        stranger in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        script in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
    ) {
        let _alone = MEASURING.blocking_read();
        SESSION
            .get_or_init(flame::__private::fuzz::Session::new)
            .run(&stranger, &script, three_calls);
    }
}
