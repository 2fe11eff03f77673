//! The metadata store (redb): volumes, extent maps and allocator state. Every change is one
//! transaction of [`MetaOp`]s, so a cluster's mapping and the allocator change that produced it
//! land together or not at all.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;

const CONFIG: TableDefinition<&str, u64> = TableDefinition::new("config");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// `VOLUME@SNAPSHOT` → snapshot record.
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Layer id → parent layer id (0: none).
const LAYERS: TableDefinition<u64, u64> = TableDefinition::new("layers");
/// (layer id, virtual cluster) → physical cluster, or `ZERO_MARK`.
const EXTENTS: TableDefinition<(u64, u64), u64> = TableDefinition::new("extents");
/// Physical clusters below the high-water mark that nobody maps.
const FREE: TableDefinition<u64, ()> = TableDefinition::new("free_clusters");
/// `VOLUME\nNODE` → attachment grant record.
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");

const FORMAT_VERSION: u64 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub created_unix: u64,
    /// The volume's writable layer.
    pub layer: u64,
    /// Free-form labels set at creation (the CSI plugin keeps a volume's origin there).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Permission for one node to attach one volume (see design.md, Security).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantRecord {
    pub volume: String,
    pub node: String,
    /// Secret part of the export name the node must ask for.
    pub token: String,
    pub read_only: bool,
    /// No other node may hold a writable grant at the same time.
    pub single_writer: bool,
    pub created_unix: u64,
}

impl GrantRecord {
    pub fn key(&self) -> String {
        grant_key(&self.volume, &self.node)
    }
}

pub fn grant_key(volume: &str, node: &str) -> String {
    format!("{volume}\n{node}")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub volume: String,
    pub name: String,
    /// The frozen layer the snapshot reads.
    pub layer: u64,
    pub size: u64,
    pub created_unix: u64,
}

impl SnapshotRecord {
    pub fn key(&self) -> String {
        format!("{}@{}", self.volume, self.name)
    }
}

/// A layer as stored: id, parent and its extents.
pub struct LayerRecord {
    pub id: u64,
    pub parent: Option<u64>,
    pub extents: Vec<(u64, u64)>,
}

/// Pool geometry fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    pub cluster_size: u64,
    pub capacity_clusters: u64,
}

