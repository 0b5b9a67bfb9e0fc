extern crate flame as my_flame;

#[my_flame::task(crate = "my_flame")]
async fn double(x: u64) -> u64 {
    x * 2
}

#[my_flame::main(crate = "my_flame", flavor = "current_thread")]
async fn main() -> Result<(), String> {
    if my_flame::parent().is_none() {
        assert_eq!(double(21).await, 42);
    }
    Ok(())
}
