//! The encode/decode path of one call (args → frame → args), for profiling the per-call cost
//! that does not depend on the network.

use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Video {
    path: String,
    width: u32,
    height: u32,
}

fn codec(c: &mut Criterion) {
    c.bench_function("call round trip: (u64,)", |b| {
        b.iter(|| flame::__private::fuzz::call_round_trip(std::hint::black_box(&(7u64,))))
    });
    let video = (
        Video {
            path: "/uploads/2026/11/27/holiday.mp4".into(),
            width: 1920,
            height: 1080,
        },
        5u32,
    );
    c.bench_function("call round trip: (Video, u32)", |b| {
        b.iter(|| flame::__private::fuzz::call_round_trip(std::hint::black_box(&video)))
    });
    let blob = (vec![7u8; 64 * 1024],);
    c.bench_function("call round trip: 64 KiB of bytes", |b| {
        b.iter(|| flame::__private::fuzz::call_round_trip(std::hint::black_box(&blob)))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
