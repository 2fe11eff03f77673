//! Where a rebuild reads from: an in-sync copy of the volume with its layers (snapshots and
//! marks), on the target's own node (read in place) or on another node (its layers over the
//! target's links, its layer chain and what changed between layers through the peer API). So a
//! target that holds no copy itself still gives a returning copy its snapshot layers and only
//! what changed since its mark.

use std::sync::Arc;

use thinbd_api::pb;

use super::volumes::VolumeSpec;
use super::{Cluster, Peer};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::io::{Backing, Linker};

/// A layer of the source copy, as the rebuild needs it.
pub struct Layer {
    pub name: String,
    pub uuid: String,
    pub size: u64,
}

/// The in-sync copy a rebuild reads.
pub enum Source {
    Local(Arc<Engine>),
    Remote { node: String, peer: Peer, linker: Arc<dyn Linker> },
}

impl Source {
    /// The copy on `node`: this node's engine, or links through the session's `linker`.
    pub fn on(cluster: &Cluster, node: &str, linker: Arc<dyn Linker>) -> Result<Source, EngineError> {
        if let Some(engine) = cluster.engine().filter(|_| node == cluster.node) {
            return Ok(Source::Local(engine.clone()));
        }
        let peer = cluster.peer(node).map_err(|e| EngineError::Unavailable(e.to_string()))?;
        Ok(Source::Remote { node: node.to_string(), peer, linker })
    }

    fn peer_err(&self, e: tonic::Status) -> EngineError {
        let node = match self {
            Source::Local(_) => "this node",
            Source::Remote { node, .. } => node,
        };
        EngineError::Unavailable(format!("{node}: {}", e.message()))
    }

    /// The copy's snapshots and marks, oldest first.
    pub async fn layers(&self, spec: &VolumeSpec) -> Result<Vec<Layer>, EngineError> {
        match self {
            Source::Local(engine) => Ok(engine
                .snapshots_in_order(&spec.name)?
                .iter()
                .map(|s| Layer { name: s.name.clone(), uuid: s.uuid.clone(), size: s.size })
                .collect()),
            Source::Remote { peer, .. } => {
                let asked = pb::ListSnapshotsRequest { volume: spec.name.clone(), here: true, layers: true };
                let listed = peer.clone().list_snapshots(asked).await.map_err(|e| self.peer_err(e))?.into_inner();
                Ok(listed
                    .snapshots
                    .into_iter()
                    .map(|s| Layer { name: s.name, uuid: s.uuid, size: s.size_bytes })
                    .collect())
            }
        }
    }

    /// The copy's head (`layer` None) or one of its layers, to read.
    pub async fn open(&self, spec: &VolumeSpec, layer: Option<&str>) -> Result<Backing, EngineError> {
        match (self, layer) {
            (Source::Local(engine), None) => Ok(Backing::Local(engine.open_volume(&spec.name)?)),
            (Source::Local(engine), Some(l)) => Ok(Backing::Local(engine.open_snapshot(&spec.name, l)?)),
            (Source::Remote { node, linker, .. }, None) => linker.link(node).await,
            (Source::Remote { node, linker, .. }, Some(l)) => linker.link_layer(node, l).await,
        }
    }

    /// The `(start, end)` byte ranges of the copy that differ between layer `older` and layer
    /// `newer` (the head when None): clusters written or trimmed in between.
    pub async fn changed(
        &self,
        spec: &VolumeSpec,
        older: &str,
        newer: Option<&str>,
    ) -> Result<Vec<(u64, u64)>, EngineError> {
        let key = |layer: Option<&str>| match layer {
            Some(l) => format!("{}@{l}", spec.name),
            None => spec.name.clone(),
        };
        let ranges = match self {
            Source::Local(engine) => engine.changed_ranges(Some(&key(Some(older))), &key(newer))?.ranges,
            Source::Remote { peer, .. } => {
                let asked = pb::ChangedRangesRequest { base: key(Some(older)), target: key(newer) };
                let mut chunks = peer.clone().changed_ranges(asked).await.map_err(|e| self.peer_err(e))?.into_inner();
                let mut ranges = Vec::new();
                while let Some(chunk) = chunks.message().await.map_err(|e| self.peer_err(e))? {
                    ranges.extend(chunk.ranges.into_iter().map(|r| (r.offset, r.length)));
                }
                ranges
            }
        };
        Ok(ranges.into_iter().map(|(at, n)| (at, at + n)).collect())
    }
}
