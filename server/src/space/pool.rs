//! The pool: a file (or block device) cut into fixed-size clusters. The extent maps decide which
//! cluster holds what; the pool only moves bytes, through one [`BlockStore`] backend (file on
//! threads, io_uring, or a fault-injecting disk in tests) that it never needs to tell apart.
//!
//! The pool file is opened with O_DIRECT: pool data is not cached twice (the client has its own
//! cache) and io_uring writes go straight to the device instead of queueing behind the inode's
//! buffered-write worker. Direct I/O needs aligned offsets, lengths and buffers; NBD clients may
//! send any alignment, so the pool turns an unaligned write into a read-modify-write of the
//! aligned blocks around it. Those are locked against other writes in the same region, so two
//! concurrent writes to different bytes of one block both land.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use thinbd_protocol::aligned::{AlignedBuf, is_aligned};
use tokio::sync::RwLock;

use crate::error::EngineError;
use crate::meta::store::Loaded;
use crate::space::backend::FileStore;
use crate::space::backend::{BlockStore, IoEngine};
use crate::space::superblock::{BLOCK, Found, Superblock, data_offset};

/// Read-modify-write locks: one per 1 MiB region of the pool, folded onto a few stripes.
const STRIPES: usize = 64;
const REGION_SHIFT: u32 = 20;

/// What the metadata says about the pool file; checked when the file is opened.
pub struct Geometry {
    pub cluster_size: u64,
    pub capacity_clusters: u64,
    /// Clusters below this are or were mapped: the file must reach that far.
    pub high_water: u64,
    /// The superblock the file must hold; `None` for format 1 pools, which have none.
    pub superblock: Option<Superblock>,
}

impl Geometry {
    /// What the pool file must look like for this metadata.
    pub fn of(loaded: &Loaded) -> Geometry {
        let superblock = match (loaded.format, loaded.pool_uuid) {
            (format @ 2.., Some(pool_uuid)) => {
                Some(Superblock { format: format as u32, cluster_size: loaded.config.cluster_size, pool_uuid })
            }
            _ => None,
        };
        Geometry {
            cluster_size: loaded.config.cluster_size,
            capacity_clusters: loaded.config.capacity_clusters,
            high_water: loaded.high_water,
            superblock,
        }
    }

    /// Where cluster 0 starts in the file.
    pub fn base(&self) -> u64 {
        self.superblock.map_or(0, |sb| data_offset(sb.format))
    }

    fn check_length(&self, path: &Path, len: u64) -> Result<(), EngineError> {
        let mapped = self.base() + self.high_water * self.cluster_size;
        if self.high_water > 0 && len < mapped {
            return Err(EngineError::Metadata(format!(
                "the pool file {} is {len} bytes, shorter than the {mapped} bytes its metadata maps: \
                 truncated or replaced; refusing to serve the missing data as zeros",
                path.display()
            )));
        }
        Ok(())
    }

    /// Whether the first block is acceptable; `Ok(true)`: blank, to be written now.
    fn judge(&self, found: Found) -> Result<bool, EngineError> {
        let Some(want) = self.superblock else { return Ok(false) };
        match found {
            Found::Valid(sb) => sb.matches(&want).map(|()| false),
            Found::Blank if self.high_water == 0 => Ok(true),
            Found::Blank => Err(EngineError::Metadata(format!(
                "the pool file has no superblock but its metadata maps {} clusters: the pool file was \
                 replaced or zeroed",
                self.high_water
            ))),
            Found::Invalid(why) => Err(EngineError::Metadata(why)),
        }
    }

    /// Checks a pool file without changing it (`thinbd fsck`).
    pub fn verify_file(&self, path: &Path) -> Result<(), EngineError> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::io("open pool", 0, e))?;
        let len = file.metadata().map_err(|e| EngineError::io("stat pool", 0, e))?.len();
        self.check_length(path, len)?;
        if self.superblock.is_some() {
            let mut block = vec![0u8; BLOCK.min(len as usize)];
            file.read_exact_at(&mut block, 0).map_err(|e| EngineError::io("read superblock", 0, e))?;
            self.judge(Superblock::decode(&block))?;
        }
        Ok(())
    }
}

pub struct Pool {
    store: Arc<dyn BlockStore>,
    /// File offset of cluster 0 (after the superblock).
    base: u64,
    align: u64,
    stripes: Box<[RwLock<()>]>,
    /// How long each `fdatasync` of the pool took (`thinbd_pool_sync_duration_seconds`).
    pub sync_latency: crate::metrics::Histogram,
}

