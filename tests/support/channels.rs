//! Tasks that stream through `flame::channel`s, for `tests/channels.rs`.

use std::sync::Mutex;

use bytes::Bytes;
use flame::channel::{Receiver, Sender};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Sends every number it receives back, in order; returns how many it forwarded.
#[flame::task]
pub async fn echo_stream(mut numbers: Receiver<u64>, back: Sender<u64>) -> Result<u64, String> {
    let mut forwarded = 0;
    while let Some(n) = numbers.recv().await {
        back.send(n).await.map_err(|e| e.to_string())?;
        forwarded += 1;
    }
    Ok(forwarded)
}

/// Sends `0..n`; returns how many it sent, or why it stopped.
#[flame::task]
pub async fn produce(n: u64, out: Sender<u64>) -> Result<u64, String> {
    for i in 0..n {
        out.send(i).await.map_err(|e| format!("after {i}: {e}"))?;
    }
    Ok(n)
}

/// What `count_bytes` saw.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ByteCount {
    /// How many bytes arrived.
    pub bytes: u64,
    /// The runner's resident set growth while streaming: highest seen minus at the start.
    pub rss_growth: u64,
}

/// Reads a byte stream to its end through `into_reader`; counts it and watches this process's
/// resident set while doing so.
#[flame::task]
pub async fn count_bytes(stream: Receiver<Bytes>) -> Result<ByteCount, String> {
    use tokio::io::AsyncReadExt;
    let start = rss_bytes();
    let mut peak = start;
    let mut reader = flame::channel::into_reader(stream);
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    let mut reads = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        reads += 1;
        if reads.is_multiple_of(64) {
            peak = peak.max(rss_bytes());
        }
    }
    peak = peak.max(rss_bytes());
    Ok(ByteCount {
        bytes,
        rss_growth: peak.saturating_sub(start),
    })
}

/// This process's resident set, from `/proc/self/statm`.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Says it runs (its pid, through `out`), then holds both channels until cancelled.
#[flame::task]
pub async fn hold_channels(inbox: Receiver<u64>, out: Sender<u64>) {
    out.send(u64::from(std::process::id())).await.ok();
    std::future::pending::<()>().await;
    drop((inbox, out));
}

static STASHED: Mutex<Option<Sender<u64>>> = Mutex::new(None);

/// Keeps its sender past its own end, in a static: misuse that must fail clearly later.
#[flame::task]
pub async fn stash_sender(out: Sender<u64>) {
    *STASHED.lock().unwrap() = Some(out);
}

/// Sends through the sender `stash_sender` kept; returns the error.
#[flame::task]
pub async fn use_stashed_sender() -> Option<String> {
    let out = STASHED.lock().unwrap().take()?;
    out.send(7).await.err().map(|e| e.to_string())
}

/// A receiver serialized twice into one call's arguments: misuse that must fail clearly.
pub struct SameReceiverTwice(pub Receiver<u64>);

impl Serialize for SameReceiverTwice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.0, &self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for SameReceiverTwice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (first, _second) = <(Receiver<u64>, Receiver<u64>)>::deserialize(d)?;
        Ok(SameReceiverTwice(first))
    }
}

/// Takes a `SameReceiverTwice` (the call never gets this far).
#[flame::task]
pub async fn take_twice(twice: SameReceiverTwice) -> u64 {
    drop(twice);
    0
}

/// Sends every blob it receives back reversed; returns how many.
#[flame::task]
pub async fn reverse_blobs(mut blobs: Receiver<Vec<u8>>, back: Sender<Vec<u8>>) -> u64 {
    let mut count = 0;
    while let Some(mut blob) = blobs.recv().await {
        blob.reverse();
        if back.send(blob).await.is_err() {
            break;
        }
        count += 1;
    }
    count
}

/// Hands a clone of its sender to a detached task that sends for ever, then returns: the call
/// must still end.
#[flame::task]
pub async fn leak_sender(out: Sender<u64>) -> u64 {
    let leaked = out.clone();
    tokio::spawn(async move { while leaked.send(1).await.is_ok() {} });
    out.send(0).await.ok();
    7
}

/// Sends `n` numbers, then panics.
#[flame::task]
pub async fn send_then_panic(n: u64, out: Sender<u64>) {
    for i in 0..n {
        out.send(i).await.ok();
    }
    panic!("the task broke after {n} messages");
}
