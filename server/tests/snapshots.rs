//! Snapshots and clones through the engine on a real redb file and pool file: isolation,
//! redirect-on-write, trims over inherited data, deletes in any order with exact space
//! accounting, and fsck after every step.

use std::sync::Arc;

use bytes::Bytes;
use thinbd::engine::{Engine, EngineConfig, LocalVolume};
use thinbd::error::EngineError;

const CS: u64 = 64 * 1024;

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    Engine::open(&EngineConfig {
        data_dir: dir.to_path_buf(),
        capacity: Some(256 << 20),
        cluster_size: None,
        io_engine: Default::default(),
        buffered_io: false,
        force: false,
    })
    .expect("open engine")
}

async fn read(h: &LocalVolume, off: u64, len: u32) -> Vec<u8> {
    h.read_bytes(off, len).await.expect("read")
}

async fn write(h: &LocalVolume, off: u64, byte: u8, len: usize) {
    h.write(off, Bytes::from(vec![byte; len]), false).await.expect("write");
}

fn assert_fsck(e: &Engine) {
    let r = e.fsck().expect("fsck runs");
    assert!(r.ok(), "fsck: {r}");
}

fn used(e: &Engine) -> u64 {
    e.pool_info().used / CS
}

#[tokio::test]
async fn snapshot_isolation_and_redirect_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume("v", 16 << 20).await.unwrap();
    {
        let h = e.open_export("v").unwrap();
        write(&h, 0, 0xA1, 4 * CS as usize).await;
    }
    e.create_snapshot("v", "s1").await.unwrap();
    assert_eq!(used(&e), 4, "a snapshot copies nothing");
    let h = e.open_export("v").unwrap();
    // A 4 KiB write into a shared cluster: new cluster, rest filled from the snapshot.
    write(&h, CS + 4096, 0xB2, 4096).await;
    assert_eq!(used(&e), 5);
    let mut expect = vec![0xA1u8; 4 * CS as usize];
    expect[(CS + 4096) as usize..(CS + 8192) as usize].fill(0xB2);
    assert_eq!(read(&h, 0, 4 * CS as u32).await, expect);
    let snap = e.open_export("v@s1").unwrap();
    assert!(snap.read_only());
    assert_eq!(read(&snap, 0, 4 * CS as u32).await, vec![0xA1u8; 4 * CS as usize], "snapshot unchanged");
    assert!(matches!(snap.write(0, Bytes::from_static(b"x"), false).await, Err(EngineError::ReadOnly(_))));
    // Trim over inherited data reads as zeros in the volume, not in the snapshot.
    h.zero(2 * CS, CS as u32, true, false).await.unwrap();
    assert_eq!(read(&h, 2 * CS, CS as u32).await, vec![0u8; CS as usize]);
    assert_eq!(read(&snap, 2 * CS, CS as u32).await, vec![0xA1u8; CS as usize]);
    let bs = h.block_status(0, 4 * CS as u32).await.unwrap();
    assert_eq!(bs.iter().map(|x| (x.length as u64 / CS, x.flags)).collect::<Vec<_>>(), vec![(2, 0), (1, 3), (1, 0)]);
    // Accounting: v reads 3 data clusters, 1 of them its own.
    let info = e.info(&e.volume("v").unwrap());
    assert_eq!((info.usage.allocated / CS, info.usage.exclusive / CS, info.usage.shared / CS), (3, 1, 2));
    drop((h, snap));
    assert_fsck(&e);
    // Everything survives a reopen.
    drop(e);
    let e = engine(dir.path());
    assert_fsck(&e);
    let h = e.open_export("v").unwrap();
    assert_eq!(read(&h, 2 * CS, 4096).await, vec![0u8; 4096]);
    assert_eq!(read(&h, CS + 4096, 4096).await, vec![0xB2u8; 4096]);
    let snap = e.open_export("v@s1").unwrap();
    assert_eq!(read(&snap, 0, 4 * CS as u32).await, vec![0xA1u8; 4 * CS as usize]);
}