impl Pool {
    /// Opens or creates the pool file and makes it at least as long as the geometry says
    /// (sparse). With `direct` the file is opened O_DIRECT, or buffered with a warning where the
    /// filesystem refuses it.
    pub fn open_file(path: &Path, geo: &Geometry, engine: IoEngine, direct: bool) -> Result<Pool, EngineError> {
        let file = FileStore::open(path, direct)?;
        let len = file.file_len()?;
        geo.check_length(path, len)?;
        let bytes = geo.base() + geo.capacity_clusters * geo.cluster_size;
        if len < bytes {
            file.set_len(bytes)?;
        }
        Pool::on(with_engine(file, engine)?, geo)
    }

    /// A pool on any backend (tests: fault-injecting disks).
    pub fn on(store: Arc<dyn BlockStore>, geo: &Geometry) -> Result<Pool, EngineError> {
        let align = store.alignment().max(1);
        let pool = Pool {
            store,
            base: geo.base(),
            align,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            sync_latency: Default::default(),
        };
        pool.check_superblock(geo)?;
        Ok(pool)
    }

    /// Refuses a file that is not the pool the metadata describes. A blank first block is
    /// written only while nothing was ever allocated (a creation cut short by a crash).
    fn check_superblock(&self, geo: &Geometry) -> Result<(), EngineError> {
        let Some(want) = geo.superblock else { return Ok(()) };
        let mut block = AlignedBuf::zeroed(BLOCK);
        let found = match self.store.read_at(block.as_mut_slice(), 0) {
            Ok(()) => Superblock::decode(block.as_mut_slice()),
            Err(_) if geo.high_water == 0 => Found::Blank,
            Err(e) => return Err(EngineError::io("read superblock", 0, e)),
        };
        if geo.judge(found)? {
            self.write_journal_zeros(geo.base())?;
            block.as_mut_slice().copy_from_slice(&want.encode());
            self.store.write_at(block.as_mut_slice(), 0).map_err(|e| EngineError::io("write superblock", 0, e))?;
            self.sync_blocking()?;
        }
        Ok(())
    }

    /// Writes zeros over a new pool's journal region (which holds nothing yet), so that its
    /// blocks are written extents of the file, not holes or fallocated (unwritten) ones whose
    /// first journal write changes the filesystem's metadata, and the FLUSH after it has to
    /// commit that too.
    fn write_journal_zeros(&self, base: u64) -> Result<(), EngineError> {
        let zeros = AlignedBuf::zeroed((1 << 20).min(base as usize));
        let mut at = BLOCK as u64;
        while at < base {
            let n = (base - at).min(zeros.len() as u64) as usize;
            let chunk = &zeros.as_slice()[..n];
            self.store.write_at(chunk, at).map_err(|e| EngineError::io("write journal region", at, e))?;
            at += n as u64;
        }
        Ok(())
    }

    pub fn engine(&self) -> IoEngine {
        self.store.engine()
    }

    /// Whether pool I/O bypasses the page cache.
    pub fn direct(&self) -> bool {
        self.align > 1
    }

    /// The granularity of pool I/O: offsets and lengths the disk takes as they are; writes
    /// finer than this are read-modify-writes.
    pub fn alignment(&self) -> u64 {
        self.align
    }

