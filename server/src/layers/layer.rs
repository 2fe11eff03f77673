//! Layers: a volume reads through a chain of extent maps, its own (writable) top first, then the
//! frozen layers of the snapshots it came from. Taking a snapshot freezes the top and starts a
//! new empty one, which is O(1) whatever the size of the map.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::error::{EngineError, poisoned};
use crate::layers::extent_map::{ExtentMap, Mapping, Run, push_run};

/// Map and parent under one lock, so a reader never sees a map from before a merge with a parent
/// from after it.
pub struct LayerState {
    pub map: ExtentMap,
    pub parent: Option<Arc<Layer>>,
}

pub struct Layer {
    pub id: u64,
    /// Changed only through `layers::edit` (after the metadata commit); read with [`Layer::read`].
    pub(super) state: RwLock<LayerState>,
    /// Frozen and named by no snapshot: only its child layers read it, so a cluster every
    /// child overrides is garbage. Never goes back to false.
    pub hidden: std::sync::atomic::AtomicBool,
}

/// Most clusters one resolve may cover; larger ranges are walked in pieces by the caller.
pub const RESOLVE_MAX: u64 = 1 << 16;

impl Layer {
    pub fn new(id: u64, map: ExtentMap, parent: Option<Arc<Layer>>) -> Arc<Layer> {
        Arc::new(Layer { id, state: RwLock::new(LayerState { map, parent }), hidden: Default::default() })
    }

    pub fn read(&self) -> Result<RwLockReadGuard<'_, LayerState>, EngineError> {
        self.state.read().map_err(|_| poisoned())
    }

    pub fn parent(&self) -> Result<Option<Arc<Layer>>, EngineError> {
        Ok(self.read()?.parent.clone())
    }

    /// What virtual clusters `start..end` read as from this layer down: `Data` or `Zero` (no
    /// `Hole`s). At most [`RESOLVE_MAX`] clusters.
    pub fn resolve(self: &Arc<Self>, start: u64, end: u64) -> Result<Vec<Run>, EngineError> {
        if end == start + 1 {
            // Most requests fall within one cluster: one lookup per layer, not a range walk (a
            // range search costs two descents of the map) and no table of slots.
            return Ok(vec![self.resolve_cluster(start)?]);
        }
        self.resolve_range(start, end)
    }

    fn resolve_range(self: &Arc<Self>, start: u64, end: u64) -> Result<Vec<Run>, EngineError> {
        let n = (end - start) as usize;
        debug_assert!(end - start <= RESOLVE_MAX);
        let mut slots: Vec<Option<u64>> = vec![None; n];
        let mut unresolved = n;
        let mut layer = Some(self.clone());
        while let Some(l) = layer {
            let st = l.read()?;
            for (v, p) in st.map.range(start, end) {
                let slot = &mut slots[(v - start) as usize];
                if slot.is_none() {
                    *slot = Some(p);
                    unresolved -= 1;
                }
            }
            if unresolved == 0 {
                break;
            }
            layer = st.parent.clone();
        }
        let mut out = Vec::new();
        for (i, s) in slots.into_iter().enumerate() {
            let mapping = match s {
                Some(p) if p != crate::layers::extent_map::ZERO_MARK => Mapping::Data(p),
                _ => Mapping::Zero,
            };
            push_run(&mut out, Run { vstart: start + i as u64, count: 1, mapping });
        }
        Ok(out)
    }

    /// What virtual cluster `v` reads as, as a run of one (see [`Layer::resolve`]).
    pub fn resolve_cluster(self: &Arc<Self>, v: u64) -> Result<Run, EngineError> {
        let mapping = self.resolve_one(v)?.map_or(Mapping::Zero, Mapping::Data);
        Ok(Run { vstart: v, count: 1, mapping })
    }

    /// The physical cluster virtual cluster `v` reads from, `None` for zeros.
    pub fn resolve_one(self: &Arc<Self>, v: u64) -> Result<Option<u64>, EngineError> {
        let mut layer = Some(self.clone());
        while let Some(l) = layer {
            let st = l.read()?;
            match st.map.get(v) {
                Mapping::Data(p) => return Ok(Some(p)),
                Mapping::Zero => return Ok(None),
                Mapping::Hole => layer = st.parent.clone(),
            }
        }
        Ok(None)
    }

    /// Clusters with data visible from this layer (the volume's allocated clusters), and how
    /// many of them are this layer's own.
    pub fn visible_data(self: &Arc<Self>) -> Result<(u64, u64), EngineError> {
        let own = self.read()?.map.data_clusters() as u64;
        if self.parent()?.is_none() {
            return Ok((own, own));
        }
        // A virtual cluster counts for the nearest layer that has an entry for it.
        let total =
            self.nearest_entries()?.values().filter(|p| **p != crate::layers::extent_map::ZERO_MARK).count() as u64;
        Ok((total, own))
    }

    /// Each virtual cluster's nearest entry in the chain from here down (data or zero mark).
    pub fn nearest_entries(self: &Arc<Self>) -> Result<std::collections::BTreeMap<u64, u64>, EngineError> {
        let mut out = std::collections::BTreeMap::new();
        let mut layer = Some(self.clone());
        while let Some(l) = layer {
            let st = l.read()?;
            for (v, p) in st.map.iter() {
                out.entry(v).or_insert(p);
            }
            layer = st.parent.clone();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::extent_map::ZERO_MARK;

    #[test]
    fn one_cluster_resolves_as_a_range_of_one_does() {
        // Three layers: data, zero marks and holes at every depth.
        let root = Layer::new(1, ExtentMap::from_pairs([(0, 100), (1, 101), (2, 102), (5, 105)]), None);
        let mid = Layer::new(2, ExtentMap::from_pairs([(1, 201), (2, ZERO_MARK), (6, 206)]), Some(root));
        let top = Layer::new(3, ExtentMap::from_pairs([(0, ZERO_MARK), (3, 303), (6, 306)]), Some(mid));
        let want = [
            Mapping::Zero,
            Mapping::Data(201),
            Mapping::Zero,
            Mapping::Data(303),
            Mapping::Zero,
            Mapping::Data(105),
            Mapping::Data(306),
            Mapping::Zero,
        ];
        for (v, want) in want.into_iter().enumerate() {
            let v = v as u64;
            let one = top.resolve(v, v + 1).unwrap();
            assert_eq!(one, top.resolve_range(v, v + 1).unwrap(), "cluster {v}");
            assert_eq!(one, vec![Run { vstart: v, count: 1, mapping: want }], "cluster {v}");
        }
    }
}
