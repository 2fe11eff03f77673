//! The engine: the façade the API, the CLI and the NBD edge use. It opens a data dir (checks,
//! metadata, pool), builds [`Space`] and the [`LayerGraph`] over it, and runs admin operations
//! (`admin`), grants (`publish`), changed-block queries (`changes`) and the store's resync view
//! (`recovery`). Admin operations are serialized and commit durably; data operations go from an
//! opened [`LocalVolume`] to the graph and space directly, commit their mapping changes
//! non-durably and rely on FLUSH/FUA for durability.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

pub mod admin;
pub mod changes;
pub mod publish;
pub mod recovery;

use crate::error::{EngineError, poisoned};
use crate::layers::graph::LayerGraph;
use crate::meta::store::{MetaOp, PoolConfig, Store};
use crate::metrics::{PoolSample, VolumeSample};
use crate::space::Space;
use crate::space::allocator::Allocator;
use crate::space::pool::Pool;

pub use crate::io::LocalVolume;
pub use crate::layers::graph::Usage;
pub use crate::layers::heads::{Snapshot, Volume, VolumeOptions};

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

/// The façade the API, the CLI and the NBD edge talk to: admin operations (serialized),
/// lookups, attachment grants, checks. Data moves through [`LocalVolume`], which talks to the
/// layer graph and space directly.
pub struct Engine {
    pub(crate) space: Arc<Space>,
    pub(crate) graph: Arc<LayerGraph>,
    /// Attachment grants by `grant_key`.
    pub(crate) grants: crate::grants::Grants,
    /// Target epochs promised for the volumes held here, and their sessions.
    pub(crate) epochs: crate::epochs::Epochs,
    /// Nodes registered to be published to, by name.
    pub(crate) nodes: std::sync::RwLock<std::collections::BTreeMap<String, crate::meta::store::NodeRegistration>>,
    /// Serializes admin operations so their checks and commits do not interleave.
    pub(crate) admin: tokio::sync::Mutex<()>,
    data_dir: PathBuf,
}

