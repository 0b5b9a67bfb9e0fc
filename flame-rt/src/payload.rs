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
//! `join.rs` on the caller), and the first big `Vec<u8>` takes that buffer over ([`FromBytes`]).
//! A 256 MiB `Vec<u8>` argument went from 0.21–0.55× a raw TCP copy to 0.85–1.05×.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Encodes a byte vector as one byte string. Used by `#[flame::task]`; not public API.
#[doc(hidden)]
pub struct AsBytes<'a, T: ?Sized>(pub &'a T);

impl<T: ?Sized + serde_bytes::Serialize> Serialize for AsBytes<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Serialize::serialize(self.0, serializer)
    }
}

/// Decodes a byte vector from one byte string. Used by `#[flame::task]`; not public API.
///
/// A big `Vec<u8>` (or `Box<[u8]>`) argument that came in pieces is not copied out of the buffer
/// the pieces were put together in: it holds a slice of that buffer, and
/// [`into_inner`](FromBytes::into_inner) — which the task runs when it is first polled, once
/// the decode and the runner have let go of the buffer — turns the buffer itself into the
/// vector, its bytes moved to its front (memory already touched, where a fresh vector cost a
/// 256 MiB argument 65 536 page faults).
#[doc(hidden)]
pub struct FromBytes<T>(Held<T>);

enum Held<T> {
    Ready(T),
    /// A slice of the reassembled arguments, to become a vector by [`ByteVec::from_vec`].
    InWhole(bytes::Bytes),
}

impl<T: ByteVec> FromBytes<T> {
    /// The decoded value.
    pub fn into_inner(self) -> T {
        match self.0 {
            Held::Ready(value) => value,
            // Unique by now, unless `Bytes` arguments share the buffer: then this copies.
            Held::InWhole(bytes) => T::from_vec(Vec::from(bytes)),
        }
    }
}

impl<'de, T: ByteVec> Deserialize<'de> for FromBytes<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if T::TAKES_OVER {
            return deserializer.deserialize_byte_buf(HeldVisitor).map(|held| {
                FromBytes(match held {
                    Held::Ready(vec) => Held::Ready(T::from_vec(vec)),
                    Held::InWhole(bytes) => Held::InWhole(bytes),
                })
            });
        }
        T::deserialize_bytes(deserializer).map(|value| FromBytes(Held::Ready(value)))
    }
}

/// The byte vectors `#[flame::task]` decodes itself, into a [`buffer`] (serde_bytes would copy
/// them into memory that faults in page by page). Not public API.
#[doc(hidden)]
pub trait ByteVec: Sized {
    /// Whether a big one may take over the reassembled arguments ([`FromBytes`]).
    const TAKES_OVER: bool = false;

    /// Decodes one byte string (or, for an `Option`, none).
    fn deserialize_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error>;

    /// The value a decoded byte string makes; only called where `TAKES_OVER`.
    fn from_vec(vec: Vec<u8>) -> Self {
        let _ = vec;
        unreachable!("only byte vectors that take over are made from a Vec")
    }
}

/// Decodes a byte string as a slice of the reassembled arguments when it is big and no other
/// argument has claimed them, else as a copy.
struct HeldVisitor;

impl<'de> serde::de::Visitor<'de> for HeldVisitor {
    type Value = Held<Vec<u8>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
        if bytes.len() > crate::protocol::PIECE
            && let Some(held) = claim_whole(bytes)
        {
            return Ok(Held::InWhole(held));
        }
        VecVisitor.visit_bytes(bytes).map(Held::Ready)
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Self::Value, E> {
        Ok(Held::Ready(bytes))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        VecVisitor.visit_seq(seq).map(Held::Ready)
    }
}

struct VecVisitor;

impl<'de> serde::de::Visitor<'de> for VecVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
        let mut vec = buffer(bytes.len());
        vec.extend_from_slice(bytes);
        Ok(vec)
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(bytes)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut vec = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(byte) = seq.next_element()? {
            vec.push(byte);
        }
        Ok(vec)
    }
}

impl ByteVec for Vec<u8> {
    const TAKES_OVER: bool = true;

    fn deserialize_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_byte_buf(VecVisitor)
    }

    fn from_vec(vec: Vec<u8>) -> Self {
        vec
    }
}

impl ByteVec for Box<[u8]> {
    const TAKES_OVER: bool = true;

    fn deserialize_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::deserialize_bytes(deserializer).map(Vec::into_boxed_slice)
    }

    fn from_vec(vec: Vec<u8>) -> Self {
        vec.into_boxed_slice()
    }
}

impl<T: ByteVec> ByteVec for Option<T> {
    fn deserialize_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Decoded at once, not held: an `Option` is unwrapped before the task runs.
        struct Eager<T>(T);
        impl<'de, T: ByteVec> Deserialize<'de> for Eager<T> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                T::deserialize_bytes(deserializer).map(Eager)
            }
        }
        Option::<Eager<T>>::deserialize(deserializer).map(|some| some.map(|e| e.0))
    }
}

