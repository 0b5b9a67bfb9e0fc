//! The app's own state on runners: a task takes the database pool `main` built and provided,
//! on real runner processes and on in-process runners; calls that come before `provide` wait for
//! it; one that is never provided fails saying what to do.

use std::time::Duration;

use flame::{ErrorKind, LocalBackend, Pool, ProcessBackend};
use flame_tests::*;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(60);

fn process_pool(name: &str, db: &std::path::Path) -> flame::PoolBuilder {
    Pool::builder(name)
        .max(1)
        .backend(ProcessBackend::new().program(RUNNER).env(DB_ENV, db))
}

async fn visits(db: &Db) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT who, pid FROM visits ORDER BY id")
        .fetch_all(&db.0)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_writes_through_the_pool_its_runners_main_provided() {
    bounded(BOUND, async {
        let dir = scratch_dir("state-db");
        let path = dir.join("app.db");
        let pool = process_pool("state-db", &path).start().await.unwrap();
        for (i, who) in ["ada", "grace", "edsger"].into_iter().enumerate() {
            let count = flame::call(&pool, record_visit(who.into())).await.unwrap();
            assert_eq!(count, i as i64 + 1);
        }
        // The parent reads what the runner wrote, from the same database file.
        let db = open_db(&path).await;
        let rows = visits(&db).await;
        let names: Vec<_> = rows.iter().map(|(who, _)| who.as_str()).collect();
        assert_eq!(names, ["ada", "grace", "edsger"]);
        assert!(
            rows.iter()
                .all(|(_, pid)| *pid != i64::from(std::process::id())),
            "the rows were written by the runner, not here: {rows:?}"
        );
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_before_provide_waits_for_it() {
    bounded(BOUND, async {
        let dir = scratch_dir("state-late");
        let path = dir.join("app.db");
        let pool = Pool::builder("state-late")
            .max(1)
            .backend(
                ProcessBackend::new()
                    .program(RUNNER)
                    .env(DB_ENV, &path)
                    .env(PROVIDE_AFTER_ENV, "1500"),
            )
            .start()
            .await
            .unwrap();
        // The runner serves at once while its main takes 1.5 s to provide the pool.
        let count = flame::call(&pool, record_visit("early".into()))
            .await
            .unwrap();
        assert_eq!(count, 1);
        assert_eq!(pool.stats().booted, 1);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_never_provided_fails_naming_it() {
    bounded(BOUND, async {
        // No database for these runners: their main never provides one.
        let pool = Pool::builder("state-missing")
            .max(1)
            .boot_timeout(Duration::from_secs(2))
            .backend(ProcessBackend::new().program(RUNNER))
            .start()
            .await
            .unwrap();
        let err = flame::call(&pool, record_visit("nobody".into()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::StateMissing, "{err}");
        assert!(err.message().contains("flame_tests::Db"), "{err}");
        assert!(err.message().contains("flame::provide"), "{err}");
        // Nothing is lost: the runner serves the next call.
        assert_eq!(flame::call(&pool, add(2, 3)).await.unwrap(), 5);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_runners_and_local_awaits_use_this_process_state() {
    bounded(BOUND, async {
        let dir = scratch_dir("state-local");
        let db = open_db(&dir.join("app.db")).await;
        flame::provide(Db(db.0.clone()));
        let pool = Pool::builder("state-local")
            .max(1)
            .backend(LocalBackend::new())
            .start()
            .await
            .unwrap();
        assert_eq!(
            flame::call(&pool, record_visit("local".into()))
                .await
                .unwrap(),
            1
        );
        assert_eq!(record_visit("awaited".into()).await, 2);
        let rows = visits(&db).await;
        assert!(
            rows.iter()
                .all(|(_, pid)| *pid == i64::from(std::process::id())),
            "both ran in this process: {rows:?}"
        );
        pool.shutdown().await;
    })
    .await;
}
