//! The named heads of the layer graph: a volume is a writable top layer with a name, a
//! snapshot a frozen layer with one. Both carry what their open sessions share (counters,
//! metrics, QoS, the volume's write gate).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{EngineError, poisoned};
use crate::layers::layer::Layer;
use crate::meta::store::{SnapshotRecord, VolumeRecord};
use crate::metrics::VolumeMetrics;

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
    /// The highest target epoch promised (persisted in the record; see `crate::epochs`).
    epoch: AtomicU64,
}

/// What a new volume is created with besides its name and size.
#[derive(Debug, Clone, Default)]
pub struct VolumeOptions {
    /// Free-form labels (the CSI plugin keeps a volume's origin there).
    pub labels: BTreeMap<String, String>,
    pub qos: crate::meta::qos::QosLimits,
    /// The UUID to give it (the cluster chose it when placing the volume); `None`: a new one.
    pub uuid: Option<String>,
    /// The highest target epoch promised so far (from the record; 0 for a new volume).
    pub epoch: u64,
}

impl Volume {
    pub fn new(
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
            epoch: AtomicU64::new(opts.epoch),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Relaxed)
    }

    /// After the record with the new epoch is committed.
    pub(crate) fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Relaxed);
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

    /// A new top layer (snapshot, clone of the live volume); callers hold the write gate.
    pub(crate) fn set_top(&self, top: Arc<Layer>) -> Result<(), EngineError> {
        *self.top.write().map_err(|_| poisoned())? = top;
        Ok(())
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
            epoch: self.epoch(),
        })
    }
}

/// A snapshot: a frozen layer, readable as `VOLUME@SNAPSHOT`.
pub struct Snapshot {
    /// Unique across pools.
    pub uuid: String,
    pub volume: String,
    /// The UUID of the volume it was taken of.
    pub volume_uuid: String,
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
    pub fn new(
        uuid: String,
        volume: (&str, &str),
        name: &str,
        layer: Arc<Layer>,
        size: u64,
        created_unix: u64,
        group: Option<String>,
    ) -> Snapshot {
        Snapshot {
            uuid,
            volume: volume.0.to_string(),
            volume_uuid: volume.1.to_string(),
            name: name.to_string(),
            layer,
            size,
            created_unix,
            group,
            sessions: AtomicU32::new(0),
            deleting: AtomicBool::new(false),
            metrics: Default::default(),
        }
    }

    pub(crate) fn record(&self) -> SnapshotRecord {
        SnapshotRecord {
            volume: self.volume.clone(),
            name: self.name.clone(),
            layer: self.layer.id,
            size: self.size,
            created_unix: self.created_unix,
            group: self.group.clone(),
            uuid: self.uuid.clone(),
            volume_uuid: self.volume_uuid.clone(),
        }
    }

    pub fn key(&self) -> String {
        format!("{}@{}", self.volume, self.name)
    }
}
