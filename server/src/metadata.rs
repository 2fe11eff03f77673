//! The metadata store (redb): volumes, extent maps and allocator state. Every change is one
//! transaction of [`MetaOp`]s, so a cluster's mapping and the allocator change that produced it
//! land together or not at all.

use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;

const CONFIG: TableDefinition<&str, u64> = TableDefinition::new("config");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// (volume id, virtual cluster) → physical cluster.
const EXTENTS: TableDefinition<(u64, u64), u64> = TableDefinition::new("extents");
/// Physical clusters below the high-water mark that nobody maps.
const FREE: TableDefinition<u64, ()> = TableDefinition::new("free_clusters");

const FORMAT_VERSION: u64 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub created_unix: u64,
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
        volume: u64,
        vcluster: u64,
        pcluster: u64,
    },
    Unmap {
        volume: u64,
        vcluster: u64,
    },
    /// Takes a physical cluster into use: off the free list, and below the high-water mark.
    Claim(u64),
    Free(u64),
    PutVolume(VolumeRecord),
    DeleteVolume {
        name: String,
        id: u64,
    },
    SetCapacity(u64),
}

/// Everything the engine keeps in memory, read once at start.
pub struct Loaded {
    pub config: PoolConfig,
    pub high_water: u64,
    pub free: Vec<u64>,
    pub next_volume_id: u64,
    pub volumes: Vec<(VolumeRecord, Vec<(u64, u64)>)>,
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens the store, creating it with `create` geometry if it is new.
    pub fn open(path: &Path, create: PoolConfig) -> Result<(Store, Loaded), EngineError> {
        let db = Database::create(path)?;
        let store = Store { db };
        let txn = store.db.begin_write()?;
        {
            let mut cfg = txn.open_table(CONFIG)?;
            if cfg.get("format_version")?.is_none() {
                cfg.insert("format_version", FORMAT_VERSION)?;
                cfg.insert("cluster_size", create.cluster_size)?;
                cfg.insert("capacity_clusters", create.capacity_clusters)?;
                cfg.insert("high_water", 0)?;
                cfg.insert("next_volume_id", 1)?;
            }
            let version = cfg.get("format_version")?.map(|v| v.value()).unwrap_or(0);
            if version != FORMAT_VERSION {
                return Err(EngineError::Metadata(format!(
                    "metadata format {version} is not supported (this build reads {FORMAT_VERSION})"
                )));
            }
            txn.open_table(VOLUMES)?;
            txn.open_table(EXTENTS)?;
            txn.open_table(FREE)?;
        }
        txn.commit()?;
        let loaded = store.load()?;
        Ok((store, loaded))
    }

    fn load(&self) -> Result<Loaded, EngineError> {
        let txn = self.db.begin_read()?;
        let cfg = txn.open_table(CONFIG)?;
        let get = |k: &str| -> Result<u64, EngineError> {
            cfg.get(k)?.map(|v| v.value()).ok_or_else(|| EngineError::Metadata(format!("config key {k} missing")))
        };
        let config = PoolConfig { cluster_size: get("cluster_size")?, capacity_clusters: get("capacity_clusters")? };
        let high_water = get("high_water")?;
        let next_volume_id = get("next_volume_id")?;
        let free = txn.open_table(FREE)?.iter()?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<Vec<_>, _>>()?;
        let vols = txn.open_table(VOLUMES)?;
        let extents = txn.open_table(EXTENTS)?;
        let mut volumes = Vec::new();
        for row in vols.iter()? {
            let (_, v) = row?;
            let rec: VolumeRecord =
                serde_json::from_slice(v.value()).map_err(|e| EngineError::Metadata(format!("volume record: {e}")))?;
            let map = extents
                .range((rec.id, 0)..=(rec.id, u64::MAX))?
                .map(|r| r.map(|(k, v)| (k.value().1, v.value())))
                .collect::<Result<Vec<_>, _>>()?;
            volumes.push((rec, map));
        }
        Ok(Loaded { config, high_water, free, next_volume_id, volumes })
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
            let mut extents = txn.open_table(EXTENTS)?;
            let mut free = txn.open_table(FREE)?;
            for op in ops {
                match op {
                    MetaOp::Map { volume, vcluster, pcluster } => {
                        extents.insert((*volume, *vcluster), *pcluster)?;
                    }
                    MetaOp::Unmap { volume, vcluster } => {
                        extents.remove((*volume, *vcluster))?;
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
                        let json = serde_json::to_vec(rec).map_err(|e| EngineError::Internal(e.to_string()))?;
                        vols.insert(rec.name.as_str(), json.as_slice())?;
                        let next = cfg.get("next_volume_id")?.map(|v| v.value()).unwrap_or(1);
                        if rec.id >= next {
                            cfg.insert("next_volume_id", rec.id + 1)?;
                        }
                    }
                    MetaOp::DeleteVolume { name, id } => {
                        vols.remove(name.as_str())?;
                        extents.retain_in((*id, 0)..=(*id, u64::MAX), |_, _| false)?;
                    }
                    MetaOp::SetCapacity(c) => {
                        cfg.insert("capacity_clusters", *c)?;
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
