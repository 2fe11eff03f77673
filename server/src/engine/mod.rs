//! The volume engine: volumes and snapshots as chains of layers over a shared pool of clusters,
//! metadata in redb. Admin operations (create, snapshot, clone, resize, delete) are serialized
//! and commit durably; data operations commit their mapping changes non-durably and rely on
//! FLUSH/FUA for durability.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub mod changes;
pub mod publish;
pub mod recovery;

use crate::error::EngineError;
use crate::error::poisoned;
use crate::layers::edit::LayerEdit;
use crate::layers::extent_map::{ExtentMap, ZERO_MARK};
use crate::layers::layer::Layer;
use crate::meta::store::{LayerRecord, MetaOp, PoolConfig, SnapshotRecord, Store, VolumeRecord};
use crate::metrics::{PoolSample, VolumeMetrics, VolumeSample};
use crate::space::allocator::Allocator;
use crate::space::pool::Pool;
use crate::space::superblock::uuid_text;

/// A fresh random UUID in text form.
fn new_uuid() -> String {
    uuid_text(crate::space::superblock::new_uuid())
}

pub use crate::io::LocalVolume;

pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;
pub const DEFAULT_CAPACITY: u64 = 10 << 30;

pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Pool capacity; `None` keeps what the pool has (or the default for a new pool).
    pub capacity: Option<u64>,
    /// Cluster size for a new pool; an existing pool must match if given.
    pub cluster_size: Option<u64>,
    pub io_engine: crate::space::backend::IoEngine,
    /// Pool I/O through the page cache instead of O_DIRECT.
    pub buffered_io: bool,
    /// Open even if the consistency check at start finds problems.
    pub force: bool,
}

pub struct Volume {
    pub id: u64,
    /// Unique across pools; the name is a label.
    pub uuid: String,
    pub name: String,
    pub(crate) size: AtomicU64,
    pub created_unix: u64,
    top: RwLock<Arc<Layer>>,
    /// Shared by reads and writes, exclusive while clusters are unmapped or the top layer
    /// changes, so no request can touch a cluster after it went back to the allocator.
    pub(crate) gate: tokio::sync::RwLock<()>,
    /// Virtual clusters some request is allocating and filling right now, so two requests never
    /// both allocate the same one; the lock is write-held by the filler until its mapping is in.
    pub(crate) filling: Mutex<std::collections::HashMap<u64, Arc<tokio::sync::RwLock<()>>>>,
    pub(crate) sessions: AtomicU32,
    /// Set (under the catalog lock) while a delete commits: no session may open it.
    pub(crate) deleting: AtomicBool,
    pub metrics: Arc<VolumeMetrics>,
    /// Limits shared by all sessions of the volume.
    pub qos: Arc<crate::qos::Qos>,
    pub labels: BTreeMap<String, String>,
}

/// What a new volume is created with besides its name and size.
#[derive(Debug, Clone, Default)]
pub struct VolumeOptions {
    /// Free-form labels (the CSI plugin keeps a volume's origin there).
    pub labels: BTreeMap<String, String>,
    pub qos: crate::meta::qos::QosLimits,
}

impl Volume {
    fn new(
        id: u64,
        uuid: String,
        name: &str,
        size: u64,
        created_unix: u64,
        top: Arc<Layer>,
        opts: VolumeOptions,
    ) -> Volume {
        Volume {
            uuid,
            labels: opts.labels,
            qos: Arc::new(crate::qos::Qos::new(opts.qos)),
            id,
            name: name.to_string(),
            size: AtomicU64::new(size),
            created_unix,
            top: RwLock::new(top),
            gate: Default::default(),
            filling: Default::default(),
            sessions: AtomicU32::new(0),
            deleting: AtomicBool::new(false),
            metrics: Default::default(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size.load(Relaxed)
    }

    pub fn top(&self) -> Result<Arc<Layer>, EngineError> {
        Ok(self.top.read().map_err(|_| poisoned())?.clone())
    }

    pub fn sessions(&self) -> u32 {
        self.sessions.load(Relaxed)
    }

    pub(crate) fn record(&self) -> Result<VolumeRecord, EngineError> {
        Ok(VolumeRecord {
            id: self.id,
            name: self.name.clone(),
            size: self.size(),
            created_unix: self.created_unix,
            layer: self.top()?.id,
            labels: self.labels.clone(),
            qos: self.qos.limits(),
            uuid: self.uuid.clone(),
        })
    }
}

/// A snapshot: a frozen layer, readable as `VOLUME@SNAPSHOT`.
pub struct Snapshot {
    /// Unique across pools.
    pub uuid: String,
    pub volume: String,
    pub name: String,
    pub layer: Arc<Layer>,
    pub size: u64,
    pub created_unix: u64,
    /// The group snapshot it was taken with, if any.
    pub group: Option<String>,
    pub(crate) sessions: AtomicU32,
    /// Set (under the catalog lock) while a delete commits: no session may open it.
    pub(crate) deleting: AtomicBool,
    pub metrics: Arc<VolumeMetrics>,
}

impl Snapshot {
    pub(crate) fn record(&self) -> SnapshotRecord {
        SnapshotRecord {
            volume: self.volume.clone(),
            name: self.name.clone(),
            layer: self.layer.id,
            size: self.size,
            created_unix: self.created_unix,
            group: self.group.clone(),
            uuid: self.uuid.clone(),
        }
    }

    pub fn key(&self) -> String {
        format!("{}@{}", self.volume, self.name)
    }
}

/// Space a volume or snapshot uses, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Clusters with data it can read.
    pub allocated: u64,
    /// Of those, the ones only it references (its own layer).
    pub exclusive: u64,
    /// Allocated minus exclusive: inherited from snapshots, shared with them and their clones.
    pub shared: u64,
}

#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub usage: Usage,
    pub created_unix: u64,
    pub sessions: u32,
}

#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    pub size: u64,
    pub usage: Usage,
    pub created_unix: u64,
    pub sessions: u32,
}

#[derive(Debug, Clone)]
pub struct PoolInfo {
    pub capacity: u64,
    pub used: u64,
    pub cluster_size: u64,
    pub volumes: usize,
    pub snapshots: usize,
    pub data_dir: PathBuf,
}

