//! Entry points into the wire internals (feature `internals`) for the fuzz targets in `fuzz/`,
//! the property tests, the benches and the tests that play a compromised runner: frame
//! splitting, message decoding, the handshake checks, one call's trip through the encoder and
//! decoder, the frames a runner sends, and a heap counter.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::wire::{self, ToParent, ToRunner};

/// One call's arguments through the wire and back, as parent and runner handle them: encode the
/// argument tuple, frame it in a `Run`, decode the `Run`, decode the tuple. Returns the tuple.
pub fn call_round_trip<A: serde::Serialize + serde::de::DeserializeOwned>(args: &A) -> A {
    let encoded = bytes::Bytes::from(postcard::to_stdvec(args).expect("encodable args"));
    let frame = wire::encode(&ToRunner::Run {
        call: 42,
        task: "bench::task".to_string(),
        args: encoded,
        deadline_ms: None,
        trace: None,
    })
    .expect("encodable frame");
    match wire::decode::<ToRunner>(&frame).expect("decodable frame") {
        ToRunner::Run { args, .. } => postcard::from_bytes(&args).expect("decodable args"),
        _ => unreachable!("a Run was encoded"),
    }
}

/// Splits `data` into frames as the parent's listener does before a hello, decodes each as
/// either side would, and runs the handshake checks on any hello. Must never panic.
pub fn frames(data: &[u8]) {
    let mut codec = tokio_util::codec::LengthDelimitedCodec::builder()
        .max_frame_length(wire::MAX_HELLO_FRAME)
        .new_codec();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = wire::decode::<ToRunner>(&frame);
        let _ = wire::chan_frame(&frame, wire::TO_RUNNER_CHAN);
        let _ = wire::chan_frame(&frame, wire::TO_PARENT_CHAN);
        let _ = wire::done_frame(&frame.clone().freeze());
        let _ = wire::part_frame(&frame, wire::TO_RUNNER_PART);
        let _ = wire::part_frame(&frame, wire::TO_PARENT_PART);
        if let Ok(ToParent::Hello(hello)) = wire::decode::<ToParent>(&frame)
            && let Ok(registry) = crate::task::registry()
        {
            let _ = crate::handshake::token_matches(&hello, &[0; 16]);
            let _ = crate::handshake::check(&hello, registry);
        }
    }
}

/// The frames a runner of this binary sends, for tests that play a runner which holds the
/// right token but breaks the rules (a compromised or buggy runner). Each returns a whole frame,
/// length prefix included, ready to write to the parent's listener.
pub mod impostor {
    use crate::wire::{self, ChanBody, ChanFrame, Hello, Outcome, ToParent, ToRunner};

    fn framed(msg: &ToParent) -> Vec<u8> {
        let body = wire::encode(msg).expect("encodable message");
        let mut out = u32::try_from(body.len())
            .expect("a small frame")
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// The hello of runner `runner_id` holding `token`, with this binary's task manifest.
    pub fn hello(runner_id: &str, token: [u8; 16]) -> Vec<u8> {
        let registry = crate::task::registry().expect("this binary's task registry");
        framed(&ToParent::Hello(Hello {
            protocol: wire::PROTOCOL_VERSION,
            runner_id: runner_id.to_string(),
            token,
            fingerprint: crate::handshake::fingerprint().to_string(),
            manifest_hash: registry.manifest_hash,
            manifest: registry.manifest.clone(),
        }))
    }

    /// The result of call `call`: `result` as its task returned it.
    pub fn done<R: serde::Serialize>(call: u64, result: &R) -> Vec<u8> {
        let encoded = postcard::to_stdvec(result).expect("an encodable result");
        framed(&ToParent::Done {
            call,
            outcome: Outcome::Ok(encoded.into()),
        })
    }

    /// A chunk of a message on channel `chan` of call `call`, more to come.
    pub fn chan_part(call: u64, chan: u32, chunk: &[u8]) -> Vec<u8> {
        framed(&ToParent::Chan(ChanFrame {
            call,
            chan,
            body: ChanBody::Part(bytes::Bytes::copy_from_slice(chunk)),
        }))
    }

    /// A whole message on channel `chan` of call `call`.
    pub fn chan_message<T: serde::Serialize>(call: u64, chan: u32, message: &T) -> Vec<u8> {
        let encoded = postcard::to_stdvec(message).expect("an encodable message");
        framed(&ToParent::Chan(ChanFrame {
            call,
            chan,
            body: ChanBody::Data(encoded.into()),
        }))
    }

    /// What the parent sent, by kind: `"welcome"`, `"refused: <reason>"`, `"run <call id>"`,
    /// `"cancel <call id>"`, `"heartbeat"`, `"shutdown"`, `"chan"`, `"part"`, or `"?"` for a
    /// frame that does not decode. Takes a frame without its length prefix.
    pub fn describe(frame: &[u8]) -> String {
        match wire::decode::<ToRunner>(frame) {
            Ok(ToRunner::Welcome(_)) => "welcome".into(),
            Ok(ToRunner::Refused { reason }) => format!("refused: {reason}"),
            Ok(ToRunner::Run { call, .. }) => format!("run {call}"),
            Ok(ToRunner::Cancel { call }) => format!("cancel {call}"),
            Ok(ToRunner::Heartbeat) => "heartbeat".into(),
            Ok(ToRunner::Shutdown { .. }) => "shutdown".into(),
            Ok(ToRunner::Chan(_)) => "chan".into(),
            Ok(ToRunner::Part(_)) => "part".into(),
            Err(_) => "?".into(),
        }
    }
}

/// A global allocator that counts the bytes allocated and not yet freed while counting is on,
/// for benches and tests that measure what flame-rt holds (`#[global_allocator] static A:
/// HeapCounter = HeapCounter;`). Off, it costs one relaxed load per allocation.
pub struct HeapCounter;

static HEAP: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl HeapCounter {
    /// Starts or stops counting.
    pub fn counting(on: bool) {
        COUNTING.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Net bytes allocated while counting was on.
    pub fn net() -> isize {
        HEAP.load(std::sync::atomic::Ordering::SeqCst)
    }
}

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl std::alloc::GlobalAlloc for HeapCounter {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
            HEAP.fetch_add(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
            HEAP.fetch_sub(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}
