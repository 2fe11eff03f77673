//! The layer graph: every layer, the volumes and snapshots that name them, and reclamation.
//! Layers form a forest (each has at most one parent); a volume's top and a snapshot's layer
//! are its named heads. Every extent-map change is a [`LayerEdit`] committed through
//! [`LayerGraph::commit_edits`]; a layer nobody names or reads any more is deleted and its
//! clusters freed, and a frozen layer with one child left is merged into it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use crate::error::{EngineError, poisoned};
use crate::layers::edit::LayerEdit;
use crate::layers::extent_map::{ExtentMap, Mapping};
use crate::layers::heads::{Snapshot, Volume, VolumeOptions};
use crate::layers::layer::Layer;
use crate::meta::store::{LayerRecord, MetaOp, SnapshotRecord, VolumeRecord, ZERO_MARK};
use crate::meta::uuid::new_uuid_text;
use crate::space::{Commit, Space};

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

struct References {
    volumes: Vec<Arc<Volume>>,
    snapshots: usize,
    children: Vec<Arc<Layer>>,
}

pub struct LayerGraph {
    pub space: Arc<Space>,
    layers: RwLock<BTreeMap<u64, Arc<Layer>>>,
    /// Volumes by name. Sessions are counted and deletes marked under this lock.
    pub(crate) volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    /// Snapshots by `VOLUME@SNAPSHOT`.
    pub(crate) snapshots: RwLock<BTreeMap<String, Arc<Snapshot>>>,
    /// Ids for layers and volumes.
    next_id: AtomicU64,
    /// Serializes freeing clusters of hidden layers (see [`LayerGraph::reclaim_overridden`]).
    reclaim: tokio::sync::Mutex<()>,
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

impl LayerGraph {
    /// The graph as committed. Records from before UUIDs get one now: the returned ops write
    /// them back.
    pub fn load(
        space: Arc<Space>,
        layers: Vec<LayerRecord>,
        volume_records: Vec<VolumeRecord>,
        snapshot_records: Vec<SnapshotRecord>,
        next_id: u64,
    ) -> Result<(LayerGraph, Vec<MetaOp>), EngineError> {
        let layers = build_layers(layers)?;
        let layer = |id: u64, what: &str| {
            layers
                .get(&id)
                .cloned()
                .ok_or_else(|| EngineError::Metadata(format!("{what} refers to missing layer {id}")))
        };
        let mut upgraded = Vec::new();
        let mut volumes = BTreeMap::new();
        for rec in volume_records {
            let top = layer(rec.layer, &format!("volume {}", rec.name))?;
            let uuid = if rec.uuid.is_empty() { new_uuid_text() } else { rec.uuid.clone() };
            let vol = Arc::new(Volume::new(
                rec.id,
                uuid,
                &rec.name,
                rec.size,
                rec.created_unix,
                top,
                VolumeOptions { labels: rec.labels.clone(), qos: rec.qos, uuid: None, epoch: rec.epoch },
            ));
            if rec.uuid.is_empty() {
                upgraded.push(MetaOp::PutVolume(vol.record()?));
            }
            volumes.insert(rec.name.clone(), vol);
        }
        let mut snapshots = BTreeMap::new();
        for rec in snapshot_records {
            // Records from before volume UUIDs in snapshots take the live volume's.
            let volume_uuid = match (rec.volume_uuid.is_empty(), volumes.get(&rec.volume)) {
                (true, Some(v)) => v.uuid.clone(),
                _ => rec.volume_uuid.clone(),
            };
            let snap = Snapshot::new(
                if rec.uuid.is_empty() { new_uuid_text() } else { rec.uuid.clone() },
                (&rec.volume, &volume_uuid),
                &rec.name,
                layer(rec.layer, &format!("snapshot {}", rec.key()))?,
                rec.size,
                rec.created_unix,
                rec.group.clone(),
            );
            if rec.uuid.is_empty() || rec.volume_uuid != volume_uuid {
                upgraded.push(MetaOp::PutSnapshot(snap.record()));
            }
            snapshots.insert(rec.key(), Arc::new(snap));
        }
        for l in layers.values() {
            let named = volumes.values().any(|v: &Arc<Volume>| v.top().is_ok_and(|t| t.id == l.id))
                || snapshots.values().any(|s: &Arc<Snapshot>| s.layer.id == l.id);
            l.hidden.store(!named, Relaxed);
        }
        let graph = LayerGraph {
            space,
            layers: RwLock::new(layers),
            volumes: RwLock::new(volumes),
            snapshots: RwLock::new(snapshots),
            next_id: AtomicU64::new(next_id.max(1)),
            reclaim: Default::default(),
        };
        Ok((graph, upgraded))
    }