#[derive(Debug, Clone)]
pub enum MetaOp {
    Map {
        layer: u64,
        vcluster: u64,
        pcluster: u64,
    },
    Unmap {
        layer: u64,
        vcluster: u64,
    },
    /// Takes a physical cluster into use: off the free list, and below the high-water mark.
    Claim(u64),
    Free(u64),
    PutVolume(VolumeRecord),
    DeleteVolume(String),
    PutSnapshot(SnapshotRecord),
    DeleteSnapshot(String),
    PutLayer {
        id: u64,
        parent: Option<u64>,
    },
    /// Removes the layer and its extents (their clusters are freed by separate `Free` ops).
    DeleteLayer(u64),
    SetCapacity(u64),
    /// Volume and layer ids come from one counter.
    SetNextId(u64),
    PutGrant(GrantRecord),
    /// By `grant_key`.
    DeleteGrant(String),
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, EngineError> {
    serde_json::to_vec(v).map_err(|e| EngineError::Internal(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, EngineError> {
    serde_json::from_slice(b).map_err(|e| EngineError::Metadata(format!("{what} record: {e}")))
}

/// Everything the engine keeps in memory, read once at start.
pub struct Loaded {
    pub config: PoolConfig,
    pub high_water: u64,
    pub free: Vec<u64>,
    pub next_id: u64,
    pub volumes: Vec<VolumeRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    pub layers: Vec<LayerRecord>,
    /// Extent rows whose layer does not exist (a leak if nonzero).
    pub orphan_extents: u64,
    pub grants: Vec<GrantRecord>,
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens the store, creating it with `create` geometry if it is new.
    pub fn open(path: &Path, create: PoolConfig) -> Result<(Store, Loaded), EngineError> {
        Self::on(Database::create(path)?, create)
    }

    /// Opens the store on any redb database (tests use fault-injecting backends).
    pub fn on(db: Database, create: PoolConfig) -> Result<(Store, Loaded), EngineError> {
        let store = Store { db };
        let txn = store.db.begin_write()?;
        {
            let mut cfg = txn.open_table(CONFIG)?;
            if cfg.get("format_version")?.is_none() {
                cfg.insert("format_version", FORMAT_VERSION)?;
                cfg.insert("cluster_size", create.cluster_size)?;
                cfg.insert("capacity_clusters", create.capacity_clusters)?;
                cfg.insert("high_water", 0)?;
                cfg.insert("next_id", 1)?;
            }
            let version = cfg.get("format_version")?.map(|v| v.value()).unwrap_or(0);
            if version != FORMAT_VERSION {
                return Err(EngineError::Metadata(format!(
                    "metadata format {version} is not supported (this build reads {FORMAT_VERSION})"
                )));
            }
            txn.open_table(VOLUMES)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(LAYERS)?;
            txn.open_table(EXTENTS)?;
            txn.open_table(FREE)?;
            txn.open_table(GRANTS)?;
        }
        txn.commit()?;
        let loaded = store.load()?;
        Ok((store, loaded))
    }

    /// Opens an existing store without creating anything (fsck).
    pub fn open_existing(path: &Path) -> Result<(Store, Loaded), EngineError> {
        if !path.exists() {
            return Err(EngineError::NotFound(format!("metadata file {}", path.display())));
        }
        let store = Store { db: Database::open(path)? };
        let loaded = store.load()?;
        Ok((store, loaded))
    }

    pub fn load(&self) -> Result<Loaded, EngineError> {
        let txn = self.db.begin_read()?;
        let cfg = txn.open_table(CONFIG)?;
        let get = |k: &str| -> Result<u64, EngineError> {
            cfg.get(k)?.map(|v| v.value()).ok_or_else(|| EngineError::Metadata(format!("config key {k} missing")))
        };
        let config = PoolConfig { cluster_size: get("cluster_size")?, capacity_clusters: get("capacity_clusters")? };
        let high_water = get("high_water")?;
        let next_id = get("next_id")?;
        let free = txn.open_table(FREE)?.iter()?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<Vec<_>, _>>()?;
        let mut volumes = Vec::new();
        for row in txn.open_table(VOLUMES)?.iter()? {
            let (_, v) = row?;
            volumes.push(from_json::<VolumeRecord>("volume", v.value())?);
        }
        let mut snapshots = Vec::new();
        for row in txn.open_table(SNAPSHOTS)?.iter()? {
            let (_, v) = row?;
            snapshots.push(from_json::<SnapshotRecord>("snapshot", v.value())?);
        }
        let mut grants = Vec::new();
        // Pools made before grants existed have no table (fsck opens them read-only).
        match txn.open_table(GRANTS) {
            Ok(t) => {
                for row in t.iter()? {
                    let (_, v) = row?;
                    grants.push(from_json::<GrantRecord>("grant", v.value())?);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let mut by_layer: std::collections::BTreeMap<u64, Vec<(u64, u64)>> = Default::default();
        for row in txn.open_table(EXTENTS)?.iter()? {
            let (k, v) = row?;
            let (layer, vc) = k.value();
            by_layer.entry(layer).or_default().push((vc, v.value()));
        }
        let mut layers = Vec::new();
        for row in txn.open_table(LAYERS)?.iter()? {
            let (k, v) = row?;
            let id = k.value();
            let parent = Some(v.value()).filter(|p| *p != 0);
            let extents = by_layer.remove(&id).unwrap_or_default();
            layers.push(LayerRecord { id, parent, extents });
        }
        let orphan_extents = by_layer.values().map(|v| v.len() as u64).sum();
        Ok(Loaded { config, high_water, free, next_id, volumes, snapshots, layers, orphan_extents, grants })
    }

    /// Applies `ops` in one transaction. `before_durable_commit` runs inside the transaction,
    /// holding redb's writer lock, only for durable commits: the engine syncs the pool there, so
    /// every mapping a durable commit makes permanent points at data that is already on disk.
    pub fn commit(
        &self,
        ops: &[MetaOp],
        durable: bool,
        before_durable_commit: impl FnOnce() -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(if durable { Durability::Immediate } else { Durability::None })
            .map_err(|e| EngineError::Metadata(e.to_string()))?;
        {
            let mut cfg = txn.open_table(CONFIG)?;
            let mut vols = txn.open_table(VOLUMES)?;
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut layers = txn.open_table(LAYERS)?;
            let mut extents = txn.open_table(EXTENTS)?;
            let mut free = txn.open_table(FREE)?;
            let mut grants = txn.open_table(GRANTS)?;
            for op in ops {
                match op {
                    MetaOp::Map { layer, vcluster, pcluster } => {
                        extents.insert((*layer, *vcluster), *pcluster)?;
                    }
                    MetaOp::Unmap { layer, vcluster } => {
                        extents.remove((*layer, *vcluster))?;
                    }
                    MetaOp::Claim(p) => {
                        free.remove(*p)?;
                        let hw = cfg.get("high_water")?.map(|v| v.value()).unwrap_or(0);
                        if *p >= hw {
                            cfg.insert("high_water", *p + 1)?;
                        }
                    }
                    MetaOp::Free(p) => {
                        free.insert(*p, ())?;
                    }
                    MetaOp::PutVolume(rec) => {
                        vols.insert(rec.name.as_str(), to_json(rec)?.as_slice())?;
                    }
                    MetaOp::DeleteVolume(name) => {
                        vols.remove(name.as_str())?;
                    }
                    MetaOp::PutSnapshot(rec) => {
                        snaps.insert(rec.key().as_str(), to_json(rec)?.as_slice())?;
                    }
                    MetaOp::DeleteSnapshot(key) => {
                        snaps.remove(key.as_str())?;
                    }
                    MetaOp::PutLayer { id, parent } => {
                        layers.insert(*id, parent.unwrap_or(0))?;
                    }
                    MetaOp::DeleteLayer(id) => {
                        layers.remove(*id)?;
                        extents.retain_in((*id, 0)..=(*id, u64::MAX), |_, _| false)?;
                    }
                    MetaOp::SetCapacity(c) => {
                        cfg.insert("capacity_clusters", *c)?;
                    }
                    MetaOp::SetNextId(n) => {
                        cfg.insert("next_id", *n)?;
                    }
                    MetaOp::PutGrant(rec) => {
                        grants.insert(rec.key().as_str(), to_json(rec)?.as_slice())?;
                    }
                    MetaOp::DeleteGrant(key) => {
                        grants.remove(key.as_str())?;
                    }
                }
            }
        }
        if durable {
            before_durable_commit()?;
        }
        txn.commit()?;
        Ok(())
    }
}
