//! Payloads coming in: byte vectors read as one byte string, a big one taking over the buffer
//! its pieces were put together in, and `Bytes` as slices of that buffer.

use serde::{Deserialize, Deserializer};

use super::buffer;

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

/// Decodes a task's result on the caller's side.
#[doc(hidden)]
pub fn decode_value<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
