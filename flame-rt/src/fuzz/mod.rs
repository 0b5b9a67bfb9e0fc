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

mod heap;
pub mod impostor;
mod session;

pub use heap::HeapCounter;
pub use session::Session;
