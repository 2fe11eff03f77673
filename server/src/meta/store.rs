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
/// The physical cluster an extent row holds for a zero mark: the cluster reads as zeros and
/// hides its parent's data.
pub const ZERO_MARK: u64 = u64::MAX;

/// `VOLUME\nNODE` → attachment grant record.
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");

/// The pool format new pools get. Formats 2 and 3 start with a superblock and keep data from
/// `superblock::data_offset` (1 MiB and 16 MiB: the journal region between them grew);
/// format 1 pools (no superblock, data from offset 0) are still opened. A pool keeps the
/// format it was created with.
pub const FORMAT_VERSION: u64 = 3;
const OLDEST_FORMAT: u64 = 1;

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
    /// IOPS and bandwidth limits (none when absent).
    #[serde(default, skip_serializing_if = "crate::meta::qos::QosLimits::is_unlimited")]
    pub qos: crate::meta::qos::QosLimits,
    /// Unique across pools (and, later, the cluster); names are labels. Empty only in records
    /// written before UUIDs existed, which get one when loaded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    /// The highest target epoch this node promised for the volume (0: none). A target whose
    /// epoch is older is refused, so a stale target can never write (see `epochs`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
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

/// A node that may be published to (single-node mode: the CSI node plugin registers its node
/// through the management API; CSI publishing to a node never registered is NOT_FOUND).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRegistration {
    pub name: String,
    pub registered_unix: u64,
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
    /// The group snapshot it belongs to (taken together with its other members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// As `VolumeRecord::uuid`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    /// The UUID of the volume it was taken of (which may since have been deleted).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub volume_uuid: String,
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
    /// Only when the engine writes its whole view back (recovery); `Claim` raises it otherwise.
    SetHighWater(u64),
    PutGrant(GrantRecord),
    /// By `grant_key`.
    DeleteGrant(String),
    PutNode(NodeRegistration),
    /// The last journal sequence this commit's state includes (durable commits only): replay
    /// at start applies the journal's records after it.
    SetJournaled(u64),
}

/// A sum over every row of every table (config's `digest` row aside) of a 64-bit hash of the
/// row. Commits keep it current row by row; a full load recomputes it. redb does not checksum
/// its pages, so this is what catches a flipped bit that still parses: a changed key or value,
/// a lost or an extra row.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Digest(u64);

const DIGEST_KEY: &str = "digest";
const JOURNALED_KEY: &str = "journaled";

impl Digest {
    /// FNV-1a over the table name and the length-prefixed key and value, then a final mix
    /// (splitmix64) so that sums of hashes of similar rows do not cancel.
    fn row(table: &str, key: &[u8], value: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
                h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(table.as_bytes());
        eat(key);
        eat(value);
        let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn add(&mut self, table: &str, key: &[u8], value: &[u8]) {
        self.0 = self.0.wrapping_add(Self::row(table, key, value));
    }

    fn sub(&mut self, table: &str, key: &[u8], value: &[u8]) {
        self.0 = self.0.wrapping_sub(Self::row(table, key, value));
    }

    /// A row replaced (`old`) or added.
    fn swap(&mut self, table: &str, key: &[u8], old: Option<&[u8]>, new: &[u8]) {
        if let Some(old) = old {
            self.sub(table, key, old);
        }
        self.add(table, key, new);
    }
}

fn damaged() -> EngineError {
    EngineError::Metadata(
        "the metadata file is damaged: its rows do not match their checksum (a changed, lost or extra row)".into(),
    )
}

fn le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_le_bytes());
    k[8..].copy_from_slice(&b.to_le_bytes());
    k
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
    pub format: u64,
    /// Recorded in the pool's superblock too (formats 2 and up).
    pub pool_uuid: Option<u128>,
    /// The store was created by this open.
    pub created: bool,
    pub high_water: u64,
    pub free: Vec<u64>,
    pub next_id: u64,
    pub volumes: Vec<VolumeRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    pub layers: Vec<LayerRecord>,
    /// Extent rows whose layer does not exist (a leak if nonzero).
    pub orphan_extents: u64,
    pub grants: Vec<GrantRecord>,
    pub nodes: Vec<NodeRegistration>,
    /// The last journal sequence the store holds (0: none yet).
    pub journaled: u64,
}

/// Opens the database file again after an I/O error (redb must be closed and reopened).
pub type Reopen = Box<dyn Fn() -> Result<Database, EngineError> + Send + Sync>;