#[tokio::test]
async fn clones_are_writable_and_isolated_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume("src", 8 << 20).await.unwrap();
    write(&e.open_export("src").unwrap(), 0, 1, 2 * CS as usize).await;
    e.create_snapshot("src", "gold").await.unwrap();
    let c1 = e.clone_volume("src@gold", "c1").await.unwrap();
    assert_eq!(c1.size(), 8 << 20);
    // Clone straight from a volume's current state.
    write(&e.open_export("src").unwrap(), 0, 2, CS as usize).await;
    e.clone_volume("src", "c2").await.unwrap();
    let (src, c1, c2, gold) = (
        e.open_export("src").unwrap(),
        e.open_export("c1").unwrap(),
        e.open_export("c2").unwrap(),
        e.open_export("src@gold").unwrap(),
    );
    write(&c1, 0, 3, 100).await;
    write(&c2, CS, 4, 100).await;
    write(&src, CS, 5, 100).await;
    assert_eq!(read(&gold, 0, 1).await, [1]);
    assert_eq!(read(&c1, 0, 1).await, [3]);
    assert_eq!(read(&c1, CS, 1).await, [1]);
    assert_eq!(read(&c2, 0, 1).await, [2]);
    assert_eq!(read(&c2, CS, 1).await, [4]);
    assert_eq!(read(&src, 0, 1).await, [2]);
    assert_eq!(read(&src, CS, 1).await, [5]);
    drop((src, c1, c2, gold));
    assert_fsck(&e);
    assert!(matches!(e.clone_volume("src@nope", "x").await, Err(EngineError::NotFound(_))));
    assert!(matches!(e.clone_volume("src", "c1").await, Err(EngineError::AlreadyExists(_))));
    assert!(matches!(e.create_snapshot("src", "gold").await, Err(EngineError::AlreadyExists(_))));
}

/// Builds: base (4 clusters) → snapshot s1 → overwrite 1 → s2 → clone k from s2 → overwrite in
/// both; then deletes in the given order, checking fsck and that the pool ends empty.
async fn delete_order(order: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume("v", 4 << 20).await.unwrap();
    write(&e.open_export("v").unwrap(), 0, 1, 4 * CS as usize).await;
    e.create_snapshot("v", "s1").await.unwrap();
    write(&e.open_export("v").unwrap(), 0, 2, CS as usize).await;
    e.create_snapshot("v", "s2").await.unwrap();
    e.clone_volume("v@s2", "k").await.unwrap();
    write(&e.open_export("v").unwrap(), CS, 3, CS as usize).await;
    write(&e.open_export("k").unwrap(), 2 * CS, 4, CS as usize).await;
    assert_eq!(used(&e), 7);
    assert_fsck(&e);
    let mut expect_k = vec![1u8; 4 * CS as usize];
    expect_k[..CS as usize].fill(2);
    expect_k[2 * CS as usize..3 * CS as usize].fill(4);
    for name in order {
        if name.contains('@') {
            e.delete_snapshot(name).await.unwrap();
        } else {
            e.delete_volume(name).await.unwrap();
        }
        assert_fsck(&e);
        // Whatever is left still reads right.
        if let Ok(k) = e.open_export("k") {
            assert_eq!(read(&k, 0, 4 * CS as u32).await, expect_k, "after deleting {name}");
        }
        if let Ok(s1) = e.open_export("v@s1") {
            assert_eq!(read(&s1, 0, 4 * CS as u32).await, vec![1u8; 4 * CS as usize], "after deleting {name}");
        }
    }
    assert_eq!(used(&e), 0, "deleting everything in order {order:?} returns every cluster");
    drop(e);
    let e = engine(dir.path());
    assert_fsck(&e);
    assert_eq!(used(&e), 0);
}

#[tokio::test]
async fn deletes_in_any_order_free_exactly_what_nobody_references() {
    delete_order(&["v", "v@s1", "v@s2", "k"]).await;
    delete_order(&["v@s1", "v", "k", "v@s2"]).await;
    delete_order(&["v@s2", "v@s1", "k", "v"]).await;
    delete_order(&["k", "v@s2", "v", "v@s1"]).await;
    delete_order(&["v@s1", "v@s2", "v", "k"]).await;
}

#[tokio::test]
async fn deleting_a_middle_snapshot_frees_overridden_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume("v", 4 << 20).await.unwrap();
    write(&e.open_export("v").unwrap(), 0, 1, 2 * CS as usize).await;
    e.create_snapshot("v", "a").await.unwrap();
    write(&e.open_export("v").unwrap(), 0, 2, CS as usize).await;
    e.create_snapshot("v", "b").await.unwrap();
    write(&e.open_export("v").unwrap(), 0, 3, CS as usize).await;
    assert_eq!(used(&e), 4);
    // Deleting b: its cluster 0 is overridden by v, so it is freed at once.
    e.delete_snapshot("v@b").await.unwrap();
    assert_eq!(used(&e), 3);
    assert_fsck(&e);
    let v = e.open_export("v").unwrap();
    assert_eq!(read(&v, 0, 1).await, [3]);
    assert_eq!(read(&v, CS, 1).await, [1]);
    // Deleting a: its cluster 0 is overridden too; cluster 1 moves into v.
    drop(v);
    e.delete_snapshot("v@a").await.unwrap();
    assert_eq!(used(&e), 2);
    let info = e.info(&e.volume("v").unwrap());
    assert_eq!((info.usage.allocated, info.usage.exclusive, info.usage.shared), (2 * CS, 2 * CS, 0));
    assert_fsck(&e);
}

