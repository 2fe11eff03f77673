//! Volumes as NBD exports: the catalog that turns an export name into a volume's I/O stack,
//! and the adapter from that stack to the protocol's `BlockDevice`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use thinbd_protocol::{
    BlockDevice, DeviceError, DeviceInfo, DeviceResult, Export, ExportCatalog, ExportListing, Extent, OpenError,
    ReadChunk,
};
use tracing::debug;

use super::export_name::ExportName;
use crate::cluster::Cluster;
use crate::cluster::targets::Joined;
use crate::cluster::volumes::VolumeSpec;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::io::{Backing, Linker, LocalVolume, Member, Metered, Replicas, Throttled, VolumeIo};

/// The I/O stack every export gets: metrics around QoS around the volume's copies (here, on
/// the node holding it, or every in-sync replica).
pub type VolumeStack = Metered<Throttled<Replicas>>;

/// Composes the stack over an opened volume.
pub fn stack(local: LocalVolume) -> VolumeStack {
    let (qos, metrics) = (local.qos(), local.metrics());
    Metered::new(Throttled::new(Replicas::single("", Backing::Local(local)), qos), metrics)
}

/// The stack of a volume served for the nodes holding it: they apply the volume's QoS; with a
/// local copy among them, its QoS and metrics apply here too.
pub fn target_stack(
    replicas: Replicas,
    local: Option<(Arc<crate::qos::Qos>, Arc<crate::metrics::VolumeMetrics>)>,
) -> VolumeStack {
    match local {
        Some((qos, metrics)) => Metered::new(Throttled::new(replicas, qos), metrics),
        None => {
            let unlimited = Arc::new(crate::qos::Qos::new(Default::default()));
            Metered::new(Throttled::new(replicas, unlimited), Default::default())
        }
    }
}

