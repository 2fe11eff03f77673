//! The management API (gRPC, `thinbd.v1.Management`): one handler per RPC, each resolving
//! names or UUIDs and calling the engine; `convert` turns engine values and errors into
//! messages and status codes.

pub mod convert;

use std::sync::Arc;

use thinbd_api::pb;
use thinbd_api::pb::management_server::Management;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, VolumeOptions};
use crate::grants::Access;
pub use convert::qos_to_pb;
use convert::{cluster_status, qos_from_pb, snapshot_to_pb, status, volume_to_pb};

pub struct Api {
    pub engine: Arc<Engine>,
    pub node_name: String,
    pub nbd_address: String,
    /// The cluster this node is part of (`serve --etcd`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// This node's record as it would register it (single node: what ListNodes shows).
    pub this_node: Box<dyn Fn() -> crate::cluster::nodes::NodeRecord + Send + Sync>,
    /// What `serve --io-engine` asked for (the pool may have fallen back to threads).
    pub io_engine_requested: crate::space::backend::IoEngine,
}

/// How the API answers in a cluster: volumes placed on a node, requests about a volume sent to
/// the node holding it.
impl Api {
    /// The API of the node holding `reference` (a volume name or UUID, or `VOLUME@SNAPSHOT`)
    /// when that is another node; `None` when it is here or unknown (the local path answers).
    async fn owner(&self, reference: &str) -> Result<Option<crate::cluster::Peer>, Status> {
        let Some(c) = &self.cluster else { return Ok(None) };
        let volume = reference.split('@').next().unwrap_or(reference);
        if self.engine.find_volume(volume).is_ok() || self.engine.snapshot(reference).is_ok() {
            return Ok(None);
        }
        let node = match c.volume_spec(volume).await.map_err(cluster_status)? {
            Some(spec) => spec.node,
            // A snapshot named by its UUID (it may outlive its volume).
            None => match c.snapshot_spec(reference).await.map_err(cluster_status)? {
                Some(spec) => spec.node,
                None => return Ok(None),
            },
        };
        if node == self.node_name {
            return Ok(None);
        }
        c.peer(&node).map(Some).map_err(cluster_status)
    }

    /// On a replicated volume's target: holds the volume's writes (those in flight finish)
    /// while every in-sync copy takes snapshot `r.uuid`; a copy that fails leaves the in-sync
    /// set (it gets the layer back by rebuild).
    async fn snapshot_barrier(
        &self,
        c: &crate::cluster::Cluster,
        r: pb::CreateSnapshotRequest,
    ) -> Result<pb::Snapshot, Status> {
        let spec = c
            .volume_spec(&r.volume)
            .await
            .map_err(cluster_status)?
            .ok_or_else(|| Status::not_found(format!("volume {:?}", r.volume)))?;
        let shared = c.shared(&spec.uuid);
        let _held = shared.order.barrier().await.map_err(status)?;
        // A copy being rebuilt holds only part of the data: its rebuild stops and starts again
        // after the snapshot, which it then gets as a layer.
        for r in shared.rebuilding() {
            tracing::info!(volume = %spec.name, node = %r.node, "a snapshot stops the rebuild of a copy");
            shared.stop_rebuild(&r.node);
        }
        let members = c.in_sync(&spec.uuid).await.map_err(cluster_status)?.map_or_else(|| spec.copies(), |s| s.members);
        let epoch = c.target(&spec.uuid).await.map_err(cluster_status)?.map_or(0, |t| t.epoch);
        let (mut made, mut failed) = (None, Vec::new());
        for node in members {
            let copy = pb::CreateSnapshotRequest { here: true, barrier: false, ..r.clone() };
            let res = match c.peer(&node) {
                Ok(mut p) => p.create_snapshot(copy).await.map(tonic::Response::into_inner),
                Err(e) => Err(cluster_status(e)),
            };
            match res {
                Ok(s) => {
                    made.get_or_insert(s);
                }
                Err(e) => failed.push((node, e)),
            }
        }
        let Some(made) = made else {
            return Err(failed.into_iter().next().map_or_else(|| Status::unavailable("no copy in sync"), |(_, e)| e));
        };
        for (node, e) in failed {
            tracing::warn!(volume = %spec.name, node, error = %e, "a copy failed a snapshot: it leaves the in-sync set");
            match c.shrink_in_sync(&spec.uuid, &node, epoch).await.map_err(cluster_status)? {
                crate::cluster::isr::Shrunk::Done | crate::cluster::isr::Shrunk::Last => {}
                crate::cluster::isr::Shrunk::Stale { newer } => {
                    return Err(Status::failed_precondition(format!("a newer target (epoch {newer}) took the volume")));
                }
            }
            shared.evicted(&node).map_err(status)?;
        }
        Ok(made)
    }

    /// Makes the sessions of the volume's live target (wherever it is) follow the in-sync set
    /// now in etcd. A target out of reach has no sessions to change: logged, not failed.
    async fn target_follows(&self, uuid: &str, name: &str) {
        let follow = pb::RebuildVolumeRequest { volume: uuid.to_string(), at_target: false, follow_only: true };
        if let Err(e) = self.rebuild_volume(Request::new(follow)).await {
            tracing::warn!(volume = %name, error = %e, "cannot tell the volume's target of its new in-sync set");
        }
    }

    /// For work done on a volume's target (rebuild, scrub): the volume's spec, and the target's
    /// API when the target is another node (unless the request already is at the target).
    async fn at_target(
        &self,
        c: &crate::cluster::Cluster,
        volume: &str,
        already: bool,
    ) -> Result<(crate::cluster::volumes::VolumeSpec, Option<crate::cluster::Peer>), Status> {
        let spec = c
            .volume_spec(volume)
            .await
            .map_err(cluster_status)?
            .ok_or_else(|| Status::not_found(format!("volume {volume:?}")))?;
        let target = c.target(&spec.uuid).await.map_err(cluster_status)?.map(|t| t.node);
        match target.filter(|t| !already && *t != self.node_name) {
            Some(t) => Ok((spec, Some(c.peer(&t).map_err(cluster_status)?))),
            None => Ok((spec, None)),
        }
    }

    /// Records snapshots taken here in the cluster.
    async fn record_snapshots(&self, snapshots: &[pb::Snapshot]) -> Result<(), Status> {
        if let Some(c) = &self.cluster {
            for s in snapshots {
                c.put_snapshot(&convert::snapshot_spec(s)).await.map_err(cluster_status)?;
            }
        }
        Ok(())
    }

