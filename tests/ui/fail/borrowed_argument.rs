#[flame::task]
async fn count(words: &str) -> usize {
    words.len()
}

fn main() {}
