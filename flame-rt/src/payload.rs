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
#[doc(hidden)]
pub struct FromBytes<T>(pub T);

impl<'de, T: serde_bytes::Deserialize<'de>> Deserialize<'de> for FromBytes<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_bytes::Deserialize::deserialize(deserializer).map(FromBytes)
    }
}

/// Encodes a task's arguments (generated code passes them as a tuple of references, byte
/// vectors wrapped in [`AsBytes`]).
#[doc(hidden)]
pub fn encode_args<A: Serialize>(args: &A) -> Result<Vec<u8>, postcard::Error> {
    encode(args)
}

/// Encodes `value` into a buffer sized once: a growing one copies a big payload again at each
/// doubling (a size pass over byte strings is a few additions). The size pass must not take the
/// channel halves among the arguments, so they count as placeholders in it.
pub(crate) fn encode<T: ?Sized + Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let size = crate::channel::probing(|| postcard::experimental::serialized_size(value))?;
    postcard::to_io(value, Vec::with_capacity(size))
}

/// Decodes a task's result on the caller's side.
#[doc(hidden)]
pub fn decode_value<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_vectors_encode_as_serde_writes_them_only_faster() {
        let data: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let plain = postcard::to_stdvec(&(7u32, &data, Some(data.clone()))).unwrap();
        let fast = encode_args(&(7u32, AsBytes(&data), AsBytes(&Some(data.clone())))).unwrap();
        assert_eq!(plain, fast);
        type Decoded = (u32, FromBytes<Vec<u8>>, FromBytes<Option<Box<[u8]>>>);
        let (n, back, opt): Decoded = decode_value(&fast).unwrap();
        assert_eq!((n, &back.0, opt.0.as_deref()), (7, &data, Some(&data[..])));
        let result: Result<Vec<u8>, String> = Ok(data.clone());
        let fast = postcard::to_stdvec(&result.as_ref().map(AsBytes)).unwrap();
        assert_eq!(fast, postcard::to_stdvec(&result).unwrap());
    }
}
