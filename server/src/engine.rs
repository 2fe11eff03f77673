//! The volume engine: volumes with sparse extent maps over a shared pool, metadata in redb.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use crate::allocator::Allocator;
use crate::error::EngineError;
use crate::extent_map::{ExtentMap, Run};
use crate::metadata::{MetaOp, PoolConfig, Store, VolumeRecord};
use crate::metrics::{PoolSample, VolumeMetrics, VolumeSample};
use crate::pool::Pool;

pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;
pub const DEFAULT_CAPACITY: u64 = 10 << 30;

pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Pool capacity; `None` keeps what the pool has (or the default for a new pool).
    pub capacity: Option<u64>,
    /// Cluster size for a new pool; an existing pool must match if given.
    pub cluster_size: Option<u64>,
}

pub struct Volume {
    pub id: u64,
    pub name: String,
    size: AtomicU64,
    pub created_unix: u64,
    map: RwLock<ExtentMap>,
    /// Shared by reads and writes, exclusive while clusters are unmapped, so no request can
    /// touch a cluster after it went back to the allocator.
    gate: tokio::sync::RwLock<()>,
    /// Serializes first writes, so two requests never both allocate the same virtual cluster.
    alloc_lock: tokio::sync::Mutex<()>,
    sessions: AtomicU32,
    pub metrics: VolumeMetrics,
}

impl Volume {
    pub fn size(&self) -> u64 {
        self.size.load(Relaxed)
    }

    pub fn mapped_clusters(&self) -> u64 {
        self.map.read().map(|m| m.len() as u64).unwrap_or(0)
    }

    pub fn sessions(&self) -> u32 {
        self.sessions.load(Relaxed)
    }

    fn record(&self) -> VolumeRecord {
        VolumeRecord { id: self.id, name: self.name.clone(), size: self.size(), created_unix: self.created_unix }
    }

    fn runs(&self, first: u64, end: u64) -> Result<Vec<Run>, EngineError> {
        Ok(self.map.read().map_err(|_| poisoned())?.runs(first, end))
    }
}

fn poisoned() -> EngineError {
    EngineError::Internal("lock poisoned".into())
}

/// What the API reports about a volume.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub allocated: u64,
    pub created_unix: u64,
    pub sessions: u32,
}

#[derive(Debug, Clone)]
pub struct PoolInfo {
    pub capacity: u64,
    pub used: u64,
    pub cluster_size: u64,
    pub volumes: usize,
    pub data_dir: PathBuf,
}

pub struct Engine {
    store: Store,
    pool: Pool,
    cs: u64,
    alloc: Mutex<Allocator>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    next_id: AtomicU64,
    /// Serializes create/delete/resize so checks and commits do not interleave.
    admin: tokio::sync::Mutex<()>,
    data_dir: PathBuf,
}

