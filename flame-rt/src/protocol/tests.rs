//! The byte layouts checked against the messages they stand for, and the decoders against
//! arbitrary bytes.

use super::*;
use crate::trace::TraceParent;
use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..512).prop_map(Bytes::from)
}

fn to_runner() -> impl Strategy<Value = ToRunner> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u32>(),
            option::of(any::<u64>()),
            any::<u64>()
        )
            .prop_map(|(heartbeat_ms, miss_limit, idle_ms, max_payload)| {
                ToRunner::Welcome(Welcome {
                    heartbeat_ms,
                    miss_limit,
                    idle_ms,
                    max_payload,
                })
            }),
        part().prop_map(ToRunner::Part),
        (any::<u64>(), any::<u64>()).prop_map(|(call, bytes)| ToRunner::Took { call, bytes }),
        ".{0,80}".prop_map(|reason| ToRunner::Refused { reason }),
        (
            any::<u64>(),
            "[a-z_:]{0,60}",
            bytes(),
            option::of(any::<u64>()),
            option::of(any::<([u8; 16], [u8; 8], u8)>())
        )
            .prop_map(|(call, task, args, deadline_ms, trace)| ToRunner::Run {
                call,
                task,
                args,
                deadline_ms,
                trace: trace.map(|(trace_id, span_id, flags)| TraceParent {
                    trace_id,
                    span_id,
                    flags
                }),
            }),
        any::<u64>().prop_map(|call| ToRunner::Cancel { call }),
        Just(ToRunner::Heartbeat),
        any::<u64>().prop_map(|grace_ms| ToRunner::Shutdown { grace_ms }),
        chan().prop_map(ToRunner::Chan),
    ]
}

fn chan() -> impl Strategy<Value = ChanFrame> {
    let body = prop_oneof![
        bytes().prop_map(ChanBody::Data),
        bytes().prop_map(ChanBody::Part),
        any::<u32>().prop_map(ChanBody::Credit),
        Just(ChanBody::Close),
        ".{0,40}".prop_map(ChanBody::Fail),
    ];
    (any::<u64>(), any::<u32>(), body).prop_map(|(call, chan, body)| ChanFrame { call, chan, body })
}

fn borrowed(frame: &ChanFrame, variant: u8) -> ChanFrameRef<'_> {
    ChanFrameRef {
        variant,
        call: frame.call,
        chan: frame.chan,
        body: match &frame.body {
            ChanBody::Data(b) => ChanBodyRef::Data(b),
            ChanBody::Part(b) => ChanBodyRef::Part(b),
            ChanBody::Credit(n) => ChanBodyRef::Credit(*n),
            ChanBody::Close => ChanBodyRef::Close,
            ChanBody::Fail(m) => ChanBodyRef::Fail(m),
        },
    }
}

fn outcome() -> impl Strategy<Value = Outcome> {
    let kind = prop_oneof![
        Just(WireErrorKind::TimedOut),
        Just(WireErrorKind::UnknownTask),
        Just(WireErrorKind::Codec),
        Just(WireErrorKind::ShuttingDown),
    ];
    prop_oneof![
        bytes().prop_map(Outcome::Ok),
        ".{0,80}".prop_map(Outcome::Panicked),
        (kind, ".{0,80}").prop_map(|(kind, message)| Outcome::Failed { kind, message }),
    ]
}

fn to_parent() -> impl Strategy<Value = ToParent> {
    prop_oneof![
        (
            any::<u32>(),
            "[a-z0-9-]{0,40}",
            any::<[u8; 16]>(),
            ".{0,60}",
            any::<u64>(),
            vec(("[a-z_:]{0,40}", any::<u64>()), 0..20)
        )
            .prop_map(
                |(protocol, runner_id, token, fingerprint, manifest_hash, manifest)| {
                    ToParent::Hello(Hello {
                        protocol,
                        runner_id,
                        token,
                        fingerprint,
                        manifest_hash,
                        manifest,
                    })
                }
            ),
        (any::<u64>(), outcome()).prop_map(|(call, outcome)| ToParent::Done { call, outcome }),
        any::<u64>().prop_map(|call| ToParent::Cancelled { call }),
        Just(ToParent::Heartbeat),
        any::<u64>().prop_map(|idle_ms| ToParent::Idle { idle_ms }),
        ".{0,80}".prop_map(|reason| ToParent::BootFailed { reason }),
        chan().prop_map(ToParent::Chan),
        part().prop_map(ToParent::Part),
        Just(ToParent::Stopping),
        (any::<u64>(), any::<u64>()).prop_map(|(call, bytes)| ToParent::Took { call, bytes }),
    ]
}

