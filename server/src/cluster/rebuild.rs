//! Rebuilding a copy of a replicated volume that left the in-sync set, on the volume's target
//! (where its writes are ordered). The copy takes live writes while the allocated ranges of an
//! in-sync copy are copied to it chunk by chunk and the ranges that copy does not map are
//! unmapped on it; it is flushed and added to the in-sync set by compare-and-swap. Its state
//! (Rebuilding, how far) is recorded in the in-sync set's record.
//!
//! Scrubbing compares the in-sync copies the same way, under the barrier, and can rewrite the
//! ranges that differ from the first copy.
//!
//! Every chunk written is read back and compared by CRC32C with what was sent.
//!
//! This rebuild copies everything allocated (the head, not the snapshot layers); the delta
//! rebuild from a hidden layer marking where the copy left is still to come (issue 12).

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

/// How often a rebuild's progress is recorded in the cluster store: every this many bytes, or
/// every second.
const CHECKPOINT: u64 = 64 << 20;

/// Stops sending live writes to a copy whose rebuild ended without it joining the set.
struct Rebuilding<'a> {
    shared: &'a crate::io::Shared,
    node: &'a str,
    joined: bool,
}

impl Drop for Rebuilding<'_> {
    fn drop(&mut self) {
        if !self.joined {
            self.shared.stop_rebuild(self.node);
        }
    }
}

