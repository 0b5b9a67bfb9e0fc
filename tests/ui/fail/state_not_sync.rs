use std::cell::Cell;

#[flame::task]
async fn bump(counter: flame::State<Cell<u64>>) -> u64 {
    counter.get()
}

fn main() {}
