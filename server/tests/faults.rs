//! Full pool (invariant 4), reuse of a deleted volume's clusters (invariant 2) and injected I/O
//! errors, on fault-injecting disks.

use std::sync::Arc;

use bytes::Bytes;
use thinbd::engine::{Engine, EngineConfig, LocalVolume};
use thinbd::error::EngineError;
use thinbd::space::fault_disk::FaultDisk;

const CS: u64 = 4096;

fn open(capacity_clusters: u64) -> (Arc<Engine>, FaultDisk) {
    let (meta, pool) = (FaultDisk::new(), FaultDisk::new());
    pool.require_alignment(4096);
    let cfg = EngineConfig {
        data_dir: "/nonexistent".into(),
        capacity: Some(capacity_clusters * CS),
        cluster_size: Some(CS),
        io_engine: Default::default(),
        buffered_io: false,
        force: false,
    };
    let db = redb::Builder::new().create_with_backend(meta.redb_backend()).unwrap();
    (Engine::open_on(&cfg, db, Arc::new(pool.clone())).unwrap(), pool)
}

async fn read(h: &LocalVolume, off: u64, len: u32) -> Vec<u8> {
    h.read_bytes(off, len).await.expect("read")
}

fn fill(b: u8, n: u64) -> Bytes {
    Bytes::from(vec![b; n as usize])
}

#[tokio::test]
async fn full_pool_refuses_new_clusters_serves_the_rest_and_recovers() {
    let (e, _) = open(8);
    e.create_volume("a", 16 * CS).await.unwrap();
    let h = e.open_export("a").unwrap();
    h.write(0, fill(1, 8 * CS), false).await.unwrap();
    assert!(matches!(h.write(8 * CS, fill(2, 512), false).await, Err(EngineError::NoSpace)));
    // A write that needs one new cluster among owned ones fails whole on the new part only.
    assert!(matches!(h.write(7 * CS, fill(3, 2 * CS), false).await, Err(EngineError::NoSpace)));
    // Reads and overwrites of owned clusters keep working.
    h.write(0, fill(4, 100), true).await.unwrap();
    assert_eq!(read(&h, 0, 101).await, [vec![4u8; 100], vec![1u8]].concat());
    assert_eq!(read(&h, 8 * CS, 512).await, vec![0u8; 512], "nothing landed past the full pool");
    // Free two clusters: the next first write succeeds without an explicit flush.
    h.zero(2 * CS, 2 * CS as u32, true, false).await.unwrap();
    h.write(8 * CS, fill(5, 2 * CS), false).await.unwrap();
    assert_eq!(read(&h, 8 * CS, 2 * CS as u32).await, vec![5u8; 2 * CS as usize]);
    assert_eq!(e.pool_info().used, 8 * CS);
    drop(h);
    assert!(e.fsck().unwrap().ok());
}

#[tokio::test]
async fn reused_clusters_never_show_a_previous_owners_bytes() {
    let (e, _) = open(16);
    e.create_volume("old", 8 * CS).await.unwrap();
    e.open_export("old").unwrap().write(0, fill(0xEE, 8 * CS), true).await.unwrap();
    e.delete_volume("old").await.unwrap();
    e.create_volume("new", 8 * CS).await.unwrap();
    let h = e.open_export("new").unwrap();
    for c in 0..8 {
        // A small write into each cluster, at a different place each time.
        h.write(c * CS + c * 256, fill(c as u8 + 1, 100), false).await.unwrap();
    }
    let got = read(&h, 0, 8 * CS as u32).await;
    assert!(!got.contains(&0xEE), "a reused cluster leaked the deleted volume's data");
    for c in 0..8u64 {
        let at = (c * CS + c * 256) as usize;
        assert_eq!(&got[at..at + 100], &vec![c as u8 + 1; 100][..]);
    }
    assert_eq!(e.pool_info().used, 8 * CS, "the deleted volume's clusters were reused");
}