/// Names become NBD export names and CLI arguments: keep them plain. `@` separates a volume
/// from its snapshot.
/// Marks are snapshots named with a leading '.', which no user name can have.
pub fn is_mark(name: &str) -> bool {
    name.starts_with('.')
}

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
        let geometry = crate::space::pool::Geometry { capacity_clusters, ..crate::space::pool::Geometry::of(&loaded) };
        if geometry.superblock.is_none() {
            tracing::warn!("the pool has no superblock (created by an older thinbd): swapped files go unnoticed");
        }
        let pool = pool(&geometry)?;
        let opened = crate::space::open_journal(&store, &pool, loaded, capacity_clusters)?;
        if !cfg.force {
            // The cheap part of fsck: maps, allocator and layers agree (no pool data is read).
            let report = crate::meta::fsck::check(&opened.loaded);
            if !report.ok() {
                return Err(EngineError::Metadata(format!(
                    "the consistency check failed; run `thinbd fsck`, or start with --force to serve anyway:\n{report}"
                )));
            }
        }
        Self::assemble(store, pool, opened, capacity_clusters, cfg.data_dir.clone())
    }

    /// Builds the engine from loaded metadata (journal replayed) and an opened pool.
    fn assemble(
        store: Store,
        pool: Pool,
        opened: crate::space::Opened,
        capacity_clusters: u64,
        data_dir: PathBuf,
    ) -> Result<Arc<Engine>, EngineError> {
        let crate::space::Opened { loaded, journal, zeroed_from } = opened;
        let cs = loaded.config.cluster_size;
        let mut alloc = Allocator::new(loaded.free, loaded.high_water, capacity_clusters);
        alloc.set_zeroed_from(zeroed_from);
        let space = Space::new(store, pool, cs, alloc, journal)?;
        let (graph, upgraded) =
            LayerGraph::load(space.clone(), loaded.layers, loaded.volumes, loaded.snapshots, loaded.next_id)?;
        if !upgraded.is_empty() {
            space.store().commit(&upgraded, true, || Ok(()))?;
        }
        let engine = Arc::new(Engine {
            space,
            graph: Arc::new(graph),
            grants: crate::grants::Grants::load(loaded.grants),
            epochs: Default::default(),
            nodes: std::sync::RwLock::new(loaded.nodes.into_iter().map(|n| (n.name.clone(), n)).collect()),
            admin: Default::default(),
            data_dir,
        });
        let view: std::sync::Weak<dyn crate::space::Resync> = Arc::downgrade(&engine) as _;
        engine.space.set_resync(view);
        Ok(engine)
    }

    pub fn io_engine(&self) -> crate::space::backend::IoEngine {
        self.space.pool.engine()
    }

    pub fn direct_io(&self) -> bool {
        self.space.pool.direct()
    }

    /// Bytes per direct I/O unit of the pool (writes finer than this read around them).
    pub fn io_unit(&self) -> u64 {
        self.space.pool.alignment()
    }

    /// 4 KiB blocks in the pool's journal region (4,095 in pools made now, 255 in format 2
    /// pools, 0 in format 1 pools, which have none).
    pub fn journal_blocks(&self) -> u64 {
        self.space.pool.journal_region().map_or(0, |(_, len)| len / crate::space::journal::BLOCK as u64)
    }

    /// Makes every completed write durable (NBD FLUSH; covers all connections).
    pub async fn flush(&self) -> Result<(), EngineError> {
        self.space.flush().await
    }

    /// Makes every completed write durable in the metadata store itself, not only in the
    /// journal: at a clean stop, so that offline tools (fsck) see every mapping.
    pub async fn checkpoint(&self) -> Result<(), EngineError> {
        self.space.commit(Vec::new(), true).await
    }

    pub fn volume(&self, name: &str) -> Result<Arc<Volume>, EngineError> {
        self.graph.volume(name)
    }

    /// A volume by name, or else by UUID (for lookups; operations take names).
    pub fn find_volume(&self, name_or_uuid: &str) -> Result<Arc<Volume>, EngineError> {
        self.graph.find_volume(name_or_uuid)
    }

    pub fn snapshot(&self, key: &str) -> Result<Arc<Snapshot>, EngineError> {
        self.graph.snapshot(key)
    }

    /// The name (`VOLUME` or `VOLUME@SNAPSHOT`) of what `reference` names: itself when it is a
    /// name, else the volume or snapshot with that UUID; unknown references come back as they
    /// are, so the operation they go to answers NotFound in its own words. The API takes UUIDs
    /// wherever it takes names this way.
    pub fn resolve(&self, reference: &str) -> String {
        let known = |r: &str| if r.contains('@') { self.snapshot(r).is_ok() } else { self.volume(r).is_ok() };
        if reference.is_empty() || known(reference) {
            return reference.to_string();
        }
        if let Some(v) = self.list().into_iter().find(|v| v.uuid == reference) {
            return v.name.clone();
        }
        match self.list_snapshots(None).into_iter().find(|s| s.uuid == reference) {
            Some(s) => s.key(),
            None => reference.to_string(),
        }
    }

    pub fn info(&self, v: &Volume) -> VolumeInfo {
        let usage = v.top().map(|t| self.graph.usage(&t)).unwrap_or_default();
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
            usage: self.graph.usage(&s.layer),
            created_unix: s.created_unix,
            sessions: s.sessions.load(Relaxed),
        }
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.graph.list()
    }

    /// The snapshots users see: not the hidden marks replication keeps (see
    /// [`Engine::create_mark`]).
    pub fn list_snapshots(&self, volume: Option<&str>) -> Vec<Arc<Snapshot>> {
        self.graph.list_snapshots(volume).into_iter().filter(|s| !is_mark(&s.name)).collect()
    }

    pub fn pool_info(&self) -> PoolInfo {
        let (capacity, used) = self.space.alloc().map(|a| (a.capacity(), a.used())).unwrap_or((0, 0));
        PoolInfo {
            capacity: capacity * self.space.cs,
            used: used * self.space.cs,
            cluster_size: self.space.cs,
            volumes: self.graph.volumes.read().map(|m| m.len()).unwrap_or(0),
            snapshots: self.graph.snapshots.read().map(|m| m.len()).unwrap_or(0),
            data_dir: self.data_dir.clone(),
        }
    }

    /// Why this node should not be sent new work, if it should not: the metadata store failed
    /// (a full or failing disk under the data dir) and every commit is refused until it
    /// recovers.
    pub fn not_ready(&self) -> Option<String> {
        self.space.store().failed().then(|| "the metadata store failed (full or failing disk?); recovering".to_string())
    }

    /// The metrics page's pool, volume and disk series.
    pub fn encode_metrics(&self, enc: &mut crate::metrics::DescriptorEncoder<'_>) -> std::fmt::Result {
        let p = self.pool_info();
        let vols = self.list();
        let snaps = self.list_snapshots(None);
        let keys: Vec<String> = snaps.iter().map(|s| s.key()).collect();
        let mut samples: Vec<VolumeSample<'_>> = Vec::with_capacity(vols.len() + snaps.len());
        for v in &vols {
            let usage = v.top().map(|t| self.graph.usage(&t)).unwrap_or_default();
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
            let usage = self.graph.usage(&s.layer);
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
        crate::metrics::encode_volumes(
            enc,
            &PoolSample { capacity: p.capacity, used: p.used, cluster_size: p.cluster_size },
            &samples,
        )?;
        let store = self.space.store();
        crate::metrics::encode_disk(
            enc,
            &self.space.pool.sync_latency,
            &store.commit_latency,
            &store.durable_commit_latency,
        )
    }

    /// Durable metadata commits so far (tests: journal checkpoints).
    #[cfg(any(test, feature = "testing"))]
    pub fn durable_commits(&self) -> u64 {
        self.space.store().durable_commit_latency.count()
    }

    /// Tests' shorthand: opens `NAME` (read-write volume) or `VOLUME@SNAPSHOT` (read-only); the
    /// handle counts as a session until dropped. The product parses export names once, at the
    /// NBD edge (`nbd::export_name`), and calls [`Engine::open_volume`] / [`Engine::open_snapshot`].
    #[cfg(any(test, feature = "testing"))]
    pub fn open_export(self: &Arc<Self>, name: &str) -> Result<LocalVolume, EngineError> {
        match name.split_once('@') {
            Some((volume, snapshot)) => self.open_snapshot(volume, snapshot),
            None => self.open_volume(name),
        }
    }

    /// Opens a volume read-write. The session is counted under the catalog's lock, where
    /// deletes check for sessions.
    pub fn open_volume(self: &Arc<Self>, name: &str) -> Result<LocalVolume, EngineError> {
        let vols = self.graph.volumes.read().map_err(|_| poisoned())?;
        let vol = vols
            .get(name)
            .filter(|v| !v.deleting.load(Relaxed))
            .ok_or_else(|| EngineError::NotFound(format!("volume {name:?}")))?;
        Ok(LocalVolume::volume(self.graph.clone(), vol.clone()))
    }

    /// Opens a snapshot read-only (counted like [`Engine::open_volume`]).
    pub fn open_snapshot(self: &Arc<Self>, volume: &str, snapshot: &str) -> Result<LocalVolume, EngineError> {
        let key = format!("{volume}@{snapshot}");
        let snaps = self.graph.snapshots.read().map_err(|_| poisoned())?;
        let snap = snaps
            .get(&key)
            .filter(|s| !s.deleting.load(Relaxed))
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {key:?}")))?;
        Ok(LocalVolume::snapshot(self.graph.clone(), snap.clone()))
    }

    /// Checks the committed metadata (fsck) and that the in-memory maps agree with it. Call it
    /// with no requests in flight.
    pub fn fsck(&self) -> Result<crate::meta::fsck::Report, EngineError> {
        self.space.settle()?;
        let loaded = self.space.store().load()?;
        let mut report = crate::meta::fsck::check(&loaded);
        let layers = self.graph.layers()?;
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
        let a = self.space.alloc()?;
        if a.high_water() != loaded.high_water {
            report.problems.push(format!(
                "high-water mark {} in memory, {} committed",
                a.high_water(),
                loaded.high_water
            ));
        }
        Ok(report)
    }

    /// See [`LayerGraph::populate_for_bench`].
    #[cfg(feature = "testing")]
    pub async fn populate_for_bench(&self, volume: &str, clusters: u64, stride: u64) -> Result<(), EngineError> {
        self.graph.populate_for_bench(volume, clusters, stride).await
    }
}
