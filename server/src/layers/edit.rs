//! Every change to a layer's extent map or parent is a [`LayerEdit`]: one value gives the
//! metadata store its op and memory its change, so the two cannot drift apart, and there is one
//! place where map changes happen (for changed-block tracking and, later, rebuild). The engine
//! commits a batch's ops and only then applies the batch to memory (`Engine::commit_edits`).

use std::sync::Arc;

use super::layer::Layer;
use crate::error::EngineError;
use crate::error::poisoned;
use crate::meta::store::MetaOp;

pub enum LayerEdit {
    /// Virtual cluster → physical cluster, or `ZERO_MARK` (reads as zeros, hides the parent).
    Map { layer: Arc<Layer>, vcluster: u64, pcluster: u64 },
    /// The cluster falls through to the parent again.
    Unmap { layer: Arc<Layer>, vcluster: u64 },
    /// A new parent (a merged-away parent's place).
    Reparent { layer: Arc<Layer>, parent: Option<Arc<Layer>> },
}

impl LayerEdit {
    pub fn meta_op(&self) -> MetaOp {
        match self {
            LayerEdit::Map { layer, vcluster, pcluster } => {
                MetaOp::Map { layer: layer.id, vcluster: *vcluster, pcluster: *pcluster }
            }
            LayerEdit::Unmap { layer, vcluster } => MetaOp::Unmap { layer: layer.id, vcluster: *vcluster },
            LayerEdit::Reparent { layer, parent } => {
                MetaOp::PutLayer { id: layer.id, parent: parent.as_ref().map(|p| p.id) }
            }
        }
    }

    fn layer(&self) -> &Arc<Layer> {
        match self {
            LayerEdit::Map { layer, .. } | LayerEdit::Unmap { layer, .. } | LayerEdit::Reparent { layer, .. } => layer,
        }
    }
}

/// Applies committed edits to memory, in order; consecutive edits of one layer share its lock.
pub fn apply(edits: Vec<LayerEdit>) -> Result<(), EngineError> {
    let mut i = 0;
    while i < edits.len() {
        let layer = edits[i].layer().clone();
        let mut st = layer.state.write().map_err(|_| poisoned())?;
        while i < edits.len() && Arc::ptr_eq(edits[i].layer(), &layer) {
            match &edits[i] {
                LayerEdit::Map { vcluster, pcluster, .. } => {
                    st.map.insert(*vcluster, *pcluster);
                }
                LayerEdit::Unmap { vcluster, .. } => {
                    st.map.remove(*vcluster);
                }
                LayerEdit::Reparent { parent, .. } => st.parent = parent.clone(),
            }
            i += 1;
        }
    }
    Ok(())
}
