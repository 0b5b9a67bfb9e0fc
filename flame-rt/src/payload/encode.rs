//! Payloads going out: byte vectors written as one byte string, and a big byte vector or
//! `Bytes` kept as the body of its [`Encoded`] payload, sent from its own memory.

use serde::{Serialize, Serializer};

use super::{Encoded, buffer, encode, encode_result};

/// Encodes a byte vector as one byte string. Used by `#[flame::task]`; not public API.
#[doc(hidden)]
pub struct AsBytes<'a, T: ?Sized>(pub &'a T);

impl<T: ?Sized + serde_bytes::Serialize> Serialize for AsBytes<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Serialize::serialize(self.0, serializer)
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
