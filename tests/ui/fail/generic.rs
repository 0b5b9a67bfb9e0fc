#[flame::task]
async fn identity<T: serde::Serialize>(x: T) -> T {
    x
}

fn main() {}