/// Decodes a `bytes::Bytes` argument as a slice of the buffer its call's arguments were
/// reassembled in (when they came in pieces) instead of copying it into fresh memory; any other
/// type decodes as it would. `#[flame::task]` wraps the parameters whose type is named `Bytes`.
/// Not public API.
#[doc(hidden)]
pub struct Shared<T>(pub T);

/// The reassembled arguments being decoded on this thread, if they came in pieces.
struct Whole {
    bytes: bytes::Bytes,
    /// A byte vector holds the buffer to take it over: no other may.
    claimed: bool,
}

thread_local! {
    static WHOLE: std::cell::RefCell<Option<Whole>> = const { std::cell::RefCell::new(None) };
}

/// Runs `decode` with `whole` as the buffer `Bytes` arguments may be sliced from, and one byte
/// vector argument may take over.
pub(crate) fn sharing<R>(whole: &bytes::Bytes, decode: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            WHOLE.with(|w| w.borrow_mut().take());
        }
    }
    WHOLE.with(|w| {
        *w.borrow_mut() = Some(Whole {
            bytes: whole.clone(),
            claimed: false,
        })
    });
    let _reset = Reset;
    decode()
}

/// `bytes` as a slice of the arguments being decoded, if they lie within them.
fn slice_of_whole(bytes: &[u8]) -> Option<bytes::Bytes> {
    WHOLE.with(|w| {
        let whole = w.borrow();
        let whole = &whole.as_ref()?.bytes;
        let inside = whole.as_ptr() <= bytes.as_ptr()
            && bytes.as_ptr_range().end <= whole.as_ptr_range().end;
        inside.then(|| whole.slice_ref(bytes))
    })
}

/// Like [`slice_of_whole`], for the one byte vector that is to take the buffer over.
fn claim_whole(bytes: &[u8]) -> Option<bytes::Bytes> {
    let claimed = WHOLE.with(|w| {
        let mut whole = w.borrow_mut();
        let whole = whole.as_mut()?;
        Some(std::mem::replace(&mut whole.claimed, true))
    });
    match claimed {
        Some(false) => slice_of_whole(bytes),
        _ => None,
    }
}

impl<'de, T: Deserialize<'de> + 'static> Deserialize<'de> for Shared<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if std::any::TypeId::of::<T>() != std::any::TypeId::of::<bytes::Bytes>() {
            return T::deserialize(deserializer).map(Shared);
        }
        let mut bytes = Some(deserializer.deserialize_bytes(SharedVisitor)?);
        let slot: &mut dyn std::any::Any = &mut bytes;
        let value = slot.downcast_mut::<Option<T>>().and_then(Option::take);
        Ok(Shared(value.expect("T is bytes::Bytes")))
    }
}

struct SharedVisitor;

impl<'de> serde::de::Visitor<'de> for SharedVisitor {
    type Value = bytes::Bytes;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, bytes: &'de [u8]) -> Result<Self::Value, E> {
        Ok(slice_of_whole(bytes).unwrap_or_else(|| bytes::Bytes::copy_from_slice(bytes)))
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
        Ok(bytes::Bytes::copy_from_slice(bytes))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Self::Value, E> {
        Ok(bytes.into())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        VecVisitor.visit_seq(seq).map(Into::into)
    }
}

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

/// Encodes a call's arguments as one tuple (generated code passes references to them), when
/// none is a byte vector or `Bytes`. Not public API.
#[doc(hidden)]
pub fn encode_args<A: Serialize>(args: &A) -> Result<Encoded, postcard::Error> {
    encode(args).map(|encoded| bytes::Bytes::from(encoded).into())
}

/// Encodes a call's arguments one by one, as postcard encodes their tuple, keeping the first
/// one that is a big byte vector or `Bytes` as the body of the [`Encoded`] payload: it is sent
/// from its own memory (a `Vec` given up by the call) rather than copied into a fresh buffer.
/// Generated code calls it; not public API.
#[doc(hidden)]
#[derive(Default)]
pub struct ArgsWriter {
    head: Vec<u8>,
    body: Option<bytes::Bytes>,
    tail: Vec<u8>,
}

impl ArgsWriter {
    fn buf(&mut self) -> &mut Vec<u8> {
        match self.body {
            None => &mut self.head,
            Some(_) => &mut self.tail,
        }
    }

