//! Benchmarks live in `benches/` (criterion) and `fio/` (the peer comparison harness).
