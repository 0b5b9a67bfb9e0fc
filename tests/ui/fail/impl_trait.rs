#[flame::task]
async fn sum(xs: impl IntoIterator<Item = u32>) -> u32 {
    xs.into_iter().sum()
}

fn main() {}
