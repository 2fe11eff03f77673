//! Changed-block tracking for volumes and snapshots by name (see `crate::layers::changes`).

use std::sync::Arc;

use crate::engine::Engine;
use crate::error::EngineError;
use crate::layers::changes;
use crate::layers::heads::Snapshot;

/// Byte ranges of a volume or snapshot, with its size.
pub struct Ranges {
    pub size: u64,
    pub cluster_size: u64,
    /// `(offset, length)` in bytes, ascending, within `size`.
    pub ranges: Vec<(u64, u64)>,
}

impl Engine {
    /// The snapshots of `volume`, marks included, oldest first: in the order of its layer
    /// chain (creation times can tie).
    pub fn snapshots_in_order(&self, volume: &str) -> Result<Vec<Arc<Snapshot>>, EngineError> {
        let chain = changes::chain(&self.volume(volume)?.top()?)?;
        let mut snapshots: Vec<(usize, Arc<Snapshot>)> = self
            .graph
            .list_snapshots(Some(volume))
            .into_iter()
            .filter_map(|s| chain.iter().position(|id| *id == s.layer.id).map(|at| (at, s)))
            .collect();
        snapshots.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        Ok(snapshots.into_iter().map(|(_, s)| s).collect())
    }

    /// What changed from snapshot `base` (`VOLUME@SNAPSHOT`) to `target` (a later snapshot of
    /// the same volume, or the volume itself); with no `base`, what `target` holds (its
    /// allocated ranges).
    pub fn changed_ranges(&self, base: Option<&str>, target: &str) -> Result<Ranges, EngineError> {
        let (layer, size) = match target.split_once('@') {
            Some(_) => {
                let s = self.snapshot(target)?;
                (s.layer.clone(), s.size)
            }
            None => {
                let v = self.volume(target)?;
                (v.top()?, v.size())
            }
        };
        let runs = match base {
            None => changes::allocated(&layer)?,
            Some(b) => {
                let base = self.snapshot(b)?;
                changes::changed_since(&layer, base.layer.id)
                    .map_err(|_| EngineError::Invalid(format!("{b} is not an earlier snapshot of {target}")))?
            }
        };
        let cs = self.space.cs;
        let ranges = runs
            .into_iter()
            .map(|(v, n)| (v * cs, ((v + n) * cs).min(size)))
            .filter(|(s, e)| s < e)
            .map(|(s, e)| (s, e - s))
            .collect();
        Ok(Ranges { size, cluster_size: cs, ranges })
    }
}