    /// A volume whose node is down or out of reach: what the cluster store records, marked
    /// unavailable (`e` if it records nothing).
    async fn unreachable_volume(&self, reference: &str, e: Status) -> Result<Response<pb::Volume>, Status> {
        let Some(c) = &self.cluster else { return Err(e) };
        let Some(spec) = c.volume_spec(reference).await.map_err(cluster_status)? else { return Err(e) };
        // What the cluster knows of it: attachments and target are in etcd.
        let grants = c.grants(&spec.uuid).await.map_err(cluster_status)?;
        let target = c.target(&spec.uuid).await.map_err(cluster_status)?;
        let mut out = convert::spec_to_pb(spec);
        out.published_nodes = grants.into_iter().map(|g| g.node).collect();
        if let Some(t) = target {
            (out.target_node, out.target_epoch) = (t.node, t.epoch);
        }
        copies(c, &out.uuid.clone(), &mut out).await?;
        Ok(Response::new(out))
    }

    /// Records volume `name`, a clone of `source` (held here), on this node; its name must be
    /// free in the cluster.
    async fn reserve_here(
        &self,
        c: &crate::cluster::Cluster,
        name: &str,
        source: &str,
    ) -> Result<crate::cluster::volumes::VolumeSpec, Status> {
        let size_bytes = match source.contains('@') {
            true => self.engine.snapshot(source).map_err(status)?.size,
            false => self.engine.volume(source).map_err(status)?.size(),
        };
        reserve(c, name, size_bytes, std::slice::from_ref(&self.node_name), 0).await
    }

    /// The in-sync copies (nodes up) of the replicated volume whose snapshot `source`
    /// (`VOLUME@SNAPSHOT`, resolved) is: every one holds the same snapshot (snapshots are
    /// barriers). `None` for a volume's head, or a volume of one copy.
    async fn replicated_snapshot(
        &self,
        c: &crate::cluster::Cluster,
        source: &str,
    ) -> Result<Option<Vec<String>>, Status> {
        let Some((volume, _)) = source.split_once('@') else { return Ok(None) };
        let v = self.engine.find_volume(volume).map_err(status)?;
        let Some(spec) = c.volume_spec(&v.uuid).await.map_err(cluster_status)? else { return Ok(None) };
        if !spec.replicated() {
            return Ok(None);
        }
        let set = c.in_sync(&v.uuid).await.map_err(cluster_status)?;
        let mut members = set.map_or_else(|| spec.copies(), |s| s.members);
        members.retain(|m| *m == self.node_name || c.directory.get(m).is_some_and(|n| n.up));
        // This node (which holds the snapshot) first: the new volume's first copy.
        members.sort_by_key(|m| *m != self.node_name);
        Ok(Some(members))
    }

    /// A clone of a replicated volume's snapshot, replicated on `members` (each clones its own
    /// copy of the snapshot: the same layers, so the clones start in sync); all or nothing.
    async fn clone_replicated(
        &self,
        c: &crate::cluster::Cluster,
        source: &str,
        members: Vec<String>,
        r: pb::CloneVolumeRequest,
    ) -> Result<pb::Volume, Status> {
        let snapshot = self.engine.snapshot(source).map_err(status)?;
        let min_insync = min_insync_for(members.len(), 0);
        let spec = reserve(c, &r.name, snapshot.size, &members, min_insync).await?;
        let each = pb::CloneVolumeRequest { source: snapshot.uuid.clone(), here: true, uuid: spec.uuid.clone(), ..r };
        let v = self
            .make_copies(c, &spec, &members, |peer| {
                let each = each.clone();
                async move {
                    match peer {
                        None => self.clone_volume(Request::new(each)).await,
                        Some(mut p) => p.clone_volume(each).await,
                    }
                }
            })
            .await?;
        tracing::info!(volume = %spec.name, uuid = %spec.uuid, source, copies = ?members, "replicated clone made");
        Ok(v)
    }

    /// A clone of a replicated volume's head: one point of its write stream on every copy,
    /// so through a snapshot taken under the target's barrier (named `clone-source-…`, deleted
    /// afterwards; left behind only if this node dies meanwhile), cloned replicated.
    async fn clone_replicated_head(
        &self,
        c: &crate::cluster::Cluster,
        spec: &crate::cluster::volumes::VolumeSpec,
        r: pb::CloneVolumeRequest,
    ) -> Result<pb::Volume, Status> {
        crate::engine::validate_name("volume", &r.name).map_err(status)?;
        let point = format!("clone-source-{}", &crate::meta::uuid::new_uuid_text()[..8]);
        let taken = pb::CreateSnapshotRequest { volume: spec.uuid.clone(), name: point.clone(), ..Default::default() };
        let made = self.create_snapshot(Request::new(taken)).await?.into_inner();
        let source = format!("{}@{point}", spec.name);
        let cloned = match self.replicated_snapshot(c, &source).await? {
            Some(members) => self.clone_replicated(c, &source, members, r).await,
            None => Err(Status::internal(format!("{source} is not a replicated volume's snapshot"))),
        };
        let gone = pb::DeleteSnapshotRequest { key: made.uuid, here: false };
        if let Err(e) = self.delete_snapshot(Request::new(gone)).await {
            tracing::warn!(volume = %spec.name, snapshot = %point, error = %e, "cannot delete a clone's source point: delete it by hand");
        }
        cloned
    }

