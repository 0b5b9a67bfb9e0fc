//! How a task's arguments and result are encoded: postcard, with byte vectors written as one
//! byte string rather than byte by byte.
//!
//! Postcard writes a `Vec<u8>` as its length then its bytes — the same bytes as a byte string —
//! but serde's `Vec<T>` implementation gets there one `u8` at a time, both ways, which held a
//! 32 MiB argument to ~0.2 GB/s. `#[flame::task]` sees which parameters and return types are byte
//! vectors (`Vec<u8>`, `Box<[u8]>`, either in an `Option`, and those as the `Ok` of a `Result`
//! return) and encodes them through these wrappers, with `serde_bytes`; the wire format does not
//! change. `bytes::Bytes`, `serde_bytes::ByteBuf` and `String` take the fast path by themselves;
//! inside a struct of your own, mark a `Vec<u8>` field `#[serde(with = "serde_bytes")]`.
//!
//! Big ones go further, as a copy into fresh memory cost a 32 MiB call about 20 ms of page
//! faults and copying. On the way out, the first byte vector or `Bytes` parameter over one
//! piece, and a byte-vector or `Bytes` result, are sent from where they are: an [`Encoded`]
//! payload is a head, that body, and a tail ([`ArgsWriter`], [`encode_body`]). On the way in, a
//! `Bytes` is a slice of the buffer the pieces were put together in ([`Shared`] on the runner,
//! `call/join.rs` on the caller), and the first big `Vec<u8>` takes that buffer over ([`FromBytes`]).
//! A 256 MiB `Vec<u8>` argument went from 0.21–0.55× a raw TCP copy to 0.85–1.05×.

//!
//! Going out (`encode.rs`): [`AsBytes`], [`ArgsWriter`], [`encode_body`]. Coming in
//! (`decode.rs`): [`FromBytes`], [`Shared`].

use serde::Serialize;

mod decode;
mod encode;

pub(crate) use decode::sharing;
pub use decode::{FromBytes, Shared, decode_value};
pub use encode::{ArgsWriter, AsBytes, encode_args, encode_body, encode_body_or, encode_shared};

/// An encoded payload as it goes out: `head`, then a body and a tail. The body is a big byte
/// vector or `Bytes` among the arguments, or a byte-vector result, sent from where it is rather
/// than copied in between its neighbours. Not public API.
#[doc(hidden)]
#[derive(Debug, Default, Clone)]
pub struct Encoded {
    head: bytes::Bytes,
    /// The body and the tail, boxed: every call's payload waits in its ticket, and few have one.
    rest: Option<Box<(bytes::Bytes, bytes::Bytes)>>,
}

impl Encoded {
    /// A body goes apart only when it is big: a small one is copied in with its neighbours,
    /// the one frame it goes in is made of one buffer anyway.
    fn with_body(head: Vec<u8>, body: bytes::Bytes, tail: Vec<u8>) -> Encoded {
        if body.len() <= crate::protocol::PIECE {
            return bytes::Bytes::from([&head[..], &body[..], &tail[..]].concat()).into();
        }
        Encoded {
            head: head.into(),
            rest: Some(Box::new((body, tail.into()))),
        }
    }

    /// The payload's length on the wire.
    pub(crate) fn len(&self) -> usize {
        self.head.len()
            + self
                .rest
                .as_ref()
                .map_or(0, |rest| rest.0.len() + rest.1.len())
    }

    /// All of it in one buffer: a copy only where there is a body (small payloads go in one
    /// frame).
    pub(crate) fn into_bytes(self) -> bytes::Bytes {
        match self.rest {
            None => self.head,
            Some(rest) => [&self.head[..], &rest.0[..], &rest.1[..]].concat().into(),
        }
    }

    /// The payload cut into pieces of at most `size` bytes, none spanning two parts, none
    /// empty.
    pub(crate) fn pieces(self, size: usize) -> impl Iterator<Item = bytes::Bytes> {
        let (body, tail) = self.rest.map(|rest| *rest).unwrap_or_default();
        [self.head, body, tail].into_iter().flat_map(move |part| {
            (0..part.len())
                .step_by(size)
                .map(move |at| part.slice(at..part.len().min(at + size)))
        })
    }
}

impl From<bytes::Bytes> for Encoded {
    fn from(head: bytes::Bytes) -> Encoded {
        Encoded { head, rest: None }
    }
}

/// Encodes `value` into a buffer sized once: a growing one copies a big payload again at each
/// doubling (a size pass over byte strings is a few additions). The size pass must not take the
/// channel halves among the arguments, so they count as placeholders in it.
pub(crate) fn encode<T: ?Sized + Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let size = crate::channel::probing(|| postcard::experimental::serialized_size(value))?;
    postcard::to_io(value, buffer(size))
}