/// Rebuilds the copy of `spec` on `node` beside live writes and adds it to the in-sync set.
/// Needs a session of the volume on this node (its grant opens the links); `Ok(false)` when
/// there is none, or the copy is already being rebuilt.
///
/// Under a short barrier the copy starts taking every live write; then each chunk is copied
/// from an in-sync copy while writes to that chunk wait (the others go on), so every chunk
/// ends as the in-sync copies have it. Under a second short barrier it is flushed and joins
/// the set by compare-and-swap.
pub async fn rebuild(cluster: &Arc<Cluster>, spec: &VolumeSpec, node: &str) -> Result<bool, EngineError> {
    use crate::io::VolumeIo;
    let shared = cluster.shared(&spec.uuid);
    let Some(linker) = shared.linker() else { return Ok(false) };
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let set = cluster.in_sync(&spec.uuid).await.map_err(cluster_err)?.unwrap_or_default();
    let members = set.members.clone();
    if members.iter().any(|m| m == node) {
        return Ok(true);
    }
    shared.adopt(&members)?;
    // The local copy when it is in sync: no network hop for the reads.
    let source = members
        .iter()
        .find(|m| **m == cluster.node)
        .or_else(|| members.first())
        .ok_or_else(|| EngineError::Unavailable("no copy is in sync".into()))?;
    let epoch = cluster.target(&spec.uuid).await.map_err(cluster_err)?.map_or(0, |t| t.epoch);
    // Where the copy left, when the mark is on the local source: only what changed since.
    let departed = set.departed.iter().find(|d| d.node == node).cloned();
    let delta = match (&departed, cluster.engine()) {
        (Some(d), Some(engine)) if d.mark_node == cluster.node && *source == cluster.node => {
            let marked = engine.snapshot(&format!("{}@.{}", spec.name, d.mark)).is_ok();
            match engine.open_volume(&spec.name) {
                Ok(head) if marked => Some((head, format!(".{}", d.mark), d.ranges.clone())),
                _ => None,
            }
        }
        _ => None,
    };
    let (from, to) = (linker.link(source).await?, linker.link(node).await?);
    let size = from.size();
    {
        let _held = shared.order.barrier().await?;
        if !shared.start_rebuild(node, size)? {
            return Ok(false);
        }
    }
    let mut guard = Rebuilding { shared: &shared, node, joined: false };
    let stopped = || EngineError::Unavailable(format!("the rebuild of {node}'s copy stopped (a write failed on it)"));
    let checkpoint = |done: u64| async move {
        let noted = cluster.note_rebuild(&spec.uuid, epoch, node, Some((done, size))).await;
        noted.map_err(cluster_err)?.fenced(&spec.name, epoch)
    };
    checkpoint(0).await?;
    tracing::info!(volume = %spec.name, from = %source, to = node, size, delta = delta.is_some(), "rebuilding a copy beside live writes");
    let (mut at, mut copied, mut recorded) = (0u64, 0u64, 0u64);
    let mut recorded_at = std::time::Instant::now();
    let rate = cluster.rebuild_rate();
    let mut bucket = crate::qos::rate_limiter::TokenBucket::new(rate, CHUNK as f64, std::time::Instant::now());
    while at < size {
        if !shared.rebuilt(node, at)? {
            return Err(stopped());
        }
        let len = (size - at).min(CHUNK as u64) as u32;
        let _chunk = shared.order.enter(at, at + len as u64).await?;
        if let Some((head, mark, ranges)) = &delta
            && !changed_since_mark(head, mark, ranges, at, len)?
        {
            at += len as u64;
            continue;
        }
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
            let sum = crc32c::crc32c(&data);
            to.write(at, data, false).await?;
            // Read back: what the copy stored is what was sent.
            let stored = crate::io::read_all(&to, at, n).await?;
            if crc32c::crc32c(&stored) != sum {
                return Err(EngineError::Unavailable(format!(
                    "{node}'s copy holds other bytes at {at} than were sent (CRC32C {:08x}, sent {sum:08x})",
                    crc32c::crc32c(&stored)
                )));
            }
            copied += n as u64;
        }
        at += n as u64;
        drop(_chunk);
        if at - recorded >= CHECKPOINT || recorded_at.elapsed() >= std::time::Duration::from_secs(1) {
            checkpoint(at).await?;
            (recorded, recorded_at) = (at, std::time::Instant::now());
        }
        if rate > 0 && extent.flags & STATE_HOLE == 0 {
            tokio::time::sleep(bucket.reserve(n as f64, std::time::Instant::now())).await;
        }
    }
    let _held = shared.order.barrier().await?;
    if !shared.rebuilt(node, size)? {
        return Err(stopped());
    }
    to.flush().await?;
    cluster.grow_in_sync(&spec.uuid, node, epoch).await.map_err(cluster_err)?.fenced(&spec.name, epoch)?;
    shared.joined(node)?;
    guard.joined = true;
    if let (Some(d), Some(engine)) = (&departed, cluster.engine())
        && d.mark_node == cluster.node
        && let Err(e) = engine.delete_mark(&spec.name, &d.mark).await
    {
        tracing::warn!(volume = %spec.name, mark = %d.mark, error = %e, "cannot delete a rebuilt copy's mark");
    }
    tracing::info!(volume = %spec.name, node, copied, delta = delta.is_some(), "copy rebuilt and back in sync");
    Ok(true)
}

/// Whether `at..at+len` may differ on a copy that left at `mark`: written since (on the
/// local copy), or among the ranges it may lack from before.
fn changed_since_mark(
    head: &crate::io::LocalVolume,
    mark: &str,
    ranges: &[(u64, u64)],
    at: u64,
    len: u32,
) -> Result<bool, EngineError> {
    let end = at + len as u64;
    if ranges.iter().any(|(s, e)| *s < end && at < *e) {
        return Ok(true);
    }
    let changed = head.changed_since(mark, at, len)?;
    let covered: u64 = changed.iter().map(|e| e.length as u64).sum();
    Ok(covered < len as u64 || changed.iter().any(|e| e.flags & 1 != 0))
}

/// A copy left the in-sync set of `spec` (its target evicted it): mark where, then rebuild it
/// as soon as it can be reached.
pub fn after_departure(cluster: Arc<Cluster>, spec: VolumeSpec, node: String) {
    tokio::spawn(async move {
        mark_departure(&cluster, &spec, &node).await;
        rebuild_soon(cluster, spec, node);
    });
}

