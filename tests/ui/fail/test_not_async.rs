#[flame::test]
fn checks() {}

fn main() {}