#[tokio::test]
async fn snapshot_with_open_session_and_volume_name_reuse_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume("v", 1 << 20).await.unwrap();
    e.create_snapshot("v", "s").await.unwrap();
    let h = e.open_export("v@s").unwrap();
    assert!(matches!(e.delete_snapshot("v@s").await, Err(EngineError::InUse { sessions: 1, .. })));
    drop(h);
    e.delete_volume("v").await.unwrap();
    // v@s outlives v; a new v would make `v@s` ambiguous.
    assert!(matches!(e.create_volume("v", 1 << 20).await, Err(EngineError::AlreadyExists(_))));
    let c = e.clone_volume("v@s", "restored").await.unwrap();
    assert_eq!(c.size(), 1 << 20);
    e.delete_snapshot("v@s").await.unwrap();
    e.create_volume("v", 1 << 20).await.unwrap();
    assert_fsck(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_during_writes_are_consistent_points_in_time() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume("v", 8 << 20).await.unwrap();
    const WRITERS: usize = 4;
    // Writer i writes version n (as 8 bytes) over its own cluster, n = 1, 2, ...
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        let (e, started, acked, stop) = (e.clone(), started.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let h = e.open_export("v").unwrap();
            let mut n = 0u64;
            while !stop.load(SeqCst) {
                n += 1;
                started[i].store(n, SeqCst);
                let mut buf = vec![0u8; 4096];
                buf[..8].copy_from_slice(&n.to_le_bytes());
                h.write(i as u64 * CS + (n % 8) * 4096, Bytes::from(buf), false).await.unwrap();
                h.write(i as u64 * CS + 60_000, Bytes::copy_from_slice(&n.to_le_bytes()), false).await.unwrap();
                acked[i].store(n, SeqCst);
            }
        }));
    }
    let mut bounds = Vec::new();
    for s in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(15)).await;
        let lo: Vec<u64> = acked.iter().map(|a| a.load(SeqCst)).collect();
        e.create_snapshot("v", &format!("s{s}")).await.unwrap();
        let hi: Vec<u64> = started.iter().map(|a| a.load(SeqCst)).collect();
        bounds.push((lo, hi));
    }
    stop.store(true, SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    for (s, (lo, hi)) in bounds.iter().enumerate() {
        let snap = e.open_export(&format!("v@s{s}")).unwrap();
        for i in 0..WRITERS {
            let tail = read(&snap, i as u64 * CS + 60_000, 8).await;
            let v = u64::from_le_bytes(tail.try_into().unwrap());
            assert!(lo[i] <= v && v <= hi[i], "snapshot s{s} writer {i}: version {v} outside [{}, {}]", lo[i], hi[i]);
        }
    }
    assert_fsck(&e);
}

/// Volume `v` (3 clusters of 1s) snapshotted as `v@s` and deleted; clones `a` and `b` of it.
async fn two_clones_of_a_deleted_volume(dir: &std::path::Path) -> Arc<Engine> {
    let e = engine(dir);
    e.create_volume("v", 4 << 20).await.unwrap();
    write(&e.open_export("v").unwrap(), 0, 1, 3 * CS as usize).await;
    e.create_snapshot("v", "s").await.unwrap();
    e.delete_volume("v").await.unwrap();
    e.clone_volume("v@s", "a").await.unwrap();
    e.clone_volume("v@s", "b").await.unwrap();
    e
}

#[tokio::test]
async fn deleting_a_snapshot_with_two_clones_frees_what_both_override() {
    let dir = tempfile::tempdir().unwrap();
    let e = two_clones_of_a_deleted_volume(dir.path()).await;
    write(&e.open_export("a").unwrap(), 0, 2, 2 * CS as usize).await;
    write(&e.open_export("b").unwrap(), 0, 3, CS as usize).await;
    assert_eq!(used(&e), 6);
    e.delete_snapshot("v@s").await.unwrap();
    // Cluster 0 of the snapshot is overridden by both clones: freed. 1 and 2 are still read.
    assert_eq!(used(&e), 5);
    assert_eq!(read(&e.open_export("b").unwrap(), CS, 1).await, [1]);
    assert_eq!(read(&e.open_export("a").unwrap(), 2 * CS, 1).await, [1]);
    assert_fsck(&e);
    e.delete_volume("a").await.unwrap();
    assert_fsck(&e);
    assert_eq!(
        read(&e.open_export("b").unwrap(), 0, 3 * CS as u32).await,
        [vec![3u8; CS as usize], vec![1u8; 2 * CS as usize]].concat()
    );
    e.delete_volume("b").await.unwrap();
    assert_eq!(used(&e), 0);
    assert_fsck(&e);
}

