//! A runner that holds the right token and then says anything, after a stranger said anything
//! while it booted: the parent must still welcome the runner, resolve every call and give every
//! slot back (`flame::__private::fuzz::Session`), and never panic.
#![no_main]

use flame::channel::{Receiver, Sender};

/// Adds two numbers.
#[flame::task]
async fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// Sends back what it gets: the call with channels.
#[flame::task]
async fn relay(mut inbox: Receiver<Vec<u8>>, out: Sender<Vec<u8>>) -> u64 {
    let mut n = 0;
    while let Some(message) = inbox.recv().await {
        let _ = out.send(message).await;
        n += 1;
    }
    n
}

/// Three calls, the second with a channel each way and a message big enough to go in chunks.
async fn three_calls(pool: flame::Pool) {
    let first = flame::spawn_on(&pool, add(1, 2));
    let (to_runner, inbox) = flame::channel(2);
    let (out, mut from_runner) = flame::channel(2);
    let second = flame::spawn_on(&pool, relay(inbox, out));
    let third = flame::spawn_on(&pool, add(3, 4));
    let _ = to_runner.send(vec![7; 300 << 10]).await;
    drop(to_runner);
    let _ = (first.await, second.await, third.await);
    while from_runner.recv().await.is_some() {}
}

static SESSION: std::sync::OnceLock<flame::__private::fuzz::Session> = std::sync::OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first byte says how much of the rest a stranger sends before the runner dials back.
    let (split, rest) = data.split_first().map_or((0, data), |(b, rest)| (*b % 64, rest));
    let (stranger, script) = rest.split_at(usize::from(split).min(rest.len()));
    SESSION
        .get_or_init(flame::__private::fuzz::Session::new)
        .run(stranger, script, three_calls);
});