/// The copies a target writes to: a volume of one copy here or on its node; a replicated
/// volume's in-sync members (the local copy first when it is one of them). Members out of
/// reach leave the in-sync set now. Also the fences of the session: a lost link to a single
/// copy ends it (the client reconnects); a lost replica only leaves the set.
async fn copies_for(
    cluster: &Arc<Cluster>,
    spec: &VolumeSpec,
    export: &str,
    volume: &str,
    epoch: Option<u64>,
    local: Option<LocalVolume>,
) -> Result<(Replicas, Vec<tokio_util::sync::CancellationToken>), OpenError> {
    let platform = |e: &dyn std::fmt::Display| OpenError::Platform(e.to_string());
    // Links always carry an epoch, so that a copy never takes them for a consumer's attachment
    // (and serves them as a target in turn). Epoch 0 is below every target's: only sessions
    // that no target orders (read-only, several writers of a volume of one copy) use it.
    let export = super::export_name::with_epoch(export, epoch.unwrap_or(0));
    // Only a writers' target orders every write to the volume: rebuilds run there.
    let orders_writes = epoch.is_some();
    if !spec.replicated() {
        if let Some(l) = local {
            return Ok((Replicas::single(&cluster.node, Backing::Local(l)), Vec::new()));
        }
        let remote = cluster.link(&spec.node, &export, volume).await.map_err(|e| platform(&e))?;
        let fences = vec![remote.lost()];
        return Ok((Replicas::single(&spec.node, Backing::Remote(remote)), fences));
    }
    let members = match cluster.in_sync(&spec.uuid).await.map_err(|e| platform(&e))? {
        Some(set) => set.members,
        None => spec.copies(),
    };
    let epoch = match epoch {
        Some(e) => e,
        None => cluster.target(&spec.uuid).await.map_err(|e| platform(&e))?.map_or(0, |t| t.epoch),
    };
    let after_evict: Option<Box<dyn Fn(String) + Send + Sync>> = match orders_writes {
        true => {
            let (cluster, spec) = (cluster.clone(), spec.clone());
            Some(Box::new(move |node| crate::cluster::rebuild::after_departure(cluster.clone(), spec.clone(), node)))
        }
        false => None,
    };
    let in_sync = Arc::new(crate::cluster::isr::TargetInSync {
        cluster: cluster.clone(),
        uuid: spec.uuid.clone(),
        volume: volume.to_string(),
        epoch,
        after_evict,
    });
    let shared = cluster.shared(&spec.uuid);
    // A new target first takes over what the last one may have left in flight: logged as its
    // own (a copy leaving below gets it in its rebuild), then made equal on the copies.
    if orders_writes {
        shared.begin_epoch(epoch).map_err(engine_err)?;
    }
    let take_over = match orders_writes && !shared.activity.current(epoch) {
        true => Some(shared.activity.take_over().await),
        false => None,
    };
    let left = match &take_over {
        Some(_) => crate::cluster::scrub::inherit(cluster, spec, &shared, epoch).await.map_err(engine_err)?,
        None => None,
    };
    let mut copies = Vec::new();
    if let Some(l) = local.filter(|_| members.contains(&cluster.node)) {
        copies.push(Member { node: cluster.node.clone(), io: Arc::new(Backing::Local(l)) });
    }
    for node in members.iter().filter(|n| **n != cluster.node) {
        match cluster.link(node, &export, volume).await {
            Ok(remote) => copies.push(Member { node: node.clone(), io: Arc::new(Backing::Remote(remote)) }),
            Err(e) => {
                tracing::warn!(volume, node, error = %e, "an in-sync replica is out of reach: it leaves the set");
                // What it may lack is logged from here until its mark (taken after the eviction).
                if orders_writes {
                    shared.departed(node).map_err(engine_err)?;
                }
                crate::io::InSyncSet::evict(&*in_sync, node).await.map_err(engine_err)?;
            }
        }
    }
    let linker = Arc::new(CopyLinker { cluster: cluster.clone(), export: export.clone(), volume: volume.to_string() });
    // Rebuilds and scrubs run beside a writer's session on the target, with its links.
    let attached = orders_writes.then(|| shared.attach(linker.clone()));
    if copies.is_empty() {
        return Err(OpenError::Platform(format!("volume {volume}: no copy in sync is reachable")));
    }
    if let Some(left) = left {
        crate::cluster::scrub::reconcile(cluster, spec, &shared, &*linker, epoch, left).await.map_err(engine_err)?;
    }
    drop(take_over);
    let min = spec.min_insync.max(1) as usize;
    let replicas = Replicas::replicated(copies, in_sync, min, shared, linker, attached).map_err(engine_err)?;
    // Copies out of the set but up are rebuilt with this session's grant, beside its writes
    // (which wait while fewer than `min_insync` copies are in sync).
    for node in spec.copies().into_iter().filter(|n| orders_writes && !members.contains(n)) {
        if cluster.directory.get(&node).is_some_and(|v| v.up) {
            crate::cluster::rebuild::rebuild_soon(cluster.clone(), spec.clone(), node);
        }
    }
    Ok((replicas, Vec::new()))
}

/// Where a consumer's session attached here is served, in a cluster: a single writer makes
/// this node the volume's target (the newest attachment takes over); a writer of a replicated
/// volume that several may write joins the live target (its sessions are forwarded there, so
/// that one node orders every writer's writes) or takes it. `None`: no target orders the
/// session (read-only, or several writers of a volume of one copy, ordered by its holder).
async fn writer_target(
    cluster: &Cluster,
    uuid: &str,
    replicated: bool,
    single_writer: bool,
    read_only: bool,
) -> Result<Option<Joined>, OpenError> {
    let platform = |e: crate::cluster::ClusterError| OpenError::Platform(e.to_string());
    Ok(match (read_only, single_writer, replicated) {
        (true, _, _) | (false, false, false) => None,
        (false, true, _) => Some(Joined::Here(cluster.take_target(uuid).await.map_err(platform)?)),
        (false, false, true) => Some(cluster.join_target(uuid).await.map_err(platform)?),
    })
}