/// Volume names become NBD export names and CLI arguments: keep them plain. `@` is reserved for
/// `VOLUME@SNAPSHOT`.
pub fn validate_name(name: &str) -> Result<(), EngineError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "invalid volume name {name:?}: use 1-128 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        )))
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Engine {
    pub fn open(cfg: &EngineConfig) -> Result<Arc<Engine>, EngineError> {
        let cs = cfg.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
        if !(4096..=1 << 20).contains(&cs) || !cs.is_power_of_two() {
            return Err(EngineError::Invalid(format!("cluster size {cs} must be a power of two from 4 KiB to 1 MiB")));
        }
        let capacity = cfg.capacity.unwrap_or(DEFAULT_CAPACITY);
        let (store, loaded) = Store::open(
            &cfg.data_dir.join("meta.redb"),
            PoolConfig { cluster_size: cs, capacity_clusters: capacity / cs },
        )?;
        let pc = loaded.config;
        if let Some(want) = cfg.cluster_size
            && want != pc.cluster_size
        {
            return Err(EngineError::Invalid(format!(
                "the pool was created with cluster size {}; it cannot change to {want}",
                pc.cluster_size
            )));
        }
        let cs = pc.cluster_size;
        let mut capacity_clusters = pc.capacity_clusters;
        if let Some(c) = cfg.capacity {
            let want = c / cs;
            if want < loaded.high_water {
                return Err(EngineError::Invalid(format!(
                    "capacity {c} is below what the pool already uses ({} bytes)",
                    loaded.high_water * cs
                )));
            }
            if want != capacity_clusters {
                store.commit(&[MetaOp::SetCapacity(want)], true, || Ok(()))?;
                capacity_clusters = want;
            }
        }
        let pool = Pool::open(&cfg.data_dir.join("pool.img"), capacity_clusters * cs, cs)?;
        let mut volumes = BTreeMap::new();
        let mut max_id = 0;
        for (rec, pairs) in loaded.volumes {
            max_id = max_id.max(rec.id);
            let vol = Volume {
                id: rec.id,
                name: rec.name.clone(),
                size: AtomicU64::new(rec.size),
                created_unix: rec.created_unix,
                map: RwLock::new(ExtentMap::from_pairs(pairs)),
                gate: Default::default(),
                alloc_lock: Default::default(),
                sessions: AtomicU32::new(0),
                metrics: VolumeMetrics::default(),
            };
            volumes.insert(rec.name, Arc::new(vol));
        }
        Ok(Arc::new(Engine {
            store,
            pool,
            cs,
            alloc: Mutex::new(Allocator::new(loaded.free, loaded.high_water, capacity_clusters)),
            volumes: RwLock::new(volumes),
            next_id: AtomicU64::new(loaded.next_volume_id.max(max_id + 1)),
            admin: Default::default(),
            data_dir: cfg.data_dir.clone(),
        }))
    }

    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    fn alloc(&self) -> Result<std::sync::MutexGuard<'_, Allocator>, EngineError> {
        self.alloc.lock().map_err(|_| poisoned())
    }

    /// Commits `ops` on a blocking thread. A durable commit first syncs the pool (inside the
    /// transaction) and afterwards releases clusters whose frees it made durable.
    async fn commit(self: &Arc<Self>, ops: Vec<MetaOp>, durable: bool) -> Result<(), EngineError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut released = Vec::new();
            let r = me.store.commit(&ops, durable, || {
                released = me.alloc()?.take_pending();
                me.pool.sync_blocking()
            });
            let mut alloc = me.alloc()?;
            match r {
                Ok(()) => alloc.release(released),
                Err(_) => alloc.free_later(released),
            }
            r
        })
        .await
        .map_err(|e| EngineError::Internal(format!("commit task: {e}")))?
    }

    /// Makes every completed write durable (NBD FLUSH; covers all connections).
    pub async fn flush(self: &Arc<Self>) -> Result<(), EngineError> {
        self.commit(Vec::new(), true).await
    }

    pub fn volume(&self, name: &str) -> Result<Arc<Volume>, EngineError> {
        self.volumes
            .read()
            .map_err(|_| poisoned())?
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(name.to_string()))
    }

    pub fn info(&self, v: &Volume) -> VolumeInfo {
        VolumeInfo {
            id: v.id,
            name: v.name.clone(),
            size: v.size(),
            allocated: v.mapped_clusters() * self.cs,
            created_unix: v.created_unix,
            sessions: v.sessions(),
        }
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    pub fn pool_info(&self) -> PoolInfo {
        let vols = self.list();
        let used: u64 = vols.iter().map(|v| v.mapped_clusters()).sum::<u64>() * self.cs;
        let capacity = self.alloc().map(|a| a.capacity()).unwrap_or(0) * self.cs;
        PoolInfo { capacity, used, cluster_size: self.cs, volumes: vols.len(), data_dir: self.data_dir.clone() }
    }

    pub fn render_metrics(&self) -> String {
        let p = self.pool_info();
        let vols = self.list();
        let samples: Vec<VolumeSample<'_>> = vols
            .iter()
            .map(|v| VolumeSample {
                name: &v.name,
                size: v.size(),
                allocated: v.mapped_clusters() * self.cs,
                sessions: v.sessions(),
                metrics: &v.metrics,
            })
            .collect();
        crate::metrics::render(
            &PoolSample { capacity: p.capacity, used: p.used, cluster_size: p.cluster_size },
            &samples,
        )
    }

    fn check_size(size: u64) -> Result<(), EngineError> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(EngineError::Invalid(format!("volume size {size} must be a positive multiple of 512 bytes")));
        }
        if size > 1 << 60 {
            return Err(EngineError::Invalid(format!("volume size {size} is larger than 1 EiB")));
        }
        Ok(())
    }

    pub async fn create_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<Arc<Volume>, EngineError> {
        validate_name(name)?;
        Self::check_size(size)?;
        let _admin = self.admin.lock().await;
        if let Ok(v) = self.volume(name) {
            return Err(EngineError::AlreadyExists(v.name.clone()));
        }
        let vol = Arc::new(Volume {
            id: self.next_id.fetch_add(1, Relaxed),
            name: name.to_string(),
            size: AtomicU64::new(size),
            created_unix: now_unix(),
            map: Default::default(),
            gate: Default::default(),
            alloc_lock: Default::default(),
            sessions: AtomicU32::new(0),
            metrics: VolumeMetrics::default(),
        });
        self.commit(vec![MetaOp::PutVolume(vol.record())], true).await?;
        self.volumes.write().map_err(|_| poisoned())?.insert(name.to_string(), vol.clone());
        tracing::info!(volume = name, size, "volume created");
        Ok(vol)
    }

    /// Grows a volume. Open sessions keep their size; new connections see the new one.
    pub async fn resize_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<Arc<Volume>, EngineError> {
        Self::check_size(size)?;
        let _admin = self.admin.lock().await;
        let vol = self.volume(name)?;
        let old = vol.size();
        if size < old {
            return Err(EngineError::Precondition(format!(
                "volume {name:?} is {old} bytes; shrinking to {size} is not supported (it would discard data)"
            )));
        }
        if size != old {
            let mut rec = vol.record();
            rec.size = size;
            self.commit(vec![MetaOp::PutVolume(rec)], true).await?;
            vol.size.store(size, Relaxed);
            tracing::info!(volume = name, old, size, "volume resized");
        }
        Ok(vol)
    }

    pub async fn delete_volume(self: &Arc<Self>, name: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        let vol = self.volume(name)?;
        let _gate = vol.gate.write().await;
        let n = vol.sessions();
        if n > 0 {
            return Err(EngineError::Precondition(format!(
                "volume {name:?} has {n} open NBD session(s); disconnect them first"
            )));
        }
        let freed: Vec<u64> = vol.map.read().map_err(|_| poisoned())?.iter().map(|(_, p)| p).collect();
        let mut ops: Vec<MetaOp> = freed.iter().map(|p| MetaOp::Free(*p)).collect();
        ops.push(MetaOp::DeleteVolume { name: name.to_string(), id: vol.id });
        self.commit(ops, true).await?;
        self.volumes.write().map_err(|_| poisoned())?.remove(name);
        // The delete is durable: its clusters can be reused at once.
        self.alloc()?.release(freed.iter().copied());
        *vol.map.write().map_err(|_| poisoned())? = ExtentMap::default();
        tracing::info!(volume = name, clusters = freed.len(), "volume deleted");
        Ok(())
    }

    /// Opens a volume for I/O; the handle counts as a session until dropped.
    pub fn open_volume(self: &Arc<Self>, name: &str, read_only: bool) -> Result<VolumeHandle, EngineError> {
        let vol = self.volume(name)?;
        vol.sessions.fetch_add(1, Relaxed);
        let size = vol.size();
        Ok(VolumeHandle { engine: self.clone(), vol, size, read_only })
    }
}

