//! Floods a runner listener, for `tests/listener_flood.rs`: `flame-test-flood ADDR IDLE GARBAGE
//! HOLD_MS` opens IDLE connections that never send a byte (held open) and GARBAGE ones that send
//! a frame no runner would and close, interleaved; prints `flooding` first and `opened N` when
//! done, then holds the idle ones for HOLD_MS.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, idle, garbage, hold_ms] = &args[..] else {
        eprintln!("usage: flame-test-flood ADDR IDLE GARBAGE HOLD_MS");
        std::process::exit(2);
    };
    let (idle, garbage): (usize, usize) = (idle.parse().unwrap(), garbage.parse().unwrap());
    let hold = Duration::from_millis(hold_ms.parse().unwrap());
    // Thousands of sockets: lift the soft limit on descriptors to the hard one.
    // SAFETY: getrlimit/setrlimit get a pointer to a local struct.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("flooding");
        let mut held = Vec::with_capacity(idle);
        let (mut opened, mut left_idle, mut left_garbage) = (0, idle, garbage);
        while left_idle + left_garbage > 0 {
            let send_garbage = left_garbage > 0 && (left_idle == 0 || left_garbage >= left_idle);
            let Ok(Ok(mut stream)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
            else {
                // Refused or timed out: not a connection the parent saw.
                if send_garbage {
                    left_garbage -= 1
                } else {
                    left_idle -= 1
                }
                continue;
            };
            opened += 1;
            if send_garbage {
                left_garbage -= 1;
                // A length prefix, then bytes that decode as no message of the protocol.
                let _ = stream.write_all(b"\x00\x00\x00\x08\xc8garbage").await;
            } else {
                left_idle -= 1;
                held.push(stream);
            }
        }
        println!("opened {opened}");
        tokio::time::sleep(hold).await;
    });
}
