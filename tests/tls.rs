//! TLS between parent and runners: calls work, the wire carries no plaintext (seen through a
//! recording proxy, with a plaintext pool as the control), a wrong pinned fingerprint and a
//! downgrade to plaintext are both refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::{ErrorKind, Pool, ProcessBackend};
use flame_tests::*;

const RUNNER: &str = env!("CARGO_BIN_EXE_flame-test-runner");
const BOUND: Duration = Duration::from_secs(60);
const SECRET: &[u8] = b"SECRET-PAYLOAD-4711";

/// A loopback TCP proxy to `target` that records every byte passing through, both ways.
async fn recording_proxy(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(&target).await.unwrap();
            let (in_r, in_w) = inbound.into_split();
            let (out_r, out_w) = outbound.into_split();
            tokio::spawn(pump(in_r, out_w, record.clone()));
            tokio::spawn(pump(out_r, in_w, record.clone()));
        }
    });
    (addr, seen)
}

/// Copies `from` to `to`, recording what passes.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    record: Arc<Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        record.lock().unwrap().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Sends `echo(SECRET)` through a recording proxy and returns whether the secret was seen.
async fn secret_visible_on_the_wire(name: &str, tls: bool) -> bool {
    // The runner dials the proxy instead of the parent; everything else is a normal boot.
    let proxy: Arc<Mutex<Option<String>>> = Arc::default();
    let slot = proxy.clone();
    let backend = Doctored::new(RUNNER, move |handoff| {
        let proxy = slot.lock().unwrap().clone().expect("proxy ready");
        with_field(handoff, "addr", Some(&proxy))
    });
    // Learn the parent's address from a first pool on the same listener, then start the proxy.
    let probe_addr = Arc::new(Mutex::new(None));
    let spy = probe_addr.clone();
    let probe = Doctored::new(RUNNER, move |handoff| {
        *spy.lock().unwrap() = field(handoff, "addr").map(str::to_string);
        handoff.to_string()
    });
    let first = Pool::builder(format!("{name}-probe"))
        .backend(probe)
        .min(1)
        .max(1)
        .start()
        .await
        .unwrap();
    first.shutdown().await;
    let parent_addr = probe_addr.lock().unwrap().clone().unwrap();
    let (proxy_addr, seen) = recording_proxy(parent_addr).await;
    *proxy.lock().unwrap() = Some(proxy_addr);

    let pool = Pool::builder(name)
        .backend(backend)
        .max(1)
        .tls(tls)
        .start()
        .await
        .unwrap();
    let back = flame::call(&pool, echo(SECRET.to_vec())).await.unwrap();
    assert_eq!(back, SECRET, "the call works through the proxy");
    pool.shutdown().await;
    let seen = seen.lock().unwrap();
    assert!(seen.len() > SECRET.len(), "the proxy saw the traffic");
    seen.windows(SECRET.len()).any(|w| w == SECRET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_tls_carry_no_plaintext() {
    bounded(BOUND, async {
        assert!(
            secret_visible_on_the_wire("plainwire", false).await,
            "control: plaintext is visible"
        );
        assert!(
            !secret_visible_on_the_wire("tlswire", true).await,
            "TLS hides the arguments and results"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_pool_serves_calls_on_process_runners() {
    bounded(BOUND, async {
        let pool = Pool::builder("tlspool")
            .backend(ProcessBackend::new().program(RUNNER))
            .max(2)
            .tls(true)
            .start()
            .await
            .unwrap();
        let handles: Vec<_> = (0..50u64)
            .map(|i| flame::spawn_on(&pool, add(i, i)))
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), 2 * i as u64);
        }
        let there = flame::call(&pool, whereabouts()).await.unwrap();
        assert_ne!(there.pid, std::process::id());
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_pinned_to_another_certificate_does_not_connect() {
    bounded(BOUND, async {
        let backend = Doctored::new(RUNNER, |h| with_field(h, "tls", Some(&"00".repeat(32))));
        let pids = backend.pids.clone();
        let pool = Pool::builder("wrongcert")
            .backend(backend)
            .max(1)
            .tls(true)
            .start()
            .await
            .unwrap();
        let err = flame::call(&pool, add(1, 1)).await.unwrap_err();
        // The runner aborts the TLS handshake; the parent sees it refuse.
        assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
        assert!(err.message().contains("TLS handshake"), "{err}");
        let pid = pids.lock().unwrap()[0];
        assert!(wait_gone(pid, Duration::from_secs(10)).await);
        pool.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_runner_is_refused_by_a_tls_pool() {
    bounded(BOUND, async {
        let backend = Doctored::new(RUNNER, |h| with_field(h, "tls", None));
        let pool = Pool::builder("downgrade")
            .backend(backend)
            .max(1)
            .tls(true)
            .start()
            .await
            .unwrap();
        let err = flame::call(&pool, add(1, 1)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
        assert!(err.message().contains("requires TLS"), "{err}");
        pool.shutdown().await;
    })
    .await;
}
