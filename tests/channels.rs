//! Typed channels across the process boundary: order, backpressure, memory, isolation between
//! channels, and how channels end with their call.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use flame::{ErrorKind, Pool, ProcessBackend};
use flame_tests::*;
use tokio::io::{AsyncRead, ReadBuf};

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(120);

async fn process_pool(name: &str, max_concurrency: usize) -> Pool {
    Pool::builder(name)
        .backend(ProcessBackend::new().program(RUNNER))
        .max(1)
        .max_concurrency(max_concurrency)
        .start()
        .await
        .expect("pool starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_messages_each_way_keep_their_order() {
    bounded(BOUND, async {
        const N: u64 = 100_000;
        let pool = process_pool("chanorder", 1).await;
        let (numbers, task_numbers) = flame::channel(256);
        let (task_back, mut back) = flame::channel(256);
        let handle = flame::spawn_on(&pool, echo_stream(task_numbers, task_back));
        let sending = tokio::spawn(async move {
            for n in 0..N {
                numbers
                    .send(n)
                    .await
                    .expect("the runner takes every number");
            }
        });
        let mut expected = 0;
        while let Some(n) = back.recv().await {
            assert_eq!(n, expected, "message {expected} came back out of order");
            expected += 1;
        }
        assert_eq!(expected, N, "every message came back: {:?}", back.error());
        assert!(back.error().is_none(), "the channel ended cleanly");
        sending.await.unwrap();
        assert_eq!(handle.await.unwrap(), Ok(N));
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_messages_cross_in_chunks_both_ways_intact() {
    bounded(BOUND, async {
        let pool = process_pool("chanbig", 1).await;
        let (blobs, task_blobs) = flame::channel(2);
        let (task_back, mut back) = flame::channel(2);
        let handle = flame::spawn_on(&pool, reverse_blobs(task_blobs, task_back));
        // Around the 256 KiB chunk size, and well above it.
        let sizes = [0, 1, 256 * 1024 - 8, 256 * 1024 + 1, 3 << 20, 9 << 20];
        let sending = tokio::spawn(async move {
            for (i, size) in sizes.into_iter().enumerate() {
                let blob: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
                blobs.send(blob).await.unwrap();
            }
        });
        for (i, size) in sizes.into_iter().enumerate() {
            let mut blob = back.recv().await.expect("every blob comes back");
            blob.reverse();
            let expected: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
            assert!(
                blob == expected,
                "blob {i} of {size} bytes came back changed"
            );
        }
        sending.await.unwrap();
        assert_eq!(back.recv().await, None);
        assert_eq!(handle.await.unwrap(), sizes.len() as u64);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_streams_to_a_runner_in_bounded_memory() {
    bounded(BOUND, async {
        const SIZE: u64 = 1 << 30;
        const LIMIT: u64 = 64 << 20;
        let pool = process_pool("chanbulk", 1).await;
        flame::call(&pool, add(0, 0)).await.unwrap(); // boot first: measure the stream alone

        let start = rss_bytes();
        let peak = std::sync::Arc::new(AtomicU64::new(start));
        let sampling = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        let stream = flame::channel::stream_reader(Pattern { left: SIZE });
        let began = Instant::now();
        let counted = flame::call(&pool, count_bytes(stream))
            .await
            .unwrap()
            .unwrap();
        let took = began.elapsed();
        sampling.abort();
        let parent_peak = peak.load(Ordering::Relaxed).max(rss_bytes());
        let parent_growth = parent_peak.saturating_sub(start);
        println!(
            "1 GiB in {took:?} ({:.0} MB/s); runner RSS growth {} KiB, parent {} KiB",
            SIZE as f64 / took.as_secs_f64() / 1e6,
            counted.rss_growth / 1024,
            parent_growth / 1024
        );
        assert_eq!(counted.bytes, SIZE, "every byte arrived");
        assert!(
            counted.rss_growth < LIMIT,
            "the runner grew by {} MiB",
            counted.rss_growth >> 20
        );
        assert!(
            parent_growth < LIMIT,
            "the parent grew by {} MiB",
            parent_growth >> 20
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_does_not_stall_another_channel_of_the_same_runner() {
    bounded(BOUND, async {
        let pool = process_pool("chanslow", 2).await;
        // Nobody reads this one: its producer runs out of credit and waits.
        let (stalled_tx, stalled_rx) = flame::channel(4);
        let stalled = flame::spawn_on(&pool, produce(1_000_000, stalled_tx));
        let (busy_tx, mut busy_rx) = flame::channel(16);
        let busy = flame::spawn_on(&pool, produce(20_000, busy_tx));
        let mut got = 0;
        while let Some(n) = busy_rx.recv().await {
            assert_eq!(n, got);
            got += 1;
        }
        assert_eq!(got, 20_000);
        assert_eq!(busy.await.unwrap(), Ok(20_000));
        assert_eq!(pool.stats().runners, 1, "both calls ran on the one runner");
        assert!(
            !stalled.is_finished(),
            "the unread channel's producer waits"
        );
        // Dropping the unread receiver is seen by the producer on the runner.
        drop(stalled_rx);
        let err = stalled.await.unwrap().unwrap_err();
        assert!(err.contains("dropped"), "{err}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_call_closes_both_local_halves_within_100ms() {
    bounded(BOUND, async {
        let pool = process_pool("chancancel", 1).await;
        let (inbox, task_inbox) = flame::channel::<u64>(4);
        let (task_out, mut out) = flame::channel(4);
        let handle = flame::spawn_on(&pool, hold_channels(task_inbox, task_out));
        out.recv().await.expect("the task runs");

        let cancelled = Instant::now();
        drop(handle);
        assert_eq!(out.recv().await, None);
        let receiver_ended = cancelled.elapsed();
        inbox.closed().await;
        let sender_ended = cancelled.elapsed();
        println!(
            "after the cancel: receiver ended in {receiver_ended:?}, sender in {sender_ended:?}"
        );
        assert!(
            receiver_ended < Duration::from_millis(100),
            "{receiver_ended:?}"
        );
        assert!(
            sender_ended < Duration::from_millis(100),
            "{sender_ended:?}"
        );
        assert_eq!(out.error().unwrap().kind(), ErrorKind::Cancelled);
        let err = inbox.send(1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
        assert!(err.to_string().contains("cancelled"), "{err}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_ends_the_local_halves_with_an_error() {
    bounded(BOUND, async {
        let pool = process_pool("chankill", 1).await;
        let (inbox, task_inbox) = flame::channel::<u64>(4);
        let (task_out, mut out) = flame::channel(4);
        let handle = flame::spawn_on(&pool, hold_channels(task_inbox, task_out));
        let runner = out.recv().await.expect("the task runs") as u32;

        kill(runner);
        assert_eq!(
            out.recv().await,
            None,
            "the receiver ends, it does not hang"
        );
        let err = out.error().expect("the receiver says why it ended");
        assert_eq!(err.kind(), ErrorKind::RunnerLost, "{err}");
        inbox.closed().await;
        let err = inbox.send(1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RunnerLost, "{err}");
        assert_eq!(handle.await.unwrap_err().kind(), ErrorKind::RunnerLost);
        assert!(wait_gone(runner, Duration::from_secs(10)).await);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misused_halves_fail_clearly() {
    bounded(BOUND, async {
        let pool = process_pool("chanmisuse", 1).await;

        // One receiver twice in the same call's arguments.
        let (_tx, rx) = flame::channel::<u64>(4);
        let err = flame::call(&pool, take_twice(SameReceiverTwice(rx)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
        assert!(err.to_string().contains("already sent"), "{err}");

        // A sender used by the runner after its call ended.
        let (tx, mut rx) = flame::channel::<u64>(4);
        flame::call(&pool, stash_sender(tx)).await.unwrap();
        assert_eq!(rx.recv().await, None, "the call ended, so did its channel");
        let err = flame::call(&pool, use_stashed_sender())
            .await
            .unwrap()
            .expect("the stashed sender fails");
        assert!(
            err.contains("call that carried this channel has ended"),
            "{err}"
        );

        // A half serialized outside a call.
        let (tx, _rx) = flame::channel::<u64>(4);
        assert!(postcard::to_stdvec(&tx).is_err());
        assert!(!tx.is_closed(), "the failed attempt left the channel alone");

        // A streaming call can't be retried.
        let (tx, _rx) = flame::channel::<u64>(4);
        let err = flame::call(&pool, produce(1, tx).retries(2))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains("can't be retried"), "{err}");
        pool.shutdown().await;
    })
    .await;
}

/// Yields `left` bytes of a pattern, fast (Tokio's `repeat` writes a byte at a time).
struct Pattern {
    left: u64,
}

impl AsyncRead for Pattern {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        static PATTERN: [u8; 64 * 1024] = [0xAB; 64 * 1024];
        let n = (self.left as usize).min(buf.remaining()).min(PATTERN.len());
        buf.put_slice(&PATTERN[..n]);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

/// Yields `ok` bytes, then fails.
struct FailingReader {
    ok: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.ok == 0 {
            return Poll::Ready(Err(std::io::Error::other("the disk is on fire")));
        }
        let n = self.ok.min(buf.remaining());
        buf.put_slice(&vec![1u8; n]);
        self.ok -= n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_error_of_a_streamed_file_reaches_the_task() {
    bounded(BOUND, async {
        let pool = process_pool("chanfail", 1).await;
        let stream = flame::channel::stream_reader(FailingReader { ok: 100_000 });
        let err = flame::call(&pool, count_bytes(stream))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.contains("the disk is on fire"), "{err}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_leaked_into_a_detached_task_does_not_hold_the_call() {
    bounded(BOUND, async {
        let pool = process_pool("chanleak", 1).await;
        let (tx, mut rx) = flame::channel::<u64>(4);
        let reading = tokio::spawn(async move {
            let mut got = 0u64;
            while rx.recv().await.is_some() {
                got += 1;
            }
            got
        });
        assert_eq!(flame::call(&pool, leak_sender(tx)).await.unwrap(), 7);
        let got = reading.await.unwrap();
        assert!(got >= 1, "what was sent before the return arrived: {got}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_short_by_a_panic_says_so() {
    bounded(BOUND, async {
        let pool = process_pool("chanpanic", 1).await;
        let (tx, mut rx) = flame::channel::<u64>(16);
        let err = flame::call(&pool, send_then_panic(5, tx))
            .await
            .unwrap_err();
        assert!(err.is_panic(), "{err}");
        let mut got = Vec::new();
        while let Some(n) = rx.recv().await {
            got.push(n);
        }
        assert!(got.len() <= 5, "{got:?}");
        let why = rx
            .error()
            .expect("the receiver says the stream was cut short");
        assert!(why.is_panic(), "{why}");
        pool.shutdown().await;
    })
    .await;
}
