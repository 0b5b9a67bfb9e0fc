//! The runner program the tests boot with `ProcessBackend::program`: the support library's
//! tasks and nothing else.

use flame_tests as _;

#[flame::main]
async fn main() {
    flame_tests::record_parent_death_signal();
    // Runners trace like an app would: their task spans join their callers' traces.
    let _ = tracing::subscriber::set_global_default(flame_tests::otel_subscriber(None));
    if flame::parent().is_none() {
        eprintln!(
            "flame-test-runner is booted by the flame-tests as a runner; it does nothing on its own"
        );
        std::process::exit(2);
    }
    // An app builds its database pool in main and provides it to its tasks; runners serve
    // calls meanwhile (a call that needs the pool waits for it).
    flame_tests::provide_db_if_asked().await;
}
