//! Rebuilding a copy of a replicated volume that left the in-sync set, on the volume's target
//! (where its writes are ordered). Under the volume's write barrier — no write in flight, new
//! ones wait — the allocated ranges of an in-sync copy are copied to it and the ranges that
//! copy does not map are unmapped on it; it is flushed and added to the in-sync set by
//! compare-and-swap, and every session links to it before its next write.
//!
//! Scrubbing compares the in-sync copies the same way, under the barrier, and can rewrite the
//! ranges that differ from the first copy.
//!
//! This first rebuild copies everything allocated and holds writes while it runs; the delta
//! rebuild from a hidden layer marking where the copy left, streamed beside live writes, with
//! checkpoints and checksums, replaces it (issue 12).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use thinbd_protocol::consts::STATE_HOLE;

use super::Cluster;
use super::volumes::VolumeSpec;
use crate::error::EngineError;
use crate::io::{Backing, Linker, RemoteVolume};

/// Links to copies with one session's export name (its grant and epoch).
pub struct CopyLinker {
    pub cluster: Arc<Cluster>,
    pub export: String,
    pub volume: String,
}

impl Linker for CopyLinker {
    fn link<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = Result<Backing, EngineError>> + Send + 'a>> {
        Box::pin(async move {
            let remote = self.cluster.link(node, &self.export, &self.volume).await.map_err(EngineError::Unavailable)?;
            Ok(Backing::Remote(remote))
        })
    }
}

impl Cluster {
    /// Opens the link from a target to the copy on `node`.
    pub async fn link(&self, node: &str, export: &str, volume: &str) -> Result<RemoteVolume, String> {
        let holder = self.directory.get(node).filter(|n| n.up).ok_or_else(|| format!("node {node} is down"))?;
        let address = &holder.record.nbd_address;
        let tls = self.peer_tls.as_ref().map(|t| t.nbd_for(address)).transpose().map_err(|e| e.to_string())?;
        RemoteVolume::open(address, export, volume, tls).await.map_err(|e| e.to_string())
    }
}

/// Bytes copied per request.
const CHUNK: u32 = 1 << 20;

/// Rebuilds the copy of `spec` on `node` and adds it to the in-sync set. Needs a session of
/// the volume on this node (its grant opens the links); `Ok(false)` when there is none.
pub async fn rebuild(cluster: &Arc<Cluster>, spec: &VolumeSpec, node: &str) -> Result<bool, EngineError> {
    let shared = cluster.shared(&spec.uuid);
    let Some(linker) = shared.linker() else { return Ok(false) };
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let _held = shared.order.barrier().await?;
    let set = cluster.in_sync(&spec.uuid).await.map_err(cluster_err)?;
    let members = set.map(|s| s.members).unwrap_or_default();
    if members.iter().any(|m| m == node) {
        return Ok(true);
    }
    let source = members.first().ok_or_else(|| EngineError::Unavailable("no copy is in sync".into()))?;
    let epoch = cluster.target(&spec.uuid).await.map_err(cluster_err)?.map_or(0, |t| t.epoch);
    tracing::info!(volume = %spec.name, from = %source, to = node, "rebuilding a copy (writes wait)");
    let (from, to) = (linker.link(source).await?, linker.link(node).await?);
    use crate::io::VolumeIo;
    let size = from.size();
    let (mut at, mut copied) = (0u64, 0u64);
    while at < size {
        let len = (size - at).min(CHUNK as u64) as u32;
        let extents = from.block_status(at, len).await?;
        let Some(extent) = extents.first() else {
            return Err(EngineError::Unavailable(format!("no extent at {at} from the source copy")));
        };
        let n = extent.length.min(len);
        if n == 0 {
            return Err(EngineError::Unavailable(format!("an empty extent at {at} from the source copy")));
        }
        if extent.flags & STATE_HOLE != 0 {
            to.trim(at, n, false).await?;
        } else {
            let data = crate::io::read_all(&from, at, n).await?;
            to.write(at, data, false).await?;
            copied += n as u64;
        }
        at += n as u64;
    }
    to.flush().await?;
    match cluster.grow_in_sync(&spec.uuid, node, epoch).await.map_err(cluster_err)? {
        super::isr::Shrunk::Done => {}
        super::isr::Shrunk::Stale { newer } => {
            return Err(EngineError::StaleEpoch { volume: spec.name.clone(), epoch, promised: newer });
        }
    }
    shared.joined(node)?;
    tracing::info!(volume = %spec.name, node, copied, "copy rebuilt and back in sync");
    Ok(true)
}

