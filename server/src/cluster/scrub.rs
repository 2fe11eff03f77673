//! Comparing a replicated volume's in-sync copies by checksum: each node computes the CRC32C
//! of its own copy's 64 KiB pieces, only the checksums cross the network, and the pieces that
//! differ from the first copy can be rewritten from it. A scrub compares everything (the
//! volume and its snapshots) on request; a new target reconciles only the regions where the
//! last target may have left writes in flight ([`crate::io::activity`]), before it serves the
//! volume.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::Cluster;
use super::isr::Shrunk;
use super::volumes::VolumeSpec;
use crate::error::EngineError;
use crate::io::{ActivityRecord, Backing, Linker, Shared, VolumeIo};

/// What a scrub found.
#[derive(Debug, Default)]
pub struct Scrubbed {
    pub copies: Vec<String>,
    pub compared: u64,
    /// (offset, length) pieces of the volume where some copy differs from the first.
    pub differing: Vec<(u64, u64)>,
    /// The snapshots compared, by name.
    pub snapshots: Vec<String>,
    /// (snapshot, offset, length) pieces of snapshots where some copy differs from the first
    /// (the whole snapshot where a copy lacks it).
    pub snapshot_differing: Vec<(String, u64, u64)>,
    pub repaired: bool,
}

/// The SHA-256 of a piece: what decides that a copy already holds it (a delta rebuild then
/// does not send it). CRC32C is linear and 32 bits: fine to find a difference, too weak to
/// declare two pieces equal.
pub fn digest(piece: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(piece).to_vec()
}

/// Pieces compared by checksum (the default cluster size).
const PIECE: u32 = 64 << 10;

/// Bytes whose checksums one call asks a node for.
const SCRUB_RANGE: u64 = 16 << 20;

/// The CRC32C of each piece of `at..at+len` of `what` (a volume's or snapshot's UUID) on each
/// of `members`' copies; `None` for a copy that does not have `what`.
async fn checksums(
    peers: &mut [super::Peer],
    members: &[String],
    what: &str,
    at: u64,
    len: u32,
) -> Result<Vec<Option<Vec<u32>>>, EngineError> {
    let request = thinbd_api::pb::ChecksumsRequest {
        volume: what.to_string(),
        offset: at,
        length: len,
        piece_bytes: PIECE,
        sha256: false,
    };
    let asked = peers.iter_mut().zip(members).map(|(p, node)| {
        let request = request.clone();
        async move {
            match p.checksums(request).await {
                Ok(r) => Ok(Some(r.into_inner().crc32c)),
                Err(e) if e.code() == tonic::Code::NotFound => Ok(None),
                Err(e) => Err(EngineError::Unavailable(format!("checksums of {node}'s copy: {}", e.message()))),
            }
        }
    });
    futures_util::future::try_join_all(asked).await
}

/// Indexes of the pieces where a copy differs from the first; every piece where a copy lacks
/// what is compared.
fn differing_pieces(sums: &[Option<Vec<u32>>], pieces: usize) -> BTreeMap<usize, Vec<usize>> {
    let mut bad: BTreeMap<usize, Vec<usize>> = Default::default();
    for (copy, theirs) in sums.iter().enumerate().skip(1) {
        for i in 0..pieces {
            let reference = sums[0].as_ref().and_then(|s| s.get(i));
            if theirs.as_ref().and_then(|s| s.get(i)) != reference {
                bad.entry(i).or_default().push(copy);
            }
        }
    }
    bad
}

/// What comparing the volume's head came to.
#[derive(Default)]
struct Compared {
    bytes: u64,
    differing: Vec<(u64, u64)>,
    /// Nodes whose copy was rewritten somewhere.
    repaired: Vec<String>,
}