pub struct Store {
    /// `None` only between closing a failed database and opening it again.
    db: std::sync::RwLock<Option<Database>>,
    reopen: Option<Reopen>,
    /// Set by an I/O error in a commit; redb refuses everything after one until reopened.
    failed: std::sync::atomic::AtomicBool,
    /// What the I/O error was (ENOSPC, EIO…): later commits report the same cause.
    cause: std::sync::Mutex<Option<std::io::ErrorKind>>,
    /// How long commits took, folded in memory and durable (`thinbd_meta_commit_duration_seconds`).
    pub commit_latency: crate::metrics::Histogram,
    pub durable_commit_latency: crate::metrics::Histogram,
}

/// Runs `f`, turning a panic inside redb (it panics on some damaged pages instead of returning
/// an error) into an error: damaged metadata must stop a start, not crash it.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    thread_local!(static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    // The panic becomes an error here: keep the default hook from printing it as a crash.
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
    GUARDED.with(|g| g.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(false));
    match r {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(EngineError::Metadata(format!("{what}: the metadata file is damaged (redb failed: {msg})")))
        }
    }
}

impl Store {
    fn new(db: Database, reopen: Option<Reopen>) -> Store {
        Store {
            db: std::sync::RwLock::new(Some(db)),
            reopen,
            failed: Default::default(),
            cause: Default::default(),
            commit_latency: Default::default(),
            durable_commit_latency: Default::default(),
        }
    }

    /// Runs `f` on the open database.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, EngineError>) -> Result<T, EngineError> {
        let db = self.db.read().map_err(|_| EngineError::Internal("metadata store lock poisoned".into()))?;
        match db.as_ref() {
            Some(db) => f(db),
            None => Err(self.failure()),
        }
    }

    /// Whether an I/O error left the store unusable until [`Store::reopen`].
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The error every commit gets while the store is failed.
    pub fn failure(&self) -> EngineError {
        let kind = self.cause.lock().ok().and_then(|c| *c).unwrap_or(std::io::ErrorKind::Other);
        EngineError::MetadataIo(std::io::Error::new(kind, "the metadata store hit an I/O error and is being reopened"))
    }

    /// Closes the failed database and opens it again, returning what is on disk now (the last
    /// commit that made it there). The caller then writes its view back with [`Store::rewrite`].
    pub fn reopen(&self) -> Result<Loaded, EngineError> {
        let reopen = self.reopen.as_ref().ok_or_else(|| self.failure())?;
        let mut db = self.db.write().map_err(|_| EngineError::Internal("metadata store lock poisoned".into()))?;
        if let Some(old) = db.take() {
            // redb may panic closing a database that failed mid-commit; it is gone either way.
            let _ = guarded("closing the failed metadata store", || {
                drop(old);
                Ok(())
            });
        }
        *db = Some(guarded("reopening the metadata", reopen)?);
        drop(db);
        let (loaded, _, _) = self.load_unverified()?;
        Ok(loaded)
    }

    /// Commits the caller's view after [`Store::reopen`], durably; the store is usable again
    /// once it succeeds.
    pub fn rewrite(
        &self,
        ops: &[MetaOp],
        before_durable_commit: impl FnOnce() -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        self.with_db(|db| apply(db, ops, true, before_durable_commit)).map_err(|e| self.note(e))?;
        self.failed.store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Notes an I/O error from redb: the store is unusable until reopened.
    fn note(&self, e: EngineError) -> EngineError {
        match e {
            EngineError::MetadataIo(io) => {
                if let Ok(mut c) = self.cause.lock()
                    && (io.kind() != std::io::ErrorKind::Other || c.is_none())
                {
                    *c = Some(io.kind());
                }
                if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    tracing::error!(error = %io, "metadata store I/O error: commits fail until it is reopened");
                }
                self.failure()
            }
            e => e,
        }
    }

    /// Opens the store, creating it with `create` geometry if it is new.
    pub fn open(path: &Path, create: PoolConfig) -> Result<(Store, Loaded), EngineError> {
        let path = path.to_path_buf();
        guarded("opening the metadata", || {
            let db = Database::create(&path)?;
            Self::on(db, Some(Box::new(move || Ok(Database::create(&path)?))), create)
        })
    }

    /// Opens the store on any redb database (tests use fault-injecting backends); `reopen`
    /// opens it again after an I/O error.
    pub fn on(db: Database, reopen: Option<Reopen>, create: PoolConfig) -> Result<(Store, Loaded), EngineError> {
        let store = Store::new(db, reopen);
        let created = store.with_db(|db| init_tables(db, create, FORMAT_VERSION))?;
        let (mut loaded, stored, computed) = store.load_unverified()?;
        match stored {
            Some(d) if d != computed => return Err(damaged()),
            Some(_) => {}
            // New, or written before digests existed: start keeping one.
            None => store.with_db(|db| {
                let txn = db.begin_write()?;
                txn.open_table(CONFIG)?.insert(DIGEST_KEY, computed)?;
                txn.commit()?;
                Ok(())
            })?,
        }
        loaded.created = created;
        Ok((store, loaded))
    }

    /// Opens an existing store without creating anything (fsck).
    pub fn open_existing(path: &Path) -> Result<(Store, Loaded), EngineError> {
        if !path.exists() {
            return Err(EngineError::NotFound(format!("metadata file {}", path.display())));
        }
        guarded("reading the metadata", || {
            let store = Store::new(Database::open(path)?, None);
            let loaded = store.load()?;
            Ok((store, loaded))
        })
    }
}