fn part() -> impl Strategy<Value = Part> {
    (any::<u64>(), any::<u64>(), bytes()).prop_map(|(call, total, data)| Part { call, total, data })
}

/// Pieces of a payload gather in order, `Took` is due at each MiB, and pieces past the
/// announced size or an announcement past `max_payload` are refused, naming the payload.
#[test]
fn pieces_gather_up_to_what_was_announced() {
    const MIB: usize = 1 << 20;
    let piece = |total: u64, data: &'static [u8]| PartRef {
        variant: TO_RUNNER_PART,
        call: 9,
        total,
        data,
    };
    static HALF: [u8; MIB / 2] = [1; MIB / 2];
    let mut whole: Option<Vec<u8>> = None;
    let mut add = |part: PartRef<'_>, max| {
        part.add_to(
            |cap| whole.get_or_insert_with(|| Vec::with_capacity(cap)),
            max,
            "arguments",
        )
    };
    let total = 2 * MIB as u64;
    let took: Vec<_> = (0..4)
        .map(|_| add(piece(total, &HALF), 4 * MIB).unwrap())
        .collect();
    assert_eq!(took, [None, Some(MIB as u64), None, Some(2 * MIB as u64)]);
    let over = add(piece(total, b"x"), 4 * MIB).unwrap_err();
    assert_eq!(over.kind(), crate::ErrorKind::Protocol);
    assert!(
        over.to_string()
            .contains("arguments of 2097152 bytes in pieces: more came"),
        "{over}"
    );
    let too_big = piece(8 * MIB as u64, b"x").add_to(|_| unreachable!(), 4 * MIB, "a result");
    let too_big = too_big.unwrap_err().to_string();
    assert!(
        too_big.contains("a result of 8388608 bytes in pieces: over max_payload (4194304)"),
        "{too_big}"
    );
    assert_eq!(whole.map(|w| w.len()), Some(2 * MIB));
}

/// Each variant number `frames.rs` relies on is the one postcard gives the enum's variant.
#[test]
fn variant_numbers_are_the_enums_own() {
    let first = |frame: Bytes| frame[0];
    let part = Part {
        call: 1,
        total: 1,
        data: Bytes::new(),
    };
    let chan = ChanFrame {
        call: 1,
        chan: 0,
        body: ChanBody::Close,
    };
    let run = ToRunner::Run {
        call: 1,
        task: String::new(),
        deadline_ms: None,
        trace: None,
        args: Bytes::new(),
    };
    let done = ToParent::Done {
        call: 1,
        outcome: Outcome::Ok(Bytes::new()),
    };
    assert_eq!(first(encode(&run).unwrap()), RUN);
    assert_eq!(first(encode(&done).unwrap()), DONE);
    assert_eq!(
        first(encode(&ToRunner::Chan(chan.clone())).unwrap()),
        TO_RUNNER_CHAN
    );
    assert_eq!(
        first(encode(&ToParent::Chan(chan)).unwrap()),
        TO_PARENT_CHAN
    );
    assert_eq!(
        first(encode(&ToRunner::Part(part.clone())).unwrap()),
        TO_RUNNER_PART
    );
    assert_eq!(
        first(encode(&ToParent::Part(part)).unwrap()),
        TO_PARENT_PART
    );
}

