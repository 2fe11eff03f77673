//! Crash torture: random writes, trims, flushes, snapshots, clones, deletes and resizes against
//! an in-memory model, on fault-injecting disks for both the pool and the redb file; then a
//! power cut that loses, keeps or tears every unsynced write, a reopen, fsck, and a check that
//!  - every write acknowledged as durable (FLUSH, FUA, or any admin operation, which commit
//!    durably) reads back exactly (invariant 1),
//!  - every sector reads as something written to it, never another volume's or a previous
//!    owner's bytes (invariant 2),
//!  - the metadata reopens and fsck agrees (invariant 5), on a pool small enough to fill up
//!    (invariant 4).
//!
//! Every third seed runs on a pool of format 2, whose 255-block journal region fills, checkpoints
//! and wraps within an iteration; the others on the current format's larger region.
//!
//! `THINBD_TORTURE_SEED` picks the first seed, `THINBD_TORTURE_ITERATIONS` the count (long mode:
//! e.g. 20000). A failure prints the seed that reproduces it.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use thinbd::engine::{Engine, EngineConfig};
use thinbd::error::EngineError;
use thinbd::meta::store::{PoolConfig, create_with_format};
use thinbd::space::fault_disk::{FaultDisk, XorShift};

const CS: u64 = 4096;
const SECTOR: u64 = 512;
const CAPACITY: u64 = 160 * CS;

#[derive(Clone, Debug)]
struct Sector {
    durable: u64,
    /// Values written since the last durable point, oldest first; the last is current.
    pending: Vec<u64>,
}

impl Sector {
    fn current(&self) -> u64 {
        *self.pending.last().unwrap_or(&self.durable)
    }
    fn set(&mut self, tag: u64) {
        self.pending.push(tag);
    }
    fn make_durable(&mut self) {
        self.durable = self.current();
        self.pending.clear();
    }
}

#[derive(Default)]
struct Model {
    volumes: BTreeMap<String, Vec<Sector>>,
    snapshots: BTreeMap<String, Vec<u64>>,
    next_tag: u64,
    names: u64,
}

impl Model {
    fn flush_all(&mut self) {
        for v in self.volumes.values_mut() {
            v.iter_mut().for_each(Sector::make_durable);
        }
    }
}

fn sector_bytes(tag: u64) -> Vec<u8> {
    tag.to_le_bytes().repeat((SECTOR / 8) as usize)
}

/// The tag a sector holds, or None if it is not uniformly one tag (garbage or torn inside).
fn tag_of(b: &[u8]) -> Option<u64> {
    let t = u64::from_le_bytes(b[..8].try_into().ok()?);
    b.chunks(8).all(|c| c == &t.to_le_bytes()[..]).then_some(t)
}

async fn read_tags(e: &Arc<Engine>, name: &str, sectors: usize) -> Vec<Option<u64>> {
    let h = e.open_export(name).expect("open for read");
    let bytes = h.read_bytes(0, (sectors as u64 * SECTOR) as u32).await.expect("read");
    bytes.chunks(SECTOR as usize).map(tag_of).collect()
}

fn config() -> EngineConfig {
    EngineConfig {
        data_dir: "/nonexistent".into(),
        capacity: Some(CAPACITY),
        cluster_size: Some(CS),
        io_engine: Default::default(),
        buffered_io: false,
        force: false,
    }
}

fn open(meta: &FaultDisk, pool: &FaultDisk, seed: u64) -> Arc<Engine> {
    // As the O_DIRECT pool file on a disk of 4 KiB sectors, where the 512-byte writes of the
    // model become read-modify-writes, or of 512-byte sectors, where they go down as they are.
    pool.require_alignment(if seed.is_multiple_of(2) { 4096 } else { 512 });
    let db = redb::Builder::new().create_with_backend(meta.redb_backend()).expect("redb reopens after any crash");
    Engine::open_on(&config(), db, Arc::new(pool.clone())).expect("engine reopens after any crash")
}

fn pick<'a>(rng: &mut XorShift, names: impl Iterator<Item = &'a String>) -> Option<String> {
    let v: Vec<&String> = names.collect();
    (!v.is_empty()).then(|| v[rng.below(v.len() as u64) as usize].clone())
}

/// After a failed write the range holds old or new data per sector; read it and adopt it.
async fn adopt(e: &Arc<Engine>, m: &mut Model, name: &str, first: usize, n: usize, tag: u64, seed: u64) {
    let len = m.volumes[name].len();
    let got = read_tags(e, name, len).await;
    let vol = m.volumes.get_mut(name).expect("volume");
    for (s, sector) in vol.iter_mut().enumerate().skip(first).take(n) {
        let actual = got[s].unwrap_or_else(|| panic!("seed {seed}: {name} sector {s} is garbage after a failed write"));
        assert!(
            actual == sector.current() || actual == tag,
            "seed {seed}: {name} sector {s} holds {actual} after a failed write of {tag} over {}",
            sector.current()
        );
        if actual != sector.current() {
            sector.set(actual);
        }
    }
}

fn trace(what: std::fmt::Arguments<'_>) {
    if std::env::var_os("THINBD_TORTURE_TRACE").is_some() {
        eprintln!("{what}");
    }
}