impl Drop for Store {
    /// redb may panic closing a damaged database (it tidies its allocator on close): a damaged
    /// file must end in an error at most, never a crash of the process closing it.
    fn drop(&mut self) {
        let db = self.db.get_mut().ok().and_then(Option::take);
        if let Some(db) = db {
            let _ = guarded("closing the metadata", || {
                drop(db);
                Ok(())
            });
        }
    }
}

/// The JSON records of a table keyed by name, added to `digest` as `table`; none when the table
/// does not exist.
fn read_records<T: serde::de::DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
    table: &str,
    what: &str,
    digest: &mut Digest,
) -> Result<Vec<T>, EngineError> {
    let t = match txn.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        digest.add(table, k.value().as_bytes(), v.value());
        out.push(from_json::<T>(what, v.value())?);
    }
    Ok(out)
}

/// Creates the store of a new pool of an earlier `format` (which [`Store::on`] then opens as it
/// would one made by that release): tests of what older pools still do.
#[cfg(any(test, feature = "testing"))]
pub fn create_with_format(db: &Database, create: PoolConfig, format: u64) -> Result<(), EngineError> {
    init_tables(db, create, format).map(|_| ())
}

/// Creates the tables (and the config of a new pool of `format`); true if the pool is new.
fn init_tables(db: &Database, create: PoolConfig, format: u64) -> Result<bool, EngineError> {
    let txn = db.begin_write()?;
    let mut created = false;
    {
        {
            let mut cfg = txn.open_table(CONFIG)?;
            if cfg.get("format_version")?.is_none() {
                created = true;
                let uuid = crate::meta::uuid::new_uuid();
                cfg.insert("pool_uuid_hi", (uuid >> 64) as u64)?;
                cfg.insert("pool_uuid_lo", uuid as u64)?;
                cfg.insert("format_version", format)?;
                cfg.insert("cluster_size", create.cluster_size)?;
                cfg.insert("capacity_clusters", create.capacity_clusters)?;
                cfg.insert("high_water", 0)?;
                cfg.insert("next_id", 1)?;
            }
            let version = cfg.get("format_version")?.map(|v| v.value()).unwrap_or(0);
            if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&version) {
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
            txn.open_table(NODES)?;
        }
    }
    txn.commit()?;
    Ok(created)
}

impl Store {
    /// Reads everything and checks it against the stored digest.
    pub fn load(&self) -> Result<Loaded, EngineError> {
        let (loaded, stored, computed) = self.load_unverified()?;
        match stored {
            Some(d) if d != computed => Err(damaged()),
            _ => Ok(loaded),
        }
    }

    /// Everything, the stored digest (if any) and the digest of what was read.
    fn load_unverified(&self) -> Result<(Loaded, Option<u64>, u64), EngineError> {
        self.with_db(load_from)
    }
}