/// A writer's session forwarded to the volume's target on `node`, as the consumer's own
/// attachment there (its export name, no epoch): the target orders its writes with its
/// other writers'. A lost link ends the session; the client reconnects and finds the target
/// again.
async fn forward(
    cluster: &Cluster,
    name: &str,
    volume: &str,
    node: &str,
) -> Result<(Replicas, Vec<tokio_util::sync::CancellationToken>), OpenError> {
    let remote = cluster.link(node, name, volume).await.map_err(OpenError::Platform)?;
    tracing::info!(volume, target = node, "a writer's session goes to the volume's target");
    let fences = vec![remote.lost()];
    Ok((Replicas::single(node, Backing::Remote(remote)), fences))
}

/// The NBD face of a volume's I/O stack.
pub struct NbdVolume<V>(pub V);

impl<V: VolumeIo> BlockDevice for NbdVolume<V> {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.0.size(),
            read_only: self.0.read_only(),
            can_trim: true,
            can_zero: true,
            can_cache: true,
            can_multi_conn: true,
            preferred_block: 4096,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Vec<ReadChunk>> {
        Ok(self.0.read(offset, len).await?)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        Ok(self.0.write(offset, data, fua).await?)
    }

    async fn flush(&self) -> DeviceResult<()> {
        Ok(self.0.flush().await?)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        Ok(self.0.trim(offset, len, fua).await?)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_unmap: bool, fast: bool, fua: bool) -> DeviceResult<()> {
        if fast && !may_unmap {
            // Zeroing without unmapping means writing zeros: not fast.
            return Err(DeviceError::NotSupported);
        }
        Ok(self.0.write_zeroes(offset, len, may_unmap, fua).await?)
    }

    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        Ok(self.0.block_status(offset, len).await?)
    }

    /// `thinbd:changed:SNAPSHOT` for each earlier snapshot of the volume: flag 1 marks
    /// clusters written or trimmed since that snapshot (incremental backup).
    fn meta_contexts(&self, query: &str) -> Vec<String> {
        let all = || self.0.earlier_snapshots().into_iter().map(|s| format!("{CHANGED_PREFIX}{s}"));
        match query {
            "" | "thinbd:" | CHANGED_PREFIX => all().collect(),
            q if q.starts_with(CHANGED_PREFIX) => all().filter(|c| c == q).collect(),
            _ => Vec::new(),
        }
    }

    async fn context_status(&self, context: &str, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        let snapshot = context.strip_prefix(CHANGED_PREFIX).ok_or(DeviceError::NotSupported)?;
        Ok(self.0.changed_since(snapshot, offset, len).await?)
    }
}

/// Meta context namespace of changed-block tracking.
pub const CHANGED_PREFIX: &str = "thinbd:changed:";

/// The engine's volumes as exports. Loopback clients may open volumes by name unless grants are
/// required; everyone else needs a grant's export name (`VOLUME#TOKEN`).
pub struct Catalog {
    pub engine: Arc<Engine>,
    pub require_grants: bool,
    /// In a cluster, grants of volumes held elsewhere open a forwarding target.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Catalog {
    fn trusted(&self, peer: Option<SocketAddr>) -> bool {
        !self.require_grants && peer.is_some_and(|p| p.ip().is_loopback())
    }

    /// A grant's export name for a volume another node holds: the grant is checked against
    /// its record in etcd; a single writer's makes this node the volume's target (a new epoch,
    /// sent on the links so the copies fence older targets), and requests go to the copies,
    /// which check the grant themselves too.
    async fn open_remote(
        &self,
        name: &str,
        volume: &str,
        token: &str,
    ) -> Result<Export<NbdVolume<VolumeStack>>, OpenError> {
        let Some(cluster) = self.cluster.clone() else { return Err(OpenError::Unknown) };
        let platform = |e: &dyn std::fmt::Display| OpenError::Platform(e.to_string());
        let (replicas, fences, epoch) = async {
            let spec = cluster.volume_spec(volume).await.map_err(|e| platform(&e))?.ok_or(OpenError::Unknown)?;
            if !spec.replicated() && spec.node == cluster.node {
                return Err(OpenError::Unknown);
            }
            let grant = cluster.grant_by_token(&spec.uuid, token).await.map_err(|e| platform(&e))?;
            let grant = grant.ok_or(OpenError::Unknown)?;
            let (single, read_only) = (grant.single_writer, grant.read_only);
            let epoch = match writer_target(&cluster, &spec.uuid, spec.replicated(), single, read_only).await? {
                Some(Joined::At(node)) => {
                    let (replicas, fences) = forward(&cluster, name, volume, &node).await?;
                    return Ok((replicas, fences, None));
                }
                Some(Joined::Here(epoch)) => Some(epoch),
                None => None,
            };
            let (replicas, fences) = copies_for(&cluster, &spec, name, volume, epoch, None).await?;
            Ok((replicas, fences, epoch))
        }
        .await?;
        let holders = replicas.nodes().join(", ");
        tracing::info!(volume, holders, epoch, "target: serving a volume held by another node");
        let description = format!("thinbd volume {volume} (data on {holders})");
        Ok(Export {
            name: name.to_string(),
            description,
            device: Arc::new(NbdVolume(target_stack(replicas, None))),
            fences,
        })
    }

