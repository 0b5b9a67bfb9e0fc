//! The frames a runner of this binary sends, for tests that play a runner which holds the
//! right token but breaks the rules (a compromised or buggy runner). Each returns a whole frame,
//! length prefix included, ready to write to the parent's listener.

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