fn load_from(db: &Database) -> Result<(Loaded, Option<u64>, u64), EngineError> {
    {
        let mut digest = Digest::default();
        let txn = db.begin_read()?;
        let cfg = txn.open_table(CONFIG)?;
        let mut stored = None;
        for row in cfg.iter()? {
            let (k, v) = row?;
            if k.value() == DIGEST_KEY {
                stored = Some(v.value());
            } else {
                digest.add("config", k.value().as_bytes(), &le(v.value()));
            }
        }
        let get = |k: &str| -> Result<u64, EngineError> {
            cfg.get(k)?.map(|v| v.value()).ok_or_else(|| EngineError::Metadata(format!("config key {k} missing")))
        };
        let config = PoolConfig { cluster_size: get("cluster_size")?, capacity_clusters: get("capacity_clusters")? };
        let high_water = get("high_water")?;
        let next_id = get("next_id")?;
        let journaled = cfg.get(JOURNALED_KEY)?.map_or(0, |v| v.value());
        let format = get("format_version")?;
        let pool_uuid = match (cfg.get("pool_uuid_hi")?, cfg.get("pool_uuid_lo")?) {
            (Some(hi), Some(lo)) => Some(((hi.value() as u128) << 64) | lo.value() as u128),
            _ if format >= 2 => return Err(EngineError::Metadata("config key pool_uuid missing".into())),
            _ => None,
        };
        let mut free = Vec::new();
        for row in txn.open_table(FREE)?.iter()? {
            let p = row?.0.value();
            digest.add("free", &le(p), &[]);
            free.push(p);
        }
        let mut volumes = Vec::new();
        for row in txn.open_table(VOLUMES)?.iter()? {
            let (k, v) = row?;
            digest.add("volumes", k.value().as_bytes(), v.value());
            volumes.push(from_json::<VolumeRecord>("volume", v.value())?);
        }
        let mut snapshots = Vec::new();
        for row in txn.open_table(SNAPSHOTS)?.iter()? {
            let (k, v) = row?;
            digest.add("snapshots", k.value().as_bytes(), v.value());
            snapshots.push(from_json::<SnapshotRecord>("snapshot", v.value())?);
        }
        // Pools made before grants (or node registrations) existed have no such table (fsck
        // opens them read-only).
        let grants: Vec<GrantRecord> = read_records(&txn, GRANTS, "grants", "grant", &mut digest)?;
        let nodes: Vec<NodeRegistration> = read_records(&txn, NODES, "nodes", "node", &mut digest)?;
        let mut by_layer: std::collections::BTreeMap<u64, Vec<(u64, u64)>> = Default::default();
        for row in txn.open_table(EXTENTS)?.iter()? {
            let (k, v) = row?;
            let (layer, vc) = k.value();
            digest.add("extents", &pair(layer, vc), &le(v.value()));
            by_layer.entry(layer).or_default().push((vc, v.value()));
        }
        let mut layers = Vec::new();
        for row in txn.open_table(LAYERS)?.iter()? {
            let (k, v) = row?;
            let id = k.value();
            digest.add("layers", &le(id), &le(v.value()));
            let parent = Some(v.value()).filter(|p| *p != 0);
            let extents = by_layer.remove(&id).unwrap_or_default();
            layers.push(LayerRecord { id, parent, extents });
        }
        let orphan_extents = by_layer.values().map(|v| v.len() as u64).sum();
        let loaded = Loaded {
            config,
            format,
            pool_uuid,
            created: false,
            high_water,
            free,
            next_id,
            volumes,
            snapshots,
            layers,
            orphan_extents,
            grants,
            nodes,
            journaled,
        };
        Ok((loaded, stored, digest.0))
    }
}

impl Store {
    /// Applies `ops` in one transaction. `before_durable_commit` runs inside the transaction,
    /// holding redb's writer lock, only for durable commits: the engine syncs the pool there, so
    /// every mapping a durable commit makes permanent points at data that is already on disk.
    pub fn commit(
        &self,
        ops: &[MetaOp],
        durable: bool,
        before_durable_commit: impl FnOnce() -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        if self.failed() {
            return Err(self.failure());
        }
        let latency = if durable { &self.durable_commit_latency } else { &self.commit_latency };
        latency.time(|| self.with_db(|db| apply(db, ops, durable, before_durable_commit))).map_err(|e| self.note(e))
    }
}

