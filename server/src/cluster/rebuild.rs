//! Rebuilding a copy of a replicated volume that left the in-sync set, on the volume's target
//! (where its writes are ordered). The copy takes live writes while the allocated ranges of an
//! in-sync copy are copied to it chunk by chunk and the ranges that copy does not map are
//! unmapped on it; it is flushed and added to the in-sync set by compare-and-swap. Its state
//! (Rebuilding, how far) is recorded in the in-sync set's record.
//!
//! Every chunk written is checked: the copy's node computes the CRC32C of what it stored, which
//! must match what was sent.
//!
//! A copy that left the set comes back with the snapshot layers it lacks and, where its target
//! marked the point it left (a hidden snapshot), only the chunks changed since; within those,
//! only the 4 KiB blocks whose SHA-256 differs on the copy are sent.

use std::sync::Arc;

use thinbd_protocol::consts::STATE_HOLE;

use super::Cluster;
use super::isr::Departed;
use super::layer_source::Source;
use super::volumes::VolumeSpec;
use crate::error::EngineError;
use crate::io::{Backing, RemoteVolume, VolumeIo};

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

/// What a copy's head is known to hold: what `layer` (a snapshot or mark of the local copy,
/// by name) holds, except within `ranges`. With no layer nothing is known and every range is
/// copied.
#[derive(Clone, Default)]
struct Known {
    layer: Option<String>,
    ranges: Vec<(u64, u64)>,
}

/// Writes pieces of a source onto the copy being rebuilt, at the target's rebuild rate,
/// several chunks at a time.
struct Copier<'a> {
    to: &'a Backing,
    node: &'a str,
    /// How what was written is checked: the copy's node computes the CRC32C of what it stored
    /// (only the checksum crosses the network).
    verify: super::Peer,
    volume: &'a str,
    /// The copy holds an earlier version of what is copied (a delta or resumed rebuild): only
    /// the blocks whose SHA-256 differs there are sent.
    diff: bool,
    rate: u64,
    bucket: std::sync::Mutex<crate::qos::rate_limiter::TokenBucket>,
    /// Bytes of data written (holes are unmapped, not counted).
    copied: std::sync::atomic::AtomicU64,
}

/// Bytes of data the checks cover.
fn data_of(checks: &[Unchecked]) -> u64 {
    checks.iter().map(|c| c.len as u64).sum()
}

/// A piece written to the copy, with the CRC32C of what was sent.
struct Unchecked {
    at: u64,
    len: u32,
    sum: u32,
}

/// The unit a delta rebuild compares and sends: the block size clients write in.
const BLOCK: usize = 4096;

/// Chunks copied at once: a rebuild keeps the link busy while each chunk is read, written
/// and checked in turn.
const PARALLEL: usize = 16;

impl<'a> Copier<'a> {
    fn new(to: &'a Backing, node: &'a str, verify: super::Peer, volume: &'a str, diff: bool, rate: u64) -> Self {
        let bucket = crate::qos::rate_limiter::TokenBucket::new(rate, CHUNK as f64, std::time::Instant::now());
        Copier { to, node, verify, volume, diff, rate, bucket: bucket.into(), copied: Default::default() }
    }