/// Marks where `node`'s copy left the in-sync set of `spec`: under the write barrier, a
/// hidden snapshot of this target's copy, and in etcd the ranges the copy may lack from before
/// it (logged by the sessions since the last flush and until now). Its rebuild then copies only
/// those and what changes from here on. Without a local in-sync copy, or with too many ranges,
/// there is no mark and the rebuild copies everything.
async fn mark_departure(cluster: &Arc<Cluster>, spec: &VolumeSpec, node: &str) {
    if let Err(e) = try_mark_departure(cluster, spec, node).await {
        tracing::warn!(volume = %spec.name, node, error = %e, "no mark where a copy left: its rebuild will copy everything");
    }
}

async fn try_mark_departure(cluster: &Arc<Cluster>, spec: &VolumeSpec, node: &str) -> Result<(), EngineError> {
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let shared = cluster.shared(&spec.uuid);
    let _held = shared.order.barrier().await?;
    let Some(ranges) = shared.take_departed(node)? else { return Ok(()) };
    let Some(engine) = cluster.engine() else { return Ok(()) };
    let set = cluster.in_sync(&spec.uuid).await.map_err(cluster_err)?.unwrap_or_default();
    // An earlier mark (the copy never came back since) covers more: it stays. A copy already
    // back, or being rebuilt, needs none.
    let back = set.members.iter().any(|m| m == node) || set.rebuilding.iter().any(|r| r.node == node);
    if back || set.departed.iter().any(|d| d.node == node) || !set.members.contains(&cluster.node) {
        return Ok(());
    }
    let Some(ranges) = ranges else { return Ok(()) };
    let epoch = cluster.target(&spec.uuid).await.map_err(cluster_err)?.map_or(0, |t| t.epoch);
    let mark = format!("departed-{node}");
    engine.delete_mark(&spec.name, &mark).await?;
    engine.create_mark(&spec.name, &mark).await?;
    let departed = super::isr::Departed { node: node.to_string(), mark_node: cluster.node.clone(), mark, ranges };
    let logged = departed.ranges.len();
    cluster
        .note_departure(&spec.uuid, epoch, node, Some(departed))
        .await
        .map_err(cluster_err)?
        .fenced(&spec.name, epoch)?;
    tracing::info!(volume = %spec.name, node, ranges = logged, "marked where a copy left");
    Ok(())
}

/// How long [`rebuild_soon`] keeps trying: a copy cut off by a partition comes back when the
/// partition heals, which no etcd event tells the target (its node stayed registered).
const REBUILD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// [`rebuild`] in the background, tried again (backing off to 30 s) until it is done, the
/// volume has no single-writer session here any more, a newer target took the volume, or
/// [`REBUILD_PATIENCE`] ran out: a node registers before its NBD listener is up, a copy that
/// just left the set is unreachable until its node is back, and a snapshot stops a rebuild in
/// progress.
pub fn rebuild_soon(cluster: Arc<Cluster>, spec: VolumeSpec, node: String) {
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + REBUILD_PATIENCE;
        let mut pause = std::time::Duration::from_millis(250);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let e = match rebuild(&cluster, &spec, &node).await {
                Ok(_) => return,
                Err(e @ EngineError::StaleEpoch { .. }) => {
                    tracing::info!(volume = %spec.name, node, error = %e, "rebuild given up: another target took the volume");
                    return;
                }
                Err(e) => e,
            };
            if tokio::time::Instant::now() + pause > deadline {
                tracing::warn!(volume = %spec.name, node, error = %e, attempt, "rebuild of a copy failed; given up");
                if let Ok(Some(t)) = cluster.target(&spec.uuid).await {
                    let _ = cluster.note_rebuild(&spec.uuid, t.epoch, &node, None).await;
                }
                return;
            }
            tracing::info!(volume = %spec.name, node, error = %e, attempt, "rebuild of a copy failed; trying again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(30));
        }
    });
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
            tracing::info!(volume = %spec.name, node, "a copy's node is back: rebuilding it");
            rebuild_soon(cluster.clone(), spec, node.clone());
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

