//! Reading frames: a message at a time on an open connection, or exactly one frame before the
//! connection is known to be ours.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::io::AsyncRead;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use super::{MAX_FRAME, decode};
use crate::error::Error;

pub(crate) fn codec() -> LengthDelimitedCodec {
    codec_with_max(MAX_FRAME)
}

fn codec_with_max(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// How much `read_one_frame` allocates ahead of the bytes that arrived.
const READ_STEP: usize = 16 * 1024;

/// Reads exactly one frame and not a byte more: what follows it may not be for us (a runner of a
/// TLS pool sends its TLS handshake right behind its first frame). `None` at a clean end of
/// stream before the frame.
pub(crate) async fn read_one_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    max_frame: usize,
) -> std::io::Result<Option<Bytes>> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    match io.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max_frame {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte frame, above the {max_frame}-byte limit"),
        ));
    }
    // Grown as the bytes arrive: a peer announcing a big frame and sending nothing costs nothing.
    let mut frame = BytesMut::with_capacity(len.min(READ_STEP));
    while frame.len() < len {
        frame.reserve((len - frame.len()).min(READ_STEP));
        let room = len - frame.len();
        if (&mut *io).take(room as u64).read_buf(&mut frame).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Some(frame.freeze()))
}

/// The reading half of a connection: decoded messages.
pub(crate) struct Reader<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub(crate) fn new(io: R) -> Self {
        Reader::with_max_frame(io, MAX_FRAME)
    }

    pub(crate) fn with_max_frame(io: R, max_frame: usize) -> Self {
        Reader {
            inner: FramedRead::new(io, codec_with_max(max_frame)),
        }
    }

    /// The next frame, undecoded; `None` at a clean end of stream.
    pub(crate) async fn next_frame(&mut self) -> Option<Result<bytes::BytesMut, Error>> {
        Some(
            self.inner
                .next()
                .await?
                .map_err(|e| Error::io("reading a frame", e)),
        )
    }

    /// The next message; `None` at a clean end of stream.
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Option<Result<T, Error>> {
        match self.inner.next().await? {
            Ok(frame) => Some(decode(&frame)),
            Err(e) => Some(Err(Error::io("reading a frame", e))),
        }
    }
}
