//! Entry points into the wire internals (feature `internals`) for the fuzz targets in `fuzz/`,
//! the property tests, the benches and the tests that play a compromised runner: frame
//! splitting, message decoding, the handshake checks, one call's trip through the encoder and
//! decoder, the frames a runner sends, and a heap counter.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::protocol::{self, ToParent, ToRunner};

/// One call's arguments through the wire and back, as parent and runner handle them: encode the
/// argument tuple, frame it behind a `Run` head, decode the `Run` in place, decode the tuple.
/// Returns the tuple.
pub fn call_round_trip<A: serde::Serialize + serde::de::DeserializeOwned>(args: &A) -> A {
    let encoded = postcard::to_stdvec(args).expect("encodable args");
    let head = protocol::RunHead::new(42, "bench::task", None, None, encoded.len());
    let mut frame = postcard::to_stdvec(&head).expect("encodable head");
    frame.extend_from_slice(&encoded);
    let run = protocol::run_frame(&frame)
        .expect("a Run frame")
        .expect("decodable frame");
    postcard::from_bytes(run.args).expect("decodable args")
}

/// Splits `data` into frames as the parent's listener does before a hello, decodes each as
/// either side would, and runs the handshake checks on any hello. Must never panic.
pub fn frames(data: &[u8]) {
    let mut codec = tokio_util::codec::LengthDelimitedCodec::builder()
        .max_frame_length(protocol::MAX_HELLO_FRAME)
        .new_codec();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = protocol::decode::<ToRunner>(&frame);
        let _ = protocol::run_frame(&frame);
        let _ = protocol::chan_frame(&frame, protocol::TO_RUNNER_CHAN);
        let _ = protocol::chan_frame(&frame, protocol::TO_PARENT_CHAN);
        let _ = protocol::done_frame(&frame.clone().freeze());
        let _ = protocol::part_frame(&frame, protocol::TO_RUNNER_PART);
        let _ = protocol::part_frame(&frame, protocol::TO_PARENT_PART);
        if let Ok(ToParent::Hello(hello)) = protocol::decode::<ToParent>(&frame)
            && let Ok(registry) = crate::task::registry()
        {
            let _ = crate::protocol::handshake::token_matches(&hello, &[0; 16]);
            let _ = crate::pool::listener::check(&hello, registry);
        }
    }
}

mod heap;
pub mod impostor;
mod session;

pub use heap::HeapCounter;
pub use session::Session;

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(data in vec(any::<u8>(), 0..2048)) {
            super::frames(&data);
        }
    }
}