    /// Makes a copy of the volume reserved as `spec` on each of `nodes`, in order (`make`
    /// gets `None` for this node, else the node's API); all or nothing: a failure deletes the
    /// copies made and forgets the volume. The first copy's volume, its copies in sync.
    async fn make_copies<F, Fut>(
        &self,
        c: &crate::cluster::Cluster,
        spec: &crate::cluster::volumes::VolumeSpec,
        nodes: &[String],
        make: F,
    ) -> Result<pb::Volume, Status>
    where
        F: Fn(Option<crate::cluster::Peer>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<pb::Volume>, Status>>,
    {
        let (mut made, mut first) = (Vec::new(), None);
        for node in nodes {
            let res = match node == &self.node_name {
                true => make(None).await,
                false => match c.peer(node) {
                    Ok(p) => make(Some(p)).await,
                    Err(e) => Err(cluster_status(e)),
                },
            };
            match res {
                Ok(v) => {
                    first.get_or_insert(v.into_inner());
                    made.push(node.clone());
                }
                Err(e) => {
                    self.forget_copies(c, spec, &made).await;
                    return Err(e);
                }
            }
        }
        let Some(mut v) = first else {
            self.forget_copies(c, spec, &made).await;
            return Err(Status::internal("no copy was made"));
        };
        if spec.replicated() {
            (v.replicas, v.in_sync) = (nodes.to_vec(), nodes.to_vec());
        }
        Ok(v)
    }

    /// Deletes the copies `made` of a volume whose creation failed, and its record.
    async fn forget_copies(
        &self,
        c: &crate::cluster::Cluster,
        spec: &crate::cluster::volumes::VolumeSpec,
        made: &[String],
    ) {
        for node in made {
            let gone = pb::DeleteVolumeRequest { name: spec.uuid.clone(), here: true };
            if let Err(e) = async { c.peer(node).map_err(cluster_status)?.delete_volume(gone).await }.await {
                tracing::warn!(volume = %spec.name, node, error = %e, "cannot delete a copy of a volume whose creation failed");
            }
        }
        if let Err(release) = c.release_volume(spec).await {
            tracing::warn!(volume = %spec.name, error = %release, "cannot forget a volume whose creation failed");
        }
    }

    /// Places a new volume, records it (its name must be free) and creates it on the node
    /// chosen; a failed creation is forgotten again.
    async fn place_and_create(
        &self,
        c: &crate::cluster::Cluster,
        mut r: pb::CreateVolumeRequest,
    ) -> Result<pb::Volume, Status> {
        crate::engine::validate_name("volume", &r.name).map_err(status)?;
        // Unset: three copies, or one per node when there are fewer.
        let copies = match r.replicas {
            0 => DEFAULT_REPLICAS.min(c.nodes_for_copies(&r.zone, &r.nodes)).max(1),
            n => n as usize,
        };
        let nodes = c
            .place_copies(&r.zone, &r.nodes, &[], copies)
            .await
            .map_err(cluster_status)?
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let names: Vec<String> = nodes.into_iter().map(|n| n.name).collect();
        let min_insync = min_insync_for(copies, r.min_insync);
        let spec = reserve(c, &r.name, r.size_bytes, &names, min_insync).await?;
        (r.here, r.uuid) = (true, spec.uuid.clone());
        let v = self
            .make_copies(c, &spec, &names, |peer| {
                let r = r.clone();
                async move {
                    match peer {
                        None => self.create_volume(Request::new(r)).await,
                        Some(mut p) => p.create_volume(r).await,
                    }
                }
            })
            .await?;
        tracing::info!(volume = %spec.name, uuid = %spec.uuid, nodes = ?names, "volume placed");
        Ok(v)
    }

    /// The other copies of a replicated volume held here (`volume` a name or UUID), with the
    /// API of each node that is up; down ones are left out (they are out of sync anyway).
    async fn other_copies(&self, volume: &str) -> Result<Vec<(String, crate::cluster::Peer)>, Status> {
        let Some(c) = &self.cluster else { return Ok(Vec::new()) };
        let Ok(v) = self.engine.find_volume(volume) else { return Ok(Vec::new()) };
        let Some(spec) = c.volume_spec(&v.uuid).await.map_err(cluster_status)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for node in spec.copies().into_iter().filter(|n| *n != self.node_name && spec.replicated()) {
            match c.peer(&node) {
                Ok(p) => out.push((node, p)),
                Err(e) => tracing::warn!(volume, node, error = %e, "a copy's node is out of reach"),
            }
        }
        Ok(out)
    }

    /// Every volume of the cluster: from each node that is up, and what the cluster store
    /// records for those on nodes that are down (name, UUID, size, node).
    async fn list_cluster_volumes(&self, c: &crate::cluster::Cluster) -> Result<Vec<pb::Volume>, Status> {
        let mut out = Vec::new();
        let mut answered = std::collections::BTreeSet::new();
        for n in c.directory.list().into_iter().filter(|n| n.up) {
            let here = pb::ListVolumesRequest { here: true };
            let volumes = match n.record.name == self.node_name {
                true => self.engine.list().iter().map(|v| volume_to_pb(&self.engine, &self.node_name, v)).collect(),
                false => {
                    let mut peer = c.peer(&n.record.name).map_err(cluster_status)?;
                    match peer.list_volumes(here).await {
                        Ok(r) => r.into_inner().volumes,
                        Err(e) => {
                            tracing::warn!(node = %n.record.name, error = %e, "cannot list a node's volumes");
                            continue;
                        }
                    }
                }
            };
            answered.insert(n.record.name.clone());
            out.extend(volumes);
        }
        for spec in c.volume_specs().await.map_err(cluster_status)? {
            if !answered.contains(&spec.node) {
                out.push(convert::spec_to_pb(spec));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// The most bytes one Checksums call reads.
const CHECKSUM_RANGE_MAX: u32 = 64 << 20;

/// The `min_insync` of a volume of `copies` copies when `asked` (0: unset): N−1 and at least
/// 1 by default, at most N; 0 for one copy (not replicated).
fn min_insync_for(copies: usize, asked: u32) -> u32 {
    match (copies, asked) {
        (0 | 1, _) => 0,
        (n, 0) => (n as u32 - 1).max(1),
        (n, m) => m.min(n as u32),
    }
}

/// Copies of a volume created in a cluster without saying how many.
const DEFAULT_REPLICAS: usize = 3;

/// A deletion on another node: what is not there any more is deleted.
fn already_gone<T>(r: Result<T, Status>) -> Result<(), Status> {
    match r {
        Err(e) if e.code() != tonic::Code::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A replicated volume's copies and those in sync, as the cluster records them.
async fn copies(c: &crate::cluster::Cluster, uuid: &str, out: &mut pb::Volume) -> Result<(), Status> {
    if let Some(spec) = c.volume_spec(uuid).await.map_err(cluster_status)?
        && spec.replicated()
    {
        out.replicas = spec.copies();
        let set = c.in_sync(uuid).await.map_err(cluster_status)?.unwrap_or_default();
        out.replica_states = out
            .replicas
            .iter()
            .map(|node| {
                let rebuilding = set.rebuilding.iter().find(|r| &r.node == node);
                pb::Replica {
                    node: node.clone(),
                    state: set.state_of(node).to_string(),
                    rebuilt_bytes: rebuilding.map_or(0, |r| r.done),
                    rebuild_total_bytes: rebuilding.map_or(0, |r| r.total),
                }
            })
            .collect();
        out.in_sync = set.members;
    }
    Ok(())
}

/// Records a new volume `name` on `node` under a fresh UUID; its name must be free in the
/// cluster.
async fn reserve(
    c: &crate::cluster::Cluster,
    name: &str,
    size_bytes: u64,
    copies: &[String],
    min_insync: u32,
) -> Result<crate::cluster::volumes::VolumeSpec, Status> {
    crate::engine::validate_name("volume", name).map_err(status)?;
    let spec = crate::cluster::volumes::VolumeSpec {
        uuid: crate::meta::uuid::new_uuid_text(),
        name: name.to_string(),
        size_bytes,
        node: copies.first().cloned().unwrap_or_default(),
        created_unix: crate::engine::now_unix(),
        replicas: if copies.len() > 1 { copies.to_vec() } else { Vec::new() },
        min_insync,
    };
    if !c.reserve_volume(&spec).await.map_err(cluster_status)? {
        return Err(Status::already_exists(format!("volume {name:?} already exists")));
    }
    Ok(spec)
}

/// Ranges per streamed chunk: well under gRPC's 4 MiB message limit.
const RANGES_PER_CHUNK: usize = 16 * 1024;

#[tonic::async_trait]
impl Management for Api {
    type ChangedRangesStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ChangedRangesChunk, Status>>;

    async fn changed_ranges(
        &self,
        req: Request<pb::ChangedRangesRequest>,
    ) -> Result<Response<Self::ChangedRangesStream>, Status> {
        let r = req.into_inner();
        let base = Some(r.base.as_str()).filter(|b| !b.is_empty());
        let base = base.map(|b| self.engine.resolve(b));
        let found = self.engine.changed_ranges(base.as_deref(), &self.engine.resolve(&r.target)).map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut chunks = found.ranges.chunks(RANGES_PER_CHUNK).peekable();
            if chunks.peek().is_none() {
                let empty = pb::ChangedRangesChunk {
                    ranges: Vec::new(),
                    size_bytes: found.size,
                    cluster_size: found.cluster_size,
                };
                let _ = tx.send(Ok(empty)).await;
            }
            for c in chunks {
                let chunk = pb::ChangedRangesChunk {
                    ranges: c
                        .iter()
                        .map(|(offset, length)| pb::ByteRange { offset: *offset, length: *length })
                        .collect(),
                    size_bytes: found.size,
                    cluster_size: found.cluster_size,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        if let (Some(c), false) = (&self.cluster, r.here) {
            return self.place_and_create(c, r).await.map(Response::new);
        }
        let uuid = Some(r.uuid).filter(|u| !u.is_empty());
        let opts = VolumeOptions {
            labels: r.labels.into_iter().collect(),
            qos: qos_from_pb(r.qos),
            uuid,
            ..Default::default()
        };
        let v = self.engine.create_volume_with(&r.name, r.size_bytes, opts).await.map_err(status)?;
        Ok(Response::new(volume_to_pb(&self.engine, &self.node_name, &v)))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        if let (Some(c), false) = (&self.cluster, req.get_ref().here) {
            return self
                .list_cluster_volumes(c)
                .await
                .map(|volumes| Response::new(pb::ListVolumesResponse { volumes }));
        }
        let volumes = self.engine.list().iter().map(|v| volume_to_pb(&self.engine, &self.node_name, v)).collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let name = req.get_ref().name.clone();
        let peer = match self.owner(&name).await {
            Err(e) if e.code() == tonic::Code::Unavailable => return self.unreachable_volume(&name, e).await,
            r => r?,
        };
        if let Some(mut peer) = peer {
            return match peer.get_volume(req.into_inner()).await {
                Err(e) if e.code() == tonic::Code::Unavailable => self.unreachable_volume(&name, e).await,
                r => r,
            };
        }
        let v = self.engine.find_volume(&req.into_inner().name).map_err(status)?;
        let mut out = volume_to_pb(&self.engine, &self.node_name, &v);
        if let Some(c) = &self.cluster {
            if let Some(t) = c.target(&v.uuid).await.map_err(cluster_status)? {
                (out.target_node, out.target_epoch) = (t.node, t.epoch);
            }
            copies(c, &v.uuid, &mut out).await?;
        }
        Ok(Response::new(out))
    }

    async fn resize_volume(&self, req: Request<pb::ResizeVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        if let Some(mut peer) = self.owner(&req.get_ref().name).await? {
            return peer.resize_volume(req.into_inner()).await;
        }
        let r = req.into_inner();
        let v = self.engine.resize_volume(&self.engine.resolve(&r.name), r.size_bytes).await.map_err(status)?;
        if let Some(c) = &self.cluster {
            let size = v.size();
            c.update_spec(&v.uuid, |s| s.size_bytes = size).await.map_err(cluster_status)?;
        }
        Ok(Response::new(volume_to_pb(&self.engine, &self.node_name, &v)))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        if let (Some(c), false) = (&self.cluster, r.here)
            && let Some(spec) = c.volume_spec(&r.name).await.map_err(cluster_status)?
            && spec.replicated()
        {
            // Every copy, then the record.
            for node in spec.copies() {
                let gone = pb::DeleteVolumeRequest { name: spec.uuid.clone(), here: true };
                already_gone(c.peer(&node).map_err(cluster_status)?.delete_volume(gone).await)?;
            }
            c.release_volume(&spec).await.map_err(cluster_status)?;
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        }
        if !r.here
            && let Some(mut peer) = self.owner(&r.name).await?
        {
            return peer.delete_volume(r).await;
        }
        let name = self.engine.resolve(&r.name);
        let uuid = self.engine.volume(&name).map(|v| v.uuid.clone()).ok();
        self.engine.delete_volume(&name).await.map_err(status)?;
        if let (Some(c), Some(uuid), false) = (&self.cluster, uuid, r.here)
            && let Some(spec) = c.volume_spec(&uuid).await.map_err(cluster_status)?
        {
            c.release_volume(&spec).await.map_err(cluster_status)?;
        }
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    /// In a cluster a clone goes where its source's layers are: to the source's node, where it
    /// is recorded like a created volume.
    async fn clone_volume(&self, req: Request<pb::CloneVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        if !req.get_ref().here
            && let Some(mut peer) = self.owner(&req.get_ref().source).await?
        {
            return peer.clone_volume(req.into_inner()).await;
        }
        let r = req.into_inner();
        let source = self.engine.resolve(&r.source);
        if r.here {
            let opts = VolumeOptions {
                labels: r.labels.into_iter().collect(),
                qos: qos_from_pb(r.qos),
                uuid: Some(r.uuid).filter(|u| !u.is_empty()),
                ..Default::default()
            };
            let v = self.engine.clone_volume_with(&source, &r.name, opts).await.map_err(status)?;
            return Ok(Response::new(volume_to_pb(&self.engine, &self.node_name, &v)));
        }
        if let Some(c) = &self.cluster
            && let Some(members) = self.replicated_snapshot(c, &source).await?
        {
            return self.clone_replicated(c, &source, members, r).await.map(Response::new);
        }
        if let Some(c) = &self.cluster
            && !source.contains('@')
            && let Some(spec) =
                c.volume_spec(&self.engine.find_volume(&source).map_err(status)?.uuid).await.map_err(cluster_status)?
            && spec.replicated()
        {
            return self.clone_replicated_head(c, &spec, r).await.map(Response::new);
        }
        let spec = match &self.cluster {
            Some(c) => Some(self.reserve_here(c, &r.name, &source).await?),
            None => None,
        };
        let opts = VolumeOptions {
            labels: r.labels.into_iter().collect(),
            qos: qos_from_pb(r.qos),
            uuid: spec.as_ref().map(|s| s.uuid.clone()),
            ..Default::default()
        };
        match self.engine.clone_volume_with(&source, &r.name, opts).await {
            Ok(v) => Ok(Response::new(volume_to_pb(&self.engine, &self.node_name, &v))),
            Err(e) => {
                if let (Some(c), Some(spec)) = (&self.cluster, &spec)
                    && let Err(release) = c.release_volume(spec).await
                {
                    tracing::warn!(volume = %spec.name, error = %release, "cannot forget a clone that failed");
                }
                Err(status(e))
            }
        }
    }

    async fn create_snapshot_group(
        &self,
        req: Request<pb::CreateSnapshotGroupRequest>,
    ) -> Result<Response<pb::SnapshotGroup>, Status> {
        let r = req.into_inner();
        let volumes: Vec<String> = r.volumes.iter().map(|v| self.engine.resolve(v)).collect();
        if self.cluster.is_some()
            && let Some(elsewhere) = volumes.iter().find(|v| self.engine.volume(v).is_err())
        {
            // One point in time across nodes needs an ordered barrier (with replication).
            return Err(Status::failed_precondition(format!(
                "volume {elsewhere:?} is not held on this node ({}): a group snapshot takes volumes of one node; \
                 send it to the node holding them",
                self.node_name
            )));
        }
        let snaps = self.engine.create_snapshot_group(&r.name, &volumes).await.map_err(status)?;
        let snapshots: Vec<pb::Snapshot> =
            snaps.iter().map(|s| snapshot_to_pb(&self.engine, &self.node_name, s)).collect();
        self.record_snapshots(&snapshots).await?;
        Ok(Response::new(pb::SnapshotGroup { name: r.name, snapshots }))
    }

    async fn set_volume_qos(&self, req: Request<pb::SetVolumeQosRequest>) -> Result<Response<pb::Volume>, Status> {
        if let Some(mut peer) = self.owner(&req.get_ref().name).await? {
            return peer.set_volume_qos(req.into_inner()).await;
        }
        let r = req.into_inner();
        let v = self.engine.set_qos(&self.engine.resolve(&r.name), qos_from_pb(r.qos)).await.map_err(status)?;
        Ok(Response::new(volume_to_pb(&self.engine, &self.node_name, &v)))
    }

    async fn create_snapshot(&self, req: Request<pb::CreateSnapshotRequest>) -> Result<Response<pb::Snapshot>, Status> {
        let r = req.into_inner();
        if r.here && r.mark {
            let volume = self.engine.resolve(&r.volume);
            self.engine.delete_mark(&volume, &r.name).await.map_err(status)?;
            let s = self.engine.create_mark(&volume, &r.name).await.map_err(status)?;
            return Ok(Response::new(snapshot_to_pb(&self.engine, &self.node_name, &s)));
        }
        if r.here {
            let uuid = Some(r.uuid.clone()).filter(|u| !u.is_empty());
            let volume = self.engine.resolve(&r.volume);
            let s = self.engine.create_snapshot_with(&volume, &r.name, uuid).await.map_err(status)?;
            return Ok(Response::new(snapshot_to_pb(&self.engine, &self.node_name, &s)));
        }
        if let (Some(c), true) = (&self.cluster, r.barrier) {
            return self.snapshot_barrier(c, r).await.map(Response::new);
        }
        if let Some(mut peer) = self.owner(&r.volume).await? {
            return peer.create_snapshot(r).await;
        }
        if let Some(c) = &self.cluster
            && let Ok(v) = self.engine.find_volume(&r.volume)
            && let Some(spec) = c.volume_spec(&v.uuid).await.map_err(cluster_status)?
            && spec.replicated()
        {
            // One point in the write stream on every copy: the target holds its writes while
            // each in-sync copy takes the snapshot.
            let barrier = pb::CreateSnapshotRequest {
                volume: spec.uuid.clone(),
                name: r.name.clone(),
                uuid: crate::meta::uuid::new_uuid_text(),
                barrier: true,
                ..Default::default()
            };
            let target = c.target(&spec.uuid).await.map_err(cluster_status)?.map(|t| t.node);
            let mut s = match target.filter(|t| *t != self.node_name && c.directory.get(t).is_some_and(|n| n.up)) {
                Some(t) => c.peer(&t).map_err(cluster_status)?.create_snapshot(barrier).await?.into_inner(),
                None => self.snapshot_barrier(c, barrier).await?,
            };
            s.node = spec.node.clone();
            self.record_snapshots(std::slice::from_ref(&s)).await?;
            return Ok(Response::new(s));
        }
        let s = self.engine.create_snapshot(&self.engine.resolve(&r.volume), &r.name).await.map_err(status)?;
        let s = snapshot_to_pb(&self.engine, &self.node_name, &s);
        self.record_snapshots(std::slice::from_ref(&s)).await?;
        Ok(Response::new(s))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let volume = self.engine.resolve(&r.volume);
        if r.here && r.layers {
            let chain = self.engine.snapshots_in_order(&volume).map_err(status)?;
            let snapshots = chain.iter().map(|s| snapshot_to_pb(&self.engine, &self.node_name, s)).collect();
            return Ok(Response::new(pb::ListSnapshotsResponse { snapshots }));
        }
        let filter = Some(volume.as_str()).filter(|v| !v.is_empty());
        let mut snapshots: Vec<pb::Snapshot> = self
            .engine
            .list_snapshots(filter)
            .iter()
            .map(|s| snapshot_to_pb(&self.engine, &self.node_name, s))
            .collect();
        if let (Some(c), false) = (&self.cluster, r.here) {
            // The other nodes' snapshots, as the cluster records them.
            let of_volume = |s: &crate::cluster::snapshots::SnapshotSpec| {
                r.volume.is_empty() || s.volume == r.volume || s.volume_uuid == r.volume
            };
            let elsewhere = c.snapshot_specs().await.map_err(cluster_status)?;
            let here: std::collections::HashSet<String> = snapshots.iter().map(|s| s.uuid.clone()).collect();
            let elsewhere = elsewhere.into_iter().filter(|s| !here.contains(&s.uuid) && of_volume(s));
            snapshots.extend(elsewhere.map(convert::snapshot_spec_to_pb));
            snapshots.sort_by(|a, b| (&a.volume, &a.name).cmp(&(&b.volume, &b.name)));
        }
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        if !r.here
            && let Some(mut peer) = self.owner(&r.key).await?
        {
            return peer.delete_snapshot(r).await;
        }
        let key = self.engine.resolve(&r.key);
        let snap = self.engine.snapshot(&key).map(|s| (s.uuid.clone(), s.volume_uuid.clone()));
        if let (Some(c), Ok((uuid, volume_uuid)), false) = (&self.cluster, &snap, r.here)
            && let Some(spec) = c.volume_spec(volume_uuid).await.map_err(cluster_status)?
            && spec.replicated()
        {
            // Every copy's. One out of the in-sync set may be out of reach: its rebuild deletes
            // the snapshots its source no longer has.
            let in_sync = c.in_sync(&spec.uuid).await.map_err(cluster_status)?.map(|s| s.members);
            for node in spec.copies().into_iter().filter(|n| *n != self.node_name) {
                let gone = pb::DeleteSnapshotRequest { key: uuid.clone(), here: true };
                let deleted = match c.peer(&node) {
                    Ok(mut peer) => already_gone(peer.delete_snapshot(gone).await),
                    Err(e) => Err(cluster_status(e)),
                };
                match deleted {
                    Err(e) if in_sync.as_ref().is_some_and(|m| !m.contains(&node)) => {
                        tracing::warn!(snapshot = %uuid, node, error = %e, "a copy out of sync keeps a deleted snapshot until its rebuild");
                    }
                    r => r?,
                }
            }
        }
        self.engine.delete_snapshot(&key).await.map_err(status)?;
        if let (Some(c), Ok((uuid, _)), false) = (&self.cluster, snap, r.here) {
            c.delete_snapshot_spec(&uuid).await.map_err(cluster_status)?;
        }
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn get_pool(&self, _req: Request<pb::GetPoolRequest>) -> Result<Response<pb::Pool>, Status> {
        let p = self.engine.pool_info();
        Ok(Response::new(pb::Pool {
            capacity_bytes: p.capacity,
            used_bytes: p.used,
            cluster_size: p.cluster_size as u32,
            volume_count: p.volumes as u32,
            snapshot_count: p.snapshots as u32,
            data_dir: p.data_dir.display().to_string(),
            node_name: self.node_name.clone(),
            nbd_address: self.nbd_address.clone(),
            available_bytes: p.capacity.saturating_sub(p.used),
            io_engine: self.engine.io_engine().name().to_string(),
            io_engine_requested: self.io_engine_requested.name().to_string(),
            direct_io: self.engine.direct_io(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn rebuild_volume(&self, req: Request<pb::RebuildVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let Some(c) = &self.cluster else {
            return Err(Status::failed_precondition("rebuilds are for replicated volumes of a cluster"));
        };
        let (spec, target) = self.at_target(c, &r.volume, r.at_target).await?;
        if let Some(mut peer) = target {
            let forward = pb::RebuildVolumeRequest { volume: spec.uuid.clone(), at_target: true, ..r };
            return peer.rebuild_volume(forward).await;
        }
        if r.follow_only {
            let shared = c.shared(&spec.uuid);
            let _held = shared.order.barrier().await.map_err(status)?;
            let set = c.in_sync(&spec.uuid).await.map_err(cluster_status)?;
            let members = set.map(|s| s.members).unwrap_or_default();
            if shared.follow_store(&members).map_err(status)? {
                tracing::info!(volume = %spec.name, in_sync = ?members, "sessions follow the in-sync set changed in etcd");
            }
            return self.get_volume(Request::new(pb::GetVolumeRequest { name: spec.uuid })).await;
        }
        let in_sync = c.in_sync(&spec.uuid).await.map_err(cluster_status)?.map(|s| s.members).unwrap_or_default();
        for node in spec.copies().into_iter().filter(|n| !in_sync.contains(n)) {
            if !c.directory.get(&node).is_some_and(|n| n.up) {
                continue;
            }
            let cluster = c.clone();
            if !crate::cluster::rebuild::rebuild(&cluster, &spec, &node).await.map_err(status)? {
                return Err(Status::failed_precondition(format!(
                    "volume {} is not attached here: its copies are rebuilt when it is next attached",
                    spec.name
                )));
            }
        }
        self.get_volume(Request::new(pb::GetVolumeRequest { name: spec.uuid })).await
    }

    async fn set_replicas(&self, req: Request<pb::SetReplicasRequest>) -> Result<Response<pb::Volume>, Status> {
        let Some(c) = &self.cluster else {
            return Err(Status::failed_precondition("replicas are for volumes of a cluster"));
        };
        if let Some(mut peer) = self.owner(&req.get_ref().volume).await? {
            return peer.set_replicas(req.into_inner()).await;
        }
        let r = req.into_inner();
        let v = self.engine.find_volume(&r.volume).map_err(status)?;
        let spec = c
            .volume_spec(&v.uuid)
            .await
            .map_err(cluster_status)?
            .ok_or_else(|| Status::not_found(format!("volume {:?} is not recorded in the cluster", r.volume)))?;
        let want = r.replicas.max(1) as usize;
        let copies = spec.copies();
        let grants = self.engine.grants_of(&v.name);
        if !spec.replicated() && want > 1 && !grants.is_empty() {
            // Its sessions write to one copy and would not learn of the others.
            return Err(Status::failed_precondition(format!(
                "volume {} is attached with one copy: unpublish it before it gets more",
                v.name
            )));
        }
        let mut kept = copies.clone();
        if want > copies.len() {
            let added = c
                .place_copies("", &[], &copies, want - copies.len())
                .await
                .map_err(cluster_status)?
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
            for node in added.into_iter().map(|n| n.name) {
                let create = pb::CreateVolumeRequest {
                    name: v.name.clone(),
                    size_bytes: v.size(),
                    here: true,
                    uuid: v.uuid.clone(),
                    labels: v.labels.clone().into_iter().collect(),
                    ..Default::default()
                };
                let mut peer = c.peer(&node).map_err(cluster_status)?;
                peer.create_volume(create).await?;
                for g in &grants {
                    let rec = &g.record;
                    let copy = pb::PublishVolumeRequest {
                        volume: v.uuid.clone(),
                        node: rec.node.clone(),
                        read_only: rec.read_only,
                        single_writer: rec.single_writer,
                        here: true,
                        token: rec.token.clone(),
                    };
                    peer.publish_volume(copy).await?;
                }
                kept.push(node);
            }
            if !spec.replicated() {
                // Only the copy that has the data is in sync; the new ones are rebuilt.
                c.set_in_sync(&v.uuid, vec![spec.node.clone()], None).await.map_err(cluster_status)?;
            }
        } else if want < copies.len() {
            let in_sync = c.in_sync(&v.uuid).await.map_err(cluster_status)?.map(|s| s.members).unwrap_or_default();
            // Out of sync first, then the last made; never the first copy.
            let mut order: Vec<String> = copies.iter().skip(1).filter(|n| !in_sync.contains(n)).cloned().collect();
            order.extend(copies.iter().skip(1).rev().filter(|n| in_sync.contains(n)).cloned());
            for node in order.into_iter().take(copies.len() - want) {
                let remaining: Vec<String> =
                    in_sync.iter().filter(|m| **m != node && kept.contains(m)).cloned().collect();
                let left = c.set_in_sync(&v.uuid, remaining, Some(&node)).await.map_err(cluster_status)?;
                kept.retain(|n| *n != node);
                // The target's sessions stop writing to it before it goes.
                self.target_follows(&v.uuid, &v.name).await;
                // The mark where it had left serves no rebuild any more.
                if let Some(d) = left {
                    crate::cluster::marks::delete(c, &v.name, &d).await;
                }
                let gone = pb::DeleteVolumeRequest { name: v.uuid.clone(), here: true };
                match c.peer(&node) {
                    Ok(mut p) => {
                        // Its grants first (they fence the target's links to it), then the copy.
                        for g in &grants {
                            let revoke = pb::UnpublishVolumeRequest {
                                volume: v.uuid.clone(),
                                node: g.record.node.clone(),
                                here: true,
                            };
                            p.unpublish_volume(revoke).await?;
                        }
                        already_gone(p.delete_volume(gone).await)?;
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.name, node, error = %e, "a removed copy's node is out of reach: its data stays there")
                    }
                }
            }
        }
        let min = min_insync_for(kept.len(), r.min_insync);
        let replicas = if kept.len() > 1 { kept.clone() } else { Vec::new() };
        c.update_spec(&v.uuid, |s| (s.replicas, s.min_insync) = (replicas.clone(), min))
            .await
            .map_err(cluster_status)?;
        tracing::info!(volume = %v.name, copies = ?kept, min_insync = min, "replicas changed");
        if kept.len() > 1 {
            let rebuild = pb::RebuildVolumeRequest { volume: v.uuid.clone(), at_target: false, follow_only: false };
            match self.rebuild_volume(Request::new(rebuild)).await {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {}
                Err(e) => return Err(e),
            }
        }
        self.get_volume(Request::new(pb::GetVolumeRequest { name: v.uuid.clone() })).await
    }

    async fn scrub_volume(&self, req: Request<pb::ScrubVolumeRequest>) -> Result<Response<pb::ScrubReport>, Status> {
        let r = req.into_inner();
        let Some(c) = &self.cluster else {
            return Err(Status::failed_precondition("scrubs compare the copies of replicated volumes of a cluster"));
        };
        let (spec, target) = self.at_target(c, &r.volume, r.at_target).await?;
        if let Some(mut peer) = target {
            let forward = pb::ScrubVolumeRequest { volume: spec.uuid.clone(), at_target: true, ..r };
            return peer.scrub_volume(forward).await;
        }
        let found = crate::cluster::scrub::scrub(c, &spec, r.repair).await.map_err(status)?.ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {} is not attached here: attach it to scrub its copies",
                spec.name
            ))
        })?;
        Ok(Response::new(pb::ScrubReport {
            copies: found.copies,
            bytes_compared: found.compared,
            differing: found.differing.into_iter().map(|(offset, length)| pb::ByteRange { offset, length }).collect(),
            repaired: found.repaired,
            snapshots: found.snapshots,
            snapshot_differing: found
                .snapshot_differing
                .into_iter()
                .map(|(snapshot, offset, length)| pb::SnapshotRange {
                    snapshot,
                    range: Some(pb::ByteRange { offset, length }),
                })
                .collect(),
        }))
    }

    async fn checksums(&self, req: Request<pb::ChecksumsRequest>) -> Result<Response<pb::ChecksumsResponse>, Status> {
        let r = req.into_inner();
        if r.piece_bytes == 0 || r.length > CHECKSUM_RANGE_MAX {
            return Err(Status::invalid_argument(format!(
                "piece_bytes must be above 0 and length at most {CHECKSUM_RANGE_MAX}"
            )));
        }
        // A volume, or a snapshot (scrubs compare the layers too).
        let local = match self.engine.resolve(&r.volume).split_once('@') {
            Some((volume, snapshot)) => self.engine.open_snapshot(volume, snapshot),
            None => self.engine.find_volume(&r.volume).and_then(|v| self.engine.open_volume(&v.name)),
        }
        .map_err(status)?;
        let end = r.offset.checked_add(r.length as u64).filter(|e| *e <= local.size());
        if end.is_none() {
            return Err(Status::out_of_range(format!("{}+{} is past the end of {}", r.offset, r.length, local.name())));
        }
        let data = crate::io::read_all(&local, r.offset, r.length).await.map_err(status)?;
        let pieces = data.chunks(r.piece_bytes as usize);
        let crc32c = pieces.clone().map(crc32c::crc32c).collect();
        let sha256 = if r.sha256 { pieces.map(crate::cluster::scrub::digest).collect() } else { Vec::new() };
        Ok(Response::new(pb::ChecksumsResponse { crc32c, sha256 }))
    }

    async fn force_promote(&self, req: Request<pb::ForcePromoteRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let Some(c) = &self.cluster else {
            return Err(Status::failed_precondition("force-promote is for replicated volumes of a cluster"));
        };
        if !r.accept_data_loss {
            return Err(Status::failed_precondition(
                "the promoted copy may lack acknowledged writes: pass accept_data_loss (--accept-data-loss) to do it anyway",
            ));
        }
        let spec = c
            .volume_spec(&r.volume)
            .await
            .map_err(cluster_status)?
            .ok_or_else(|| Status::not_found(format!("volume {:?}", r.volume)))?;
        if !spec.replicated() || !spec.copies().contains(&r.node) {
            return Err(Status::invalid_argument(format!(
                "{} holds no copy of replicated volume {} (copies: {})",
                r.node,
                spec.name,
                spec.copies().join(", ")
            )));
        }
        let (before, departed) = c.force_in_sync(&spec.uuid, &r.node).await.map_err(cluster_status)?;
        // One copy must be enough to write again.
        c.update_spec(&spec.uuid, |s| s.min_insync = 1).await.map_err(cluster_status)?;
        // The other copies are rebuilt from the promoted one in full: their marks go.
        for d in &departed {
            crate::cluster::marks::delete(c, &spec.name, d).await;
        }
        self.target_follows(&spec.uuid, &spec.name).await;
        tracing::warn!(
            volume = %spec.name, node = %r.node, in_sync_before = ?before, min_insync_before = spec.min_insync,
            "FORCE-PROMOTE: one copy made the in-sync set (min_insync now 1); writes only other copies had are lost"
        );
        self.get_volume(Request::new(pb::GetVolumeRequest { name: spec.uuid })).await
    }

    async fn list_nodes(&self, _req: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes: Vec<pb::Node> = match &self.cluster {
            Some(c) => c.directory.list().into_iter().map(convert::node_to_pb).collect(),
            None => {
                let me = (self.this_node)();
                let others = self.engine.registered_nodes().into_iter().filter(|n| n.name != me.name);
                let others: Vec<pb::Node> = others.map(|n| convert::registered_node_to_pb(&n.name)).collect();
                let me = crate::cluster::nodes::NodeView { record: me, up: true };
                std::iter::once(convert::node_to_pb(me)).chain(others).collect()
            }
        };
        Ok(Response::new(pb::ListNodesResponse { nodes, clustered: self.cluster.is_some() }))
    }

    async fn register_node(&self, req: Request<pb::RegisterNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let name = req.into_inner().name;
        if let Some(c) = &self.cluster {
            return match c.directory.get(&name) {
                Some(n) => Ok(Response::new(convert::node_to_pb(n))),
                None => Err(Status::not_found(format!(
                    "node {name:?} has not joined the cluster: run `thinbd serve --etcd ... --node-name {name}` there"
                ))),
            };
        }
        let me = (self.this_node)();
        if name == me.name {
            return Ok(Response::new(convert::node_to_pb(crate::cluster::nodes::NodeView { record: me, up: true })));
        }
        let n = self.engine.register_node(&name).await.map_err(status)?;
        Ok(Response::new(convert::registered_node_to_pb(&n.name)))
    }

    async fn publish_volume(&self, req: Request<pb::PublishVolumeRequest>) -> Result<Response<pb::Grant>, Status> {
        let r = req.into_inner();
        if !r.here
            && let Some(mut peer) = self.owner(&r.volume).await?
        {
            return peer.publish_volume(r).await;
        }
        let access = Access { read_only: r.read_only, single_writer: r.single_writer };
        let token = Some(r.token.clone()).filter(|t| r.here && !t.is_empty());
        let volume = self.engine.resolve(&r.volume);
        let g = self.engine.publish(&volume, &r.node, access, token).await.map_err(status)?;
        let rec = &g.record;
        if r.here {
            return Ok(Response::new(convert::grant_to_pb(&g, &self.nbd_address)));
        }
        // A replicated volume's grant is the same on every copy (the target's links use it).
        for (node, mut peer) in self.other_copies(&volume).await? {
            let copy = pb::PublishVolumeRequest { here: true, token: rec.token.clone(), ..r.clone() };
            peer.publish_volume(copy)
                .await
                .map_err(|e| Status::new(e.code(), format!("copy on {node}: {}", e.message())))?;
        }
        if let Some(c) = &self.cluster {
            // Publish is idempotent: a retry after a failure here records it again.
            let uuid = self.engine.volume(&rec.volume).map_err(status)?.uuid.clone();
            let entry = crate::cluster::grants::GrantEntry {
                volume: rec.volume.clone(),
                node: rec.node.clone(),
                read_only: rec.read_only,
                single_writer: rec.single_writer,
                token_sha256: crate::cluster::grants::token_hash(&rec.token),
                created_unix: rec.created_unix,
            };
            c.put_grant(&uuid, &entry).await.map_err(cluster_status)?;
        }
        Ok(Response::new(convert::grant_to_pb(&g, &self.nbd_address)))
    }

    async fn unpublish_volume(
        &self,
        req: Request<pb::UnpublishVolumeRequest>,
    ) -> Result<Response<pb::UnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if !r.here
            && let Some(mut peer) = self.owner(&r.volume).await?
        {
            return peer.unpublish_volume(r).await;
        }
        let volume = self.engine.resolve(&r.volume);
        if let (Some(c), Ok(v), false) = (&self.cluster, self.engine.volume(&volume), r.here) {
            // First out of etcd, so no target can take the volume's epoch with it any more.
            c.delete_grant(&v.uuid, &r.node).await.map_err(cluster_status)?;
            for (node, mut peer) in self.other_copies(&volume).await? {
                let copy = pb::UnpublishVolumeRequest { here: true, ..r.clone() };
                peer.unpublish_volume(copy)
                    .await
                    .map_err(|e| Status::new(e.code(), format!("copy on {node}: {}", e.message())))?;
            }
        }
        self.engine.unpublish(&volume, &r.node).await.map_err(status)?;
        Ok(Response::new(pb::UnpublishVolumeResponse {}))
    }
}
