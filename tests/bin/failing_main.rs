//! A runner whose `main` fails while setting up, as an app whose database is down would.

use flame_tests as _;

#[flame::main]
async fn main() -> anyhow::Result<()> {
    anyhow::bail!("database at db.internal:5432 is unreachable")
}
