//! Changed-block tracking, read straight from the layer chain: no per-write bookkeeping. A
//! snapshot froze the layer its volume wrote until then, so everything written (or trimmed)
//! since snapshot A is exactly the virtual clusters that the layers above A's layer map, and
//! what a snapshot holds is what its chain maps to data. Both are exact at cluster granularity
//! and read only metadata.

use std::sync::Arc;

use super::extent_map::ZERO_MARK;
use super::layer::Layer;
use crate::error::EngineError;

/// Runs `(first cluster, count)` of the clusters that read as data from `top`.
pub fn allocated(top: &Arc<Layer>) -> Result<Vec<(u64, u64)>, EngineError> {
    Ok(runs(top.nearest_entries()?.into_iter().filter(|(_, p)| *p != ZERO_MARK).map(|(v, _)| v)))
}

/// Runs of the clusters written or trimmed in the layers from `top` down to `base` (not
/// included): what changed since the snapshot whose frozen layer `base` is. `base` must be in
/// `top`'s chain.
pub fn changed_since(top: &Arc<Layer>, base: u64) -> Result<Vec<(u64, u64)>, EngineError> {
    let mut changed = std::collections::BTreeSet::new();
    let mut layer = Some(top.clone());
    while let Some(l) = layer {
        if l.id == base {
            return Ok(runs(changed.into_iter()));
        }
        let st = l.read()?;
        changed.extend(st.map.iter().map(|(v, _)| v));
        layer = st.parent.clone();
    }
    Err(EngineError::Invalid("the base snapshot is not an earlier state of the target".into()))
}

/// The ids of the layers of `top`'s chain, `top` first.
pub fn chain(top: &Arc<Layer>) -> Result<Vec<u64>, EngineError> {
    let mut ids = Vec::new();
    let mut layer = Some(top.clone());
    while let Some(l) = layer {
        ids.push(l.id);
        layer = l.read()?.parent.clone();
    }
    Ok(ids)
}

/// Ascending cluster numbers as `(first, count)` runs.
fn runs(sorted: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for v in sorted {
        match out.last_mut() {
            Some((s, n)) if *s + *n == v => *n += 1,
            _ => out.push((v, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::extent_map::ExtentMap;

    #[test]
    fn changes_are_the_layers_above_the_base() {
        let base = Layer::new(1, ExtentMap::from_pairs([(0, 10), (1, 11), (5, 15)]), None);
        let mid = Layer::new(2, ExtentMap::from_pairs([(1, 21), (2, 22)]), Some(base.clone()));
        let top = Layer::new(3, ExtentMap::from_pairs([(3, ZERO_MARK), (9, 29)]), Some(mid.clone()));
        assert_eq!(changed_since(&top, 1).unwrap(), vec![(1, 3), (9, 1)]);
        assert_eq!(changed_since(&top, 2).unwrap(), vec![(3, 1), (9, 1)]);
        assert_eq!(changed_since(&top, 3).unwrap(), vec![]);
        assert!(changed_since(&mid, 3).is_err(), "a later layer is no base");
        // The zero mark hides nothing below here, but it is not data.
        assert_eq!(allocated(&top).unwrap(), vec![(0, 3), (5, 1), (9, 1)]);
    }
}