    pub fn take_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    /// The op that stores the id counter (with every commit that took ids).
    pub fn next_id_op(&self) -> MetaOp {
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

    pub fn usage(&self, layer: &Arc<Layer>) -> Usage {
        let (allocated, exclusive) = layer.visible_data().unwrap_or((0, 0));
        Usage {
            allocated: allocated * self.space.cs,
            exclusive: exclusive * self.space.cs,
            shared: (allocated - exclusive) * self.space.cs,
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

    /// A new empty layer on `parent`, in the table (not yet committed).
    pub fn new_layer(&self, parent: Option<Arc<Layer>>) -> Result<Arc<Layer>, EngineError> {
        let l = Layer::new(self.take_id(), ExtentMap::default(), parent);
        self.layers.write().map_err(|_| poisoned())?.insert(l.id, l.clone());
        Ok(l)
    }

    /// Drops layers made for an operation whose commit failed, or deleted.
    pub fn forget_layers(&self, ids: &[u64]) {
        if let Ok(mut m) = self.layers.write() {
            for id in ids {
                m.remove(id);
            }
        }
    }

    /// Commits `edits` (with `extra` ops: allocator changes, records) and then applies them to
    /// memory: the one path by which extent maps change.
    pub async fn commit_edits(
        self: &Arc<Self>,
        edits: Vec<LayerEdit>,
        extra: Vec<MetaOp>,
        how: Commit,
    ) -> Result<(), EngineError> {
        let mut ops: Vec<MetaOp> = edits.iter().map(LayerEdit::meta_op).collect();
        ops.extend(extra);
        if matches!(how, Commit::Grouped { .. })
            && self.space.journaled()
            && ops.iter().all(crate::space::journal::journaled)
        {
            // Journaled: putting the record on the ring cannot fail, so memory may go first.
            crate::layers::edit::apply(edits)?;
            return self.space.commit_as(ops, how).await;
        }
        self.space.commit_as(ops, how).await?;
        crate::layers::edit::apply(edits)
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
    pub async fn release_layer(self: &Arc<Self>, mut id: u64) -> Result<(), EngineError> {
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
                self.space.commit(ops, true).await?;
                self.forget_layers(&[id]);
                self.space.release(freed).await?;
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
                        if cs.map.get(v) != Mapping::Hole {
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
                self.commit_edits(edits, extra, Commit::Durable).await?;
                self.forget_layers(&[id]);
                self.space.release(freed).await?;
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
        self.commit_edits(edits, frees, Commit::durable_if(durable)).await?;
        let freed = dead.iter().map(|(_, p)| *p).filter(|p| *p != ZERO_MARK);
        if durable {
            self.space.release(freed.collect()).await?;
        } else {
            self.space.alloc()?.free_later(freed);
        }
        Ok(())
    }

    /// The layers volumes and snapshots read through. A layer made for an admin operation whose
    /// commit has not happened yet is in the engine's table but not reachable: it is left out.
    pub fn reachable_layers(&self) -> Result<BTreeMap<u64, Arc<Layer>>, EngineError> {
        let mut out = BTreeMap::new();
        let mut todo: Vec<Arc<Layer>> = Vec::new();
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

    /// A copy of the layer table (for checks).
    pub fn layers(&self) -> Result<BTreeMap<u64, Arc<Layer>>, EngineError> {
        Ok(self.layers.read().map_err(|_| poisoned())?.clone())
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
        let pcs = self.space.alloc()?.allocate(clusters as usize).ok_or(EngineError::NoSpace)?.clusters;
        let edits = pcs
            .iter()
            .enumerate()
            .map(|(i, p)| LayerEdit::Map { layer: top.clone(), vcluster: i as u64 * stride, pcluster: *p })
            .collect();
        self.commit_edits(edits, pcs.iter().map(|p| MetaOp::Claim(*p)).collect(), Commit::Durable).await?;
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
            Mapping::Data(p) => Some((v, p)),
            Mapping::Zero => Some((v, ZERO_MARK)),
            Mapping::Hole => None,
        })
        .filter(|(v, _)| !children.is_empty() && guards.iter().all(|c| c.map.get(*v) != Mapping::Hole))
        .collect())
}