    /// Appends one argument.
    pub fn value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), postcard::Error> {
        let size = crate::channel::probing(|| postcard::experimental::serialized_size(value))?;
        let buf = self.buf();
        if buf.is_empty() {
            *buf = buffer(size);
        } else {
            buf.reserve(size);
        }
        postcard::to_io(value, buf).map(drop)
    }

    /// Appends a byte-vector argument: taken as the body when it is the first big one.
    pub fn byte_vec<T>(&mut self, value: &mut T) -> Result<(), postcard::Error>
    where
        T: IntoBody + Default + serde_bytes::Serialize,
    {
        if self.body.is_none() && value.body_len() > crate::protocol::PIECE {
            let body = std::mem::take(value).into_body(&mut self.head);
            self.body = Some(body);
            return Ok(());
        }
        self.value(&AsBytes(value))
    }

    /// Appends an argument of a type named `Bytes`: taken as the body (shared, not copied) when
    /// it is `bytes::Bytes`, big, and the first.
    pub fn shared<T: Serialize + 'static>(&mut self, value: &T) -> Result<(), postcard::Error> {
        let any: &dyn std::any::Any = value;
        match any.downcast_ref::<bytes::Bytes>() {
            Some(bytes) if self.body.is_none() && bytes.len() > crate::protocol::PIECE => {
                self.body = Some(bytes.clone().into_body(&mut self.head));
                Ok(())
            }
            _ => self.value(value),
        }
    }

    /// The payload.
    pub fn finish(self) -> Encoded {
        match self.body {
            Some(body) => Encoded::with_body(self.head, body, self.tail),
            None => bytes::Bytes::from(self.head).into(),
        }
    }
}

/// A byte vector a task returns, with what postcard writes in front of its bytes. Not public
/// API.
#[doc(hidden)]
pub trait IntoBody {
    /// Appends to `head` what goes before the bytes, and gives the bytes without a copy.
    fn into_body(self, head: &mut Vec<u8>) -> bytes::Bytes;

    /// How many bytes the body would be.
    fn body_len(&self) -> usize;
}

/// Postcard's length prefix: a varint, as for any `usize`.
fn push_len(head: &mut Vec<u8>, len: usize) {
    let mut buf = [0u8; 10];
    let varint = postcard::to_slice(&len, &mut buf).expect("a usize fits in 10 bytes");
    head.extend_from_slice(varint);
}

impl IntoBody for Vec<u8> {
    fn into_body(self, head: &mut Vec<u8>) -> bytes::Bytes {
        push_len(head, self.len());
        self.into()
    }

    fn body_len(&self) -> usize {
        self.len()
    }
}

impl IntoBody for bytes::Bytes {
    fn into_body(self, head: &mut Vec<u8>) -> bytes::Bytes {
        push_len(head, self.len());
        self
    }

    fn body_len(&self) -> usize {
        self.len()
    }
}

impl IntoBody for Box<[u8]> {
    fn into_body(self, head: &mut Vec<u8>) -> bytes::Bytes {
        push_len(head, self.len());
        self.into()
    }

    fn body_len(&self) -> usize {
        self.len()
    }
}

impl<T: IntoBody> IntoBody for Option<T> {
    fn into_body(self, head: &mut Vec<u8>) -> bytes::Bytes {
        match self {
            None => {
                head.push(0);
                bytes::Bytes::new()
            }
            Some(value) => {
                head.push(1);
                value.into_body(head)
            }
        }
    }

    fn body_len(&self) -> usize {
        self.as_ref().map_or(0, IntoBody::body_len)
    }
}

/// Encodes a task's byte-vector result as postcard would, the bytes left where they are.
#[doc(hidden)]
pub fn encode_body<T: IntoBody>(value: T) -> Result<Encoded, crate::Error> {
    let mut head = Vec::new();
    let body = value.into_body(&mut head);
    Ok(Encoded::with_body(head, body, Vec::new()))
}

/// Encodes a task's result of a type named `Bytes`: a big `bytes::Bytes` is sent from where it
/// is, any other type as usual.
#[doc(hidden)]
pub fn encode_shared<T: Serialize + 'static>(value: T) -> Result<Encoded, crate::Error> {
    let any: &dyn std::any::Any = &value;
    match any.downcast_ref::<bytes::Bytes>() {
        Some(bytes) => encode_body(bytes.clone()),
        None => encode_result(&value),
    }
}

/// [`encode_body`] for a `Result` whose `Ok` is a byte vector.
#[doc(hidden)]
pub fn encode_body_or<T: IntoBody, E: Serialize>(
    value: Result<T, E>,
) -> Result<Encoded, crate::Error> {
    match value {
        // Postcard writes a `Result`'s variant as a varint: `Ok` is 0, `Err` 1.
        Ok(value) => {
            let mut head = vec![0];
            let body = value.into_body(&mut head);
            Ok(Encoded::with_body(head, body, Vec::new()))
        }
        Err(error) => encode_result(&Err::<(), E>(error)),
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

/// Decodes a task's result on the caller's side.
#[doc(hidden)]
pub fn decode_value<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
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