/// Compares `members`' copies of the volume `uuid` (the first is the reference) in `ranges`;
/// with `repair`, rewrites each differing piece on the copies that differ from the first one
/// and flushes them.
async fn compare_head(
    cluster: &Arc<Cluster>,
    linker: &dyn Linker,
    members: &[String],
    uuid: &str,
    ranges: &[(u64, u64)],
    repair: bool,
) -> Result<Compared, EngineError> {
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let mut out = Compared::default();
    let Some(reference) = members.first() else { return Ok(out) };
    let reference = linker.link(reference).await?;
    let size = reference.size();
    let mut peers = Vec::with_capacity(members.len());
    for node in members {
        peers.push(cluster.peer(node).map_err(cluster_err)?);
    }
    let mut links: std::collections::HashMap<String, Backing> = Default::default();
    for &(start, end) in ranges {
        let (mut at, end) = (start.min(size), end.min(size));
        while at < end {
            let len = (end - at).min(SCRUB_RANGE) as u32;
            let sums = checksums(&mut peers, members, uuid, at, len).await?;
            for (i, copies) in differing_pieces(&sums, (len as usize).div_ceil(PIECE as usize)) {
                let offset = at + i as u64 * PIECE as u64;
                let piece_len = (end - offset).min(PIECE as u64);
                out.differing.push((offset, piece_len));
                if !repair {
                    continue;
                }
                let data = crate::io::read_all(&reference, offset, piece_len as u32).await?;
                for node in copies.into_iter().map(|c| &members[c]) {
                    if !links.contains_key(node) {
                        links.insert(node.clone(), linker.link(node).await?);
                    }
                    if let Some(copy) = links.get(node) {
                        copy.write(offset, data.clone(), false).await?;
                    }
                    if !out.repaired.contains(node) {
                        out.repaired.push(node.clone());
                    }
                }
            }
            out.bytes += len as u64 * members.len() as u64;
            at += len as u64;
        }
    }
    for copy in links.values() {
        copy.flush().await?;
    }
    Ok(out)
}

/// The in-sync members, the local copy first when it is one.
async fn members_here_first(cluster: &Arc<Cluster>, uuid: &str) -> Result<Vec<String>, EngineError> {
    let set = cluster.in_sync(uuid).await.map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let mut members = set.map(|s| s.members).unwrap_or_default();
    if let Some(i) = members.iter().position(|m| *m == cluster.node) {
        members.swap(0, i);
    }
    Ok(members)
}

/// Compares the in-sync copies of `spec` (under the write barrier, through this node's
/// session grant), the volume and each of its snapshots. With `repair`, rewrites the volume's
/// differing pieces on each copy from the first one (the local copy when it is in sync); a
/// snapshot that differs is reported (its layers are not rewritten: rebuild that copy).
/// `None` when the volume has no writer's session on this node (its target).
pub async fn scrub(cluster: &Arc<Cluster>, spec: &VolumeSpec, repair: bool) -> Result<Option<Scrubbed>, EngineError> {
    let shared = cluster.shared(&spec.uuid);
    let Some(linker) = shared.linker() else { return Ok(None) };
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let _held = shared.order.barrier().await?;
    let members = members_here_first(cluster, &spec.uuid).await?;
    let mut out = Scrubbed { copies: members.clone(), ..Default::default() };
    let head = compare_head(cluster, &*linker, &members, &spec.uuid, &[(0, u64::MAX)], repair).await?;
    (out.compared, out.differing, out.repaired) = (head.bytes, head.differing, !head.repaired.is_empty());
    let mut peers = Vec::with_capacity(members.len());
    for node in &members {
        peers.push(cluster.peer(node).map_err(cluster_err)?);
    }
    let mut snapshots = cluster.snapshot_specs().await.map_err(cluster_err)?;
    snapshots.retain(|s| s.volume_uuid == spec.uuid);
    snapshots.sort_by_key(|s| s.created_unix);
    for snap in snapshots {
        let mut at = 0u64;
        while at < snap.size_bytes {
            let len = (snap.size_bytes - at).min(SCRUB_RANGE) as u32;
            let sums = checksums(&mut peers, &members, &snap.uuid, at, len).await?;
            if sums.iter().any(Option::is_none) {
                out.snapshot_differing.push((snap.name.clone(), 0, snap.size_bytes));
                break;
            }
            for i in differing_pieces(&sums, (len as usize).div_ceil(PIECE as usize)).into_keys() {
                let offset = at + i as u64 * PIECE as u64;
                out.snapshot_differing.push((snap.name.clone(), offset, (snap.size_bytes - offset).min(PIECE as u64)));
            }
            out.compared += len as u64 * members.len() as u64;
            at += len as u64;
        }
        out.snapshots.push(snap.name);
    }
    tracing::info!(
        volume = %spec.name, copies = ?members, differing = out.differing.len(), snapshots = out.snapshots.len(),
        snapshot_differing = out.snapshot_differing.len(), repaired = out.repaired, "scrubbed"
    );
    Ok(Some(out))
}

/// The activity record as the target of one epoch keeps it, in the volume's in-sync record.
pub struct TargetActivity {
    pub cluster: Arc<Cluster>,
    pub uuid: String,
    pub volume: String,
    pub epoch: u64,
}

/// How long a write into a new region waits for etcd to record it before it fails.
const RECORD_PATIENCE: Duration = Duration::from_secs(60);