    /// The aligned span around `offset..offset+len`.
    fn span(&self, offset: u64, len: usize) -> (u64, u64) {
        let a = self.align;
        (offset / a * a, (offset + len as u64).div_ceil(a) * a)
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, EngineError> {
        let (s, e) = self.span(offset, len);
        let whole = self.raw_read(s, (e - s) as usize).await?;
        let at = (offset - s) as usize;
        Ok(if s == offset && at + len == whole.len() { whole } else { whole.slice(at..at + len) })
    }

    /// Takes the buffer by value so it moves to the I/O thread without a copy when it is
    /// aligned (payloads read from the socket are).
    pub async fn write_at(&self, offset: u64, data: Bytes) -> Result<(), EngineError> {
        if self.align == 1 {
            return self.raw_write(offset, data).await;
        }
        let (s, e) = self.span(offset, data.len());
        if s == offset && e == offset + data.len() as u64 {
            let _shared = self.lock(s, e, false).await;
            let data = if is_aligned(&data) { data } else { copy_aligned(&data) };
            return self.raw_write(offset, data).await;
        }
        let _exclusive = self.lock(s, e, true).await;
        let a = self.align;
        let mut buf = AlignedBuf::zeroed((e - s) as usize);
        // Only the first and last blocks hold bytes the write does not replace.
        if offset != s {
            let head = self.raw_read(s, a as usize).await?;
            buf.as_mut_slice()[..a as usize].copy_from_slice(&head);
        }
        let end = offset + data.len() as u64;
        if end != e && (e - a != s || offset == s) {
            let tail = self.raw_read(e - a, a as usize).await?;
            let n = buf.len();
            buf.as_mut_slice()[n - a as usize..].copy_from_slice(&tail);
        }
        let at = (offset - s) as usize;
        buf.as_mut_slice()[at..at + data.len()].copy_from_slice(&data);
        self.raw_write(s, buf.freeze()).await
    }

    /// Region locks for `s..e`, taken in stripe order so that writers never deadlock.
    async fn lock(&self, s: u64, e: u64, exclusive: bool) -> RegionLocks<'_> {
        let first = s >> REGION_SHIFT;
        let last = (e - 1) >> REGION_SHIFT;
        let take = |i: usize| async move {
            match exclusive {
                true => RegionGuard::Exclusive(self.stripes[i].write().await),
                false => RegionGuard::Shared(self.stripes[i].read().await),
            }
        };
        if first == last {
            // Most writes stay in one region: no list of stripes to build.
            return RegionLocks { _one: Some(take((first % STRIPES as u64) as usize).await), _more: Vec::new() };
        }
        let mut idx: Vec<usize> =
            (first..=last.min(first + STRIPES as u64)).map(|r| (r % STRIPES as u64) as usize).collect();
        idx.sort_unstable();
        idx.dedup();
        let mut locks = RegionLocks { _one: None, _more: Vec::with_capacity(idx.len()) };
        for i in idx {
            locks._more.push(take(i).await);
        }
        locks
    }

    async fn raw_read(&self, offset: u64, len: usize) -> Result<Bytes, EngineError> {
        let offset = offset + self.base;
        self.store.clone().read(offset, len).await.map_err(|e| EngineError::io("read", offset, e))
    }

    async fn raw_write(&self, offset: u64, data: Bytes) -> Result<(), EngineError> {
        let offset = offset + self.base;
        self.store.clone().write(offset, data).await.map_err(|e| EngineError::io("write", offset, e))
    }

    /// The bytes between the superblock and cluster 0 (offset and length in the file), which
    /// hold the journal; `None` for format 1 pools, whose clusters start at 0.
    pub fn journal_region(&self) -> Option<(u64, u64)> {
        (self.base > BLOCK as u64).then_some((BLOCK as u64, self.base - BLOCK as u64))
    }

    /// Allocates the journal region on the device, so a FLUSH on a full filesystem does not
    /// fail writing into a hole of the sparse file.
    pub fn reserve_region(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.store.reserve(offset, len).map_err(|e| EngineError::io("reserve journal", offset, e))
    }

    /// Reads `len` bytes at file offset `offset` (outside the clusters: the journal region).
    pub fn read_region_blocking(&self, offset: u64, len: usize) -> Result<AlignedBuf, EngineError> {
        let mut buf = AlignedBuf::zeroed(len);
        self.store.read_at(buf.as_mut_slice(), offset).map_err(|e| EngineError::io("read journal", offset, e))?;
        Ok(buf)
    }

    /// Writes aligned `data` at file offset `offset` (outside the clusters: the journal region).
    pub async fn write_region(&self, offset: u64, data: Bytes) -> Result<(), EngineError> {
        self.store.clone().write(offset, data).await.map_err(|e| EngineError::io("write journal", offset, e))
    }

    /// Makes every cluster from byte `from` (relative to cluster 0) to `to` read as zeros, if
    /// the backend can punch holes; durable after the next sync. `Ok(false)`: it cannot.
    pub fn zero_clusters(&self, from: u64, to: u64) -> Result<bool, EngineError> {
        let offset = self.base + from;
        self.store.punch(offset, to.saturating_sub(from)).map_err(|e| EngineError::io("punch hole", offset, e))
    }

    /// See [`BlockStore::sync_here`].
    pub fn sync_here(&self) -> bool {
        self.store.sync_here()
    }

