//! Request header parse/encode: the per-request cost of the codec on the hot path.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use thinbd_protocol::wire::Request;

fn codec(c: &mut Criterion) {
    let req = Request { flags: 1, command: 1, cookie: 42, offset: 1 << 30, length: 4096 };
    let raw = req.encode();
    c.bench_function("request_parse", |b| b.iter(|| Request::parse(black_box(&raw))));
    c.bench_function("request_encode", |b| b.iter(|| black_box(&req).encode()));
}

criterion_group!(benches, codec);
criterion_main!(benches);
