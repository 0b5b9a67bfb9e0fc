//! A runner that holds the right token but breaks the rules (compromised, or a broken build):
//! the parent believes no answer it did not ask for, and buffers no more than it granted.

use std::time::Duration;

use flame::fuzz::impostor::done;
use flame_tests::*;

const BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_for_calls_nobody_made_change_no_count() {
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
