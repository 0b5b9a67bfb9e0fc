//! The frames a runner of this binary sends, for tests that play a runner which holds the
//! right token but breaks the rules (a compromised or buggy runner). Each returns a whole frame,
//! length prefix included, ready to write to the parent's listener.

use crate::protocol::{
    self, ChanBody, ChanFrame, Hello, Outcome, Part, ToParent, ToRunner, WireErrorKind,
};

fn framed(msg: &ToParent) -> Vec<u8> {
    let body = protocol::encode(msg).expect("encodable message");
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
        protocol: protocol::PROTOCOL_VERSION,
        runner_id: runner_id.to_string(),
        token,
        fingerprint: crate::protocol::handshake::fingerprint().to_string(),
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

/// The runner has put `bytes` of call `call`'s arguments together.
pub fn took(call: u64, bytes: u64) -> Vec<u8> {
    framed(&ToParent::Took { call, bytes })
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
/// `"cancel <call id>"`, `"heartbeat"`, `"shutdown"`, `"chan"`, `"part <call id> <bytes>"`,
/// `"took <call id> <bytes>"`, or `"?"` for a frame that does not decode. Takes a frame without its length prefix.
pub fn describe(frame: &[u8]) -> String {
    match protocol::decode::<ToRunner>(frame) {
        Ok(ToRunner::Welcome(_)) => "welcome".into(),
        Ok(ToRunner::Refused { reason }) => format!("refused: {reason}"),
        Ok(ToRunner::Run { call, .. }) => format!("run {call}"),
        Ok(ToRunner::Cancel { call }) => format!("cancel {call}"),
        Ok(ToRunner::Heartbeat) => "heartbeat".into(),
        Ok(ToRunner::Shutdown { .. }) => "shutdown".into(),
        Ok(ToRunner::Chan(_)) => "chan".into(),
        Ok(ToRunner::Part(part)) => format!("part {} {}", part.call, part.data.len()),
        Ok(ToRunner::Took { call, bytes }) => format!("took {call} {bytes}"),
        Err(_) => "?".into(),
    }
}

/// Frames of whatever `script` says, for the fuzz target and its property test: each op is a
/// byte choosing a message the runner may send, then bytes for its fields (a call id among 0–4,
/// of which 1–3 are the calls a session starts, a channel among 0–2, short payloads), or a
/// frame of raw bytes. Any byte string is a script.
pub fn script(script: &[u8]) -> Vec<u8> {
    let mut cur = Cursor(script);
    let mut out = Vec::new();
    while let Some(op) = cur.next() {
        let call = u64::from(cur.u8() % 5);
        let chan = |cur: &mut Cursor<'_>, body| {
            ToParent::Chan(ChanFrame {
                call,
                chan: u32::from(cur.u8() % 3),
                body,
            })
        };
        let msg = match op % 12 {
            0 => ToParent::Done {
                call,
                outcome: Outcome::Ok(cur.bytes()),
            },
            1 => ToParent::Done {
                call,
                outcome: Outcome::Failed {
                    kind: WireErrorKind::Codec,
                    message: cur.text(),
                },
            },
            2 => ToParent::Done {
                call,
                outcome: Outcome::Panicked(cur.text()),
            },
            3 => ToParent::Cancelled { call },
            4 => {
                let data = cur.bytes();
                chan(&mut cur, ChanBody::Data(data))
            }
            5 => {
                let data = cur.bytes();
                chan(&mut cur, ChanBody::Part(data))
            }
            6 => {
                let n = u32::from(cur.u8());
                chan(&mut cur, ChanBody::Credit(n))
            }
            7 => chan(&mut cur, ChanBody::Close),
            8 => {
                let why = cur.text();
                chan(&mut cur, ChanBody::Fail(why))
            }
            9 => ToParent::Part(Part {
                call,
                total: u64::from(cur.u8()) << (cur.u8() % 40),
                data: cur.bytes(),
            }),
            10 => match cur.u8() % 7 {
                0 => ToParent::Heartbeat,
                1 => ToParent::Idle {
                    idle_ms: u64::from(cur.u8()) * 100,
                },
                2 => ToParent::Stopping,
                3 => ToParent::BootFailed { reason: cur.text() },
                4 => ToParent::StartTls {
                    runner_id: cur.text(),
                },
                5 => ToParent::Took {
                    call,
                    bytes: u64::from(cur.u8()) << (cur.u8() % 64),
                },
                _ => ToParent::Hello(Hello {
                    protocol: protocol::PROTOCOL_VERSION,
                    runner_id: cur.text(),
                    token: [0; 16],
                    fingerprint: String::new(),
                    manifest_hash: 0,
                    manifest: Vec::new(),
                }),
            },
            _ => {
                let raw = cur.bytes();
                out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
                out.extend_from_slice(&raw);
                continue;
            }
        };
        out.extend_from_slice(&framed(&msg));
    }
    out
}

/// Reads a script; past its end, every field is zero or empty.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn next(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn u8(&mut self) -> u8 {
        self.next().unwrap_or(0)
    }

    fn bytes(&mut self) -> bytes::Bytes {
        let len = usize::from(self.u8()).min(self.0.len());
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        bytes::Bytes::copy_from_slice(taken)
    }

    fn text(&mut self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}