/// Applies `ops` in one transaction (see [`Store::commit`]).
fn apply(
    db: &Database,
    ops: &[MetaOp],
    durable: bool,
    before_durable_commit: impl FnOnce() -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    {
        let mut txn = db.begin_write()?;
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
            let mut nodes = txn.open_table(NODES)?;
            let mut d = Digest(cfg.get(DIGEST_KEY)?.map(|v| v.value()).unwrap_or(0));
            let set_cfg = |cfg: &mut redb::Table<&str, u64>, d: &mut Digest, key: &str, value: u64| {
                let old = cfg.insert(key, value)?.map(|v| le(v.value()));
                d.swap("config", key.as_bytes(), old.as_ref().map(|o| &o[..]), &le(value));
                Ok::<(), EngineError>(())
            };
            for op in ops {
                match op {
                    MetaOp::Map { layer, vcluster, pcluster } => {
                        let old = extents.insert((*layer, *vcluster), *pcluster)?.map(|v| le(v.value()));
                        d.swap("extents", &pair(*layer, *vcluster), old.as_ref().map(|o| &o[..]), &le(*pcluster));
                    }
                    MetaOp::Unmap { layer, vcluster } => {
                        if let Some(old) = extents.remove((*layer, *vcluster))?.map(|v| v.value()) {
                            d.sub("extents", &pair(*layer, *vcluster), &le(old));
                        }
                    }
                    MetaOp::Claim(p) => {
                        if free.remove(*p)?.is_some() {
                            d.sub("free", &le(*p), &[]);
                        }
                        let hw = cfg.get("high_water")?.map(|v| v.value()).unwrap_or(0);
                        if *p >= hw {
                            set_cfg(&mut cfg, &mut d, "high_water", *p + 1)?;
                        }
                    }
                    MetaOp::Free(p) => {
                        if free.insert(*p, ())?.is_none() {
                            d.add("free", &le(*p), &[]);
                        }
                    }
                    MetaOp::PutVolume(rec) => {
                        let new = to_json(rec)?;
                        let old = vols.insert(rec.name.as_str(), new.as_slice())?.map(|v| v.value().to_vec());
                        d.swap("volumes", rec.name.as_bytes(), old.as_deref(), &new);
                    }
                    MetaOp::DeleteVolume(name) => {
                        if let Some(old) = vols.remove(name.as_str())?.map(|v| v.value().to_vec()) {
                            d.sub("volumes", name.as_bytes(), &old);
                        }
                    }
                    MetaOp::PutSnapshot(rec) => {
                        let (key, new) = (rec.key(), to_json(rec)?);
                        let old = snaps.insert(key.as_str(), new.as_slice())?.map(|v| v.value().to_vec());
                        d.swap("snapshots", key.as_bytes(), old.as_deref(), &new);
                    }
                    MetaOp::DeleteSnapshot(key) => {
                        if let Some(old) = snaps.remove(key.as_str())?.map(|v| v.value().to_vec()) {
                            d.sub("snapshots", key.as_bytes(), &old);
                        }
                    }
                    MetaOp::PutLayer { id, parent } => {
                        let new = parent.unwrap_or(0);
                        let old = layers.insert(*id, new)?.map(|v| le(v.value()));
                        d.swap("layers", &le(*id), old.as_ref().map(|o| &o[..]), &le(new));
                    }
                    MetaOp::DeleteLayer(id) => {
                        if let Some(old) = layers.remove(*id)?.map(|v| v.value()) {
                            d.sub("layers", &le(*id), &le(old));
                        }
                        for row in extents.range((*id, 0)..=(*id, u64::MAX))? {
                            let (k, v) = row?;
                            let (l, vc) = k.value();
                            d.sub("extents", &pair(l, vc), &le(v.value()));
                        }
                        extents.retain_in((*id, 0)..=(*id, u64::MAX), |_, _| false)?;
                    }
                    MetaOp::SetCapacity(c) => set_cfg(&mut cfg, &mut d, "capacity_clusters", *c)?,
                    MetaOp::SetNextId(n) => set_cfg(&mut cfg, &mut d, "next_id", *n)?,
                    MetaOp::SetHighWater(n) => set_cfg(&mut cfg, &mut d, "high_water", *n)?,
                    MetaOp::SetJournaled(n) => set_cfg(&mut cfg, &mut d, JOURNALED_KEY, *n)?,
                    MetaOp::PutGrant(rec) => {
                        let (key, new) = (rec.key(), to_json(rec)?);
                        let old = grants.insert(key.as_str(), new.as_slice())?.map(|v| v.value().to_vec());
                        d.swap("grants", key.as_bytes(), old.as_deref(), &new);
                    }
                    MetaOp::DeleteGrant(key) => {
                        if let Some(old) = grants.remove(key.as_str())?.map(|v| v.value().to_vec()) {
                            d.sub("grants", key.as_bytes(), &old);
                        }
                    }
                    MetaOp::PutNode(rec) => {
                        let new = to_json(rec)?;
                        let old = nodes.insert(rec.name.as_str(), new.as_slice())?.map(|v| v.value().to_vec());
                        d.swap("nodes", rec.name.as_bytes(), old.as_deref(), &new);
                    }
                }
            }
            cfg.insert(DIGEST_KEY, d.0)?;
        }
        if durable {
            before_durable_commit()?;
        }
        txn.commit()?;
        Ok(())
    }
}
