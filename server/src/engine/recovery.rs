//! Recovery of the metadata store after an I/O error (a full or failing disk under the data
//! dir). redb refuses every transaction after one until it is closed and opened again; what
//! it then holds may lack the commits since the last durable one. The engine's memory holds
//! every commit that succeeded (it changes only after a commit did), so the engine writes its
//! view back over what reopened, in one durable transaction, and carries on: no restart, and
//! nothing acknowledged is lost. While the disk stays full this is tried at most once a second
//! and every commit fails with the store's error (ENOSPC to clients).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::engine::Engine;
use crate::error::EngineError;
use crate::error::poisoned;
use crate::layers::extent_map::ZERO_MARK;
use crate::meta::store::{Loaded, MetaOp};

const RETRY_EVERY: Duration = Duration::from_secs(1);

impl Engine {
    /// Reopens the failed store and writes the engine's view back.
    pub(crate) async fn recover(self: &Arc<Self>) -> Result<(), EngineError> {
        let mut last = self.recovery.lock().await;
        if !self.store.failed() {
            return Ok(());
        }
        if last.is_some_and(|t| t.elapsed() < RETRY_EVERY) {
            return Err(self.store.failure());
        }
        *last = Some(Instant::now());
        let me = self.clone();
        let released = tokio::task::spawn_blocking(move || {
            let disk = me.store.reopen()?;
            let ops = me.resync_ops(&disk)?;
            let mut released = Vec::new();
            me.store.rewrite(&ops, || {
                me.meta_dirty.store(false, Relaxed);
                released = me.alloc()?.take_pending();
                me.pool.sync_blocking()
            })?;
            tracing::info!(changes = ops.len(), "metadata store recovered: reopened and brought up to date");
            Ok::<_, EngineError>(released)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("recovery task: {e}")))?;
        match released {
            Ok(released) => self.release(released).await,
            Err(e) => {
                tracing::warn!(error = %e, "metadata store still unusable; retrying on the next commit");
                Err(e)
            }
        }
    }

    /// The layers volumes and snapshots read through. A layer made for an admin operation whose
    /// commit has not happened yet is in the engine's table but not reachable: it is left out.
    fn reachable_layers(&self) -> Result<BTreeMap<u64, Arc<crate::layers::layer::Layer>>, EngineError> {
        let mut out = BTreeMap::new();
        let mut todo: Vec<Arc<crate::layers::layer::Layer>> = Vec::new();
        for v in self.volumes.read().map_err(|_| poisoned())?.values() {
            todo.push(v.top()?);
        }
        todo.extend(self.snapshots.read().map_err(|_| poisoned())?.values().map(|s| s.layer.clone()));
        while let Some(l) = todo.pop() {
            if out.contains_key(&l.id) {
                continue;
            }
            if let Some(p) = l.parent()? {
                todo.push(p);
            }
            out.insert(l.id, l);
        }
        Ok(out)
    }

    /// The changes that turn `disk` into the engine's view.
    fn resync_ops(&self, disk: &Loaded) -> Result<Vec<MetaOp>, EngineError> {
        let mut ops = Vec::new();
        let mut mapped = BTreeSet::new();
        let layers = self.reachable_layers()?;
        let on_disk: BTreeMap<u64, _> = disk.layers.iter().map(|l| (l.id, l)).collect();
        for (&id, layer) in layers.iter() {
            let st = layer.read()?;
            let parent = st.parent.as_ref().map(|p| p.id);
            let disk_map: BTreeMap<u64, u64> =
                on_disk.get(&id).map(|l| l.extents.iter().copied().collect()).unwrap_or_default();
            if on_disk.get(&id).map(|l| l.parent) != Some(parent) {
                ops.push(MetaOp::PutLayer { id, parent });
            }
            let mut mine = BTreeSet::new();
            for (v, p) in st.map.iter() {
                mine.insert(v);
                if p != ZERO_MARK {
                    mapped.insert(p);
                }
                if disk_map.get(&v) != Some(&p) {
                    ops.push(MetaOp::Map { layer: id, vcluster: v, pcluster: p });
                }
            }
            ops.extend(
                disk_map.keys().filter(|v| !mine.contains(v)).map(|&v| MetaOp::Unmap { layer: id, vcluster: v }),
            );
        }
        ops.extend(disk.layers.iter().filter(|l| !layers.contains_key(&l.id)).map(|l| MetaOp::DeleteLayer(l.id)));
        drop(layers);

        let volumes = self.volumes.read().map_err(|_| poisoned())?;
        for v in volumes.values() {
            let rec = v.record()?;
            if !disk.volumes.contains(&rec) {
                ops.push(MetaOp::PutVolume(rec));
            }
        }
        ops.extend(
            disk.volumes
                .iter()
                .filter(|d| !volumes.contains_key(&d.name))
                .map(|d| MetaOp::DeleteVolume(d.name.clone())),
        );
        drop(volumes);

        let snapshots = self.snapshots.read().map_err(|_| poisoned())?;
        for s in snapshots.values() {
            let rec = s.record();
            if !disk.snapshots.contains(&rec) {
                ops.push(MetaOp::PutSnapshot(rec));
            }
        }
        ops.extend(
            disk.snapshots
                .iter()
                .filter(|d| !snapshots.contains_key(&d.key()))
                .map(|d| MetaOp::DeleteSnapshot(d.key())),
        );
        drop(snapshots);

        let grants = self.grants.records();
        for g in &grants {
            if !disk.grants.contains(g) {
                ops.push(MetaOp::PutGrant(g.clone()));
            }
        }
        let live: std::collections::BTreeSet<String> = grants.iter().map(|g| g.key()).collect();
        ops.extend(disk.grants.iter().filter(|d| !live.contains(&d.key())).map(|d| MetaOp::DeleteGrant(d.key())));

        // Free is everything below the high-water mark that no layer maps: clusters handed to a
        // request that has not committed yet count as free until its commit claims them.
        let alloc = self.alloc()?;
        let high_water = alloc.high_water();
        let disk_free: BTreeSet<u64> = disk.free.iter().copied().collect();
        for p in 0..high_water {
            match (!mapped.contains(&p), disk_free.contains(&p)) {
                (true, false) => ops.push(MetaOp::Free(p)),
                (false, true) => ops.push(MetaOp::Claim(p)),
                _ => {}
            }
        }
        ops.push(MetaOp::SetHighWater(high_water));
        ops.push(MetaOp::SetCapacity(alloc.capacity()));
        ops.push(MetaOp::SetNextId(self.next_id.load(Relaxed)));
        Ok(ops)
    }
}