/// Until `shutdown`: when a node registers (starts again, or is back after its lease ran out),
/// the copies it holds of volumes this node serves as target that are out of the in-sync set
/// are rebuilt.
pub async fn on_registration(
    cluster: Arc<Cluster>,
    mut registrations: tokio::sync::broadcast::Receiver<String>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let node = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = registrations.recv() => match r {
                Ok(node) => node,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            },
        };
        for uuid in cluster.served() {
            let spec = match cluster.volume_spec(&uuid).await {
                Ok(Some(spec)) if spec.replicated() && spec.copies().contains(&node) => spec,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(volume = %uuid, error = %e, "cannot read a volume's spec to rebuild its copy");
                    continue;
                }
            };
            match cluster.in_sync(&uuid).await {
                Ok(Some(set)) if set.members.contains(&node) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume = %uuid, error = %e, "cannot read a volume's in-sync set");
                    continue;
                }
            }
            let (cluster, node) = (cluster.clone(), node.clone());
            tokio::spawn(async move {
                tracing::info!(volume = %spec.name, node, "a copy's node is back: rebuilding it");
                // It registers before its NBD listener is up: a few tries.
                let mut pause = std::time::Duration::from_millis(250);
                for attempt in 1..=8 {
                    match rebuild(&cluster, &spec, &node).await {
                        Ok(_) => return,
                        Err(e) if attempt == 8 => {
                            tracing::warn!(volume = %spec.name, node, error = %e, "rebuild of a copy failed")
                        }
                        Err(_) => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(std::time::Duration::from_secs(4));
                        }
                    }
                }
            });
        }
    }
}

/// What a scrub found.
#[derive(Debug, Default)]
pub struct Scrubbed {
    pub copies: Vec<String>,
    pub compared: u64,
    /// (offset, length) pieces where some copy differs from the first.
    pub differing: Vec<(u64, u64)>,
    pub repaired: bool,
}

/// Pieces compared by checksum.
const PIECE: usize = 64 << 10;

/// Compares the in-sync copies of `spec` (under the write barrier, through this node's
/// session grant); with `repair`, rewrites differing pieces on every copy from the first.
/// `None` when the volume has no session on this node.
pub async fn scrub(cluster: &Arc<Cluster>, spec: &VolumeSpec, repair: bool) -> Result<Option<Scrubbed>, EngineError> {
    use crate::io::VolumeIo;
    let shared = cluster.shared(&spec.uuid);
    let Some(linker) = shared.linker() else { return Ok(None) };
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let _held = shared.order.barrier().await?;
    let members = cluster.in_sync(&spec.uuid).await.map_err(cluster_err)?.map(|s| s.members).unwrap_or_default();
    let mut links = Vec::with_capacity(members.len());
    for node in &members {
        links.push(linker.link(node).await?);
    }
    let mut out = Scrubbed { copies: members.clone(), ..Default::default() };
    let Some(reference) = links.first() else { return Ok(Some(out)) };
    let size = reference.size();
    let mut at = 0u64;
    while at < size {
        let len = (size - at).min(CHUNK as u64) as u32;
        let want = crate::io::read_all(reference, at, len).await?;
        let mut bad = std::collections::BTreeSet::new();
        for copy in &links[1..] {
            let got = crate::io::read_all(copy, at, len).await?;
            for (i, (a, b)) in want.chunks(PIECE).zip(got.chunks(PIECE)).enumerate() {
                if crc32fast::hash(a) != crc32fast::hash(b) || a.len() != b.len() {
                    bad.insert(i);
                }
            }
        }
        for i in bad {
            let (offset, piece) = (at + (i * PIECE) as u64, &want[i * PIECE..((i + 1) * PIECE).min(want.len())]);
            out.differing.push((offset, piece.len() as u64));
            if repair {
                for copy in &links[1..] {
                    copy.write(offset, bytes::Bytes::copy_from_slice(piece), false).await?;
                }
            }
        }
        out.compared += len as u64 * links.len() as u64;
        at += len as u64;
    }
    if repair && !out.differing.is_empty() {
        for copy in &links[1..] {
            copy.flush().await?;
        }
        out.repaired = true;
    }
    tracing::info!(volume = %spec.name, copies = ?members, differing = out.differing.len(), repaired = out.repaired, "scrubbed");
    Ok(Some(out))
}