async fn step(e: &Arc<Engine>, m: &mut Model, rng: &mut XorShift, seed: u64) {
    let r = rng.below(100);
    let volume = pick(rng, m.volumes.keys());
    trace(format_args!("step {r} on {volume:?}"));
    match (r, volume) {
        (0..=44, Some(name)) => {
            let len = m.volumes[&name].len() as u64;
            let first = rng.below(len);
            let n = 1 + rng.below(16.min(len - first));
            m.next_tag += 1;
            let tag = m.next_tag;
            let fua = rng.below(10) == 0;
            let data: Vec<u8> = (0..n).flat_map(|_| sector_bytes(tag)).collect();
            let h = e.open_export(&name).expect("open");
            trace(format_args!("write {name} sectors {first}+{n} tag {tag} fua {fua}"));
            match h.write(first * SECTOR, Bytes::from(data), fua).await {
                Ok(()) => {
                    let vol = m.volumes.get_mut(&name).expect("volume");
                    for s in &mut vol[first as usize..(first + n) as usize] {
                        s.set(tag);
                        if fua {
                            s.make_durable();
                        }
                    }
                }
                Err(EngineError::NoSpace) => {
                    drop(h);
                    adopt(e, m, &name, first as usize, n as usize, tag, seed).await;
                }
                Err(err) => panic!("seed {seed}: write failed: {err}"),
            }
        }
        (45..=54, Some(name)) => {
            let len = m.volumes[&name].len() as u64;
            let first = rng.below(len);
            let n = 1 + rng.below(64.min(len - first));
            let unmap = rng.below(5) != 0;
            let h = e.open_export(&name).expect("open");
            trace(format_args!("zero {name} sectors {first}+{n} unmap {unmap}"));
            match h.zero(first * SECTOR, (n * SECTOR) as u32, unmap, false).await {
                Ok(()) => {
                    let vol = m.volumes.get_mut(&name).expect("volume");
                    vol[first as usize..(first + n) as usize].iter_mut().for_each(|s| s.set(0));
                }
                Err(EngineError::NoSpace) => {
                    drop(h);
                    adopt(e, m, &name, first as usize, n as usize, 0, seed).await;
                }
                Err(err) => panic!("seed {seed}: zero failed: {err}"),
            }
        }
        (55..=64, _) => {
            e.flush().await.expect("flush");
            m.flush_all();
        }
        (65..=72, _) => {
            // Read back a volume or snapshot and compare with the model.
            let all: Vec<String> = m.volumes.keys().chain(m.snapshots.keys()).cloned().collect();
            if let Some(name) = pick(rng, all.iter()) {
                let expect: Vec<u64> = match m.volumes.get(&name) {
                    Some(v) => v.iter().map(Sector::current).collect(),
                    None => m.snapshots[&name].clone(),
                };
                let got = read_tags(e, &name, expect.len()).await;
                for (s, (g, x)) in got.iter().zip(&expect).enumerate() {
                    assert_eq!(*g, Some(*x), "seed {seed}: {name} sector {s} reads wrong before any crash");
                }
            }
        }
        (73..=78, Some(name)) if m.snapshots.len() < 6 => {
            m.names += 1;
            let snap = format!("s{}", m.names);
            trace(format_args!("snapshot {name}@{snap}"));
            e.create_snapshot(&name, &snap).await.expect("snapshot");
            m.flush_all();
            let tags = m.volumes[&name].iter().map(Sector::current).collect();
            m.snapshots.insert(format!("{name}@{snap}"), tags);
        }
        (79..=82, _) if m.volumes.len() < 5 => {
            let all: Vec<String> = m.volumes.keys().chain(m.snapshots.keys()).cloned().collect();
            if let Some(src) = pick(rng, all.iter()) {
                m.names += 1;
                let name = format!("c{}", m.names);
                trace(format_args!("clone {src} -> {name}"));
                e.clone_volume(&src, &name).await.expect("clone");
                m.flush_all();
                let tags: Vec<u64> = match m.volumes.get(&src) {
                    Some(v) => v.iter().map(Sector::current).collect(),
                    None => m.snapshots[&src].clone(),
                };
                m.volumes.insert(name, tags.into_iter().map(|t| Sector { durable: t, pending: vec![] }).collect());
            }
        }
        (83..=87, _) => {
            let all: Vec<String> = m.volumes.keys().chain(m.snapshots.keys()).cloned().collect();
            if let Some(victim) = pick(rng, all.iter()) {
                trace(format_args!("delete {victim}"));
                if victim.contains('@') {
                    e.delete_snapshot(&victim).await.expect("delete snapshot");
                    m.snapshots.remove(&victim);
                } else {
                    e.delete_volume(&victim).await.expect("delete volume");
                    m.volumes.remove(&victim);
                }
                m.flush_all();
            }
        }
        (88..=93, _) if m.volumes.len() < 5 => {
            m.names += 1;
            let name = format!("v{}", m.names);
            let sectors = (1 + rng.below(4)) * 128;
            trace(format_args!("create {name}"));
            e.create_volume(&name, sectors * SECTOR).await.expect("create");
            m.flush_all();
            m.volumes.insert(name, vec![Sector { durable: 0, pending: vec![] }; sectors as usize]);
        }
        (94..=99, Some(name)) => {
            let len = m.volumes[&name].len();
            let grow = rng.below(64) as usize;
            trace(format_args!("resize {name} +{grow}"));
            e.resize_volume(&name, ((len + grow) as u64) * SECTOR).await.expect("resize");
            if grow > 0 {
                // A resize that changes the size commits durably (a global flush); one that does
                // not changes nothing.
                m.flush_all();
            }
            m.volumes.get_mut(&name).expect("volume").resize(len + grow, Sector { durable: 0, pending: vec![] });
        }
        _ => {}
    }
}