    fn copied(&self) -> u64 {
        self.copied.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the copy hold what `from` holds from `at`, up to `len` bytes or the end of the
    /// first extent there: unmapped for a hole, else the data. Returns how far it got (more than 0), and the written data's check, still to be
    /// made ([`Copier::check`]).
    async fn piece(&self, from: &impl VolumeIo, at: u64, len: u32) -> Result<(u32, Option<Unchecked>), EngineError> {
        let extents = from.block_status(at, len).await?;
        let Some(extent) = extents.first() else {
            return Err(EngineError::Unavailable(format!("no extent at {at} from the source copy")));
        };
        let n = extent.length.min(len);
        if n == 0 {
            return Err(EngineError::Unavailable(format!("an empty extent at {at} from the source copy")));
        }
        if extent.flags & STATE_HOLE != 0 {
            self.to.trim(at, n, false).await?;
            return Ok((n, None));
        }
        let data = crate::io::read_all(from, at, n).await?;
        let sum = crc32c::crc32c(&data);
        let sent = if self.diff {
            self.write_differing(at, data).await?
        } else {
            self.to.write(at, data, false).await?;
            n as u64
        };
        self.copied.fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
        Ok((n, Some(Unchecked { at, len: n, sum })))
    }

    /// Writes to the copy the runs of [`BLOCK`]s of `data` (at `at`) whose SHA-256 differs
    /// from what the copy holds there (its node computes them: only digests cross the
    /// network). A copy that missed a few 4 KiB writes into a cluster gets those, not the
    /// cluster. Returns the bytes sent.
    async fn write_differing(&self, at: u64, data: bytes::Bytes) -> Result<u64, EngineError> {
        let theirs = self.stored(at, data.len() as u32, BLOCK as u32, true).await?.sha256;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, block) in data.chunks(BLOCK).enumerate() {
            if theirs.get(i).is_some_and(|t| *t == super::scrub::digest(block)) {
                continue;
            }
            let (start, end) = (i * BLOCK, i * BLOCK + block.len());
            match runs.last_mut() {
                Some(run) if run.1 == start => run.1 = end,
                _ => runs.push((start, end)),
            }
        }
        let writes = runs.iter().map(|&(s, e)| self.to.write(at + s as u64, data.slice(s..e), false));
        futures_util::future::try_join_all(writes).await?;
        Ok(runs.iter().map(|(s, e)| (e - s) as u64).sum())
    }

    /// Charges `n` bytes about to be copied to the rebuild rate (before the copy starts, so
    /// that no more start meanwhile); what turned out to be holes is given back by
    /// [`Copier::refund`].
    fn charge(&self, n: u64) -> Result<(), EngineError> {
        if self.rate > 0 {
            let mut bucket = self.bucket.lock().map_err(|_| crate::error::poisoned())?;
            bucket.reserve(n as f64, std::time::Instant::now());
        }
        Ok(())
    }

    fn refund(&self, n: u64) -> Result<(), EngineError> {
        if self.rate > 0 && n > 0 {
            let mut bucket = self.bucket.lock().map_err(|_| crate::error::poisoned())?;
            bucket.refund(n as f64, std::time::Instant::now());
        }
        Ok(())
    }

    /// How long until what was copied so far is paid for at the rebuild rate: no chunk starts
    /// before.
    fn owed(&self) -> Result<std::time::Duration, EngineError> {
        if self.rate == 0 {
            return Ok(std::time::Duration::ZERO);
        }
        let mut bucket = self.bucket.lock().map_err(|_| crate::error::poisoned())?;
        Ok(bucket.reserve(0.0, std::time::Instant::now()))
    }

