//! A runner from "another build": the support library's tasks plus one more, so its task
//! manifest differs from the tests' and the parent must refuse it.

use flame_tests as _;

/// Exists only in this build.
#[flame::task]
async fn only_in_other_build() -> u8 {
    7
}

#[flame::main]
async fn main() {
    if flame::parent().is_none() {
        // Reference the task so the linker keeps it.
        println!("{}", only_in_other_build().await);
    }
}
