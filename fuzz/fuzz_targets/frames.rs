//! Bytes from a peer that has not proven who it is: frame splitting, message decoding and the
//! handshake checks must never panic, whatever arrives.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flame::__private::fuzz::frames(data);
});