/// After a snapshot with two clones is deleted, a cluster of it that both clones override later
/// (by writing or trimming) is freed then, not only at the next delete; also after a restart.
#[tokio::test]
async fn clusters_every_clone_overrides_later_are_freed_as_it_happens() {
    let dir = tempfile::tempdir().unwrap();
    let e = two_clones_of_a_deleted_volume(dir.path()).await;
    e.delete_snapshot("v@s").await.unwrap();
    assert_eq!(used(&e), 3);
    write(&e.open_export("a").unwrap(), CS, 2, 100).await;
    e.flush().await.unwrap();
    assert_eq!(used(&e), 4, "b still reads cluster 1 of the deleted snapshot");
    write(&e.open_export("b").unwrap(), CS + 5, 3, 100).await;
    e.flush().await.unwrap();
    assert_eq!(used(&e), 4, "both clones override cluster 1: the old copy is freed");
    assert_fsck(&e);
    e.open_export("a").unwrap().zero(2 * CS, CS as u32, true, false).await.unwrap();
    e.flush().await.unwrap();
    assert_eq!(used(&e), 4);
    // Which layers are hidden is worked out again on open.
    drop(e);
    let e = engine(dir.path());
    e.open_export("b").unwrap().zero(2 * CS, CS as u32, true, false).await.unwrap();
    e.flush().await.unwrap();
    assert_eq!(used(&e), 3, "both clones trimmed cluster 2: freed");
    assert_fsck(&e);
    let a = read(&e.open_export("a").unwrap(), 0, 3 * CS as u32).await;
    let b = read(&e.open_export("b").unwrap(), 0, 3 * CS as u32).await;
    assert!(a[..CS as usize].iter().all(|x| *x == 1) && b[..CS as usize].iter().all(|x| *x == 1));
    assert!(a[CS as usize..CS as usize + 100].iter().all(|x| *x == 2));
    assert!(a[CS as usize + 100..2 * CS as usize].iter().all(|x| *x == 1), "redirect-on-write kept the rest");
    assert!(b[CS as usize..CS as usize + 5].iter().all(|x| *x == 1));
    assert!(b[CS as usize + 5..CS as usize + 105].iter().all(|x| *x == 3));
    assert!(a[2 * CS as usize..].iter().all(|x| *x == 0) && b[2 * CS as usize..].iter().all(|x| *x == 0));
}

/// A clone of a live volume freezes its top into a layer only the two of them read.
#[tokio::test]
async fn a_live_clone_and_its_source_free_what_both_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume("v", 4 << 20).await.unwrap();
    write(&e.open_export("v").unwrap(), 0, 1, 2 * CS as usize).await;
    e.clone_volume("v", "c").await.unwrap();
    write(&e.open_export("v").unwrap(), 0, 2, CS as usize).await;
    write(&e.open_export("c").unwrap(), 0, 3, CS as usize).await;
    e.flush().await.unwrap();
    assert_eq!(used(&e), 3);
    assert_fsck(&e);
    assert_eq!(read(&e.open_export("v").unwrap(), 0, 1).await, [2]);
    assert_eq!(read(&e.open_export("c").unwrap(), 0, 1).await, [3]);
    assert_eq!(read(&e.open_export("c").unwrap(), CS, 1).await, [1]);
}

/// Replication's marks: hidden snapshots that tell what changed since (a trim too), are not
/// listed, survive a restart (redb), and go with their volume, freeing their clusters.
#[tokio::test]
async fn marks_are_hidden_tell_changes_and_go_with_their_volume() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = engine(dir.path());
        e.create_volume("v", 4 << 20).await.unwrap();
        let h = e.open_export("v").unwrap();
        write(&h, 0, 0x11, 2 * CS as usize).await;
        drop(h);
        e.create_mark("v", "departed-n3").await.unwrap();
        assert!(e.list_snapshots(None).is_empty(), "a mark is listed");
        assert!(matches!(e.create_mark("v", ".bad").await, Err(EngineError::Invalid(_))));
        let h = e.open_export("v").unwrap();
        write(&h, 2 * CS, 0x22, CS as usize).await;
        h.zero(0, CS as u32, true, false).await.unwrap();
        let changed = h.changed_since(".departed-n3", 0, 4 * CS as u32).unwrap();
        let flags: Vec<(u32, u32)> = changed.iter().map(|x| (x.length, x.flags)).collect();
        // Cluster 0 trimmed, 1 untouched, 2 written, 3 never written.
        assert_eq!(flags, vec![(CS as u32, 1), (CS as u32, 0), (CS as u32, 1), (CS as u32, 0)]);
        h.flush().await.unwrap();
    }
    let e = engine(dir.path());
    assert!(e.snapshot("v@.departed-n3").is_ok(), "the mark did not survive a restart");
    e.delete_volume("v").await.unwrap();
    assert!(e.snapshot("v@.departed-n3").is_err(), "the mark outlived its volume");
    assert_eq!(used(&e), 0);
    assert_fsck(&e);
}
