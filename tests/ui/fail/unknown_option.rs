#[flame::task(retries = 3)]
async fn flaky() {}

fn main() {}