#[test]
fn the_run_head_and_its_arguments_encode_as_the_message() {
    let args = [1, 2, 3, 250];
    let trace = TraceParent {
        trace_id: [9; 16],
        span_id: [4; 8],
        flags: 1,
    };
    let head = RunHead::new(300, "app::thumbnails", Some(1500), Some(trace), args.len());
    let mut frame = postcard::to_stdvec(&head).unwrap();
    frame.extend_from_slice(&args);
    let message = ToRunner::Run {
        call: 300,
        task: "app::thumbnails".into(),
        args: Bytes::from_static(&[1, 2, 3, 250]),
        deadline_ms: Some(1500),
        trace: Some(trace),
    };
    assert_eq!(frame, encode(&message).unwrap().to_vec());
    let back = run_frame(&frame).unwrap().unwrap();
    assert_eq!(
        (back.call, back.task, back.args),
        (300, "app::thumbnails", &args[..])
    );
    assert_eq!((back.deadline_ms, back.trace), (Some(1500), Some(trace)));
}

#[test]
fn the_chan_data_head_and_its_message_encode_as_the_message() {
    let message = Bytes::from_static(b"a chunk");
    for (variant, frame) in [
        (
            TO_RUNNER_CHAN,
            encode(&ToRunner::Chan(data_frame(&message))),
        ),
        (
            TO_PARENT_CHAN,
            encode(&ToParent::Chan(data_frame(&message))),
        ),
    ] {
        let mut mine =
            postcard::to_stdvec(&ChanDataHead::new(variant, 300, 2, message.len())).unwrap();
        mine.extend_from_slice(&message);
        assert_eq!(mine, frame.unwrap().to_vec());
    }
}

fn data_frame(message: &Bytes) -> ChanFrame {
    ChanFrame {
        call: 300,
        chan: 2,
        body: ChanBody::Data(message.clone()),
    }
}

proptest! {
    #[test]
    fn parent_messages_round_trip(msg in to_runner()) {
        prop_assert_eq!(decode::<ToRunner>(&encode(&msg).unwrap()).unwrap(), msg);
    }

    #[test]
    fn runner_messages_round_trip(msg in to_parent()) {
        prop_assert_eq!(decode::<ToParent>(&encode(&msg).unwrap()).unwrap(), msg);
    }

    #[test]
    fn borrowed_channel_frames_encode_as_the_messages(frame in chan()) {
        let to_runner = encode(&ToRunner::Chan(frame.clone())).unwrap();
        prop_assert_eq!(&postcard::to_stdvec(&borrowed(&frame, TO_RUNNER_CHAN)).unwrap()[..], &to_runner[..]);
        let back = chan_frame(&to_runner, TO_RUNNER_CHAN).unwrap().unwrap();
        prop_assert_eq!((back.call, back.chan), (frame.call, frame.chan));
        let to_parent = encode(&ToParent::Chan(frame.clone())).unwrap();
        prop_assert_eq!(&postcard::to_stdvec(&borrowed(&frame, TO_PARENT_CHAN)).unwrap()[..], &to_parent[..]);
        prop_assert!(chan_frame(&to_parent, TO_RUNNER_CHAN).is_none());
    }

    #[test]
    fn done_frames_decode_in_place_as_the_messages(call in any::<u64>(), outcome in outcome()) {
        let msg = ToParent::Done { call, outcome };
        let frame = encode(&msg).unwrap();
        prop_assert_eq!(done_frame(&frame).unwrap().unwrap(), msg);
    }

    #[test]
    fn pieces_and_results_sent_from_where_they_are_encode_as_the_messages(
        part in part(),
        call in any::<u64>(),
        outcome in outcome(),
    ) {
        let out = Outbox::new();
        let total = part.total as usize;
        out.send_part(TO_RUNNER_PART, part.call, total, part.data.clone());
        out.send_part(TO_PARENT_PART, part.call, total, part.data.clone());
        out.send_done(call, outcome.clone());
        let frames = out.queued_frames();
        prop_assert_eq!(&frames[0], &encode(&ToRunner::Part(part.clone())).unwrap().to_vec());
        prop_assert_eq!(&frames[1], &encode(&ToParent::Part(part.clone())).unwrap().to_vec());
        prop_assert_eq!(&frames[2], &encode(&ToParent::Done { call, outcome }).unwrap().to_vec());
        let back = part_frame(&frames[0], TO_RUNNER_PART).unwrap().unwrap();
        prop_assert_eq!((back.call, back.total, back.data), (part.call, part.total, &part.data[..]));
        prop_assert!(part_frame(&frames[0], TO_PARENT_PART).is_none());
    }
}
