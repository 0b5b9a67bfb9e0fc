//! Entry points for fuzzing the bytes a peer controls: frame splitting, message decoding and the
//! handshake checks. Used by the `fuzz/` targets (feature `fuzzing`) and by the property tests.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::wire::{self, ToParent, ToRunner};

/// Splits `data` into frames as the parent's listener does before a hello, decodes each as
/// either side would, and runs the handshake checks on any hello. Must never panic.
pub fn frames(data: &[u8]) {
    let mut codec = tokio_util::codec::LengthDelimitedCodec::builder()
        .max_frame_length(wire::MAX_HELLO_FRAME)
        .new_codec();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = wire::decode::<ToRunner>(&frame);
        if let Ok(ToParent::Hello(hello)) = wire::decode::<ToParent>(&frame)
            && let Ok(registry) = crate::task::registry()
        {
            let _ = crate::handshake::check(&hello, &[0; 16], registry);
        }
    }
}
