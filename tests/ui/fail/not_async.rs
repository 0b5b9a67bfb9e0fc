#[flame::task]
fn compute(x: u32) -> u32 {
    x
}

fn main() {}
