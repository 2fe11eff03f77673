//! Marks: where a copy of a replicated volume left the in-sync set. Each in-sync copy takes a
//! hidden snapshot `.departed-NODE` under the target's write barrier (one point in the write
//! stream on all of them), and `isr/UUID` records which copies hold it and the ranges the
//! departed copy may lack from before it. Any of those copies can then be the source of a
//! delta rebuild, whichever node is the target by then.

use std::sync::Arc;
use std::time::Duration;

use thinbd_api::pb;

use super::Cluster;
use super::isr::Departed;
use super::volumes::VolumeSpec;
use crate::error::EngineError;

/// How long one copy may take to make or delete its mark: the barrier holds the volume's
/// writes meanwhile, and a copy that does not answer just holds no mark.
const MARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Marks where `node`'s copy left the in-sync set of `spec`: under the write barrier, a hidden
/// snapshot of every in-sync copy, and in etcd the ranges the copy may lack from before it
/// (logged by the sessions since the last flush and until now). Its rebuild then copies only
/// those and what changes from here on. Without a copy that took the mark, or with too many
/// ranges, there is no mark and the rebuild copies everything.
pub async fn mark_departure(cluster: &Arc<Cluster>, spec: &VolumeSpec, node: &str) {
    if let Err(e) = try_mark_departure(cluster, spec, node).await {
        tracing::warn!(volume = %spec.name, node, error = %e, "no mark where a copy left: its rebuild will copy everything");
    }
}

async fn try_mark_departure(cluster: &Arc<Cluster>, spec: &VolumeSpec, node: &str) -> Result<(), EngineError> {
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let shared = cluster.shared(&spec.uuid);
    let _held = shared.order.barrier().await?;
    let Some(ranges) = shared.take_departed(node)? else {
        tracing::info!(volume = %spec.name, node, "no mark where a copy left: its writes were not being logged");
        return Ok(());
    };
    let set = cluster.in_sync(&spec.uuid).await.map_err(cluster_err)?.unwrap_or_default();
    // An earlier mark (the copy never came back since) covers more: it stays. A copy already
    // back, or being rebuilt, needs none.
    let back = set.members.iter().any(|m| m == node) || set.rebuilding.iter().any(|r| r.node == node);
    if back || set.departed.iter().any(|d| d.node == node) {
        tracing::info!(volume = %spec.name, node, back, "no new mark where a copy left: back already, or marked before");
        return Ok(());
    }
    let Some(ranges) = ranges else {
        tracing::info!(volume = %spec.name, node, "no mark where a copy left: more unflushed writes than the log keeps; its rebuild copies everything");
        return Ok(());
    };
    let epoch = cluster.target(&spec.uuid).await.map_err(cluster_err)?.map_or(0, |t| t.epoch);
    let mark = format!("departed-{node}");
    let name = mark.as_str();
    let made = futures_util::future::join_all(set.members.iter().map(|m| async move {
        let made = tokio::time::timeout(MARK_TIMEOUT, make(cluster, &spec.name, m, name)).await;
        let made = made.unwrap_or_else(|_| Err(EngineError::Unavailable("no answer".into())));
        if let Err(e) = &made {
            tracing::warn!(volume = %spec.name, copy = %m, error = %e, "a copy could not take the mark where another left");
        }
        made.ok().map(|()| m.clone())
    }))
    .await;
    let marked: Vec<String> = made.into_iter().flatten().collect();
    if marked.is_empty() {
        return Err(EngineError::Unavailable("no in-sync copy took the mark".into()));
    }
    let departed = Departed { node: node.to_string(), marked, mark, ranges };
    let (logged, on) = (departed.ranges.len(), departed.marked.join(","));
    cluster
        .note_departure(&spec.uuid, epoch, node, Some(departed))
        .await
        .map_err(cluster_err)?
        .fenced(&spec.name, epoch)?;
    tracing::info!(volume = %spec.name, node, ranges = logged, marked = %on, "marked where a copy left");
    Ok(())
}

/// Mark `.MARK` of `volume` on `copy` (replacing one of that name).
async fn make(cluster: &Cluster, volume: &str, copy: &str, mark: &str) -> Result<(), EngineError> {
    if let Some(engine) = cluster.engine().filter(|_| copy == cluster.node) {
        engine.delete_mark(volume, mark).await?;
        return engine.create_mark(volume, mark).await.map(drop);
    }
    let mut peer = cluster.peer(copy).map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let asked = pb::CreateSnapshotRequest {
        volume: volume.to_string(),
        name: mark.to_string(),
        here: true,
        mark: true,
        ..Default::default()
    };
    peer.create_snapshot(asked).await.map_err(|e| EngineError::Unavailable(e.message().to_string()))?;
    Ok(())
}

/// Deletes the marks where a copy of volume `name` left the in-sync set (it serves no rebuild
/// any more); one out of reach stays until its volume is deleted (logged).
pub async fn delete(cluster: &Cluster, name: &str, d: &Departed) {
    for copy in &d.marked {
        let deleted = match cluster.engine().filter(|_| *copy == cluster.node) {
            Some(engine) => engine.delete_mark(name, &d.mark).await,
            None => delete_remote(cluster, name, copy, &d.mark).await,
        };
        if let Err(e) = deleted {
            tracing::warn!(volume = %name, %copy, mark = %d.mark, error = %e, "cannot delete a mark where a copy left");
        }
    }
}

async fn delete_remote(cluster: &Cluster, name: &str, copy: &str, mark: &str) -> Result<(), EngineError> {
    let mut peer = cluster.peer(copy).map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let asked = pb::DeleteSnapshotRequest { key: format!("{name}@.{mark}"), here: true };
    match tokio::time::timeout(MARK_TIMEOUT, peer.delete_snapshot(asked)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.code() == tonic::Code::NotFound => Ok(()),
        Ok(Err(e)) => Err(EngineError::Unavailable(e.message().to_string())),
        Err(_) => Err(EngineError::Unavailable("no answer".into())),
    }
}