/// Power cut, reopen, fsck, and compare every volume and snapshot with what may have survived.
async fn crash_and_check(
    e: Arc<Engine>,
    meta: &mut FaultDisk,
    pool: &mut FaultDisk,
    m: &mut Model,
    rng: &mut XorShift,
    seed: u64,
) -> Arc<Engine> {
    if rng.below(2) == 0 {
        // The power fails inside a FLUSH: after 0, 1 or 2 of its syncs (between a reused
        // cluster's data and the journal record that maps it, or before the record is durable).
        let n = rng.below(3) as usize;
        trace(format_args!("crash inside a flush after {n} syncs"));
        pool.fail_syncs_after(Some(n));
        meta.fail_syncs_after(Some(n));
        if e.flush().await.is_ok() {
            m.flush_all();
        }
    }
    // Take the disks as a power cut leaves them before the engine is dropped: dropping redb's
    // Database is a clean shutdown that would persist its unflushed commits.
    trace(format_args!(
        "crash: {} unsynced metadata writes, {} unsynced pool writes",
        meta.unsynced_writes(),
        pool.unsynced_writes()
    ));
    *meta = meta.crash(rng);
    *pool = pool.crash(rng);
    drop(e);
    let mut e = open(meta, pool, seed);
    if rng.below(4) == 0 {
        // And again right after the restart: the journal is replayed a second time.
        trace(format_args!("crash again after the restart"));
        *meta = meta.crash(rng);
        *pool = pool.crash(rng);
        drop(e);
        e = open(meta, pool, seed);
    }
    let report = e.fsck().expect("fsck");
    assert!(report.ok(), "seed {seed}: fsck after crash:\n{report}");
    let vols: Vec<String> = e.list().iter().map(|v| v.name.clone()).collect();
    assert_eq!(vols, m.volumes.keys().cloned().collect::<Vec<_>>(), "seed {seed}: volumes after crash");
    let snaps: Vec<String> = e.list_snapshots(None).iter().map(|s| s.key()).collect();
    assert_eq!(snaps, m.snapshots.keys().cloned().collect::<Vec<_>>(), "seed {seed}: snapshots after crash");
    for (name, sectors) in m.volumes.iter_mut() {
        let got = read_tags(&e, name, sectors.len()).await;
        for (i, (g, s)) in got.iter().zip(sectors.iter_mut()).enumerate() {
            let g = g.unwrap_or_else(|| panic!("seed {seed}: {name} sector {i} is garbage after crash"));
            assert!(
                g == s.durable || s.pending.contains(&g),
                "seed {seed}: {name} sector {i} reads {g}; durable {} pending {:?}",
                s.durable,
                s.pending
            );
            *s = Sector { durable: g, pending: vec![] };
        }
    }
    for (name, tags) in &m.snapshots {
        let got = read_tags(&e, name, tags.len()).await;
        for (i, (g, x)) in got.iter().zip(tags).enumerate() {
            assert_eq!(*g, Some(*x), "seed {seed}: snapshot {name} sector {i} after crash");
        }
    }
    e
}

async fn iteration(seed: u64) {
    let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (mut meta, mut pool) = (FaultDisk::new(), FaultDisk::new());
    if seed.is_multiple_of(3) {
        let db = redb::Builder::new().create_with_backend(meta.redb_backend()).expect("redb");
        let cfg = PoolConfig { cluster_size: CS, capacity_clusters: CAPACITY / CS };
        create_with_format(&db, cfg, 2).expect("a format 2 store");
    }
    let mut e = open(&meta, &pool, seed);
    let mut m = Model::default();
    for _ in 0..3 {
        for _ in 0..rng.below(60) + 10 {
            step(&e, &mut m, &mut rng, seed).await;
        }
        e = crash_and_check(e, &mut meta, &mut pool, &mut m, &mut rng, seed).await;
    }
}

#[test]
fn crash_torture() {
    let first: u64 = std::env::var("THINBD_TORTURE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let n: u64 = std::env::var("THINBD_TORTURE_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let started = std::time::Instant::now();
    for seed in first..first + n {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(iteration(seed))));
        if r.is_err() {
            panic!("crash torture failed; reproduce with THINBD_TORTURE_SEED={seed} THINBD_TORTURE_ITERATIONS=1");
        }
    }
    eprintln!("crash torture: {n} iterations from seed {first} in {:.1?}", started.elapsed());
}
