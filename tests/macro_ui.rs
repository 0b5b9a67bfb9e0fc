//! Compile-time behaviour of `#[flame::task]` and `#[flame::main]`: what compiles, and the
//! error (pointing at the offending token) for what must not.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/fail/*.rs");
}
