//! Layers: sparse extent maps from virtual to physical clusters, chained child to parent, so a
//! volume reads through its own top layer and then the frozen layers of the snapshots it came
//! from.

pub mod changes;
pub mod edit;
pub mod extent_map;
pub mod graph;
pub mod heads;
pub mod layer;
