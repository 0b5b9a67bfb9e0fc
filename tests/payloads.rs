//! Big and byte-typed payloads on real runner processes: byte vectors in every shape the task
//! macro encodes as one byte string, user structs holding bytes, and arguments and results of
//! tens of MiB, checked byte for byte.

use std::time::Duration;

use flame::__private::fuzz::impostor::took;
use flame::{Pool, ProcessBackend};
use flame_tests::*;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(60);

async fn pool(name: &str) -> Pool {
    Pool::builder(name)
        .max(1)
        .backend(ProcessBackend::new().program(RUNNER))
        .start()
        .await
        .expect("pool starts")
}

/// Bytes no run of equal values hides a lost or shifted chunk in.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_48_mib_vec_goes_and_comes_back_intact() {
    bounded(BOUND, async {
        let pool = pool("big-vec").await;
        let data = pattern(48 << 20, 7);
        let back = flame::call(&pool, echo(data.clone())).await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the echoed bytes differ");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vecs_around_the_piece_size_come_back_intact() {
    bounded(BOUND, async {
        // A result above one piece is taken over from the buffer it was reassembled in, past
        // its length prefix (3 bytes up to 2 MiB, 4 above): each side of those edges.
        let pool = pool("piece-edges").await;
        let piece = 256 << 10;
        for (i, len) in [
            piece - 1,
            piece,
            piece + 1,
            piece + 7,
            (2 << 20) - 1,
            (2 << 20) + 1,
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(len, i as u64);
            let back = flame::call(&pool, echo(data.clone())).await.unwrap();
            assert!(back == data, "{len} bytes came back different");
        }
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_vec_argument_is_handed_the_reassembled_buffer() {
    bounded(BOUND, async {
        let pool = pool("taken-over").await;
        let (first, last) = (pattern(3 << 20, 1), pattern(1 << 20, 2));
        let sent = |v: &[u8]| containers::fnv(v);
        // The first big vector takes the buffer over; the second is copied out of it first.
        let none = bytes::Bytes::new();
        let (a, empty, b) =
            flame::call(&pool, byte_args(first.clone(), none.clone(), last.clone()))
                .await
                .unwrap();
        assert_eq!(
            (a.fnv, empty, b.fnv),
            (sent(&first), sent(&none), sent(&last))
        );
        assert!(
            a.taken_over,
            "the first vector was copied out of the buffer"
        );
        assert!(!b.taken_over, "two vectors took over one buffer");
        // A `Bytes` argument slices the same buffer: the vector must not take it from under it.
        let shared = bytes::Bytes::from(pattern(2 << 20, 3));
        let (a, bytes, b) = flame::call(
            &pool,
            byte_args(first.clone(), shared.clone(), last.clone()),
        )
        .await
        .unwrap();
        assert_eq!(
            (a.fnv, bytes, b.fnv),
            (sent(&first), sent(&shared), sent(&last))
        );
        assert!(!a.taken_over, "the vector took the buffer a Bytes shares");
        // Under one piece, arguments come in one frame and are copied as before.
        let small = pattern(100 << 10, 4);
        let (a, _, _) = flame::call(&pool, byte_args(small.clone(), none, Vec::new()))
            .await
            .unwrap();
        assert_eq!(a.fnv, sent(&small));
        assert!(!a.taken_over);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_waits_for_the_runner_to_take_its_pieces() {
    bounded(BOUND, async {
        // 4 MiB may be on their way unread (flame-rt's PIECE_WINDOW); a piece is 256 KiB.
        let (window, piece) = (4u64 << 20, 256u64 << 10);
        let puppet = Puppet::default();
        let pool = puppet.pool("window").await;
        let handle = flame::spawn_on(&pool, echo(pattern(32 << 20, 5)));
        let mut runner = puppet.impostor().await;
        // The parts the parent sends before it goes quiet, and the call they belong to.
        async fn parts_until_quiet(runner: &mut Impostor) -> (u64, u64) {
            let (mut call, mut bytes) = (0, 0);
            while let Ok(said) =
                tokio::time::timeout(Duration::from_millis(300), runner.next()).await
            {
                let said = said.expect("the parent hung up");
                let mut fields = said.strip_prefix("part ").expect(&said).split(' ');
                call = fields.next().unwrap().parse().unwrap();
                bytes += fields.next().unwrap().parse::<u64>().unwrap();
            }
            (call, bytes)
        }
        let (call, first) = parts_until_quiet(&mut runner).await;
        assert!(
            (window..window + piece).contains(&first),
            "{first} bytes sent before the runner took any"
        );
        // Each report of progress lets the upload go on, up to the window past it.
        runner.send(&took(call, 2 << 20)).await.unwrap();
        let (_, more) = parts_until_quiet(&mut runner).await;
        assert!(
            (2 << 20..(2 << 20) + piece).contains(&more),
            "{more} bytes more after the runner took 2 MiB"
        );
        // Cancelled, the upload stops waiting and sends nothing more.
        drop(handle);
        assert_eq!(
            runner.next().await.as_deref(),
            Some(format!("cancel {call}").as_str())
        );
        runner.send(&took(call, 8 << 20)).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), runner.next())
                .await
                .is_err(),
            "the cancelled upload went on"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_vector_shape_round_trips() {
    bounded(BOUND, async {
        let pool = pool("byte-shapes").await;
        let (first, second) = (pattern(3000, 1), pattern(70_000, 2));
        let joined = flame::call(
            &pool,
            join_bytes(Some(first.clone()), second.clone().into(), false),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(joined, [first, second.clone()].concat());
        let none = flame::call(&pool, join_bytes(None, second.clone().into(), false))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(none, second);
        let refused = flame::call(&pool, join_bytes(None, vec![1, 2, 3].into(), true))
            .await
            .unwrap();
        assert_eq!(refused, Err("refused 3 bytes".to_string()));
        let empty = flame::call(&pool, join_bytes(Some(Vec::new()), Box::new([]), false))
            .await
            .unwrap();
        assert_eq!(empty, Ok(Vec::new()));
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_whole_or_in_pieces_and_other_types_named_bytes_too() {
    bounded(BOUND, async {
        let pool = pool("bytes").await;
        // Small ones in the call's frame; big ones in pieces, sliced out of the reassembled
        // arguments on the runner and out of the reassembled result here.
        for (head, tail) in [(10, 20), (3 << 20, 5 << 20)] {
            let head = bytes::Bytes::from(pattern(head, 6));
            let tail = bytes::Bytes::from(pattern(tail, 7));
            let joined = flame::call(&pool, splice(head.clone(), 9, tail.clone()))
                .await
                .unwrap();
            assert_eq!(joined, [&head[..], &[9], &tail[..]].concat());
        }
        let word = named::Bytes("hey".into());
        assert_eq!(flame::call(&pool, shout(word)).await.unwrap(), "HEY");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_struct_with_byte_fields_round_trips() {
    bounded(BOUND, async {
        let pool = pool("blobs").await;
        let blobs = ByteFields {
            marked: pattern(5 << 20, 3),
            shared: pattern(1 << 20, 4).into(),
            buf: serde_bytes::ByteBuf::from(pattern(2 << 20, 5)),
            name: "clip".into(),
        };
        let back = flame::call(&pool, reverse_byte_fields(blobs.clone()))
            .await
            .unwrap();
        let mut expected = blobs;
        expected.marked.reverse();
        expected.shared = expected.shared.iter().rev().copied().collect();
        expected.buf.reverse();
        assert!(back == expected, "the struct came back changed");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_argument_and_result_cross_in_pieces_intact() {
    bounded(Duration::from_secs(120), async {
        let pool = pool("huge").await;
        let runner = flame::call(&pool, whereabouts()).await.unwrap().pid;
        let before = peak_rss_kib_of(runner) / 1024;
        let data = pattern(256 << 20, 11);
        let back = flame::call(&pool, echo(data.clone())).await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the echoed bytes differ");
        // The pieces are put together in one buffer, which the task gets as its Vec and sends
        // back from: the runner's peak is about one copy, well within the two allowed.
        let peak = peak_rss_kib_of(runner) / 1024 - before;
        assert!(
            peak <= 512,
            "the runner's peak grew by {peak} MiB for a 256 MiB echo"
        );
        // The runner is still in a state to serve: nothing of the pieces is left over.
        assert_eq!(flame::call(&pool, add(1, 2)).await.unwrap(), 3);
        assert_eq!(pool.stats().booted, 1);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_over_max_payload_fail_naming_the_size_and_the_knob() {
    bounded(BOUND, async {
        let pool = Pool::builder("capped")
            .max(1)
            .max_payload(1 << 20)
            .backend(ProcessBackend::new().program(RUNNER))
            .start()
            .await
            .unwrap();
        let err = flame::call(&pool, echo(vec![7; 2 << 20]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), flame::ErrorKind::Codec, "{err}");
        assert!(err.message().contains("2097156 bytes"), "{err}");
        assert!(err.message().contains("max_payload"), "{err}");
        // Under the limit going out, over it coming back: the runner refuses to send it.
        let err = flame::call(&pool, make_bytes(2 << 20)).await.unwrap_err();
        assert_eq!(err.kind(), flame::ErrorKind::Codec, "{err}");
        assert!(err.message().contains("result"), "{err}");
        assert!(
            err.message().contains("max_payload of 1048576 bytes"),
            "{err}"
        );
        // Nothing is lost: the pool serves the next call.
        assert_eq!(
            flame::call(&pool, echo(vec![5; 1000])).await.unwrap(),
            vec![5; 1000]
        );
        pool.shutdown().await;
    })
    .await;
}

/// The resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    rss_kib_of(pid) / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_mid_upload_frees_the_slot_and_the_runners_memory() {
    bounded(Duration::from_secs(120), async {
        let pool = Pool::builder("upload-cancel")
            .max(1)
            .max_concurrency(1)
            .backend(ProcessBackend::new().program(RUNNER))
            .start()
            .await
            .unwrap();
        let runner = flame::call(&pool, whereabouts()).await.unwrap().pid;
        let before = rss_mib(runner);
        let handle = flame::spawn_on(&pool, echo(vec![3; 768 << 20]));
        // The pieces are arriving: the runner holds a good part of them.
        while rss_mib(runner) < before + 128 {
            assert!(
                !handle.is_finished(),
                "the upload ended before it could be cancelled"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(handle);
        while pool.stats().in_flight > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The slot is free: the next call runs at once, on the same runner.
        let next = flame::call(&pool, whereabouts()).await.unwrap();
        assert_eq!(next.pid, runner, "the same runner serves on");
        // The pieces are freed off the runner's protocol thread, soon after the cancel.
        let freed_by = std::time::Instant::now() + Duration::from_secs(10);
        while rss_mib(runner) >= before + 64 && std::time::Instant::now() < freed_by {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let after = rss_mib(runner);
        assert!(
            after < before + 64,
            "the runner still holds {after} MiB (it had {before} MiB before the upload)"
        );
        assert_eq!(pool.stats().booted, 1);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_beside_a_big_argument_loses_nothing_while_it_decodes() {
    bounded(BOUND, async {
        let pool = pool("big-and-stream").await;
        let (tx, rx) = flame::channel(1024);
        let handle = flame::spawn_on(&pool, big_and_streamed(vec![9; 64 << 20], rx));
        for n in 0..1000 {
            tx.send(n).await.unwrap();
        }
        drop(tx);
        let (len, got) = handle.await.unwrap();
        assert_eq!(len, 64 << 20);
        assert_eq!(got, (0..1000).collect::<Vec<u64>>());
        pool.shutdown().await;
    })
    .await;
}