struct References {
    volumes: Vec<Arc<Volume>>,
    snapshots: usize,
    children: Vec<Arc<Layer>>,
}

type CommitJob = (Vec<MetaOp>, tokio::sync::oneshot::Sender<Result<(), EngineError>>);

/// Group commit: one thread takes every non-durable metadata change queued while the previous
/// transaction ran and commits them all in one, so first writes from many requests share a
/// transaction instead of waiting in line for one each.
fn spawn_committer(store: Arc<Store>, dirty: Arc<std::sync::atomic::AtomicBool>) -> Result<Committer, EngineError> {
    let (tx, rx) = std::sync::mpsc::channel::<CommitJob>();
    let thread = std::thread::Builder::new()
        .name("thinbd-commit".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let (mut ops, mut replies) = (first.0, vec![first.1]);
                while let Ok((o, r)) = rx.try_recv() {
                    ops.extend(o);
                    replies.push(r);
                    if replies.len() >= 512 {
                        break;
                    }
                }
                let r = store.commit(&ops, false, || Ok(()));
                dirty.store(true, Relaxed);
                for reply in replies {
                    let _ = reply.send(match &r {
                        Ok(()) => Ok(()),
                        Err(e) => Err(EngineError::Metadata(e.to_string())),
                    });
                }
            }
        })
        .map_err(|e| EngineError::Internal(format!("cannot start the commit thread: {e}")))?;
    Ok(Committer { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) })
}

