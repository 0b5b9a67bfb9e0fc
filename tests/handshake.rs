//! The handshake: a runner with a wrong token, an unknown runner id, or another build's task
//! manifest is refused with a reason on both sides, and nobody hangs. Garbage on the listener
//! harms nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::{ErrorKind, Pool, ProcessBackend};
use flame_tests::*;
use tokio::io::AsyncWriteExt;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const OTHER_BUILD: &str = env!("CARGO_BIN_EXE_flame-test-other-build");
const BOUND: Duration = Duration::from_secs(60);

async fn doctored_pool(name: &str, doctor: fn(&str) -> String) -> (Pool, Arc<Mutex<Vec<u32>>>) {
    let backend = Doctored::new(RUNNER, doctor);
    let pids = backend.pids.clone();
    let pool = Pool::builder(name)
        .backend(backend)
        .max(1)
        .boot_timeout(Duration::from_secs(20))
        .start()
        .await
        .unwrap();
    (pool, pids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_rejected() {
    bounded(BOUND, async {
        let (pool, pids) = doctored_pool("wrongtoken", |h| {
            with_field(h, "token", Some(&"0".repeat(32)))
        })
        .await;
        let err = flame::call(&pool, add(1, 2)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
        assert!(err.message().contains("wrong token"), "{err}");
        let pid = pids.lock().unwrap()[0];
        assert!(
            wait_gone(pid, Duration::from_secs(10)).await,
            "the refused runner exits"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_runner_id_is_refused_and_the_boot_fails_with_its_reason() {
    bounded(BOUND, async {
        let (pool, pids) =
            doctored_pool("stranger", |h| with_field(h, "runner", Some("nobody-0"))).await;
        let err = flame::call(&pool, add(1, 2)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(
            err.message().contains("exited before it connected back"),
            "{err}"
        );
        let pid = pids.lock().unwrap()[0];
        assert!(
            wait_gone(pid, Duration::from_secs(10)).await,
            "the refused runner exits"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_builds_manifest_is_rejected_by_name() {
    bounded(BOUND, async {
        let pool = Pool::builder("otherbuild")
            .backend(ProcessBackend::new().program(OTHER_BUILD))
            .max(1)
            .start()
            .await
            .unwrap();
        let err = flame::call(&pool, add(1, 2)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
        assert!(err.message().contains("task manifest mismatch"), "{err}");
        assert!(err.message().contains("only_in_other_build"), "{err}");
        pool.shutdown().await;
    })
    .await;
}

/// The runner → parent messages as they look on the wire (mirrors of flame-rt's private types:
/// the point is to write bytes a real runner never would).
#[derive(serde::Serialize)]
enum ToParentWire {
    Hello(HelloWire),
    Done { call: u64, outcome: OutcomeWire },
}

#[derive(serde::Serialize)]
struct HelloWire {
    protocol: u32,
    runner_id: String,
    token: [u8; 16],
    fingerprint: String,
    manifest_hash: u64,
    manifest: Vec<(String, u64)>,
}

#[derive(serde::Serialize)]
enum OutcomeWire {
    Ok(Vec<u8>),
}

#[derive(serde::Deserialize, Debug)]
enum ToRunnerWire {
    // Only its position matters: Refused is the second variant.
    #[allow(dead_code)]
    Welcome {
        heartbeat_ms: u64,
        miss_limit: u32,
        idle_ms: Option<u64>,
    },
    Refused {
        reason: String,
    },
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A stranger's hello: it can't know the runner's token.
fn hello(protocol: u32, runner_id: &str) -> Vec<u8> {
    hello_with_token(protocol, runner_id, [7; 16])
}

fn hello_with_token(protocol: u32, runner_id: &str, token: [u8; 16]) -> Vec<u8> {
    frame(
        &postcard::to_stdvec(&ToParentWire::Hello(HelloWire {
            protocol,
            runner_id: runner_id.into(),
            token,
            fingerprint: "attacker".into(),
            manifest_hash: 0,
            manifest: vec![],
        }))
        .unwrap(),
    )
}

/// Sends `bytes`, optionally half-closes, and returns what the parent answered before it
/// closed the connection (it must close it: nobody waits forever on a bad peer).
async fn throw(addr: &str, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    if stream.write_all(bytes).await.is_err() {
        // Cut off mid-write (a 2 MiB frame, say): the parent has already closed on us.
        return Vec::new();
    }
    if half_close {
        stream.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "the parent kept a bad connection open after {bytes:?}"
    );
    answer
}

fn refusal(answer: &[u8]) -> String {
    assert!(answer.len() > 4, "the parent sent no refusal");
    match postcard::from_bytes::<ToRunnerWire>(&answer[4..]).unwrap() {
        ToRunnerWire::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_listener_harms_nothing() {
    bounded(BOUND, async {
        let addr = Arc::new(Mutex::new(None));
        let dir = scratch_dir("bad-input");
        let pool = Pool::builder("badinput")
            .backend(Spy {
                inner: ProcessBackend::new().program(RUNNER),
                addr: addr.clone(),
            })
            .min(1)
            .max(1)
            .start()
            .await
            .unwrap();
        let addr = addr.lock().unwrap().clone().unwrap();
        let task_frame = postcard::to_stdvec(&ToParentWire::Done {
            call: 1,
            outcome: OutcomeWire::Ok(postcard::to_stdvec(&7u64).unwrap()),
        })
        .unwrap();
        let silent: Vec<Vec<u8>> = vec![
            b"\xff\xff\xff\xffjunk".to_vec(),     // a 4 GiB length prefix
            frame(&vec![0; 2 * 1024 * 1024]),     // 2 MiB before any hello
            b"\x00\x00\x00\x64only ten".to_vec(), // a truncated frame
            frame(&[200, 1, 2, 3]),               // an unknown message tag
            frame(&task_frame),                   // a result before any hello
        ];
        for bytes in &silent {
            let answer = throw(&addr, bytes, true).await;
            assert!(
                answer.is_empty(),
                "the parent answered an unauthenticated peer: {answer:?}"
            );
        }
        // A stranger learns nothing, not even whether the runner id it names exists: a hello
        // without the runner's token gets no answer, whatever its version.
        for stranger in [
            hello(99, "badinput-1"),
            hello(2, "badinput-1"),
            hello(2, "nobody-9"),
        ] {
            let answer = throw(&addr, &stranger, false).await;
            assert!(
                answer.is_empty(),
                "the parent answered a stranger's hello: {answer:?}"
            );
        }
        // A peer that never finishes its hello is cut off (slowloris).
        let started = std::time::Instant::now();
        throw(&addr, b"\x00\x00", false).await;
        assert!(started.elapsed() < Duration::from_secs(14));

        // The pool's runner was never disturbed, and nothing ran for the strangers.
        assert_eq!(pool.stats().served, 0);
        let marker = dir.join("ran");
        flame::call(&pool, write_after(0, marker.clone()))
            .await
            .unwrap();
        assert_eq!(
            flame::call(&pool, add(40, 2)).await.unwrap(),
            42,
            "the pool still works"
        );
        assert_eq!(pool.stats().served, 2);
        assert_eq!(pool.stats().booted, 1, "the one runner served throughout");
        pool.shutdown().await;
    })
    .await;
}

#[test]
fn a_binary_without_tasks_is_told_how_to_link_them() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flame-test-no-tasks"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no #[flame::task] is registered in this binary"),
        "{text}"
    );
    assert!(text.contains("use my_tasks as _;"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_hello_for_a_booting_runner_changes_nothing() {
    bounded(BOUND, async {
        // The real runner dials back 1.5 s into its boot; a stranger gets in first, naming it.
        let puppet = Puppet::then_boot(
            ProcessBackend::new().program(RUNNER),
            Duration::from_millis(1500),
        );
        let pool = puppet.pool("victim").await;
        let call = flame::spawn_on(&pool, add(1, 2));
        let (addr, runner_id, _) = puppet.booting().await;
        for _ in 0..3 {
            let answer = throw(&addr, &hello(2, &runner_id), false).await;
            assert!(answer.is_empty(), "the stranger was answered: {answer:?}");
        }
        assert_eq!(call.await.unwrap(), 3, "the boot waited for its runner");
        let stats = pool.stats();
        assert_eq!((stats.booted, stats.failed_boots), (1, 0));
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_with_its_token_but_another_protocol_is_told_why() {
    bounded(BOUND, async {
        let puppet = Puppet::default();
        let pool = puppet.pool("oldrelease").await;
        let call = flame::spawn_on(&pool, add(1, 2));
        let (addr, runner_id, handoff) = puppet.booting().await;
        let token = unhex(field(&handoff, "token").unwrap());
        let reason = refusal(&throw(&addr, &hello_with_token(99, &runner_id, token), false).await);
        assert!(reason.contains("protocol version mismatch"), "{reason}");
        let err = call.await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
        assert!(err.message().contains("protocol version mismatch"), "{err}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processes_a_task_starts_never_see_the_hand_off_token() {
    bounded(BOUND, async {
        let pool = Pool::builder("scrubbed")
            .backend(ProcessBackend::new().program(RUNNER))
            .max(1)
            .start()
            .await
            .unwrap();
        let (env, on_a_runner) = flame::call(&pool, child_env()).await.unwrap().unwrap();
        assert!(on_a_runner, "the runner still knows what it is");
        assert!(env.contains("PATH="), "env ran: {env}");
        assert!(!env.contains(flame::__private::HANDOFF_ENV), "{env}");
        assert!(!env.contains("FLAME_PARENT_PID"), "{env}");
        pool.shutdown().await;
    })
    .await;
}
