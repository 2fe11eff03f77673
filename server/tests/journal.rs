//! The journal region as queue-depth-1 first writes use it: each write's record goes out as its
//! own block beside its data, and a FLUSH follows each write. Enough of them to fill the region
//! of both pool formats twice over (255 blocks in format 2, 4,095 in format 3), so that the
//! ring is checkpointed and its slots reused; then a power cut. Every flushed write must read
//! back, through the records replayed from reused slots, and the region must cost a durable
//! metadata commit only once per half of it, not once per FLUSH.

use std::sync::Arc;

use bytes::Bytes;
use thinbd::engine::{Engine, EngineConfig};
use thinbd::meta::store::{FORMAT_VERSION, PoolConfig, create_with_format};
use thinbd::space::backend::BlockStore;
use thinbd::space::fault_disk::{FaultDisk, XorShift};
use thinbd::space::journal::BLOCK;
use thinbd::space::superblock::data_offset;

const CS: u64 = 4096;

fn config(clusters: u64) -> EngineConfig {
    EngineConfig {
        data_dir: "/nonexistent".into(),
        capacity: Some(clusters * CS),
        cluster_size: Some(CS),
        io_engine: Default::default(),
        buffered_io: false,
        force: false,
    }
}

fn open(meta: &FaultDisk, pool: &FaultDisk, clusters: u64) -> Arc<Engine> {
    let db = redb::Builder::new().create_with_backend(meta.redb_backend()).expect("redb opens");
    Engine::open_on(&config(clusters), db, Arc::new(pool.clone())).expect("engine opens")
}

/// Cluster `i`'s content: its number in every 8 bytes.
fn payload(i: u64) -> Vec<u8> {
    (0..CS / 8).flat_map(|_| (i + 1).to_le_bytes()).collect()
}

async fn fill_flush_crash_and_check(format: Option<u64>) {
    let (meta, pool) = (FaultDisk::new(), FaultDisk::new());
    pool.require_alignment(4096);
    let offset = data_offset(format.unwrap_or(FORMAT_VERSION) as u32);
    let slots = offset / BLOCK as u64 - 1;
    let writes = 2 * slots + 50;
    let clusters = writes + 16;
    if let Some(f) = format {
        let db = redb::Builder::new().create_with_backend(meta.redb_backend()).expect("redb");
        create_with_format(&db, PoolConfig { cluster_size: CS, capacity_clusters: clusters }, f).expect("store");
    }
    let e = open(&meta, &pool, clusters);
    assert_eq!(e.journal_blocks(), slots, "format {format:?}");
    e.create_volume("v", clusters * CS).await.expect("create");
    let h = e.open_export("v").expect("open");
    let before = e.durable_commits();
    for i in 0..writes {
        h.write(i * CS, Bytes::from(payload(i)), false).await.expect("write");
        h.flush().await.expect("flush");
    }
    let checkpoints = e.durable_commits() - before;
    // One per half region, give or take the first and last: never one per FLUSH.
    let expected = writes / (slots / 2);
    assert!(
        (expected.saturating_sub(1)..=expected + 2).contains(&checkpoints),
        "format {format:?}: {checkpoints} durable commits in {writes} flushes of a {slots}-block journal"
    );
    // Cluster 0 starts where the format says: the journal region is below it.
    let mut first = thinbd_protocol::aligned::AlignedBuf::zeroed(CS as usize);
    pool.read_at(first.as_mut_slice(), offset).expect("read pool");
    assert!(first.as_slice() == payload(0), "format {format:?}: cluster 0 is not at {offset}");

    let mut rng = XorShift(writes);
    let (meta, pool) = (meta.crash(&mut rng), pool.crash(&mut rng));
    drop(h);
    drop(e);
    let e = open(&meta, &pool, clusters);
    assert!(e.fsck().expect("fsck").ok(), "format {format:?}: fsck after the power cut");
    let h = e.open_export("v").expect("open");
    for i in 0..writes {
        let got = h.read_bytes(i * CS, CS as u32).await.expect("read");
        assert!(got == payload(i), "format {format:?}: flushed cluster {i} of {writes} lost in the power cut");
    }
}

#[tokio::test]
async fn a_full_journal_of_a_format_2_pool_checkpoints_and_wraps_without_losing_a_flushed_write() {
    fill_flush_crash_and_check(Some(2)).await;
}

#[tokio::test]
async fn a_full_journal_of_a_new_pool_checkpoints_and_wraps_without_losing_a_flushed_write() {
    fill_flush_crash_and_check(None).await;
}