#[tokio::test]
async fn io_errors_reach_the_client_and_leave_metadata_consistent() {
    let (e, pool) = open(64);
    e.create_volume("v", 32 * CS).await.unwrap();
    let h = e.open_export("v").unwrap();
    h.write(0, fill(1, CS), true).await.unwrap();
    pool.fail_writes(Some(std::io::ErrorKind::Other));
    let err = h.write(CS, fill(2, CS), false).await.unwrap_err();
    assert!(matches!(err, EngineError::Io { .. }), "{err}");
    assert!(h.write(0, fill(3, 10), false).await.is_err(), "overwrite fails too");
    assert!(h.flush().await.is_err(), "a flush that cannot sync reports it");
    pool.fail_writes(Some(std::io::ErrorKind::StorageFull));
    assert!(h.write(5 * CS, fill(2, CS), false).await.is_err());
    pool.fail_writes(None);
    // The failed first write never got mapped: that cluster still reads as zeros.
    assert_eq!(read(&h, CS, CS as u32).await, vec![0u8; CS as usize]);
    assert_eq!(read(&h, 10, 10).await, vec![1u8; 10]);
    pool.fail_reads(true);
    assert!(h.read(0, 512).await.is_err());
    pool.fail_reads(false);
    h.write(CS, fill(4, CS), true).await.unwrap();
    assert_eq!(read(&h, CS, 4).await, vec![4u8; 4]);
    drop(h);
    let r = e.fsck().unwrap();
    assert!(r.ok(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_writes_into_the_same_clusters_all_land() {
    let (e, _) = open(64);
    e.create_volume("v", 16 * CS).await.unwrap();
    let h = Arc::new(e.open_export("v").unwrap());
    for round in 0..20u8 {
        let mut tasks = Vec::new();
        // 128 writes of 512 bytes, eight to a cluster, all racing to allocate the same clusters.
        for i in 0..128u64 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                h.write(i * 512, fill(round.wrapping_mul(31).wrapping_add(i as u8), 512), false).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let got = read(&h, 0, 16 * CS as u32).await;
        for i in 0..128usize {
            assert!(
                got[i * 512..(i + 1) * 512].iter().all(|b| *b == round.wrapping_mul(31).wrapping_add(i as u8)),
                "round {round} write {i} lost"
            );
        }
        assert_eq!(e.info(&e.volume("v").unwrap()).usage.allocated, 16 * CS, "each cluster mapped once");
        // Trimmed clusters are reusable after the next durable commit; count them once there.
        e.flush().await.unwrap();
        assert_eq!(e.pool_info().used, 16 * CS, "no cluster allocated twice");
        h.zero(0, 16 * CS as u32, true, false).await.unwrap();
    }
    drop(h);
    assert!(e.fsck().unwrap().ok());
}

/// A read that resolved a cluster of a hidden layer (a deleted snapshot with two clones) and is
/// still reading it while both clones override the cluster, the reclaim frees it, a FLUSH makes
/// the free durable and another volume takes the cluster and writes it, returns what it
/// resolved, never the other volume's bytes (invariant 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_in_flight_never_sees_its_cluster_reused() {
    let (e, pool) = open(64);
    e.create_volume("base", 8 * CS).await.unwrap();
    e.open_export("base").unwrap().write(0, fill(0xAA, 8 * CS), false).await.unwrap();
    e.create_snapshot("base", "s").await.unwrap();
    e.clone_volume("base@s", "c1").await.unwrap();
    e.clone_volume("base@s", "c2").await.unwrap();
    e.delete_snapshot("base@s").await.unwrap();
    e.delete_volume("base").await.unwrap();
    e.flush().await.unwrap();

    pool.delay_reads(Some(std::time::Duration::from_millis(400)));
    let c1 = Arc::new(e.open_export("c1").unwrap());
    let reader = tokio::spawn({
        let c1 = c1.clone();
        async move { c1.read_bytes(0, CS as u32).await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Both clones override cluster 0: the hidden layer's cluster is freed, and made reusable.
    c1.write(0, fill(0xC1, CS), false).await.unwrap();
    e.open_export("c2").unwrap().write(0, fill(0xC2, CS), false).await.unwrap();
    e.flush().await.unwrap();
    // Another volume takes every free cluster and writes it.
    e.create_volume("other", 64 * CS).await.unwrap();
    let other = e.open_export("other").unwrap();
    for i in 0..64 {
        if other.write(i * CS, fill(0xEE, CS), false).await.is_err() {
            break;
        }
    }
    let got = reader.await.unwrap();
    pool.delay_reads(None);
    assert!(
        got.iter().all(|b| *b == 0xAA) || got.iter().all(|b| *b == 0xC1),
        "a read returned another volume's bytes (first byte {:#x})",
        got[0]
    );
}

/// A volume deleted while sessions try to open it: whenever the delete succeeds, no open
/// succeeded (the open either failed or made the delete refuse).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_and_open_never_both_win() {
    let (e, _) = open(64);
    for i in 0..300 {
        let name = format!("v{i}");
        e.create_volume(&name, CS).await.unwrap();
        let opener = std::thread::spawn({
            let e = e.clone();
            let name = name.clone();
            move || e.open_export(&name).ok()
        });
        let deleted = e.delete_volume(&name).await.is_ok();
        let handle = opener.join().unwrap();
        assert!(!(deleted && handle.is_some()), "iteration {i}: deleted a volume with an open session");
    }
}