/// An empty buffer for `capacity` bytes. A big one is backed by huge pages where the kernel
/// offers them on request (`transparent_hugepage` = `madvise`, a common default): a fresh
/// 32 MiB buffer otherwise takes 8 192 page faults as it fills, which cost more than copying
/// into it (measured: half the CPU time of a 32 MiB call went to faults).
pub(crate) fn buffer(capacity: usize) -> Vec<u8> {
    const HUGE: usize = 2 << 20;
    let buf = Vec::<u8>::with_capacity(capacity);
    if capacity >= 4 * HUGE {
        let start = buf.as_ptr() as usize;
        let aligned = start.next_multiple_of(HUGE);
        let end = (start + capacity) / HUGE * HUGE;
        if end > aligned {
            // SAFETY: the range lies within the buffer's allocation, which nothing has touched
            // yet; the advice changes how its pages are backed, never their contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    buf
}

/// Encodes a task's result (generated code calls this on the runner).
#[doc(hidden)]
pub fn encode_result<R: serde::Serialize>(value: &R) -> Result<Encoded, crate::Error> {
    encode(value)
        .map(|encoded| bytes::Bytes::from(encoded).into())
        .map_err(|e| {
            crate::Error::new(
                crate::ErrorKind::Codec,
                format!("the task's return value could not be encoded: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_vectors_encode_as_serde_writes_them_only_faster() {
        let data: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let plain = postcard::to_stdvec(&(7u32, &data, Some(data.clone()))).unwrap();
        let fast = encode(&(7u32, AsBytes(&data), AsBytes(&Some(data.clone())))).unwrap();
        assert_eq!(plain, fast);
        type Decoded = (u32, FromBytes<Vec<u8>>, FromBytes<Option<Box<[u8]>>>);
        let (n, back, opt): Decoded = decode_value(&fast).unwrap();
        let (back, opt) = (back.into_inner(), opt.into_inner());
        assert_eq!((n, &back, opt.as_deref()), (7, &data, Some(&data[..])));
        let result: Result<Vec<u8>, String> = Ok(data.clone());
        let fast = postcard::to_stdvec(&result.as_ref().map(AsBytes)).unwrap();
        assert_eq!(fast, postcard::to_stdvec(&result).unwrap());
    }

    #[test]
    fn a_byte_vector_result_left_in_place_encodes_as_postcard_writes_it() {
        fn whole(encoded: Encoded, piece: usize) -> Vec<u8> {
            encoded.pieces(piece).flat_map(|p| p.to_vec()).collect()
        }
        for len in [0, 1, 127, 128, 16_383, 16_384, 300_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let expect = postcard::to_stdvec(&serde_bytes::Bytes::new(&data)).unwrap();
            assert_eq!(
                whole(encode_body(data.clone()).unwrap(), 4096),
                expect,
                "{len}"
            );
            let some = postcard::to_stdvec(&Some(serde_bytes::Bytes::new(&data))).unwrap();
            assert_eq!(whole(encode_body(Some(data.clone())).unwrap(), 1000), some);
            let boxed = data.clone().into_boxed_slice();
            assert_eq!(encode_body(boxed).unwrap().into_bytes(), expect);
            let ok: Result<Vec<u8>, String> = Ok(data.clone());
            let plain = postcard::to_stdvec(&ok.as_ref().map(AsBytes)).unwrap();
            assert_eq!(encode_body_or(ok).unwrap().into_bytes(), plain);
        }
        let none: Option<Vec<u8>> = None;
        assert_eq!(encode_body(none).unwrap().into_bytes(), [0][..]);
        let err: Result<Vec<u8>, String> = Err("no".into());
        let plain = postcard::to_stdvec(&err).unwrap();
        assert_eq!(encode_body_or(err).unwrap().into_bytes(), plain);
        // Pieces never span head and body, and none is empty; a small body goes with its head.
        let big = crate::protocol::PIECE + 3;
        let pieces: Vec<usize> = encode_body(vec![1u8; big])
            .unwrap()
            .pieces(crate::protocol::PIECE)
            .map(|p| p.len())
            .collect();
        assert_eq!(pieces, [3, crate::protocol::PIECE, 3]);
        let pieces: Vec<usize> = encode_body(vec![1u8; 10])
            .unwrap()
            .pieces(4)
            .map(|p| p.len())
            .collect();
        assert_eq!(pieces, [4, 4, 3]);
    }
}