/// Pieces compared by checksum (the default cluster size).
const PIECE: u32 = 64 << 10;

/// Bytes whose checksums one call asks a node for.
const SCRUB_RANGE: u64 = 16 << 20;

/// Compares the in-sync copies of `spec` (under the write barrier, through this node's
/// session grant): each node computes the CRC32C of its own copy's pieces, only the checksums
/// cross the network. With `repair`, rewrites the differing pieces of each copy from the
/// first one (the local copy when it is in sync). `None` when the volume has no single-writer
/// session on this node.
pub async fn scrub(cluster: &Arc<Cluster>, spec: &VolumeSpec, repair: bool) -> Result<Option<Scrubbed>, EngineError> {
    use crate::io::VolumeIo;
    let shared = cluster.shared(&spec.uuid);
    let Some(linker) = shared.linker() else { return Ok(None) };
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let _held = shared.order.barrier().await?;
    let mut members = cluster.in_sync(&spec.uuid).await.map_err(cluster_err)?.map(|s| s.members).unwrap_or_default();
    if let Some(i) = members.iter().position(|m| *m == cluster.node) {
        members.swap(0, i);
    }
    let mut out = Scrubbed { copies: members.clone(), ..Default::default() };
    let Some(reference) = members.first() else { return Ok(Some(out)) };
    let reference = linker.link(reference).await?;
    let size = reference.size();
    let mut peers = Vec::with_capacity(members.len());
    for node in &members {
        peers.push(cluster.peer(node).map_err(cluster_err)?);
    }
    let mut links: std::collections::HashMap<String, crate::io::Backing> = Default::default();
    let mut repaired = Vec::new();
    let mut at = 0u64;
    while at < size {
        let len = (size - at).min(SCRUB_RANGE) as u32;
        let request =
            thinbd_api::pb::ChecksumsRequest { volume: spec.uuid.clone(), offset: at, length: len, piece_bytes: PIECE };
        let asked = peers.iter_mut().zip(&members).map(|(p, node)| {
            let request = request.clone();
            async move {
                p.checksums(request)
                    .await
                    .map(|r| r.into_inner().crc32c)
                    .map_err(|e| EngineError::Unavailable(format!("checksums of {node}'s copy: {}", e.message())))
            }
        });
        let sums = futures_util::future::try_join_all(asked).await?;
        let mut bad = std::collections::BTreeSet::new();
        for (node, theirs) in members.iter().zip(&sums).skip(1) {
            for (i, (a, b)) in sums[0].iter().zip(theirs).enumerate() {
                if a != b {
                    bad.insert(i);
                    if repair {
                        let piece_at = at + i as u64 * PIECE as u64;
                        let piece_len = (size - piece_at).min(PIECE as u64) as u32;
                        let data = crate::io::read_all(&reference, piece_at, piece_len).await?;
                        if !links.contains_key(node) {
                            links.insert(node.clone(), linker.link(node).await?);
                        }
                        if let Some(copy) = links.get(node) {
                            copy.write(piece_at, data, false).await?;
                        }
                        repaired.push(node.clone());
                    }
                }
            }
        }
        for i in bad {
            let offset = at + i as u64 * PIECE as u64;
            out.differing.push((offset, (size - offset).min(PIECE as u64)));
        }
        out.compared += len as u64 * members.len() as u64;
        at += len as u64;
    }
    for copy in links.values() {
        copy.flush().await?;
    }
    out.repaired = !repaired.is_empty();
    tracing::info!(volume = %spec.name, copies = ?members, differing = out.differing.len(), repaired = out.repaired, "scrubbed");
    Ok(Some(out))
}
