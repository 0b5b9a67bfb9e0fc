#[flame::main]
fn main() {}
