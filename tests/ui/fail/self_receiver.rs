struct Service;

impl Service {
    #[flame::task]
    async fn run(&self, x: u32) -> u32 {
        x
    }
}

fn main() {}