struct Committer {
    tx: Mutex<Option<std::sync::mpsc::Sender<CommitJob>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Engine {
    /// Stops the commit thread before the store closes, so a reopen finds the file free.
    fn drop(&mut self) {
        if let Ok(mut tx) = self.committer.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.committer.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

pub struct Engine {
    pub(crate) store: Arc<Store>,
    committer: Committer,
    pub(crate) pool: Pool,
    pub(crate) cs: u64,
    alloc: Mutex<Allocator>,
    pub(crate) volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    pub(crate) snapshots: RwLock<BTreeMap<String, Arc<Snapshot>>>,
    pub(crate) layers: RwLock<BTreeMap<u64, Arc<Layer>>>,
    /// Attachment grants by `grant_key`.
    pub(crate) grants: crate::grants::Grants,
    /// Freed clusters are reused only after the reads that may have resolved to them.
    pub(crate) grace: crate::space::grace::Grace,
    /// One metadata store recovery at a time, and when the last one was tried.
    pub(crate) recovery: tokio::sync::Mutex<Option<std::time::Instant>>,
    pub(crate) next_id: AtomicU64,
    /// Set by non-durable metadata commits, cleared by durable ones.
    pub(crate) meta_dirty: Arc<std::sync::atomic::AtomicBool>,
    /// Serializes admin operations so their checks and commits do not interleave.
    pub(crate) admin: tokio::sync::Mutex<()>,
    /// Serializes freeing clusters of hidden layers (see [`Engine::reclaim_overridden`]).
    reclaim: tokio::sync::Mutex<()>,
    data_dir: PathBuf,
}

/// Names become NBD export names and CLI arguments: keep them plain. `@` separates a volume
/// from its snapshot.
pub fn validate_name(kind: &str, name: &str) -> Result<(), EngineError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "invalid {kind} name {name:?}: use 1-128 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        )))
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Refuses a data dir with one of its two files missing: a new pool is made only where
/// neither exists, so a lost pool file is never re-created empty (serving zeros for data) and a
/// lost metadata file never turns an existing pool into an empty one.
fn check_data_dir(meta: &std::path::Path, pool: &std::path::Path) -> Result<(), EngineError> {
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).ok();
    match (size(meta), size(pool)) {
        (None, None) => Ok(()),
        (Some(m), Some(_)) if m > 0 => Ok(()),
        (Some(m), None) if m > 0 => Err(EngineError::Metadata(format!(
            "the metadata file {} exists but the pool file {} is missing: refusing to start \
             (the volumes' data would read as zeros); restore the pool file",
            meta.display(),
            pool.display()
        ))),
        (_, Some(_)) => Err(EngineError::Metadata(format!(
            "the pool file {} exists but the metadata file {} is missing or empty: refusing to start \
             (every volume would be gone); restore the metadata file",
            pool.display(),
            meta.display()
        ))),
        (Some(_), None) => Err(EngineError::Metadata(format!(
            "the metadata file {} is empty and there is no pool file: remove the data dir to start afresh",
            meta.display()
        ))),
    }
}

/// Builds layers parents-first; refuses dangling parents and cycles.
fn build_layers(records: Vec<LayerRecord>) -> Result<BTreeMap<u64, Arc<Layer>>, EngineError> {
    let mut pending: BTreeMap<u64, LayerRecord> = records.into_iter().map(|r| (r.id, r)).collect();
    let mut built: BTreeMap<u64, Arc<Layer>> = BTreeMap::new();
    while let Some((&id, _)) = pending.iter().next() {
        // Follow parents up to one that is built (or none), then build down again.
        let mut chain = vec![id];
        loop {
            let cur = *chain.last().unwrap_or(&id);
            let parent = pending.get(&cur).and_then(|r| r.parent);
            match parent {
                Some(p) if built.contains_key(&p) => break,
                Some(p) if pending.contains_key(&p) => {
                    if chain.contains(&p) {
                        return Err(EngineError::Metadata(format!("layer {p} is its own ancestor")));
                    }
                    chain.push(p);
                }
                Some(p) => return Err(EngineError::Metadata(format!("layer {cur} has missing parent {p}"))),
                None => break,
            }
        }
        for id in chain.into_iter().rev() {
            let rec = pending.remove(&id).ok_or_else(|| EngineError::Internal("layer build".into()))?;
            let parent = rec.parent.and_then(|p| built.get(&p).cloned());
            built.insert(id, Layer::new(id, ExtentMap::from_pairs(rec.extents), parent));
        }
    }
    Ok(built)
}

impl Engine {
    pub fn open(cfg: &EngineConfig) -> Result<Arc<Engine>, EngineError> {
        let meta = cfg.data_dir.join("meta.redb");
        let pool_path = cfg.data_dir.join("pool.img");
        check_data_dir(&meta, &pool_path)?;
        let db = crate::meta::store::guarded("opening the metadata", || Ok(redb::Database::create(&meta)?))?;
        let reopen: crate::meta::store::Reopen = Box::new(move || Ok(redb::Database::create(&meta)?));
        Self::open_parts(cfg, db, Some(reopen), |geo| Pool::open_file(&pool_path, geo, cfg.io_engine, !cfg.buffered_io))
    }

    /// Opens an engine on a given redb database and pool store (tests: fault-injecting disks).
    pub fn open_on(
        cfg: &EngineConfig,
        db: redb::Database,
        store: Arc<dyn crate::space::backend::BlockStore>,
    ) -> Result<Arc<Engine>, EngineError> {
        Self::open_parts(cfg, db, None, |geo| Pool::on(store, geo))
    }

    fn open_parts(
        cfg: &EngineConfig,
        db: redb::Database,
        reopen: Option<crate::meta::store::Reopen>,
        pool: impl FnOnce(&crate::space::pool::Geometry) -> Result<Pool, EngineError>,
    ) -> Result<Arc<Engine>, EngineError> {
        let cs = cfg.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
        if !(4096..=1 << 20).contains(&cs) || !cs.is_power_of_two() {
            return Err(EngineError::Invalid(format!("cluster size {cs} must be a power of two from 4 KiB to 1 MiB")));
        }
        let capacity = cfg.capacity.unwrap_or(DEFAULT_CAPACITY);
        let (store, loaded) = crate::meta::store::guarded("reading the metadata", || {
            Store::on(db, reopen, PoolConfig { cluster_size: cs, capacity_clusters: capacity / cs })
        })?;
        if !cfg.force {
            // The cheap part of fsck: maps, allocator and layers agree (no pool data is read).
            let report = crate::meta::fsck::check(&loaded);
            if !report.ok() {
                return Err(EngineError::Metadata(format!(
                    "the consistency check failed; run `thinbd fsck`, or start with --force to serve anyway:\n{report}"
                )));
            }
        }
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
        let geometry = crate::space::pool::Geometry { capacity_clusters, ..loaded.geometry() };
        if geometry.superblock.is_none() {
            tracing::warn!("the pool has no superblock (created by an older thinbd): swapped files go unnoticed");
        }
        let pool = pool(&geometry)?;
        Self::assemble(store, pool, loaded, capacity_clusters, cfg.data_dir.clone())
    }

    /// Builds the engine from loaded metadata and an opened pool (tests use other pool backends).
    fn assemble(
        store: Store,
        pool: Pool,
        loaded: crate::meta::store::Loaded,
        capacity_clusters: u64,
        data_dir: PathBuf,
    ) -> Result<Arc<Engine>, EngineError> {
        let cs = loaded.config.cluster_size;
        let layers = build_layers(loaded.layers)?;
        let layer = |id: u64, what: &str| {
            layers
                .get(&id)
                .cloned()
                .ok_or_else(|| EngineError::Metadata(format!("{what} refers to missing layer {id}")))
        };
        // Records from before UUIDs get one now, written back below.
        let mut upgraded = Vec::new();
        let mut volumes = BTreeMap::new();
        for rec in loaded.volumes {
            let top = layer(rec.layer, &format!("volume {}", rec.name))?;
            let uuid = if rec.uuid.is_empty() { new_uuid() } else { rec.uuid.clone() };
            let vol = Arc::new(Volume::new(
                rec.id,
                uuid,
                &rec.name,
                rec.size,
                rec.created_unix,
                top,
                VolumeOptions { labels: rec.labels.clone(), qos: rec.qos },
            ));
            if rec.uuid.is_empty() {
                upgraded.push(MetaOp::PutVolume(vol.record()?));
            }
            volumes.insert(rec.name.clone(), vol);
        }
        let mut snapshots = BTreeMap::new();
        for rec in loaded.snapshots {
            let snap = Snapshot {
                uuid: if rec.uuid.is_empty() { new_uuid() } else { rec.uuid.clone() },
                layer: layer(rec.layer, &format!("snapshot {}", rec.key()))?,
                volume: rec.volume.clone(),
                name: rec.name.clone(),
                size: rec.size,
                created_unix: rec.created_unix,
                group: rec.group.clone(),
                sessions: AtomicU32::new(0),
                deleting: AtomicBool::new(false),
                metrics: Default::default(),
            };
            if rec.uuid.is_empty() {
                upgraded.push(MetaOp::PutSnapshot(snap.record()));
            }
            snapshots.insert(rec.key(), Arc::new(snap));
        }
        if !upgraded.is_empty() {
            store.commit(&upgraded, true, || Ok(()))?;
        }
        for l in layers.values() {
            let named = volumes.values().any(|v: &Arc<Volume>| v.top().is_ok_and(|t| t.id == l.id))
                || snapshots.values().any(|s: &Arc<Snapshot>| s.layer.id == l.id);
            l.hidden.store(!named, Relaxed);
        }
        let grants = crate::grants::Grants::load(loaded.grants);
        let store = Arc::new(store);
        let meta_dirty: Arc<std::sync::atomic::AtomicBool> = Default::default();
        let committer = spawn_committer(store.clone(), meta_dirty.clone())?;
        Ok(Arc::new(Engine {
            store,
            committer,
            pool,
            cs,
            alloc: Mutex::new(Allocator::new(loaded.free, loaded.high_water, capacity_clusters)),
            volumes: RwLock::new(volumes),
            snapshots: RwLock::new(snapshots),
            layers: RwLock::new(layers),
            next_id: AtomicU64::new(loaded.next_id.max(1)),
            meta_dirty,
            admin: Default::default(),
            reclaim: Default::default(),
            grants,
            grace: Default::default(),
            recovery: Default::default(),
            data_dir,
        }))
    }

    pub fn io_engine(&self) -> crate::space::backend::IoEngine {
        self.pool.engine()
    }

    pub fn direct_io(&self) -> bool {
        self.pool.direct()
    }

    pub(crate) fn alloc(&self) -> Result<std::sync::MutexGuard<'_, Allocator>, EngineError> {
        self.alloc.lock().map_err(|_| poisoned())
    }

    /// Commits `ops` on a blocking thread. A durable commit first syncs the pool (inside the
    /// transaction) and afterwards releases clusters whose frees it made durable.
    pub(crate) async fn commit(self: &Arc<Self>, ops: Vec<MetaOp>, durable: bool) -> Result<(), EngineError> {
        if self.store.failed() {
            self.recover().await?;
        }
        if !durable {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sent = match self.committer.tx.lock().map_err(|_| poisoned())?.as_ref() {
                Some(c) => c.send((ops, tx)).is_ok(),
                None => false,
            };
            if !sent {
                return Err(EngineError::Internal("commit thread is gone".into()));
            }
            return rx.await.map_err(|_| EngineError::Internal("commit thread dropped a commit".into()))?;
        }
        let me = self.clone();
        let released = tokio::task::spawn_blocking(move || {
            let mut released = Vec::new();
            let r = me.store.commit(&ops, durable, || {
                // Under redb's writer lock: every non-durable commit so far is in this one.
                me.meta_dirty.store(false, Relaxed);
                released = me.alloc()?.take_pending();
                me.pool.sync_blocking()
            });
            if r.is_err() {
                me.meta_dirty.store(true, Relaxed);
                me.alloc()?.free_later(released);
                return r.map(|()| Vec::new());
            }
            Ok(released)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("commit task: {e}")))??;
        self.release(released).await
    }

    /// Commits `edits` (with `extra` ops: allocator changes, records) and then applies them to
    /// memory: the one path by which extent maps change.
    pub(crate) async fn commit_edits(
        self: &Arc<Self>,
        edits: Vec<LayerEdit>,
        extra: Vec<MetaOp>,
        durable: bool,
    ) -> Result<(), EngineError> {
        let mut ops: Vec<MetaOp> = edits.iter().map(LayerEdit::meta_op).collect();
        ops.extend(extra);
        self.commit(ops, durable).await?;
        crate::layers::edit::apply(edits)
    }

    /// Gives freed clusters back to the allocator once no read can still be using them.
    pub(crate) async fn release(&self, clusters: Vec<u64>) -> Result<(), EngineError> {
        if clusters.is_empty() {
            return Ok(());
        }
        self.grace.wait().await;
        self.alloc()?.release(clusters);
        Ok(())
    }

    /// Makes every completed write durable (NBD FLUSH; covers all connections).
    /// When no mapping changed since the last durable commit (overwrites only), syncing the
    /// pool is enough: the metadata on disk already describes every completed write.
    pub async fn flush(self: &Arc<Self>) -> Result<(), EngineError> {
        let clean = !self.meta_dirty.load(Relaxed) && !self.alloc()?.has_pending();
        if clean {
            let me = self.clone();
            return tokio::task::spawn_blocking(move || me.pool.sync_blocking())
                .await
                .map_err(|e| EngineError::Internal(format!("sync task: {e}")))?;
        }
        self.commit(Vec::new(), true).await
    }

    fn take_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    fn next_id_op(&self) -> MetaOp {
        MetaOp::SetNextId(self.next_id.load(Relaxed))
    }

    pub fn volume(&self, name: &str) -> Result<Arc<Volume>, EngineError> {
        self.volumes
            .read()
            .map_err(|_| poisoned())?
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("volume {name:?}")))
    }

    /// A volume by name, or else by UUID (for lookups; operations take names).
    pub fn find_volume(&self, name_or_uuid: &str) -> Result<Arc<Volume>, EngineError> {
        self.volume(name_or_uuid).or_else(|e| {
            let vols = self.volumes.read().map_err(|_| poisoned())?;
            vols.values().find(|v| v.uuid == name_or_uuid).cloned().ok_or(e)
        })
    }

    pub fn snapshot(&self, key: &str) -> Result<Arc<Snapshot>, EngineError> {
        self.snapshots
            .read()
            .map_err(|_| poisoned())?
            .get(key)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {key:?}")))
    }

    fn usage(&self, layer: &Arc<Layer>) -> Usage {
        let (allocated, exclusive) = layer.visible_data().unwrap_or((0, 0));
        Usage {
            allocated: allocated * self.cs,
            exclusive: exclusive * self.cs,
            shared: (allocated - exclusive) * self.cs,
        }
    }

    pub fn info(&self, v: &Volume) -> VolumeInfo {
        let usage = v.top().map(|t| self.usage(&t)).unwrap_or_default();
        VolumeInfo {
            id: v.id,
            name: v.name.clone(),
            size: v.size(),
            usage,
            created_unix: v.created_unix,
            sessions: v.sessions(),
        }
    }

    pub fn snapshot_info(&self, s: &Snapshot) -> SnapshotInfo {
        SnapshotInfo {
            volume: s.volume.clone(),
            name: s.name.clone(),
            size: s.size,
            usage: self.usage(&s.layer),
            created_unix: s.created_unix,
            sessions: s.sessions.load(Relaxed),
        }
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    pub fn list_snapshots(&self, volume: Option<&str>) -> Vec<Arc<Snapshot>> {
        self.snapshots
            .read()
            .map(|m| m.values().filter(|s| volume.is_none_or(|v| s.volume == v)).cloned().collect())
            .unwrap_or_default()
    }

    pub fn pool_info(&self) -> PoolInfo {
        let (capacity, used) = self.alloc().map(|a| (a.capacity(), a.used())).unwrap_or((0, 0));
        PoolInfo {
            capacity: capacity * self.cs,
            used: used * self.cs,
            cluster_size: self.cs,
            volumes: self.volumes.read().map(|m| m.len()).unwrap_or(0),
            snapshots: self.snapshots.read().map(|m| m.len()).unwrap_or(0),
            data_dir: self.data_dir.clone(),
        }
    }

    pub fn render_metrics(&self) -> String {
        let p = self.pool_info();
        let vols = self.list();
        let snaps = self.list_snapshots(None);
        let keys: Vec<String> = snaps.iter().map(|s| s.key()).collect();
        let mut samples: Vec<VolumeSample<'_>> = Vec::with_capacity(vols.len() + snaps.len());
        for v in &vols {
            let usage = v.top().map(|t| self.usage(&t)).unwrap_or_default();
            samples.push(VolumeSample {
                name: &v.name,
                size: v.size(),
                allocated: usage.allocated,
                exclusive: usage.exclusive,
                shared: usage.shared,
                sessions: v.sessions(),
                metrics: &v.metrics,
                qos: Some(crate::metrics::QosSample {
                    limits: v.qos.limits(),
                    throttled_ns: v.qos.throttled_ns.load(Relaxed),
                    throttled_requests: v.qos.throttled_requests.load(Relaxed),
                }),
            });
        }
        for (s, key) in snaps.iter().zip(&keys) {
            let usage = self.usage(&s.layer);
            samples.push(VolumeSample {
                name: key,
                size: s.size,
                allocated: usage.allocated,
                exclusive: usage.exclusive,
                shared: usage.shared,
                sessions: s.sessions.load(Relaxed),
                metrics: &s.metrics,
                qos: None,
            });
        }
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

    /// A new volume name must not collide with a volume, nor with snapshots left by a deleted
    /// volume of that name (their export names would be ambiguous).
    fn check_new_volume_name(&self, name: &str) -> Result<(), EngineError> {
        validate_name("volume", name)?;
        if let Ok(v) = self.volume(name) {
            return Err(EngineError::AlreadyExists(format!("volume {:?}", v.name)));
        }
        if !self.list_snapshots(Some(name)).is_empty() {
            return Err(EngineError::AlreadyExists(format!(
                "snapshots of a deleted volume {name:?} still exist; delete them or choose another name"
            )));
        }
        Ok(())
    }

    fn new_layer(&self, parent: Option<Arc<Layer>>) -> Result<Arc<Layer>, EngineError> {
        let l = Layer::new(self.take_id(), ExtentMap::default(), parent);
        self.layers.write().map_err(|_| poisoned())?.insert(l.id, l.clone());
        Ok(l)
    }

    fn forget_layers(&self, ids: &[u64]) {
        if let Ok(mut m) = self.layers.write() {
            for id in ids {
                m.remove(id);
            }
        }
    }

    pub async fn create_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<Arc<Volume>, EngineError> {
        self.create_volume_with(name, size, VolumeOptions::default()).await
    }

    pub async fn create_volume_with(
        self: &Arc<Self>,
        name: &str,
        size: u64,
        opts: VolumeOptions,
    ) -> Result<Arc<Volume>, EngineError> {
        Self::check_size(size)?;
        let _admin = self.admin.lock().await;
        self.check_new_volume_name(name)?;
        let top = self.new_layer(None)?;
        let vol = Arc::new(Volume::new(self.take_id(), new_uuid(), name, size, now_unix(), top.clone(), opts));
        let ops =
            vec![MetaOp::PutLayer { id: top.id, parent: None }, MetaOp::PutVolume(vol.record()?), self.next_id_op()];
        if let Err(e) = self.commit(ops, true).await {
            self.forget_layers(&[top.id]);
            return Err(e);
        }
        self.volumes.write().map_err(|_| poisoned())?.insert(name.to_string(), vol.clone());
        tracing::info!(volume = name, size, "volume created");
        Ok(vol)
    }

    /// Grows a volume. New connections see the new size in the handshake; open sessions accept
    /// requests up to the new end as well.
    pub async fn resize_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<Arc<Volume>, EngineError> {
        Self::check_size(size)?;
        let _admin = self.admin.lock().await;
        let vol = self.volume(name)?;
        let old = vol.size();
        if size < old {
            return Err(EngineError::Shrink { volume: name.to_string(), size: old, requested: size });
        }
        if size != old {
            let mut rec = vol.record()?;
            rec.size = size;
            self.commit(vec![MetaOp::PutVolume(rec)], true).await?;
            vol.size.store(size, Relaxed);
            tracing::info!(volume = name, old, size, "volume resized");
        }
        Ok(vol)
    }

    /// Freezes the volume's top layer as the snapshot and gives the volume a new, empty top.
    /// Costs the same for an empty volume and a full one.
    pub async fn create_snapshot(self: &Arc<Self>, volume: &str, name: &str) -> Result<Arc<Snapshot>, EngineError> {
        let mut snaps = self.snapshot_volumes(&[volume.to_string()], name, None).await?;
        snaps.pop().ok_or_else(|| EngineError::Internal("no snapshot made".into()))
    }

    /// A group snapshot: snapshot `name` of every volume in `volumes`, all of one instant.
    /// Every member's requests in flight finish first and new ones wait, so no write lands in
    /// one member's snapshot while an earlier acknowledged write is missing from another's;
    /// all layers commit in one transaction.
    pub async fn create_snapshot_group(
        self: &Arc<Self>,
        name: &str,
        volumes: &[String],
    ) -> Result<Vec<Arc<Snapshot>>, EngineError> {
        if volumes.is_empty() {
            return Err(EngineError::Invalid("a group snapshot needs at least one volume".into()));
        }
        self.snapshot_volumes(volumes, name, Some(name)).await
    }

    /// The members of group snapshot `group`.
    pub fn snapshot_group(&self, group: &str) -> Vec<Arc<Snapshot>> {
        self.list_snapshots(None).into_iter().filter(|s| s.group.as_deref() == Some(group)).collect()
    }

    async fn snapshot_volumes(
        self: &Arc<Self>,
        volumes: &[String],
        name: &str,
        group: Option<&str>,
    ) -> Result<Vec<Arc<Snapshot>>, EngineError> {
        validate_name("snapshot", name)?;
        let _admin = self.admin.lock().await;
        let mut sorted: Vec<&String> = volumes.iter().collect();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != volumes.len() {
            return Err(EngineError::Invalid("a volume is named twice".into()));
        }
        let mut vols = Vec::with_capacity(sorted.len());
        for v in &sorted {
            let key = format!("{v}@{name}");
            if self.snapshot(&key).is_ok() {
                return Err(EngineError::AlreadyExists(format!("snapshot {key:?}")));
            }
            vols.push(self.volume(v)?);
        }
        // Wait for requests in flight on every member (in name order, so two group snapshots
        // never wait for each other); new ones wait for the new tops.
        let mut gates = Vec::with_capacity(vols.len());
        for v in &vols {
            gates.push(v.gate.write().await);
        }
        let created_unix = now_unix();
        let mut ops = Vec::new();
        let mut made = Vec::with_capacity(vols.len());
        for vol in &vols {
            let frozen = vol.top()?;
            let top = self.new_layer(Some(frozen.clone()))?;
            let snap = Arc::new(Snapshot {
                uuid: new_uuid(),
                volume: vol.name.clone(),
                name: name.to_string(),
                layer: frozen.clone(),
                size: vol.size(),
                created_unix,
                group: group.map(str::to_string),
                sessions: AtomicU32::new(0),
                deleting: AtomicBool::new(false),
                metrics: Default::default(),
            });
            let mut rec = vol.record()?;
            rec.layer = top.id;
            ops.push(MetaOp::PutLayer { id: top.id, parent: Some(frozen.id) });
            ops.push(MetaOp::PutVolume(rec));
            ops.push(MetaOp::PutSnapshot(snap.record()));
            made.push((vol.clone(), top, snap));
        }
        ops.push(self.next_id_op());
        if let Err(e) = self.commit(ops, true).await {
            self.forget_layers(&made.iter().map(|(_, top, _)| top.id).collect::<Vec<_>>());
            return Err(e);
        }
        let mut out = Vec::with_capacity(made.len());
        for (vol, top, snap) in made {
            *vol.top.write().map_err(|_| poisoned())? = top;
            self.snapshots.write().map_err(|_| poisoned())?.insert(snap.key(), snap.clone());
            tracing::info!(snapshot = %snap.key(), group, "snapshot created");
            out.push(snap);
        }
        drop(gates);
        Ok(out)
    }

    /// A writable volume from `VOLUME@SNAPSHOT`, or from a volume's current state (which
    /// freezes it into a hidden layer that both then share).
    pub async fn clone_volume(self: &Arc<Self>, source: &str, name: &str) -> Result<Arc<Volume>, EngineError> {
        self.clone_volume_with(source, name, VolumeOptions::default()).await
    }

    pub async fn clone_volume_with(
        self: &Arc<Self>,
        source: &str,
        name: &str,
        opts: VolumeOptions,
    ) -> Result<Arc<Volume>, EngineError> {
        let _admin = self.admin.lock().await;
        self.check_new_volume_name(name)?;
        let mut ops = Vec::new();
        let source_vol = if source.contains('@') { None } else { Some(self.volume(source)?) };
        let _gate = match &source_vol {
            Some(v) => Some(v.gate.write().await),
            None => None,
        };
        let (base, size) = match &source_vol {
            Some(v) => (v.top()?, v.size()),
            None => {
                let snap = self.snapshot(source)?;
                (snap.layer.clone(), snap.size)
            }
        };
        let mut new_layers = Vec::new();
        let src_top = match &source_vol {
            Some(src) => {
                let t = self.new_layer(Some(base.clone()))?;
                new_layers.push(t.id);
                let mut rec = src.record()?;
                rec.layer = t.id;
                ops.push(MetaOp::PutLayer { id: t.id, parent: Some(base.id) });
                ops.push(MetaOp::PutVolume(rec));
                Some(t)
            }
            None => None,
        };
        let top = self.new_layer(Some(base.clone()))?;
        new_layers.push(top.id);
        let vol = Arc::new(Volume::new(self.take_id(), new_uuid(), name, size, now_unix(), top.clone(), opts));
        ops.push(MetaOp::PutLayer { id: top.id, parent: Some(base.id) });
        ops.push(MetaOp::PutVolume(vol.record()?));
        ops.push(self.next_id_op());
        if let Err(e) = self.commit(ops, true).await {
            self.forget_layers(&new_layers);
            return Err(e);
        }
        if let (Some(src), Some(t)) = (&source_vol, src_top) {
            *src.top.write().map_err(|_| poisoned())? = t;
            base.hidden.store(true, Relaxed);
        }
        self.volumes.write().map_err(|_| poisoned())?.insert(name.to_string(), vol.clone());
        tracing::info!(source, volume = name, "clone created");
        Ok(vol)
    }

    /// Changes a volume's QoS limits; open sessions get them with their next request.
    pub async fn set_qos(
        self: &Arc<Self>,
        name: &str,
        limits: crate::meta::qos::QosLimits,
    ) -> Result<Arc<Volume>, EngineError> {
        let _admin = self.admin.lock().await;
        let vol = self.volume(name)?;
        let mut rec = vol.record()?;
        rec.qos = limits;
        self.commit(vec![MetaOp::PutVolume(rec)], true).await?;
        vol.qos.set(limits);
        tracing::info!(volume = name, ?limits, "QoS limits set");
        Ok(vol)
    }

    pub async fn delete_volume(self: &Arc<Self>, name: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        let vol = self.volume(name)?;
        let _gate = vol.gate.write().await;
        let nodes = self.published_nodes(name);
        if !nodes.is_empty() {
            return Err(EngineError::Published { volume: name.to_string(), nodes });
        }
        // Sessions are counted under the same lock by `open_export`: once the volume is marked
        // here with none open, no session can open it any more.
        {
            let _vols = self.volumes.write().map_err(|_| poisoned())?;
            let n = vol.sessions();
            if n > 0 {
                return Err(EngineError::InUse { what: format!("volume {name:?}"), sessions: n });
            }
            vol.deleting.store(true, Relaxed);
        }
        if let Err(e) = self.commit(vec![MetaOp::DeleteVolume(name.to_string())], true).await {
            vol.deleting.store(false, Relaxed);
            return Err(e);
        }
        self.volumes.write().map_err(|_| poisoned())?.remove(name);
        self.release_layer(vol.top()?.id).await?;
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    pub async fn delete_snapshot(self: &Arc<Self>, key: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        let snap = {
            let snaps = self.snapshots.write().map_err(|_| poisoned())?;
            let snap = snaps.get(key).cloned().ok_or_else(|| EngineError::NotFound(format!("snapshot {key:?}")))?;
            let n = snap.sessions.load(Relaxed);
            if n > 0 {
                return Err(EngineError::InUse { what: format!("snapshot {key:?}"), sessions: n });
            }
            snap.deleting.store(true, Relaxed);
            snap
        };
        if let Err(e) = self.commit(vec![MetaOp::DeleteSnapshot(key.to_string())], true).await {
            snap.deleting.store(false, Relaxed);
            return Err(e);
        }
        self.snapshots.write().map_err(|_| poisoned())?.remove(key);
        self.release_layer(snap.layer.id).await?;
        tracing::info!(snapshot = key, "snapshot deleted");
        Ok(())
    }

    /// Who holds `id`: volumes whose top it is, snapshots of it, and child layers.
    fn references(&self, id: u64) -> Result<References, EngineError> {
        let vols: Vec<Arc<Volume>> = self
            .volumes
            .read()
            .map_err(|_| poisoned())?
            .values()
            .filter(|v| v.top().is_ok_and(|t| t.id == id))
            .cloned()
            .collect();
        let snaps = self.snapshots.read().map_err(|_| poisoned())?.values().filter(|s| s.layer.id == id).count();
        let children = children_in(&*self.layers.read().map_err(|_| poisoned())?, id);
        Ok(References { volumes: vols, snapshots: snaps, children })
    }

    /// After a reference to layer `id` went away: a layer nobody holds is deleted and its
    /// clusters freed (then its parent is looked at in turn); a layer only one child layer holds
    /// is merged into that child, freeing the clusters the child overrides.
    async fn release_layer(self: &Arc<Self>, mut id: u64) -> Result<(), EngineError> {
        loop {
            let Some(layer) = self.layers.read().map_err(|_| poisoned())?.get(&id).cloned() else { return Ok(()) };
            let References { volumes: vols, snapshots: snaps, children } = self.references(id)?;
            if vols.is_empty() && snaps == 0 && children.is_empty() {
                let (freed, parent) = {
                    let st = layer.read()?;
                    let freed: Vec<u64> = st.map.iter().map(|(_, p)| p).filter(|p| *p != ZERO_MARK).collect();
                    (freed, st.parent.clone())
                };
                let mut ops: Vec<MetaOp> = freed.iter().map(|p| MetaOp::Free(*p)).collect();
                ops.push(MetaOp::DeleteLayer(id));
                self.commit(ops, true).await?;
                self.forget_layers(&[id]);
                self.release(freed).await?;
                match parent {
                    Some(p) => id = p.id,
                    None => return Ok(()),
                }
            } else if vols.is_empty() && snaps == 0 && children.len() == 1 {
                let child = children[0].clone();
                // A child that is a volume's top changes with writes: hold them off.
                let owner = self
                    .volumes
                    .read()
                    .map_err(|_| poisoned())?
                    .values()
                    .find(|v| v.top().is_ok_and(|t| t.id == child.id))
                    .cloned();
                let _gate = match &owner {
                    Some(v) => Some(v.gate.write().await),
                    None => None,
                };
                let (edits, freed) = {
                    let ls = layer.read()?;
                    let cs = child.read()?;
                    let mut freed = Vec::new();
                    let mut edits = Vec::new();
                    for (v, p) in ls.map.iter() {
                        if cs.map.get(v) != crate::layers::extent_map::Mapping::Hole {
                            if p != ZERO_MARK {
                                freed.push(p);
                            }
                        } else {
                            edits.push(LayerEdit::Map { layer: child.clone(), vcluster: v, pcluster: p });
                        }
                    }
                    edits.push(LayerEdit::Reparent { layer: child.clone(), parent: ls.parent.clone() });
                    (edits, freed)
                };
                let mut extra: Vec<MetaOp> = freed.iter().map(|p| MetaOp::Free(*p)).collect();
                extra.push(MetaOp::DeleteLayer(id));
                self.commit_edits(edits, extra, true).await?;
                self.forget_layers(&[id]);
                self.release(freed).await?;
                return Ok(());
            } else if vols.is_empty() && snaps == 0 {
                // Several children: from now on only they read this layer. What they all
                // override already is freed here; what they override later is freed as they
                // write (`reclaim_overridden`).
                layer.hidden.store(true, Relaxed);
                let _reclaim = self.reclaim.lock().await;
                // Collected first: dead_entries takes the layer's read lock itself, and a second
                // read lock held by the same thread can deadlock behind a waiting writer.
                let all: Vec<u64> = layer.read()?.map.iter().map(|(v, _)| v).collect();
                let dead = dead_entries(&layer, &children, all.into_iter())?;
                if !dead.is_empty() {
                    self.free_dead(&layer, &dead, true).await?;
                }
                return Ok(());
            } else {
                return Ok(());
            }
        }
    }

    /// After a layer whose parent is hidden stopped reading `vclusters` from it (first writes,
    /// zero marks): the parent's clusters there that no other child reads either are freed.
    pub(crate) async fn reclaim_overridden(
        self: &Arc<Self>,
        top: &Arc<Layer>,
        vclusters: &[u64],
    ) -> Result<(), EngineError> {
        let Some(parent) = top.parent()? else { return Ok(()) };
        if !parent.hidden.load(Relaxed) {
            return Ok(());
        }
        let _reclaim = self.reclaim.lock().await;
        // Under the lock: the layer may have been merged away or already freed these.
        let children = {
            let layers = self.layers.read().map_err(|_| poisoned())?;
            if !layers.contains_key(&parent.id) {
                return Ok(());
            }
            children_in(&layers, parent.id)
        };
        let dead = dead_entries(&parent, &children, vclusters.iter().copied())?;
        if !dead.is_empty() {
            self.free_dead(&parent, &dead, false).await?;
        }
        Ok(())
    }

    /// Drops `dead` entries from a hidden layer and frees their clusters: at once after a
    /// durable commit, or with the next one (like a TRIM) after a grouped one.
    async fn free_dead(
        self: &Arc<Self>,
        layer: &Arc<Layer>,
        dead: &[(u64, u64)],
        durable: bool,
    ) -> Result<(), EngineError> {
        let edits = dead.iter().map(|(v, _)| LayerEdit::Unmap { layer: layer.clone(), vcluster: *v }).collect();
        let frees = dead.iter().filter(|(_, p)| *p != ZERO_MARK).map(|(_, p)| MetaOp::Free(*p)).collect();
        self.commit_edits(edits, frees, durable).await?;
        let freed = dead.iter().map(|(_, p)| *p).filter(|p| *p != ZERO_MARK);
        if durable {
            self.release(freed.collect()).await?;
        } else {
            self.alloc()?.free_later(freed);
        }
        Ok(())
    }

    /// Opens `NAME` (read-write volume) or `VOLUME@SNAPSHOT` (read-only) for I/O; the handle
    /// counts as a session until dropped. (The NBD edge parses export names itself.)
    pub fn open_export(self: &Arc<Self>, name: &str) -> Result<LocalVolume, EngineError> {
        match name.split_once('@') {
            Some((volume, snapshot)) => self.open_snapshot(volume, snapshot),
            None => self.open_volume(name),
        }
    }

    /// Opens a volume read-write. The session is counted under the catalog's lock, where
    /// deletes check for sessions.
    pub fn open_volume(self: &Arc<Self>, name: &str) -> Result<LocalVolume, EngineError> {
        let vols = self.volumes.read().map_err(|_| poisoned())?;
        let vol = vols
            .get(name)
            .filter(|v| !v.deleting.load(Relaxed))
            .ok_or_else(|| EngineError::NotFound(format!("volume {name:?}")))?;
        Ok(LocalVolume::volume(self.clone(), vol.clone()))
    }

    /// Opens a snapshot read-only (counted like [`Engine::open_volume`]).
    pub fn open_snapshot(self: &Arc<Self>, volume: &str, snapshot: &str) -> Result<LocalVolume, EngineError> {
        let key = format!("{volume}@{snapshot}");
        let snaps = self.snapshots.read().map_err(|_| poisoned())?;
        let snap = snaps
            .get(&key)
            .filter(|s| !s.deleting.load(Relaxed))
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {key:?}")))?;
        Ok(LocalVolume::snapshot(self.clone(), snap.clone()))
    }

    /// Checks the committed metadata (fsck) and that the in-memory maps agree with it. Call it
    /// with no requests in flight.
    pub fn fsck(&self) -> Result<crate::meta::fsck::Report, EngineError> {
        let loaded = self.store.load()?;
        let mut report = crate::meta::fsck::check(&loaded);
        let layers = self.layers.read().map_err(|_| poisoned())?;
        if layers.len() != loaded.layers.len() {
            report.problems.push(format!("{} layers in memory, {} committed", layers.len(), loaded.layers.len()));
        }
        for rec in &loaded.layers {
            let Some(l) = layers.get(&rec.id) else {
                report.problems.push(format!("layer {} is committed but not in memory", rec.id));
                continue;
            };
            let st = l.read()?;
            let mem: Vec<(u64, u64)> = st.map.iter().collect();
            if mem != rec.extents {
                report.problems.push(format!(
                    "layer {}: {} extents in memory, {} committed, or they differ",
                    rec.id,
                    mem.len(),
                    rec.extents.len()
                ));
            }
            if st.parent.as_ref().map(|p| p.id) != rec.parent {
                report.problems.push(format!("layer {}: parent differs between memory and disk", rec.id));
            }
        }
        let a = self.alloc()?;
        if a.high_water() != loaded.high_water {
            report.problems.push(format!(
                "high-water mark {} in memory, {} committed",
                a.high_water(),
                loaded.high_water
            ));
        }
        Ok(report)
    }

    /// Maps `clusters` virtual clusters of `volume` (every `stride`-th one) to fresh physical
    /// clusters in one commit, without writing data. Only for benchmarks that need a big map
    /// quickly; the clusters read as whatever the pool file holds there.
    #[cfg(feature = "testing")]
    pub async fn populate_for_bench(
        self: &Arc<Self>,
        volume: &str,
        clusters: u64,
        stride: u64,
    ) -> Result<(), EngineError> {
        let vol = self.volume(volume)?;
        let top = vol.top()?;
        let pcs = self.alloc()?.allocate(clusters as usize).ok_or(EngineError::NoSpace)?;
        let edits = pcs
            .iter()
            .enumerate()
            .map(|(i, p)| LayerEdit::Map { layer: top.clone(), vcluster: i as u64 * stride, pcluster: *p })
            .collect();
        self.commit_edits(edits, pcs.iter().map(|p| MetaOp::Claim(*p)).collect(), true).await?;
        Ok(())
    }
}

/// The layers whose parent is `id`.
fn children_in(layers: &BTreeMap<u64, Arc<Layer>>, id: u64) -> Vec<Arc<Layer>> {
    layers.values().filter(|l| l.parent().ok().flatten().is_some_and(|p| p.id == id)).cloned().collect()
}

/// The entries of `layer` among `vclusters` that every child overrides (maps as data or zero),
/// so nobody reads them. Children only add entries while the layer exists, so an entry found
/// dead stays dead.
fn dead_entries(
    layer: &Layer,
    children: &[Arc<Layer>],
    vclusters: impl Iterator<Item = u64>,
) -> Result<Vec<(u64, u64)>, EngineError> {
    let ls = layer.read()?;
    let guards = children.iter().map(|c| c.read()).collect::<Result<Vec<_>, _>>()?;
    Ok(vclusters
        .filter_map(|v| match ls.map.get(v) {
            crate::layers::extent_map::Mapping::Data(p) => Some((v, p)),
            crate::layers::extent_map::Mapping::Zero => Some((v, ZERO_MARK)),
            crate::layers::extent_map::Mapping::Hole => None,
        })
        .filter(|(v, _)| {
            !children.is_empty() && guards.iter().all(|c| c.map.get(*v) != crate::layers::extent_map::Mapping::Hole)
        })
        .collect())
}