impl TargetActivity {
    /// Replaces the record with `ranges` (and clears `equal` from the suspect copies); waits
    /// while etcd cannot be reached.
    async fn put(&self, ranges: &[(u64, u64)], equal: &[String]) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + RECORD_PATIENCE;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.cluster.record_activity(&self.uuid, self.epoch, ranges, equal).await {
                Ok(Shrunk::Stale { newer }) => {
                    return Err(EngineError::StaleEpoch {
                        volume: self.volume.clone(),
                        epoch: self.epoch,
                        promised: newer,
                    });
                }
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, volume = %self.volume, "cannot record where writes go yet; they wait");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(EngineError::Unavailable(format!("cannot record where writes go: {e}"))),
            }
        }
    }

    /// The take-over's record: empty, of this epoch; `equal` are no longer suspect.
    async fn take_over(&self, equal: &[String]) -> Result<(), EngineError> {
        self.put(&[], equal).await
    }
}

impl ActivityRecord for TargetActivity {
    /// No copy sees a write before its region is recorded.
    fn record<'a>(
        &'a self,
        ranges: Vec<(u64, u64)>,
    ) -> Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send + 'a>> {
        Box::pin(async move { self.put(&ranges, &[]).await })
    }
}

/// What the last target of `spec` left for this one to reconcile.
pub struct Inherited {
    /// Where it may have left writes in flight (`None`: anywhere).
    ranges: Option<Vec<(u64, u64)>>,
    /// Members whose node stopped uncleanly since they were last made equal to another copy.
    suspect: Vec<String>,
}

/// Reads what the last target of `spec` left (its activity record, the suspect copies),
/// unless this target's take-over already ran, and logs the ranges in `shared` as this
/// target's own unflushed writes (a copy that leaves now gets them in its rebuild). Call before
/// linking to the copies, under [`crate::io::Activity::take_over`].
pub async fn inherit(
    cluster: &Arc<Cluster>,
    spec: &VolumeSpec,
    shared: &Shared,
    epoch: u64,
) -> Result<Option<Inherited>, EngineError> {
    if shared.activity.current(epoch) {
        return Ok(None);
    }
    let set = cluster.in_sync(&spec.uuid).await.map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let suspect = set.as_ref().map(|s| s.suspect.clone()).unwrap_or_default();
    let ranges = match set.and_then(|s| s.active) {
        Some(a) if a.everywhere => None,
        Some(a) => Some(a.ranges),
        None => Some(Vec::new()),
    };
    shared.inherit(ranges.as_deref())?;
    Ok(Some(Inherited { ranges, suspect }))
}

/// The order copies are compared in: the first is the reference — this node's copy, unless
/// its node stopped uncleanly since it was last made equal (suspect), then the others that
/// are not suspect, the suspect ones last.
fn reference_first(mut members: Vec<String>, here: &str, suspect: &[String]) -> Vec<String> {
    members.sort_by_key(|m| (suspect.contains(m), m != here));
    members
}

/// A new target of `spec` (epoch `epoch`, linked by `linker`) makes its in-sync copies equal
/// where the last target may have left writes in flight, from a copy that is not suspect (its
/// own when it can), then starts its own activity record. Call before serving, under
/// [`crate::io::Activity::take_over`].
pub async fn reconcile(
    cluster: &Arc<Cluster>,
    spec: &VolumeSpec,
    shared: &Shared,
    linker: &dyn Linker,
    epoch: u64,
    left: Inherited,
) -> Result<(), EngineError> {
    let ranges = left.ranges.unwrap_or_else(|| vec![(0, u64::MAX)]);
    let set = cluster.in_sync(&spec.uuid).await.map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let members = reference_first(set.map(|s| s.members).unwrap_or_default(), &cluster.node, &left.suspect);
    let mut equal = Vec::new();
    if let Some(reference) = members.first() {
        if left.suspect.contains(reference) {
            tracing::warn!(
                volume = %spec.name, copies = ?members,
                "every in-sync copy's node stopped uncleanly: writes none of them flushed may be lost"
            );
        }
        if !ranges.is_empty() {
            let found = compare_head(cluster, linker, &members, &spec.uuid, &ranges, true).await?;
            tracing::info!(
                volume = %spec.name, epoch, copies = ?members, regions = ranges.len(), compared = found.bytes,
                differing = found.differing.len(), repaired = ?found.repaired,
                "reconciled where the last target may have left writes in flight"
            );
        }
        equal = members.clone();
    }
    let record = Arc::new(TargetActivity {
        cluster: cluster.clone(),
        uuid: spec.uuid.clone(),
        volume: spec.name.clone(),
        epoch,
    });
    record.take_over(&equal).await?;
    shared.activity.begin(epoch, record)
}
