//! Replays the fuzz corpus (fuzz/corpus/server_input) and a bounded, seeded run of mutations of
//! it through the same entry point as the cargo-fuzz target, so every test run fuzzes a little.

use std::path::PathBuf;

use thinbd_protocol::fuzzing::server_input;

fn corpus() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/server_input");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).expect("corpus file")).collect()
}

#[test]
fn corpus_replays_without_panic() {
    let c = corpus();
    assert!(c.len() >= 5, "the seed corpus is missing");
    for input in &c {
        server_input(input);
    }
}

#[test]
fn seeded_mutations_do_not_panic_or_hang() {
    let seed: u64 = std::env::var("THINBD_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x7415bd);
    let iterations: usize = std::env::var("THINBD_FUZZ_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(5000);
    let corpus = corpus();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..iterations {
        let mut input = corpus[next() as usize % corpus.len()].clone();
        for _ in 0..1 + next() % 8 {
            let pos = if input.is_empty() { 0 } else { next() as usize % input.len() };
            match next() % 5 {
                0 if !input.is_empty() => input[pos] = next() as u8,
                1 if !input.is_empty() => input[pos] ^= 1 << (next() % 8),
                2 => input.insert(pos, next() as u8),
                3 if !input.is_empty() => {
                    input.remove(pos);
                }
                _ => {
                    // Overwrite 4 bytes with an interesting value (lengths, flags).
                    let vals = [0u32, 1, 0xffff_ffff, 0x8000_0000, 4096, 1 << 20, 28];
                    let v = vals[next() as usize % vals.len()].to_be_bytes();
                    for (k, b) in v.iter().enumerate() {
                        if let Some(slot) = input.get_mut(pos + k) {
                            *slot = *b;
                        }
                    }
                }
            }
        }
        let r = std::panic::catch_unwind(|| server_input(&input));
        assert!(r.is_ok(), "iteration {i} (THINBD_FUZZ_SEED={seed}) panicked on input {input:02x?}");
    }
}
