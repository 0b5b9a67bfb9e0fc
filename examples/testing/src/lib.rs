//! An app's tasks, and how the app tests them: unit tests on `LocalBackend` here, and
//! `#[flame::test]` with real runner processes in `tests/`.
//!
//! Run them with `cargo test -p flame-example-testing` or
//! `cargo nextest run -p flame-example-testing`.

use std::time::Duration;

/// Which process ran a call, and as which runner.
#[flame::task]
pub async fn whoami() -> (u32, Option<String>) {
    (
        std::process::id(),
        flame::parent().map(|p| p.runner_id().to_string()),
    )
}

/// Squares `n` after `ms` milliseconds.
#[flame::task]
pub async fn slow_square(n: u64, ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    n * n
}

#[cfg(test)]
mod tests {
    use super::*;

    // Unit tests: runners inside the test process, same encoding and handshake as remote ones.
    #[tokio::test]
    async fn squares_on_a_local_runner() {
        let pool = flame::Pool::builder("unit")
            .backend(flame::LocalBackend::new())
            .start()
            .await
            .unwrap();
        assert_eq!(flame::call(&pool, slow_square(12, 1)).await.unwrap(), 144);
        let (pid, runner) = flame::call(&pool, whoami()).await.unwrap();
        assert_eq!(pid, std::process::id());
        assert!(runner.is_some_and(|r| r.starts_with("unit-")));
        pool.shutdown().await;
    }
}