/// An open volume: the NBD session's block device.
pub struct VolumeHandle {
    engine: Arc<Engine>,
    pub vol: Arc<Volume>,
    size: u64,
    read_only: bool,
}

impl Drop for VolumeHandle {
    fn drop(&mut self) {
        self.vol.sessions.fetch_sub(1, Relaxed);
    }
}

/// The byte range of `run` that lies inside `[offset, end)`: (start, length, offset into the
/// run's first physical cluster).
fn clip(run: &Run, cs: u64, offset: u64, end: u64) -> (u64, u64, u64) {
    let rs = (run.vstart * cs).max(offset);
    let re = ((run.vstart + run.count) * cs).min(end);
    (rs, re - rs, rs - run.vstart * cs)
}

impl VolumeHandle {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<thinbd_protocol::ReadChunk>, EngineError> {
        use thinbd_protocol::ReadChunk;
        if len == 0 {
            return Ok(Vec::new());
        }
        let cs = self.engine.cs;
        let end = offset + len as u64;
        let _g = self.vol.gate.read().await;
        let runs = self.vol.runs(offset / cs, end.div_ceil(cs))?;
        let mut out = Vec::with_capacity(runs.len());
        for run in &runs {
            let (_, n, within) = clip(run, cs, offset, end);
            match run.physical {
                Some(p) => {
                    let data = self.engine.pool.read_at(p * cs + within, n as usize).await?;
                    out.push(ReadChunk::Data(Bytes::from(data)));
                }
                None => out.push(ReadChunk::Hole(n as u32)),
            }
        }
        self.vol.metrics.bytes_read.fetch_add(len as u64, Relaxed);
        Ok(out)
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        if !data.is_empty() {
            let _g = self.vol.gate.read().await;
            self.write_locked(offset, data.clone()).await?;
            self.vol.metrics.bytes_written.fetch_add(data.len() as u64, Relaxed);
        }
        if fua {
            self.engine.flush().await?;
        }
        Ok(())
    }