    pub fn sync_blocking(&self) -> Result<(), EngineError> {
        self.sync_latency.time(|| self.store.sync()).map_err(|e| EngineError::io("fdatasync", 0, e))
    }
}

/// The pool file driven by `engine`: io_uring where the kernel allows it, else threads.
fn with_engine(file: FileStore, engine: IoEngine) -> Result<Arc<dyn BlockStore>, EngineError> {
    if engine == IoEngine::Threads {
        return Ok(Arc::new(file));
    }
    match crate::space::uring::UringStore::new(file) {
        Ok(u) => Ok(Arc::new(u)),
        Err((file, e)) => {
            tracing::warn!(error = %e, "io_uring is not available; using blocking threads for pool I/O");
            Ok(Arc::new(file))
        }
    }
}

/// Held for the duration of one write: the stripes of the regions it touches, in stripe order.
struct RegionLocks<'a> {
    _one: Option<RegionGuard<'a>>,
    _more: Vec<RegionGuard<'a>>,
}

/// Held, never read: its drop releases the stripe.
enum RegionGuard<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

fn copy_aligned(data: &[u8]) -> Bytes {
    let mut buf = AlignedBuf::zeroed(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh format-2 pool of 128 clusters of 64 KiB.
    fn geometry() -> Geometry {
        let sb = Superblock { format: 2, cluster_size: 65536, pool_uuid: crate::meta::uuid::new_uuid() };
        Geometry { cluster_size: 65536, capacity_clusters: 128, high_water: 0, superblock: Some(sb) }
    }

    fn pools(dir: &Path) -> Vec<(String, Arc<Pool>)> {
        let mut out = Vec::new();
        for engine in [IoEngine::Uring, IoEngine::Threads] {
            let path = dir.join(format!("{engine:?}.img"));
            let pool = Pool::open_file(&path, &geometry(), engine, true).expect("open pool");
            if !pool.direct() {
                eprintln!("NOTE: {} refuses O_DIRECT; testing buffered I/O instead", dir.display());
            }
            out.push((format!("{:?}", pool.engine()), Arc::new(pool)));
        }
        out
    }

    /// The journal region of a new pool is written data from its first block to cluster 0
    /// (not a hole, not unwritten extents, which `SEEK_DATA` skips on ext4 and xfs), and the
    /// superblock is still there after it.
    #[test]
    fn a_new_pools_journal_region_is_written_out() {
        let dir = tempfile::tempdir().unwrap();
        let sb = Superblock { format: 3, cluster_size: 65536, pool_uuid: crate::meta::uuid::new_uuid() };
        let geo = Geometry { cluster_size: 65536, capacity_clusters: 16, high_water: 0, superblock: Some(sb) };
        let path = dir.path().join("pool.img");
        let pool = Pool::open_file(&path, &geo, IoEngine::Threads, true).expect("open pool");
        assert_eq!(pool.journal_region(), Some((4096, (16 << 20) - 4096)));
        drop(pool);
        let file = std::fs::File::open(&path).unwrap();
        let data = |from| rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(from)).unwrap();
        let hole = |from| rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(from)).unwrap();
        assert_eq!(data(0), 0);
        assert!(hole(0) >= 16 << 20, "the region has a hole at {}", hole(0));
        let mut first = [0u8; BLOCK];
        file.read_exact_at(&mut first, 0).unwrap();
        assert_eq!(Superblock::decode(&first), Found::Valid(sb));
    }

    /// Many concurrent writes to different bytes of the same blocks: every byte lands, which
    /// only holds if read-modify-writes of a block are serialized.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_unaligned_writes_into_shared_blocks_all_land() {
        let dir = tempfile::tempdir().unwrap();
        for (name, pool) in pools(dir.path()) {
            let base = 3 * 4096 + 1000;
            let mut tasks = Vec::new();
            for i in 0..200u64 {
                let pool = pool.clone();
                tasks.push(tokio::spawn(async move {
                    pool.write_at(base + i * 97, Bytes::from(vec![(i % 250 + 1) as u8; 97])).await.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let got = pool.read_at(base, 200 * 97).await.unwrap();
            for i in 0..200usize {
                assert!(got[i * 97..(i + 1) * 97].iter().all(|b| *b == (i % 250 + 1) as u8), "{name}: write {i} lost");
            }
            // The bytes around the written range were not disturbed.
            assert!(pool.read_at(base - 1000, 1000).await.unwrap().iter().all(|b| *b == 0), "{name}");
        }
    }

    /// Random offsets, lengths and buffer addresses against a model of the file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_reads_and_writes_match_a_model() {
        let dir = tempfile::tempdir().unwrap();
        for (name, pool) in pools(dir.path()) {
            let mut model = vec![0u8; 1 << 20];
            let mut rng = crate::space::fault_disk::XorShift(0x5eed);
            for round in 0..400u64 {
                let off = rng.below(model.len() as u64 - 70_000) as usize;
                let len = match rng.below(3) {
                    0 => 1 + rng.below(600) as usize,
                    1 => 4096 * (1 + rng.below(16) as usize),
                    _ => 1 + rng.below(70_000) as usize,
                };
                if rng.below(2) == 0 {
                    // A slice one byte into a buffer: never aligned in memory.
                    let fill = (round % 255 + 1) as u8;
                    let buf = Bytes::from(vec![fill; len + 1]).slice(1..);
                    pool.write_at(off as u64, buf).await.unwrap();
                    model[off..off + len].fill(fill);
                } else {
                    let got = pool.read_at(off as u64, len).await.unwrap();
                    assert_eq!(&got[..], &model[off..off + len], "{name}: read {off}+{len} in round {round}");
                }
            }
            let all = pool.read_at(0, model.len()).await.unwrap();
            assert!(all[..] == model[..], "{name}: final image differs");
        }
    }

    #[test]
    fn an_aligned_store_only_ever_sees_aligned_io() {
        let disk = crate::space::fault_disk::FaultDisk::new();
        disk.require_alignment(4096);
        let pool = Pool::on(Arc::new(disk.clone()), &geometry()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            pool.write_at(4095, Bytes::from_static(b"ab")).await.unwrap();
            pool.write_at(10, Bytes::from_static(b"xyz")).await.unwrap();
            assert_eq!(&pool.read_at(4094, 4).await.unwrap()[..], b"\0ab\0");
            assert_eq!(&pool.read_at(9, 5).await.unwrap()[..], b"\0xyz\0");
        });
        // The store itself refuses what the pool smoothed over.
        assert!(BlockStore::write_at(&disk, b"q", 1).is_err());
    }

    /// On a disk that takes 512-byte direct I/O a 512-byte write goes down as it is: with
    /// every read failing it still lands, while a write of fewer bytes, which must read the
    /// sector around it, fails.
    #[test]
    fn a_sector_write_on_a_disk_of_sectors_reads_nothing() {
        let disk = crate::space::fault_disk::FaultDisk::new();
        disk.require_alignment(512);
        let pool = Pool::on(Arc::new(disk.clone()), &geometry()).unwrap();
        assert_eq!(pool.alignment(), 512);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            disk.fail_reads(true);
            pool.write_at(4096 + 512, Bytes::from(vec![7u8; 512])).await.unwrap();
            assert!(pool.write_at(4096 + 100, Bytes::from(vec![8u8; 100])).await.is_err());
            disk.fail_reads(false);
            let got = pool.read_at(4096, 1536).await.unwrap();
            assert!(got[..512].iter().all(|b| *b == 0) && got[512..1024].iter().all(|b| *b == 7));
            assert!(got[1024..].iter().all(|b| *b == 0), "the failed write changed nothing");
        });
    }

    /// The pool file takes direct I/O at the granularity the kernel reports for it, and a
    /// write at that granularity between older data reads back with its neighbours intact.
    #[tokio::test]
    async fn the_pool_file_uses_the_direct_io_granularity_its_filesystem_reports() {
        let dir = tempfile::tempdir().unwrap();
        for (name, pool) in pools(dir.path()) {
            let a = pool.alignment() as usize;
            if !pool.direct() {
                continue;
            }
            assert!(a.is_power_of_two() && (512..=4096).contains(&a), "{name}: alignment {a}");
            pool.write_at(0, Bytes::from(vec![1u8; 8192])).await.unwrap();
            pool.write_at(a as u64, Bytes::from(vec![2u8; a])).await.unwrap();
            let got = pool.read_at(0, 8192).await.unwrap();
            let want: Vec<u8> = (0..8192).map(|i| if (a..2 * a).contains(&i) { 2 } else { 1 }).collect();
            assert!(got[..] == want[..], "{name}: a write of {a} bytes disturbed its neighbours");
            eprintln!("{name}: direct I/O in units of {a} bytes");
        }
    }
}