    /// A session through a grant of a volume held here. A volume's writers are fenced by target
    /// epochs: the epoch its target sent, or, in a cluster, the one this node takes or joins when
    /// the consumer is attached here (see [`writer_target`]; then, for a replicated volume, this
    /// node is the target and writes to every in-sync copy, or forwards the session to the
    /// target). Read-only attachments, and the writers of a volume of one copy in a cluster,
    /// are fenced by their grants alone.
    async fn open_granted(
        &self,
        name: &str,
        grant: Arc<crate::grants::Grant>,
        link_epoch: Option<u64>,
        peer: Option<SocketAddr>,
    ) -> Result<Export<NbdVolume<VolumeStack>>, OpenError> {
        let r = &grant.record;
        let uuid = self.engine.volume(&r.volume).map_err(engine_err)?.uuid.clone();
        // The consumer is attached here (not a target's link): in a cluster this node serves it.
        let serving = match (&self.cluster, link_epoch) {
            (Some(c), None) => {
                Some((c.clone(), c.volume_spec(&uuid).await.map_err(|e| OpenError::Platform(e.to_string()))?))
            }
            _ => None,
        };
        let epoch = match (link_epoch, &serving) {
            // A target's link: a writer's target sends its epoch (0: no target orders the
            // session's writes).
            (Some(e), _) => (e > 0 && !r.read_only).then_some(e),
            (None, Some((cluster, spec))) => {
                let replicated = spec.as_ref().is_some_and(VolumeSpec::replicated);
                match writer_target(cluster, &uuid, replicated, r.single_writer, r.read_only).await? {
                    Some(Joined::At(node)) => {
                        let (replicas, fences) = forward(cluster, name, &r.volume, &node).await?;
                        let description = format!("thinbd volume {} (through its target on {node})", r.volume);
                        let device = Arc::new(NbdVolume(target_stack(replicas, None)));
                        return Ok(Export { name: name.to_string(), description, device, fences });
                    }
                    Some(Joined::Here(epoch)) => Some(epoch),
                    None => None,
                }
            }
            (None, _) => None,
        };
        let at_epoch = match epoch {
            Some(e) => Some(self.engine.enter_epoch(&r.volume, e).await.map_err(engine_err)?),
            None => None,
        };
        // Counted before the volume is opened: a revocation from here on waits for us.
        let session = grant.enter().ok_or(OpenError::Unknown)?;
        let mut h = self.engine.open_volume(&r.volume).map_err(engine_err)?.through_grant(session);
        if r.read_only {
            h = h.into_read_only();
        }
        let mut fences = vec![grant.revoked.clone()];
        if let Some(s) = at_epoch {
            fences.push(s.cut.clone());
            h = h.at_epoch(s);
        }
        debug!(volume = %r.volume, node = %r.node, ?peer, read_only = r.read_only, epoch, "export opened through grant");
        let description = describe(&h, &r.volume);
        let device = match serving {
            Some((cluster, Some(spec))) if spec.replicated() => {
                let local = Some((h.qos(), h.metrics()));
                let (replicas, more) = copies_for(&cluster, &spec, name, &r.volume, epoch, Some(h)).await?;
                fences.extend(more);
                target_stack(replicas, local)
            }
            _ => stack(h),
        };
        Ok(Export { name: name.to_string(), description, device: Arc::new(NbdVolume(device)), fences })
    }

