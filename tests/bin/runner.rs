//! The runner program the tests boot with `ProcessBackend::program`: the support library's
//! tasks and nothing else.

use flame_tests as _;

#[flame::main]
async fn main() {
    flame_tests::record_parent_death_signal();
    if flame::parent().is_none() {
        eprintln!(
            "flame-test-runner is booted by the flame-tests as a runner; it does nothing on its own"
        );
        std::process::exit(2);
    }
}