    /// Writes with the gate held (shared or exclusive) by the caller.
    async fn write_locked(&self, offset: u64, data: Bytes) -> Result<(), EngineError> {
        let cs = self.engine.cs;
        let end = offset + data.len() as u64;
        let runs = self.vol.runs(offset / cs, end.div_ceil(cs))?;
        let mut holes = Vec::new();
        for run in runs {
            let (start, n, within) = clip(&run, cs, offset, end);
            match run.physical {
                Some(p) => {
                    let slice = data.slice((start - offset) as usize..(start - offset + n) as usize);
                    self.engine.pool.write_at(p * cs + within, slice).await?;
                }
                None => holes.push(run),
            }
        }
        if holes.is_empty() {
            return Ok(());
        }
        let _a = self.vol.alloc_lock.lock().await;
        // Another request may have filled some of these clusters while we waited.
        let mut need = Vec::new();
        for hole in holes {
            for run in self.vol.runs(hole.vstart, hole.vstart + hole.count)? {
                let (start, n, within) = clip(&run, cs, offset, end);
                match run.physical {
                    Some(p) => {
                        let slice = data.slice((start - offset) as usize..(start - offset + n) as usize);
                        self.engine.pool.write_at(p * cs + within, slice).await?;
                    }
                    None => need.extend(run.vstart..run.vstart + run.count),
                }
            }
        }
        if need.is_empty() {
            return Ok(());
        }
        let pcs = self.engine.alloc()?.allocate(need.len()).ok_or(EngineError::NoSpace)?;
        let r = self.fill_new_clusters(&need, &pcs, offset, &data).await;
        let r = match r {
            Ok(()) => {
                let mut ops = Vec::with_capacity(need.len() * 2);
                for (v, p) in need.iter().zip(&pcs) {
                    ops.push(MetaOp::Claim(*p));
                    ops.push(MetaOp::Map { volume: self.vol.id, vcluster: *v, pcluster: *p });
                }
                self.engine.commit(ops, false).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            self.engine.alloc()?.unallocate(pcs);
            return Err(e);
        }
        let mut map = self.vol.map.write().map_err(|_| poisoned())?;
        for (v, p) in need.iter().zip(&pcs) {
            map.insert(*v, *p);
        }
        Ok(())
    }

    /// Writes whole new clusters: the request's bytes where it covers them, zeros elsewhere, so
    /// a reused cluster never shows its previous owner's data. Consecutive clusters go in one
    /// write.
    async fn fill_new_clusters(&self, vcs: &[u64], pcs: &[u64], offset: u64, data: &Bytes) -> Result<(), EngineError> {
        let cs = self.engine.cs;
        let end = offset + data.len() as u64;
        let mut i = 0;
        while i < vcs.len() {
            let mut j = i + 1;
            while j < vcs.len() && vcs[j] == vcs[j - 1] + 1 && pcs[j] == pcs[j - 1] + 1 && j - i < 256 {
                j += 1;
            }
            let vstart = vcs[i] * cs;
            let vend = (vcs[j - 1] + 1) * cs;
            let mut buf = BytesMut::zeroed((vend - vstart) as usize);
            let (s, e) = (offset.max(vstart), end.min(vend));
            if s < e {
                buf[(s - vstart) as usize..(e - vstart) as usize]
                    .copy_from_slice(&data[(s - offset) as usize..(e - offset) as usize]);
            }
            self.engine.pool.write_at(pcs[i] * cs, buf.freeze()).await?;
            i = j;
        }
        Ok(())
    }

    /// TRIM and WRITE_ZEROES: whole clusters are unmapped (freed when `unmap`), partial ones
    /// zeroed in place.
    pub async fn zero(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        let cs = self.engine.cs;
        let end = offset + len as u64;
        {
            let _g = self.vol.gate.write().await;
            if unmap {
                let first_full = offset.div_ceil(cs);
                let end_full = end / cs;
                let mut freed = Vec::new();
                if first_full < end_full {
                    let runs = self.vol.runs(first_full, end_full)?;
                    for r in runs.iter().filter(|r| r.physical.is_some()) {
                        let p = r.physical.unwrap_or_default();
                        freed.extend((0..r.count).map(|k| (r.vstart + k, p + k)));
                    }
                }
                if !freed.is_empty() {
                    let mut ops = Vec::with_capacity(freed.len() * 2);
                    for (v, p) in &freed {
                        ops.push(MetaOp::Unmap { volume: self.vol.id, vcluster: *v });
                        ops.push(MetaOp::Free(*p));
                    }
                    self.engine.commit(ops, false).await?;
                    let mut map = self.vol.map.write().map_err(|_| poisoned())?;
                    for (v, _) in &freed {
                        map.remove(*v);
                    }
                    drop(map);
                    self.engine.alloc()?.free_later(freed.iter().map(|(_, p)| *p));
                }
                // Partial clusters at either end are zeroed where mapped.
                let head_end = (first_full * cs).min(end);
                let tail_start = (end_full * cs).max(offset);
                if first_full >= end_full {
                    self.zero_mapped(offset, end).await?;
                } else {
                    self.zero_mapped(offset, head_end).await?;
                    self.zero_mapped(tail_start, end).await?;
                }
            } else {
                // NO_HOLE: the range must end up allocated and zero.
                let mut pos = offset;
                while pos < end {
                    let n = (end - pos).min(1 << 20);
                    self.write_locked(pos, Bytes::from(vec![0u8; n as usize])).await?;
                    pos += n;
                }
            }
        }
        if fua {
            self.engine.flush().await?;
        }
        Ok(())
    }

    /// Zeroes `[start, end)` inside clusters that are mapped; unmapped ones already read as zero.
    async fn zero_mapped(&self, start: u64, end: u64) -> Result<(), EngineError> {
        if start >= end {
            return Ok(());
        }
        let cs = self.engine.cs;
        for run in self.vol.runs(start / cs, end.div_ceil(cs))? {
            if let Some(p) = run.physical {
                let (_, n, within) = clip(&run, cs, start, end);
                self.engine.pool.write_at(p * cs + within, Bytes::from(vec![0u8; n as usize])).await?;
            }
        }
        Ok(())
    }

    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<thinbd_protocol::Extent>, EngineError> {
        use thinbd_protocol::consts::{STATE_HOLE, STATE_ZERO};
        let cs = self.engine.cs;
        let end = offset + len as u64;
        let runs = self.vol.runs(offset / cs, end.div_ceil(cs))?;
        let mut out: Vec<thinbd_protocol::Extent> = Vec::new();
        for run in &runs {
            let (_, n, _) = clip(run, cs, offset, end);
            let flags = if run.physical.is_some() { 0 } else { STATE_HOLE | STATE_ZERO };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += n as u32,
                _ => out.push(thinbd_protocol::Extent { length: n as u32, flags }),
            }
        }
        Ok(out)
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        self.engine.flush().await
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn cluster_size(&self) -> u64 {
        self.engine.cs
    }
}

/// Where the pool lives; used by `serve` for the lock file and by tests.
pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("lock")
}
