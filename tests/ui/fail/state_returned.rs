struct Db;

#[flame::task]
async fn leak(table: String) -> Option<flame::State<Db>> {
    let _ = table;
    flame::state::<Db>()
}

fn main() {}
