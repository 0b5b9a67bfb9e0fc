//! An app that registers no task at all (its tasks' crate was dropped by the linker, say):
//! starting a pool must say what is wrong and what to do.

#[tokio::main]
async fn main() {
    match flame::Pool::builder("empty").start().await {
        Ok(_) => println!("started"),
        Err(e) => println!("{e}"),
    }
}
