//! The Fly backend end to end, against the Machines API emulator in `support/` (the real API is
//! unreachable from here; the emulator boots each Machine as a real process: this test binary,
//! which serves as the runner of the test that booted it).

use std::collections::HashMap;
use std::time::Duration;

use flame::{ErrorKind, Pool};
use flame_backend_fly::{FlyBackend, FlyBackendBuilder};
use flame_tests::{bounded, held_pids, hold_child, is_gone, scratch_dir, wait_gone};
use support::{Emulator, Fault};

mod support;

const BOUND: Duration = Duration::from_secs(60);
const TOKEN: &str = "fm2_test-token";
const APP: &str = "thumbs-app";

/// The Machine this task runs on, as Fly tells a Machine.
#[flame::task]
async fn machine_id() -> Option<String> {
    std::env::var("FLY_MACHINE_ID").ok()
}

/// An emulator whose image `flame-test:{test}` boots this test binary as the runner of `test`.
async fn emulator(test: &str) -> Emulator {
    let exe = std::env::current_exe()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let argv = [test, "--exact", "--nocapture", "--test-threads", "1"];
    let mut images = HashMap::new();
    images.insert(
        format!("flame-test:{test}"),
        std::iter::once(exe)
            .chain(argv.iter().map(|a| a.to_string()))
            .collect(),
    );
    Emulator::start(APP, TOKEN, images).await
}

/// A Fly backend pointed at `emu`, as a parent outside Fly configures it.
fn backend(emu: &Emulator, test: &str) -> FlyBackendBuilder {
    FlyBackend::builder_from(|_| None)
        .host(&emu.url)
        .app(APP)
        .token(TOKEN)
        .image(format!("flame-test:{test}"))
        .region("ord")
        .listen("127.0.0.1:0".parse().unwrap())
        .retry_backoff(Duration::from_millis(20))
}

#[flame::test]
async fn calls_run_on_machines_and_shutdown_leaves_none() {
    bounded(BOUND, async {
        let emu = emulator("calls_run_on_machines_and_shutdown_leaves_none").await;
        let fly = backend(&emu, "calls_run_on_machines_and_shutdown_leaves_none")
            .env("THUMBS_FPS", "2")
            .build()
            .unwrap();
        let pool = Pool::builder("thumbs")
            .backend(fly)
            .max(2)
            .start()
            .await
            .unwrap();
        let ran_on = flame::call(&pool, machine_id())
            .await
            .unwrap()
            .expect("a Fly machine id");
        let live = emu.live();
        assert_eq!(
            live.get(&ran_on).map(String::as_str),
            Some("started"),
            "{live:?}"
        );
        assert_eq!(emu.creates(), 1);
        pool.shutdown().await;
        assert!(emu.live().is_empty(), "machines left: {:?}", emu.live());
    })
    .await;
}

#[flame::test]
async fn dropping_the_handle_cancels_on_the_machine() {
    bounded(BOUND, async {
        let emu = emulator("dropping_the_handle_cancels_on_the_machine").await;
        let fly = backend(&emu, "dropping_the_handle_cancels_on_the_machine")
            .build()
            .unwrap();
        let pool = Pool::builder("cancel")
            .backend(fly)
            .max(1)
            .start()
            .await
            .unwrap();
        let dir = scratch_dir("fly-cancel");
        let handle = flame::spawn_on(&pool, hold_child(dir.clone()));
        let (_runner, child) = held_pids(&dir).await;
        assert!(!is_gone(child));
        drop(handle);
        assert!(
            wait_gone(child, Duration::from_secs(5)).await,
            "the task's child outlived the cancel"
        );
        pool.shutdown().await;
        assert!(emu.live().is_empty());
    })
    .await;
}

#[flame::test]
async fn rate_limits_and_capacity_errors_are_retried_then_reported() {
    bounded(BOUND, async {
        let emu = emulator("rate_limits_and_capacity_errors_are_retried_then_reported").await;
        emu.inject([
            Fault::Status(429, "rate limit exceeded"),
            Fault::Status(
                412,
                "insufficient resources to create new machine with existing volume",
            ),
        ]);
        let fly = backend(
            &emu,
            "rate_limits_and_capacity_errors_are_retried_then_reported",
        )
        .boot_timeout(Duration::from_millis(800))
        .build()
        .unwrap();
        let pool = Pool::builder("retry")
            .backend(fly)
            .max(1)
            .start()
            .await
            .unwrap();
        assert!(flame::call(&pool, machine_id()).await.unwrap().is_some());
        assert_eq!(emu.creates(), 3, "two refusals, then the machine");
        pool.shutdown().await;

        // Capacity that never comes: the boot window runs out and callers get Fly's message.
        emu.inject(std::iter::repeat_n(
            Fault::Status(
                422,
                "could not reserve resource for machine: insufficient CPUs available",
            ),
            1000,
        ));
        let fly = backend(
            &emu,
            "rate_limits_and_capacity_errors_are_retried_then_reported",
        )
        .boot_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
        let pool = Pool::builder("nocapacity")
            .backend(fly)
            .max(1)
            .start()
            .await
            .unwrap();
        let err = flame::call(&pool, machine_id()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BootFailed, "{err}");
        assert!(
            err.message().contains("insufficient CPUs available"),
            "{err}"
        );
        assert!(err.message().contains("422"), "{err}");
        pool.shutdown().await;
        assert!(emu.live().is_empty());
    })
    .await;
}