    /// Waits until the rebuild is within its rate.
    async fn ready(&self) -> Result<(), EngineError> {
        loop {
            let wait = self.owed()?;
            if wait.is_zero() {
                return Ok(());
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Whether the copy's node stores what was written: it computes the CRC32C of what it
    /// stored (only the checksum crosses the network), which must be the one sent.
    async fn check(&self, u: &Unchecked) -> Result<bool, EngineError> {
        Ok(self.stored(u.at, u.len, u.len, false).await?.crc32c.as_slice() == [u.sum])
    }

    /// What the copy's node computes over its own copy at `at..at+len`, per `piece` bytes:
    /// CRC32C, and SHA-256 when `sha256`.
    async fn stored(
        &self,
        at: u64,
        len: u32,
        piece: u32,
        sha256: bool,
    ) -> Result<thinbd_api::pb::ChecksumsResponse, EngineError> {
        let asked = thinbd_api::pb::ChecksumsRequest {
            volume: self.volume.to_string(),
            offset: at,
            length: len,
            piece_bytes: piece,
            sha256,
        };
        let stored = self.verify.clone().checksums(asked).await.map_err(|e| {
            EngineError::Unavailable(format!("checksums of {}'s copy at {at}: {}", self.node, e.message()))
        })?;
        Ok(stored.into_inner())
    }

    /// [`Copier::piece`] over all of `start..start+len`, in order: the checks to make.
    async fn range_unchecked(&self, from: &impl VolumeIo, start: u64, len: u64) -> Result<Vec<Unchecked>, EngineError> {
        let end = start + len;
        let (mut at, mut checks) = (start, Vec::new());
        while at < end {
            let (n, check) = self.piece(from, at, (end - at).min(CHUNK as u64) as u32).await?;
            at += n as u64;
            checks.extend(check);
        }
        Ok(checks)
    }

    /// Makes every check of `checks` (at once); false when one found other bytes.
    async fn all_stored(&self, checks: &[Unchecked]) -> Result<bool, EngineError> {
        let found = futures_util::future::try_join_all(checks.iter().map(|c| self.check(c))).await?;
        Ok(found.into_iter().all(|ok| ok))
    }

    /// [`Copier::range_unchecked`], checked: fails when the copy stored other bytes than were
    /// sent. Only where no live write can come in between (the copy takes none yet, or the
    /// range lock is held). Returns the bytes of data written.
    async fn range(&self, from: &impl VolumeIo, start: u64, len: u64) -> Result<u64, EngineError> {
        let checks = self.range_unchecked(from, start, len).await?;
        if !self.all_stored(&checks).await? {
            return Err(EngineError::Unavailable(format!(
                "{}'s copy holds other bytes in {start}..{} than were sent (CRC32C)",
                self.node,
                start + len
            )));
        }
        Ok(data_of(&checks))
    }

    /// [`Copier::range`] over each of `ranges`, cut into chunks copied [`PARALLEL`] at a time.
    async fn ranges(&self, from: &impl VolumeIo, ranges: &[(u64, u64)]) -> Result<(), EngineError> {
        use futures_util::StreamExt;
        let mut copies = futures_util::stream::FuturesUnordered::new();
        for &(start, end) in ranges {
            let mut at = start;
            while at < end {
                if copies.len() == PARALLEL
                    && let Some(done) = copies.next().await
                {
                    done?;
                }
                let len = (end - at).min(CHUNK as u64);
                self.ready().await?;
                self.charge(len)?;
                let from_at = at;
                copies.push(async move { self.refund(len - self.range(from, from_at, len).await?) });
                at += len;
            }
        }
        while let Some(done) = copies.next().await {
            done?;
        }
        Ok(())
    }
}

/// Ascending, merged `(start, end)` ranges.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Gives the copy on `node` every snapshot of the `source` copy of `spec` it lacks, oldest
/// first, with the same UUIDs: each snapshot's content is copied onto the copy's head (only
/// what differs from what the head is `known` to hold), then the copy takes the snapshot. A
/// copy's snapshots the source does not have (deleted while it was away), or that come after
/// one it lacks (layers stack only on top), are deleted on it first. Returns what the copy's
/// head holds afterwards. The copy takes no live writes meanwhile.
async fn copy_layers(
    cluster: &Arc<Cluster>,
    spec: &VolumeSpec,
    node: &str,
    source: &Source,
    copier: &Copier<'_>,
    mut known: Known,
) -> Result<(Known, usize), EngineError> {
    use thinbd_api::pb;
    let peer_err = |e: tonic::Status| EngineError::Unavailable(format!("{node}: {}", e.message()));
    let chain = source.layers(spec).await?;
    let position = |name: &str| chain.iter().position(|s| s.name == name);
    let ours: Vec<_> = chain.iter().filter(|s| !crate::engine::is_mark(&s.name)).collect();
    let mut peer = cluster.peer(node).map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let theirs = their_snapshots(&mut peer, spec, node).await?;
    let had = ours.iter().take_while(|s| theirs.iter().any(|t| t.uuid == s.uuid)).count();
    for t in theirs.iter().filter(|t| !ours[..had].iter().any(|s| s.uuid == t.uuid)) {
        tracing::info!(volume = %spec.name, node, snapshot = %t.name, "deleting a snapshot on a copy being rebuilt");
        let gone = pb::DeleteSnapshotRequest { key: t.uuid.clone(), here: true };
        peer.delete_snapshot(gone).await.map_err(peer_err)?;
    }
    // A snapshot the copy holds from after its mark came from an earlier try of this rebuild:
    // its head holds that snapshot (and at most part of the next one, within what differs).
    if let (Some(last), Some(mark)) = (had.checked_sub(1).map(|i| ours[i]), &known.layer)
        && position(&last.name) > position(mark)
    {
        known = Known { layer: Some(last.name.clone()), ranges: Vec::new() };
    }
    for s in &ours[had..] {
        let from = source.open(spec, Some(&s.name)).await?;
        let ranges = match &known.layer {
            None => vec![(0, s.size)],
            Some(base) => {
                let (older, newer) = if position(base) < position(&s.name) {
                    (base.as_str(), s.name.as_str())
                } else {
                    (s.name.as_str(), base.as_str())
                };
                let differ = source.changed(spec, older, Some(newer)).await?;
                let all = differ.into_iter().chain(known.ranges.iter().copied());
                merged(all.map(|(a, e)| (a, e.min(s.size))).filter(|(a, e)| a < e).collect())
            }
        };
        copier.ranges(&from, &ranges).await?;
        copier.to.flush().await?;
        let taken = pb::CreateSnapshotRequest {
            volume: spec.uuid.clone(),
            name: s.name.clone(),
            here: true,
            uuid: s.uuid.clone(),
            ..Default::default()
        };
        peer.create_snapshot(taken).await.map_err(peer_err)?;
        tracing::info!(volume = %spec.name, node, snapshot = %s.name, "a copy being rebuilt took a snapshot layer");
        known = Known { layer: Some(s.name.clone()), ranges: Vec::new() };
    }
    Ok((known, ours.len() - had))
}

/// The snapshots `node`'s copy of `spec` holds (not those the cluster records elsewhere).
async fn their_snapshots(
    peer: &mut super::Peer,
    spec: &VolumeSpec,
    node: &str,
) -> Result<Vec<thinbd_api::pb::Snapshot>, EngineError> {
    let listed = thinbd_api::pb::ListSnapshotsRequest { volume: spec.uuid.clone(), here: true, layers: false };
    let theirs = peer.list_snapshots(listed).await;
    Ok(theirs.map_err(|e| EngineError::Unavailable(format!("{node}: {}", e.message())))?.into_inner().snapshots)
}

/// Whether the copy on `node` holds exactly the snapshots of the `source` copy of `spec`.
async fn same_snapshots(
    cluster: &Arc<Cluster>,
    spec: &VolumeSpec,
    node: &str,
    source: &Source,
) -> Result<bool, EngineError> {
    let mut peer = cluster.peer(node).map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let mut theirs: Vec<String> = their_snapshots(&mut peer, spec, node).await?.into_iter().map(|s| s.uuid).collect();
    let layers = source.layers(spec).await?;
    let mut ours: Vec<String> =
        layers.into_iter().filter(|l| !crate::engine::is_mark(&l.name)).map(|l| l.uuid).collect();
    theirs.sort();
    ours.sort();
    Ok(theirs == ours)
}

/// The in-sync copy a rebuild of `node`'s copy reads: one holding the mark where it left (for
/// a delta), the local one first; else the local one; else any. Copies suspect of lacking
/// unflushed writes come last.
fn pick_source<'a>(set: &'a super::isr::InSync, departed: Option<&Departed>, here: &str) -> Option<&'a String> {
    set.members.iter().min_by_key(|m| {
        let marked = departed.is_some_and(|d| d.marked.contains(m));
        (set.suspect.contains(m), !marked, *m != here)
    })
}

/// Rebuilds the copy of `spec` on `node` beside live writes and adds it to the in-sync set.
/// Needs a session of the volume on this node (its grant opens the links); `Ok(false)` when
/// there is none, or the copy is already being rebuilt.
///
/// The copy first gets the snapshot layers it lacks from the source (an in-sync copy, see
/// [`pick_source`]; oldest first, each only where it differs from what the copy holds). Then,
/// under a short barrier, it starts taking every live write; each chunk that may differ is
/// copied from the source while writes to that chunk wait (the others go on), so every chunk
/// ends as the in-sync copies have it. Under a second short barrier it is flushed and joins
/// the set by compare-and-swap.
pub async fn rebuild(cluster: &Arc<Cluster>, spec: &VolumeSpec, node: &str) -> Result<bool, EngineError> {
    let shared = cluster.shared(&spec.uuid);
    let Some(linker) = shared.linker() else { return Ok(false) };
    let cluster_err = |e: super::ClusterError| EngineError::Unavailable(e.to_string());
    let set = cluster.in_sync(&spec.uuid).await.map_err(cluster_err)?.unwrap_or_default();
    let members = set.members.clone();
    if members.iter().any(|m| m == node) {
        return Ok(true);
    }
    shared.adopt(&members)?;
    let departed = set.departed.iter().find(|d| d.node == node).cloned();
    let source_node = pick_source(&set, departed.as_ref(), &cluster.node)
        .ok_or_else(|| EngineError::Unavailable("no copy is in sync".into()))?
        .clone();
    let source = Source::on(cluster, &source_node, linker.clone())?;
    let epoch = cluster.target(&spec.uuid).await.map_err(cluster_err)?.map_or(0, |t| t.epoch);
    // Where the copy left, when the source holds the mark: only what changed since.
    let mut known = match &departed {
        Some(d) if d.marked.contains(&source_node) => {
            let layer = format!(".{}", d.mark);
            let marked = source.layers(spec).await?.iter().any(|l| l.name == layer);
            Known { ranges: if marked { d.ranges.clone() } else { Vec::new() }, layer: Some(layer).filter(|_| marked) }
        }
        _ => Known::default(),
    };
    let from = source.open(spec, None).await?;
    let to = linker.link(node).await?;
    let size = from.size();
    let verify = cluster.peer(node).map_err(cluster_err)?;
    let delta = known.layer.is_some();
    // How far an earlier rebuild of this copy got (flushed on the copy when recorded), under
    // this target or the one before (no writes this target's log lacks came in between).
    let before = set.rebuilding.iter().find(|r| r.node == node).map(|r| (r.done.min(size), r.epoch));
    let diff = delta || before.is_some_and(|(done, _)| done > 0);
    let copier = Copier::new(&to, node, verify, &spec.uuid, diff, cluster.rebuild_rate());
    let layers;
    (known, layers) = copy_layers(cluster, spec, node, &source, &copier, known).await?;
    let (resume, since) = {
        let _held = shared.order.barrier().await?;
        if !shared.start_rebuild(node, size)? {
            return Ok(false);
        }
        // What changed on the source's head since the layer the copy's head holds: looked up
        // chunk by chunk in place, or listed once here (from now on the copy takes every
        // write itself).
        let since = match (&known.layer, &source) {
            (None, _) => Since::Unknown,
            (Some(_), Source::Local(engine)) => Since::Local(engine.open_volume(&spec.name)?),
            (Some(layer), Source::Remote { .. }) => Since::Listed(source.changed(spec, layer, None).await?),
        };
        // Below where it got, the copy lacks only what was written since it stopped taking
        // writes — unless it just got a layer (its head changed under that part too).
        let resume = match before {
            Some((done, under)) if done > 0 && layers == 0 => {
                shared.missed_since_stop(node, under, epoch)?.map(|missed| (done, merged(missed)))
            }
            _ => None,
        };
        (resume, since)
    };
    let resumed_from = resume.as_ref().map_or(0, |(done, _)| *done);
    let plan = ToCopy { resume, since, known };
    let mut guard = Rebuilding { shared: &shared, node, joined: false };
    let stopped = || EngineError::Unavailable(format!("the rebuild of {node}'s copy stopped (a write failed on it)"));
    // What is recorded as done is durable on the copy: a later rebuild resumes there.
    let checkpoint = |done: u64| {
        let to = &to;
        async move {
            to.flush().await?;
            let noted = cluster.note_rebuild(&spec.uuid, epoch, node, Some((done, size))).await;
            noted.map_err(cluster_err)?.fenced(&spec.name, epoch)
        }
    };
    checkpoint(resumed_from).await?;
    tracing::info!(
        volume = %spec.name, from = %source_node, to = node, size, delta, layers, resumed_from,
        "rebuilding a copy beside live writes"
    );
    // A window of chunks in flight (none straddling where a resumed rebuild had got), each
    // under its own range lock: writes to those chunks wait, the others go on. Everything below
    // the lowest chunk still in flight is done.
    let mut chunks = futures_util::stream::FuturesUnordered::new();
    let mut in_flight = std::collections::BTreeSet::new();
    let (mut at, mut recorded) = (0u64, resumed_from);
    let mut recorded_at = std::time::Instant::now();
    while at < size || !chunks.is_empty() {
        while chunks.len() < PARALLEL && at < size {
            // Within the rate before the next chunk; the chunks in flight go on meanwhile (they
            // hold their range locks).
            if !copier.owed()?.is_zero() {
                if !chunks.is_empty() {
                    break;
                }
                copier.ready().await?;
            }
            let mut end = (at + CHUNK as u64).min(size);
            if resumed_from > at {
                end = end.min(resumed_from);
            }
            copier.charge(end - at)?;
            let (start, plan, copier, from, shared) = (at, &plan, &copier, &from, &shared);
            chunks.push(async move { copy_chunk(shared, copier, from, plan, start, end).await.map(|()| start) });
            in_flight.insert(at);
            at = end;
        }
        if let Some(done) = futures_util::StreamExt::next(&mut chunks).await {
            in_flight.remove(&done?);
        }
        let done = in_flight.first().copied().unwrap_or(at);
        if !shared.rebuilt(node, done.max(resumed_from))? {
            return Err(stopped());
        }
        if done.saturating_sub(recorded) >= CHECKPOINT || recorded_at.elapsed() >= std::time::Duration::from_secs(1) {
            checkpoint(done).await?;
            (recorded, recorded_at) = (done, std::time::Instant::now());
        }
    }
    let _held = shared.order.barrier().await?;
    if !shared.rebuilt(node, size)? {
        return Err(stopped());
    }
    // A snapshot taken while the layers were copied is not on the copy: the next try adds it.
    if !same_snapshots(cluster, spec, node, &source).await? {
        return Err(EngineError::Unavailable(format!("{node}'s copy lacks a snapshot taken during its rebuild")));
    }
    to.flush().await?;
    cluster.grow_in_sync(&spec.uuid, node, epoch).await.map_err(cluster_err)?.fenced(&spec.name, epoch)?;
    shared.joined(node)?;
    guard.joined = true;
    tracing::info!(volume = %spec.name, node, copied = copier.copied(), delta, layers, resumed_from, "copy rebuilt and back in sync");
    if let Some(d) = &departed {
        super::marks::delete(cluster, &spec.name, d).await;
    }
    Ok(true)
}

/// What changed on the source's head since the layer the copy's head is known to hold.
enum Since {
    /// No such layer: everything may differ.
    Unknown,
    /// The local copy's head, looked up chunk by chunk.
    Local(crate::io::LocalVolume),
    /// Listed by a remote source when the copy started taking live writes.
    Listed(Vec<(u64, u64)>),
}

/// What the live phase of a rebuild copies.
struct ToCopy {
    /// Where an earlier rebuild had got, and what the copy missed below it since.
    resume: Option<(u64, Vec<(u64, u64)>)>,
    since: Since,
    known: Known,
}

impl ToCopy {
    /// The parts of chunk `start..end` that may differ on the copy: below where a resumed
    /// rebuild had got, what it missed since; else what changed since the layer its head is
    /// known to hold; else everything.
    fn parts(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>, EngineError> {
        Ok(match (&self.resume, &self.since, &self.known.layer) {
            (Some((done, missed)), _, _) if start < *done => within(missed, start, end),
            (_, Since::Local(head), Some(layer)) => {
                changed_parts(head, layer, &self.known.ranges, start, (end - start) as u32)?
            }
            (_, Since::Listed(changed), Some(_)) => {
                let mut parts = within(changed, start, end);
                parts.extend(within(&self.known.ranges, start, end));
                merged(parts)
            }
            _ => vec![(start, end)],
        })
    }
}

/// Copies what may differ on the copy in chunk `start..end`, holding the chunk's range lock.
async fn copy_chunk(
    shared: &crate::io::Shared,
    copier: &Copier<'_>,
    from: &Backing,
    plan: &ToCopy,
    start: u64,
    end: u64,
) -> Result<(), EngineError> {
    let chunk = shared.order.enter(start, end).await?;
    let mut checks = Vec::new();
    for (s, e) in plan.parts(start, end)? {
        checks.extend(copier.range_unchecked(from, s, e - s).await?);
    }
    // Charged in full before it started: holes and unchanged parts are given back.
    copier.refund((end - start).saturating_sub(data_of(&checks)))?;
    // Checked outside the lock, so that the copy's node reads back the chunk while the next
    // one is written. A live write in between changes what it finds: then the chunk is copied
    // again and checked under the lock.
    drop(chunk);
    if !copier.all_stored(&checks).await? {
        tracing::debug!(start, end, "a chunk changed before its check (a live write?): copied again under its lock");
        let _chunk = shared.order.enter(start, end).await?;
        for (s, e) in plan.parts(start, end)? {
            copier.range(from, s, e - s).await?;
        }
    }
    Ok(())
}

/// The parts of `ranges` within `start..end`.
fn within(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    ranges.iter().filter(|(s, e)| *s < end && start < *e).map(|(s, e)| ((*s).max(start), (*e).min(end))).collect()
}

/// The parts of `at..at+len` that may differ on a copy whose head holds what snapshot (or
/// mark) `layer` of the local copy holds except within `ranges`: the clusters written or
/// trimmed since (on the local copy), and those ranges.
fn changed_parts(
    head: &crate::io::LocalVolume,
    layer: &str,
    ranges: &[(u64, u64)],
    at: u64,
    len: u32,
) -> Result<Vec<(u64, u64)>, EngineError> {
    let end = at + len as u64;
    let mut parts = within(ranges, at, end);
    let mut pos = at;
    for extent in head.changed_since(layer, at, len)? {
        let next = pos + extent.length as u64;
        if extent.flags & 1 != 0 {
            parts.push((pos, next));
        }
        pos = next;
    }
    // Beyond what one lookup resolves: copied.
    if pos < end {
        parts.push((pos, end));
    }
    Ok(merged(parts))
}

/// A copy left the in-sync set of `spec` (its target evicted it): mark where, then rebuild it
/// as soon as it can be reached.
pub fn after_departure(cluster: Arc<Cluster>, spec: VolumeSpec, node: String) {
    cluster.clone().spawn_background(async move {
        super::marks::mark_departure(&cluster, &spec, &node).await;
        rebuild_soon(cluster, spec, node);
    });
}

/// How long [`rebuild_soon`] keeps trying: a copy cut off by a partition comes back when the
/// partition heals, which no etcd event tells the target (its node stayed registered).
const REBUILD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// [`rebuild`] in the background, tried again (backing off to 30 s) until it is done, the
/// volume has no writer's session here any more, a newer target took the volume, or
/// [`REBUILD_PATIENCE`] ran out: a node registers before its NBD listener is up, a copy that
/// just left the set is unreachable until its node is back, and a snapshot stops a rebuild in
/// progress.
pub fn rebuild_soon(cluster: Arc<Cluster>, spec: VolumeSpec, node: String) {
    cluster.clone().spawn_background(async move {
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
