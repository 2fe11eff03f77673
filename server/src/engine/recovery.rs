//! What the metadata store must hold after `Space` reopened it following an I/O error: the
//! engine's view (layers, volumes, snapshots, grants, allocator, id counter), written back as
//! the differences from what reopened (see `Space::recover`).

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::Engine;
use crate::error::{EngineError, poisoned};
use crate::meta::store::{Loaded, MetaOp, ZERO_MARK};
use crate::space::{Resync, Space};

impl Resync for Engine {
    /// The changes that turn `disk` into the engine's view.
    fn resync_ops(&self, disk: &Loaded, space: &Space) -> Result<Vec<MetaOp>, EngineError> {
        let mut ops = Vec::new();
        let mut mapped = BTreeSet::new();
        let layers = self.graph.reachable_layers()?;
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

        let volumes = self.graph.volumes.read().map_err(|_| poisoned())?;
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

        let snapshots = self.graph.snapshots.read().map_err(|_| poisoned())?;
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

        // Nodes are only ever added.
        ops.extend(self.registered_nodes().into_iter().filter(|n| !disk.nodes.contains(n)).map(MetaOp::PutNode));

        // Free is everything below the high-water mark that no layer maps: clusters handed to a
        // request that has not committed yet count as free until its commit claims them.
        let alloc = space.alloc()?;
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
        ops.push(self.graph.next_id_op());
        Ok(ops)
    }
}
