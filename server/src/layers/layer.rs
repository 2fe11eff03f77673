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

    /// Resolves one cluster.
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