    /// A layer of this node's copy (a snapshot or a mark), read-only, for the target whose
    /// link `epoch` is not older than the highest this copy promised: the source of a rebuild.
    async fn open_layer(
        &self,
        name: &str,
        grant: Arc<crate::grants::Grant>,
        epoch: u64,
        snapshot: &str,
    ) -> Result<Export<NbdVolume<VolumeStack>>, OpenError> {
        let volume = &grant.record.volume;
        let at_epoch = self.engine.enter_epoch(volume, epoch).await.map_err(engine_err)?;
        let fences = vec![grant.revoked.clone(), at_epoch.cut.clone()];
        let session = grant.enter().ok_or(OpenError::Unknown)?;
        let h = self.engine.open_snapshot(volume, snapshot).map_err(engine_err)?.through_grant(session);
        let h = h.at_epoch(at_epoch);
        debug!(%volume, snapshot, epoch, "a layer opened for the volume's target");
        let description = describe(&h, &format!("{volume}@{snapshot}"));
        Ok(Export { name: name.to_string(), description, device: Arc::new(NbdVolume(stack(h))), fences })
    }
}

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

    fn link_layer<'a>(
        &'a self,
        node: &'a str,
        layer: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Backing, EngineError>> + Send + 'a>> {
        Box::pin(async move {
            let export = super::export_name::layer_of(&self.export, layer);
            let name = format!("{}@{layer}", self.volume);
            let remote = self.cluster.link(node, &export, &name).await.map_err(EngineError::Unavailable)?;
            Ok(Backing::Remote(remote))
        })
    }
}

fn engine_err(e: EngineError) -> OpenError {
    match e {
        EngineError::NotFound(_) => OpenError::Unknown,
        e @ EngineError::StaleEpoch { .. } => OpenError::Policy(e.to_string()),
        e => OpenError::Platform(e.to_string()),
    }
}

fn describe(h: &LocalVolume, name: &str) -> String {
    if h.read_only() { format!("thinbd {name} (read-only)") } else { format!("thinbd volume {name}") }
}

impl ExportCatalog for Catalog {
    type Device = NbdVolume<VolumeStack>;

    async fn open(&self, name: &str, peer: Option<SocketAddr>) -> Result<Export<Self::Device>, OpenError> {
        let parsed = ExportName::parse(name).ok_or(OpenError::Unknown)?;
        if let ExportName::Grant { volume, token, epoch, snapshot } = &parsed {
            return match (self.engine.grant_for(volume, token), snapshot, epoch) {
                (Some(grant), Some(snapshot), Some(epoch)) => self.open_layer(name, grant, *epoch, snapshot).await,
                (Some(grant), _, _) => self.open_granted(name, grant, *epoch, peer).await,
                // A target's link is never forwarded further.
                (None, _, Some(_)) => Err(OpenError::Unknown),
                (None, _, None) => self.open_remote(name, volume, token).await,
            };
        }
        if !self.trusted(peer) {
            return Err(OpenError::Policy(
                "an attachment grant is required: open the export name that `thinbd volume publish` printed \
                 (VOLUME#TOKEN; in an NBD URI write the # as %23)"
                    .into(),
            ));
        }
        let h = match &parsed {
            ExportName::Snapshot { volume, snapshot } => self.engine.open_snapshot(volume, snapshot),
            _ => self.engine.open_volume(name),
        }
        .map_err(engine_err)?;
        let description = describe(&h, name);
        Ok(Export { name: name.to_string(), description, device: Arc::new(NbdVolume(stack(h))), fences: Vec::new() })
    }

    fn list(&self, peer: Option<SocketAddr>) -> Vec<ExportListing> {
        if !self.trusted(peer) {
            return Vec::new();
        }
        self.engine
            .list()
            .iter()
            .map(|v| ExportListing { name: v.name.clone(), description: format!("thinbd volume {}", v.name) })
            .collect()
    }
}
