//! A read longer than one resolve of the layer chain (`RESOLVE_MAX` clusters) is resolved in
//! pieces: every piece comes back, in order, on a real pool file.

use bytes::Bytes;
use thinbd::engine::{Engine, EngineConfig};
use thinbd_protocol::ReadChunk;

const CS: u64 = 4096;
/// `thinbd::layers::layer::RESOLVE_MAX`, in 4 KiB clusters: 256 MiB.
const RESOLVE_MAX: u64 = 1 << 16;

#[tokio::test]
async fn a_read_past_one_resolve_comes_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(&EngineConfig {
        data_dir: dir.path().to_path_buf(),
        capacity: Some(16 << 20),
        cluster_size: Some(CS),
        io_engine: Default::default(),
        buffered_io: false,
        force: false,
    })
    .expect("open engine");
    e.create_volume("v", 2 * RESOLVE_MAX * CS).await.unwrap();
    let h = e.open_export("v").unwrap();
    // Data in the first cluster read, in the first of the second resolve and past the read.
    let first = 1;
    let last = first + RESOLVE_MAX + 1;
    for (v, byte) in [(first, 0xA1u8), (first + RESOLVE_MAX, 0xB2), (last, 0xC3)] {
        h.write(v * CS, Bytes::from(vec![byte; CS as usize]), false).await.unwrap();
    }
    let len = (last - first) * CS;
    let chunks = h.read(first * CS, len as u32).await.unwrap();
    let mut at = first * CS;
    let mut data = Vec::new();
    for c in &chunks {
        if let ReadChunk::Data(b) = c {
            data.push((at, b[0], b.len() as u64));
        }
        at += c.len() as u64;
    }
    assert_eq!(at, last * CS, "the chunks cover the whole read");
    assert_eq!(data, vec![(first * CS, 0xA1, CS), ((first + RESOLVE_MAX) * CS, 0xB2, CS)]);
}
