struct Connection;

#[flame::task]
async fn query(conn: Connection, sql: String) -> usize {
    drop(conn);
    sql.len()
}

fn main() {}
