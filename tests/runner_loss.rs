//! Runners that die, parents that die, runners that never come up: no hang, no orphan, and an
//! error that says why.

use std::process::Stdio;
use std::time::{Duration, Instant};

use flame::{ErrorKind, Pool, ProcessBackend};
use flame_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const PARENT: &str = env!("CARGO_BIN_EXE_flame-test-parent");
const FAILING_MAIN: &str = env!("CARGO_BIN_EXE_flame-test-failing-main");
const BOUND: Duration = Duration::from_secs(60);

/// A one-runner pool with two calls in flight on it: one holding a child process, one sleeping
/// for a minute. Returns the calls, the runner's pid and the child's.
async fn two_calls_on_one_runner(
    name: &str,
) -> (
    Pool,
    (flame::JoinHandle<()>, flame::JoinHandle<Whereabouts>),
    u32,
    u32,
) {
    let pool = Pool::builder(name)
        .backend(ProcessBackend::new().program(RUNNER))
        .max(1)
        .max_concurrency(4)
        .start()
        .await
        .unwrap();
    let dir = scratch_dir(name);
    let held = flame::spawn_on(&pool, hold_child(dir.clone()));
    let slow = flame::spawn_on(&pool, sleep_ms(60_000));
    let (runner_pid, child_pid) = held_pids(&dir).await;
    (pool, (held, slow), runner_pid, child_pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_runner_fails_its_calls_with_runner_lost() {
    bounded(BOUND, async {
        let (pool, (held, slow), runner_pid, child_pid) = two_calls_on_one_runner("killed").await;

        kill(runner_pid);
        let killed_at = Instant::now();
        for result in [held.await.map(|_| ()), slow.await.map(|_| ())] {
            let err = result.unwrap_err();
            assert!(err.is_runner_lost(), "{err:?}");
        }
        let noticed = killed_at.elapsed();
        println!("SIGKILL of a runner: its in-flight calls failed after {noticed:?}");
        assert!(
            noticed < Duration::from_secs(1),
            "in-flight calls failed only after {noticed:?}"
        );
        // Its process group goes with it: the task's child too.
        assert!(
            wait_gone(child_pid, Duration::from_secs(1)).await,
            "the killed runner's task child outlived it"
        );

        // The pool heals: the next call boots a fresh runner.
        let there = flame::call(&pool, whereabouts()).await.unwrap();
        assert_ne!(there.pid, runner_pid);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_drops_its_calls_on_sigterm_fails_them_with_the_reason() {
    bounded(BOUND, async {
        let (pool, (held, slow), runner_pid, _) = two_calls_on_one_runner("sigtermed").await;
        // A process runner stops at once on SIGTERM, dropping its tasks: it tells the parent
        // each call ended, unasked, before it exits. Every handle must resolve, saying why.
        signal(runner_pid, libc::SIGTERM);
        for result in [held.await.map(|_| ()), slow.await.map(|_| ())] {
            let err = result.unwrap_err();
            assert!(err.is_runner_lost(), "{err:?}");
            assert!(err.to_string().contains("ended the call"), "{err}");
        }
        assert!(wait_gone(runner_pid, Duration::from_secs(5)).await);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_takes_every_child_of_its_tasks_with_it() {
    bounded(BOUND, async {
        let pool = Pool::builder("killed-group")
            .backend(ProcessBackend::new().program(RUNNER))
            .max(1)
            .start()
            .await
            .unwrap();
        let dir = scratch_dir("killed-group");
        let held = flame::spawn_on(&pool, hold_children(dir.clone()));
        let pids = held_all_pids(&dir).await;
        let (runner, children) = (pids[0], &pids[1..]);
        kill(runner);
        let killed_at = Instant::now();
        assert!(held.await.unwrap_err().is_runner_lost());
        for &child in children {
            let gone = wait_gone(child, Duration::from_secs(1)).await;
            if !gone {
                kill(child);
            }
            assert!(
                gone,
                "child {child} of the killed runner's task outlived it"
            );
        }
        println!(
            "SIGKILL of a runner: both children of its task (one without kill_on_drop) gone after {:?}",
            killed_at.elapsed()
        );
        pool.shutdown().await;
    })
    .await;
}

/// Starts `flame-test-parent`, kills it with SIGKILL once its three runners each hold two
/// `sleep` children (one without `kill_on_drop`), and checks that no runner and no child survives the failsafe window.
async fn parent_killed_leaves_nothing(pdeathsig: &str) {
    let dir = scratch_dir(&format!("orphans-{pdeathsig}"));
    let mut parent = tokio::process::Command::new(PARENT)
        .args(["orphans", RUNNER, dir.to_str().unwrap(), pdeathsig])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(parent.stdout.take().unwrap()).lines();
    loop {
        match lines.next_line().await.unwrap() {
            Some(line) if line == "READY" => break,
            Some(_) => continue,
            None => panic!("the parent exited before it was ready"),
        }
    }
    let mut pids = Vec::new();
    for i in 0..3 {
        pids.extend(held_all_pids(&dir.join(i.to_string())).await);
    }
    assert!(
        pids.iter().all(|&p| !is_gone(p)),
        "all runners and children run"
    );

    parent.start_kill().unwrap();
    parent.wait().await.unwrap();
    let killed_at = std::time::Instant::now();
    // The failsafe window: 5 missed heartbeats of 1 s; the connection's end is noticed sooner.
    let window = Duration::from_secs(5);
    for &pid in &pids {
        wait_gone(pid, window + Duration::from_secs(5)).await;
    }
    println!(
        "SIGKILL of the parent (parent-death signal {pdeathsig}): 3 runners and their children gone after {:?}",
        killed_at.elapsed()
    );
    let alive: Vec<u32> = pids.iter().copied().filter(|&p| !is_gone(p)).collect();
    for &pid in &alive {
        kill(pid);
    }
    assert_eq!(
        alive,
        Vec::<u32>::new(),
        "processes outlived their SIGKILLed parent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_parent_leaves_no_runner_by_protocol_failsafe_alone() {
    bounded(BOUND, parent_killed_leaves_nothing("off")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_parent_leaves_no_runner_with_the_parent_death_signal() {
    bounded(BOUND, parent_killed_leaves_nothing("on")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_whose_main_fails_is_a_boot_failure_with_its_message() {
    bounded(BOUND, async {
        let pool = Pool::builder("failingmain")
            .backend(ProcessBackend::new().program(FAILING_MAIN))
            .max(1)
            .boot_timeout(Duration::from_secs(20))
            .start()
            .await
            .unwrap();
        // The runner serves calls as soon as it is connected, while its main still runs: a call
        // in flight when main fails is failed with main's error.
        let err = flame::call(&pool, sleep_ms(10_000)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(
            err.message()
                .contains("database at db.internal:5432 is unreachable"),
            "{err}"
        );
        // The next call fails the same way, after the pool's pause before booting again.
        let err = flame::call(&pool, sleep_ms(10_000)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_runners_that_cannot_boot_fail_start() {
    bounded(BOUND, async {
        let err = Pool::builder("nosuchprogram")
            .backend(ProcessBackend::new().program("/nonexistent/flame-app"))
            .min(1)
            .max(1)
            .start()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(
            err.message().contains("could not start the runner process"),
            "{err}"
        );
        assert!(err.message().contains("No such file"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_exits_before_dialing_back_fails_the_call_at_once() {
    bounded(BOUND, async {
        // `true` ignores the hand-off and exits 0: the boot must fail now, not at boot_timeout.
        let pool = Pool::builder("exitsearly")
            .backend(ProcessBackend::new().program("true"))
            .max(1)
            .boot_timeout(Duration::from_secs(50))
            .start()
            .await
            .unwrap();
        let started = Instant::now();
        // The runner serves calls as soon as it is connected, while its main still runs: a call
        // in flight when main fails is failed with main's error.
        let err = flame::call(&pool, sleep_ms(10_000)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(
            err.message().contains("exited before it connected back"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the failure waited for the boot timeout"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_runners_arm_the_parent_death_signal_unless_told_not_to() {
    bounded(BOUND, async {
        for (armed, expected) in [(true, libc::SIGTERM), (false, 0)] {
            let pool = Pool::builder("deathsignal")
                .backend(
                    ProcessBackend::new()
                        .program(RUNNER)
                        .parent_death_signal(armed),
                )
                .max(1)
                .start()
                .await
                .unwrap();
            assert_eq!(
                flame::call(&pool, parent_death_signal()).await.unwrap(),
                expected
            );
            pool.shutdown().await;
        }
    })
    .await;
}