#[flame::test]
async fn a_machine_that_never_dials_back_is_deleted() {
    bounded(BOUND, async {
        let emu = emulator("a_machine_that_never_dials_back_is_deleted").await;
        emu.inject([Fault::NeverDialsBack]);
        let fly = backend(&emu, "a_machine_that_never_dials_back_is_deleted")
            .build()
            .unwrap();
        let pool = Pool::builder("silent")
            .backend(fly)
            .max(1)
            .boot_timeout(Duration::from_millis(500))
            .start()
            .await
            .unwrap();
        // The first boot never dials back; the pool retries, and the second machine serves.
        let ran_on = flame::call(&pool, machine_id().timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .unwrap();
        let deleted = emu.deletes();
        assert_eq!(
            deleted.len(),
            1,
            "the silent machine was deleted: {deleted:?}"
        );
        assert_ne!(deleted[0], ran_on);
        assert!(!emu.live().contains_key(&deleted[0]));
        pool.shutdown().await;
        assert!(emu.live().is_empty());
    })
    .await;
}

/// Leaves a runner Machine of a parent that stops without cleaning up, and returns its id.
async fn leave_a_runner(emu: &Emulator, fly: FlyBackend) -> String {
    let before: Vec<String> = emu.live().into_keys().collect();
    emu.inject([Fault::NeverDialsBack]);
    let pool = Pool::builder("thumbs")
        .backend(fly)
        .max(1)
        .boot_timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    flame::spawn_on(&pool, machine_id()).detach();
    loop {
        if let Some(id) = emu.live().into_keys().find(|id| !before.contains(id)) {
            std::mem::forget(pool); // gone without cleaning up
            return id;
        }
        tokio::task::yield_now().await;
    }
}

#[flame::test]
async fn the_sweep_keeps_live_parents_runners_and_destroys_gone_ones() {
    bounded(BOUND, async {
        let test = "the_sweep_keeps_live_parents_runners_and_destroys_gone_ones";
        let emu = emulator(test).await;
        // Two web Machines of one app, each a parent with its own runners.
        emu.put_parent("web-a", "v1", "started");
        emu.put_parent("web-b", "v1", "started");
        let parent = |id: &str| {
            backend(&emu, test)
                .parent_id(id)
                .parent_version("v1")
                .build()
                .unwrap()
        };
        let (a, b) = (parent("web-a"), parent("web-b"));
        let of_b = leave_a_runner(&emu, b.clone()).await;
        // Each one's sweep keeps the other's runners: both parents are alive.
        assert!(a.sweep_leftovers().await.unwrap().is_empty());
        assert!(b.sweep_leftovers().await.unwrap().is_empty());
        assert!(emu.live().contains_key(&of_b));
        // web-b is redeployed (a new version): its earlier runners are orphans.
        emu.put_parent("web-b", "v2", "started");
        assert_eq!(a.sweep_leftovers().await.unwrap(), vec![of_b.clone()]);
        assert!(!emu.live().contains_key(&of_b));
        // web-b is destroyed: so are its runners, at the next sweep of any parent.
        let b2 = backend(&emu, test)
            .parent_id("web-b")
            .parent_version("v2")
            .build()
            .unwrap();
        let of_b2 = leave_a_runner(&emu, b2).await;
        emu.remove_parent("web-b");
        assert_eq!(a.sweep_leftovers().await.unwrap(), vec![of_b2.clone()]);
        // A stopped parent's too.
        emu.put_parent("web-c", "v1", "started");
        let c = backend(&emu, test)
            .parent_id("web-c")
            .parent_version("v1")
            .build()
            .unwrap();
        let of_c = leave_a_runner(&emu, c).await;
        assert!(a.sweep_leftovers().await.unwrap().is_empty());
        emu.put_parent("web-c", "v1", "stopped");
        assert_eq!(a.sweep_leftovers().await.unwrap(), vec![of_c]);
    })
    .await;
}

#[flame::test]
async fn a_restarted_parent_sweeps_its_earlier_process_runners_only() {
    bounded(BOUND, async {
        let test = "a_restarted_parent_sweeps_its_earlier_process_runners_only";
        let emu = emulator(test).await;
        emu.put_parent("web-a", "v1", "started");
        let process = |instance: &str| {
            backend(&emu, test)
                .parent_id("web-a")
                .parent_version("v1")
                .parent_instance(instance)
                .build()
                .unwrap()
        };
        // The first process left a runner behind; the same Machine restarts its process.
        let leftover = leave_a_runner(&emu, process("first")).await;
        let second = process("second");
        assert_eq!(
            second.sweep_leftovers().await.unwrap(),
            vec![leftover.clone()]
        );
        assert!(!emu.live().contains_key(&leftover));
        // Its own runners are not the sweep's business.
        let pool = Pool::builder("thumbs")
            .backend(second.clone())
            .max(1)
            .start()
            .await
            .unwrap();
        let mine = flame::call(&pool, machine_id()).await.unwrap().unwrap();
        assert!(second.sweep_leftovers().await.unwrap().is_empty());
        assert!(emu.live().contains_key(&mine));
        pool.shutdown().await;
    })
    .await;
}

#[flame::test]
async fn mounts_gpus_and_init_reach_the_create_request() {
    bounded(BOUND, async {
        let test = "mounts_gpus_and_init_reach_the_create_request";
        let emu = emulator(test).await;
        let fly = backend(&emu, test)
            .mount("vol_3xr8jq1k2v", "/data")
            .gpus("a100-pcie-40gb", 1)
            .init(flame_backend_fly::MachineInit {
                cmd: vec!["serve".into(), "--quiet".into()],
                ..Default::default()
            })
            .build()
            .unwrap();
        let pool = Pool::builder("thumbs")
            .backend(fly)
            .max(1)
            .start()
            .await
            .unwrap();
        let machine = flame::call(&pool, machine_id()).await.unwrap().unwrap();
        let config = emu.config_of(&machine);
        assert_eq!(
            config["mounts"],
            serde_json::json!([{ "volume": "vol_3xr8jq1k2v", "path": "/data" }])
        );
        assert_eq!(config["guest"]["gpu_kind"], "a100-pcie-40gb");
        assert_eq!(config["guest"]["gpus"], 1);
        assert_eq!(
            config["init"],
            serde_json::json!({ "cmd": ["serve", "--quiet"] })
        );
        pool.shutdown().await;
    })
    .await;
}

#[test]
fn a_missing_setting_names_its_variable() {
    let err = FlyBackend::builder_from(|_| None).build().err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("FLY_APP_NAME"), "{err}");
    let err = FlyBackend::builder_from(|v| (v != "FLY_API_TOKEN").then(|| "x".into()))
        .private_ip("fdaa::3")
        .build()
        .err()
        .unwrap();
    assert!(err.message().contains("FLY_API_TOKEN"), "{err}");
    let err = FlyBackend::builder_from(|v| (v != "FLY_PRIVATE_IP").then(|| "x".into()))
        .build()
        .err()
        .unwrap();
    assert!(err.message().contains("FLY_PRIVATE_IP"), "{err}");
    let err = FlyBackend::builder_from(|_| Some("x".into()))
        .private_ip("fdaa::3")
        .memory_mb(300)
        .build()
        .err()
        .unwrap();
    assert!(err.message().contains("multiple of 256"), "{err}");
    let ok = FlyBackend::builder_from(|_| Some("x".into()))
        .private_ip("fdaa::3")
        .build();
    assert!(ok.is_ok());
}

#[flame::test]
async fn a_slow_boot_is_waited_for_not_counted_started() {
    bounded(BOUND, async {
        let emu = emulator("a_slow_boot_is_waited_for_not_counted_started").await;
        emu.inject([Fault::SlowBoot(Duration::from_millis(600))]);
        let fly = backend(&emu, "a_slow_boot_is_waited_for_not_counted_started")
            .build()
            .unwrap();
        let pool = Pool::builder("slow")
            .backend(fly)
            .max(1)
            .start()
            .await
            .unwrap();
        let started = std::time::Instant::now();
        // The API said "created" at once; the runner is ready only when it dials back.
        assert!(flame::call(&pool, machine_id()).await.unwrap().is_some());
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(emu.creates(), 1, "one machine, waited for");
        pool.shutdown().await;
        assert!(emu.live().is_empty());
    })
    .await;
}
