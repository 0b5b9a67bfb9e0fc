struct Db;

#[flame::task]
async fn count(db: &flame::State<Db>, table: String) -> usize {
    let _ = (db, table);
    0
}

fn main() {}
