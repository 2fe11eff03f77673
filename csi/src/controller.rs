//! CSI Controller: provisioning, snapshots, attachment grants and expansion, each translated to
//! the management API of the storage node that holds the volume. Every call is idempotent: the
//! volume name carries the CSI name, and its labels remember the request's content source so an
//! incompatible re-create is told apart from a retry.

use std::collections::HashMap;
use std::sync::Arc;

use thinbd_api::csi::controller_server::Controller;
use thinbd_api::csi::controller_service_capability::rpc::Type as Rpc;
use thinbd_api::csi::*;
use thinbd_api::pb;
use tonic::{Request, Response, Status};

use crate::backend::{Api, Backends, unavailable};
use crate::ids::{SnapshotId, VolumeId, required, server_name};
use crate::{CTX_EXPORT, CTX_MKFS_OPTIONS, CTX_NBD, CTX_STORAGE_NODE, TOPOLOGY_KEY, ZONE_KEY, capability, params};

/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volume sizes are multiples of this (the kernel NBD block size).
pub const SIZE_ALIGN: u64 = 4096;
const LABEL_SOURCE: &str = "csi.source";
const LABEL_NAME: &str = "csi.name";
const LABEL_MKFS: &str = "csi.mkfs-options";
/// What csi-provisioner's `--extra-create-metadata` passes, kept as labels so that `thinbd
/// volume show` names the claim a volume belongs to: parameter → label.
const CLAIM_LABELS: [(&str, &str); 3] = [
    ("csi.storage.k8s.io/pvc/name", "kubernetes.pvc-name"),
    ("csi.storage.k8s.io/pvc/namespace", "kubernetes.pvc-namespace"),
    ("csi.storage.k8s.io/pv/name", "kubernetes.pv-name"),
];

pub struct ControllerService {
    pub backends: Arc<Backends>,
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// The size to create for a capacity range, or OUT_OF_RANGE.
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64, Status> {
    let Some(r) = range else { return Ok(DEFAULT_SIZE) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(invalid("capacity_range values must not be negative"));
    }
    if r.required_bytes == 0 && r.limit_bytes == 0 {
        return Err(invalid("capacity_range must set required_bytes or limit_bytes"));
    }
    let (req, lim) = (r.required_bytes as u64, r.limit_bytes as u64);
    let want =
        if req > 0 { req.div_ceil(SIZE_ALIGN) * SIZE_ALIGN } else { DEFAULT_SIZE.min(lim / SIZE_ALIGN * SIZE_ALIGN) };
    if want == 0 || (lim > 0 && want > lim) {
        return Err(Status::out_of_range(format!(
            "no multiple of {SIZE_ALIGN} bytes fits required {req} and limit {lim}"
        )));
    }
    if want > 1 << 60 {
        return Err(Status::out_of_range("volumes are limited to 1 EiB"));
    }
    Ok(want)
}

fn fits(size: u64, range: Option<&CapacityRange>) -> bool {
    range.is_none_or(|r| size >= r.required_bytes.max(0) as u64 && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64))
}

fn source_label(src: Option<&VolumeContentSource>) -> Result<String, Status> {
    use volume_content_source::Type;
    Ok(match src.and_then(|s| s.r#type.as_ref()) {
        None => String::new(),
        Some(Type::Snapshot(s)) => format!("snapshot:{}", required(&s.snapshot_id, "snapshot_id")?),
        Some(Type::Volume(v)) => format!("volume:{}", required(&v.volume_id, "volume_id")?),
    })
}

fn source_from_label(label: &str) -> Option<VolumeContentSource> {
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    let t = match label.split_once(':')? {
        ("snapshot", id) => Type::Snapshot(SnapshotSource { snapshot_id: id.into() }),
        ("volume", id) => Type::Volume(VolumeSource { volume_id: id.into() }),
        _ => return None,
    };
    Some(VolumeContentSource { r#type: Some(t) })
}

fn topology(node: &str) -> Topology {
    Topology { segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.to_string())]) }
}

pub(crate) fn condition(v: &pb::Volume) -> VolumeCondition {
    if v.unavailable {
        return VolumeCondition {
            abnormal: true,
            message: format!("the storage node {} holding volume {} is down", v.node, v.name),
        };
    }
    // The server answered for it and holds its metadata: healthy. (I/O errors are reported by
    // the node, which sees them.)
    VolumeCondition { abnormal: false, message: format!("volume {} is present on its storage node", v.name) }
}

impl ControllerService {
    /// A volume as CSI sees it. In a cluster (`cluster`: its nodes) it is reachable from every
    /// node, so its topology is its node's zone, or none; else its storage node.
    fn csi_volume_in(&self, node: &str, v: &pb::Volume, nbd: &str, cluster: Option<&[pb::Node]>) -> Volume {
        let node = if v.node.is_empty() { node } else { v.node.as_str() };
        let accessible_topology = match cluster {
            None => vec![topology(node)],
            Some(nodes) => match nodes.iter().find(|n| n.name == node).map(|n| n.zone.as_str()).unwrap_or("") {
                "" => Vec::new(),
                zone => vec![Topology { segments: HashMap::from([(ZONE_KEY.to_string(), zone.to_string())]) }],
            },
        };
        let mut ctx =
            HashMap::from([(CTX_STORAGE_NODE.to_string(), node.to_string()), (CTX_NBD.to_string(), nbd.to_string())]);
        if let Some(m) = v.labels.get(LABEL_MKFS) {
            ctx.insert(CTX_MKFS_OPTIONS.into(), m.clone());
        }
        Volume {
            capacity_bytes: v.size_bytes as i64,
            volume_id: VolumeId::of(self.backends.route(node), &v.name, &v.uuid),
            volume_context: ctx,
            content_source: v.labels.get(LABEL_SOURCE).and_then(|l| source_from_label(l)),
            accessible_topology,
        }
    }

    async fn nbd_address(api: &mut Api) -> Result<String, Status> {
        Ok(api.get_pool(pb::GetPoolRequest {}).await.map_err(unavailable)?.into_inner().nbd_address)
    }

    /// The volume, or None when it does not exist.
    async fn find(api: &mut Api, name: &str) -> Result<Option<pb::Volume>, Status> {
        match api.get_volume(pb::GetVolumeRequest { name: name.into() }).await {
            Ok(v) => Ok(Some(v.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(unavailable(s)),
        }
    }

    /// The id, the storage node it is on and that node's API.
    async fn volume_api(&self, volume_id: &str) -> Result<(VolumeId, String, Api), Status> {
        let id = VolumeId::parse(required(volume_id, "volume_id")?).ok_or_else(|| {
            Status::not_found(format!("volume {volume_id:?} does not exist (not a thinbd volume id)"))
        })?;
        let (node, api) = self.backends.locate(id.node.as_deref()).await?;
        Ok((id, node, api))
    }

    async fn snapshots(api: &mut Api, volume: &str) -> Result<Vec<pb::Snapshot>, Status> {
        Ok(api
            .list_snapshots(pb::ListSnapshotsRequest { volume: volume.into(), ..Default::default() })
            .await
            .map_err(unavailable)?
            .into_inner()
            .snapshots)
    }

    /// A snapshot as CSI sees it; `route` as in [`Backends::route`].
    pub fn csi_snapshot(route: Option<&str>, s: &pb::Snapshot) -> Snapshot {
        Snapshot {
            size_bytes: s.size_bytes as i64,
            snapshot_id: SnapshotId::of(route, &s.volume, &s.name, &s.uuid),
            source_volume_id: VolumeId::of(route, &s.volume, &s.volume_uuid),
            creation_time: Some(prost_types::Timestamp { seconds: s.created_unix_seconds as i64, nanos: 0 }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        }
    }

    /// Every storage node we can enumerate (a template cannot be enumerated: only the nodes
    /// named in ids are reachable then).
    async fn known_nodes(&self) -> Result<Vec<String>, Status> {
        if self.backends.is_template() { Ok(Vec::new()) } else { Ok(vec![self.backends.single_node().await?]) }
    }
}

/// Pagination over a sorted list: `starting_token` is the index to start at.
fn page<T>(items: Vec<T>, max_entries: i32, token: &str) -> Result<(Vec<T>, String), Status> {
    if max_entries < 0 {
        return Err(invalid("max_entries must not be negative"));
    }
    let start: usize = if token.is_empty() {
        0
    } else {
        token
            .parse()
            .ok()
            .filter(|i| *i <= items.len())
            .ok_or_else(|| Status::aborted(format!("invalid starting_token {token:?}")))?
    };
    let n = if max_entries == 0 { usize::MAX } else { max_entries as usize };
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(start).take(n).collect();
    let next = if start + page.len() < total { (start + page.len()).to_string() } else { String::new() };
    Ok((page, next))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let csi_name = required(&r.name, "name")?;
        capability::check_all(&r.volume_capabilities).map_err(invalid)?;
        let p = params::parse(&r.parameters).map_err(invalid)?;
        let mut qos = p.qos;
        params::apply_mutable(&mut qos, &r.mutable_parameters).map_err(invalid)?;
        let size = size_for(r.capacity_range.as_ref())?;
        let source = source_label(r.volume_content_source.as_ref())?;
        let placement = self.backends.place(r.accessibility_requirements.as_ref()).await?;
        let node = placement.node.clone();
        let mut api = self.backends.api(&node).await?;
        let nbd = Self::nbd_address(&mut api).await?;
        let name = server_name(csi_name);
        if let Some(v) = Self::find(&mut api, &name).await? {
            let same_source = v.labels.get(LABEL_SOURCE).map(String::as_str).unwrap_or("") == source;
            if !fits(v.size_bytes, r.capacity_range.as_ref()) || !same_source {
                return Err(Status::already_exists(format!(
                    "volume {csi_name:?} exists with another size or content source"
                )));
            }
            let volume = self.csi_volume_in(&node, &v, &nbd, placement.cluster.as_deref());
            return Ok(Response::new(CreateVolumeResponse { volume: Some(volume) }));
        }
        let mut labels = HashMap::from([(LABEL_NAME.to_string(), csi_name.to_string())]);
        if !source.is_empty() {
            labels.insert(LABEL_SOURCE.into(), source.clone());
        }
        if let Some(m) = &p.mkfs_options {
            labels.insert(LABEL_MKFS.into(), m.clone());
        }
        for (parameter, label) in CLAIM_LABELS {
            if let Some(v) = r.parameters.get(parameter).filter(|v| !v.is_empty()) {
                labels.insert(label.into(), v.clone());
            }
        }
        use volume_content_source::Type;
        let from = match r.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            None => None,
            Some(Type::Snapshot(s)) => {
                let id = SnapshotId::parse(&s.snapshot_id)
                    .ok_or_else(|| Status::not_found(format!("snapshot {:?} does not exist", s.snapshot_id)))?;
                if let Some(on) = id.node.as_ref().filter(|on| **on != node) {
                    return Err(invalid(format!(
                        "snapshot {:?} lives on storage node {on:?}, not {node:?}",
                        s.snapshot_id
                    )));
                }
                Some(id.key)
            }
            Some(Type::Volume(v)) => {
                let id = VolumeId::parse(&v.volume_id)
                    .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", v.volume_id)))?;
                if let Some(on) = id.node.as_ref().filter(|on| **on != node) {
                    return Err(invalid(format!(
                        "volume {:?} lives on storage node {on:?}, not {node:?}",
                        v.volume_id
                    )));
                }
                Some(id.volume)
            }
        };
        let created = match from {
            None => {
                api.create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    size_bytes: size,
                    labels,
                    qos: Some(qos),
                    zone: placement.zone.clone(),
                    nodes: placement.nodes.clone(),
                    replicas: p.replicas,
                    min_insync: p.min_insync,
                    ..Default::default()
                })
                .await
            }
            Some(source_name) => {
                let cloned = api
                    .clone_volume(pb::CloneVolumeRequest {
                        source: source_name,
                        name: name.clone(),
                        labels,
                        qos: Some(qos),
                        ..Default::default()
                    })
                    .await;
                match cloned {
                    Ok(v) if v.get_ref().size_bytes > size => {
                        // Too small a request for its source: undo, the CO may retry bigger.
                        let _ = api.delete_volume(pb::DeleteVolumeRequest { name: name.clone(), here: false }).await;
                        return Err(Status::out_of_range(format!(
                            "the source is {} bytes, more than the {size} requested",
                            v.get_ref().size_bytes
                        )));
                    }
                    Ok(v) if v.get_ref().size_bytes < size => {
                        api.resize_volume(pb::ResizeVolumeRequest { name: name.clone(), size_bytes: size }).await
                    }
                    other => other,
                }
            }
        };
        let v = created
            .map_err(|s| match s.code() {
                tonic::Code::ResourceExhausted => Status::resource_exhausted(s.message()),
                _ => unavailable(s),
            })?
            .into_inner();
        tracing::info!(name = csi_name, volume = %v.name, node, size, "volume provisioned");
        let volume = self.csi_volume_in(&node, &v, &nbd, placement.cluster.as_deref());
        Ok(Response::new(CreateVolumeResponse { volume: Some(volume) }))
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let Some(id) = VolumeId::parse(&r.volume_id) else { return Ok(Response::new(DeleteVolumeResponse {})) };
        let (_, mut api) = self.backends.locate(id.node.as_deref()).await?;
        match api.delete_volume(pb::DeleteVolumeRequest { name: id.volume.clone(), here: false }).await {
            Ok(_) => tracing::info!(volume = %r.volume_id, "volume deleted"),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(unavailable(s)),
        }
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let node = required(&r.node_id, "node_id")?.to_string();
        let cap = r.volume_capability.as_ref().ok_or_else(|| invalid("volume_capability is required"))?;
        let usage = capability::check(cap).map_err(invalid)?;
        let (id, _, mut api) = self.volume_api(&r.volume_id).await?;
        if Self::find(&mut api, &id.volume).await?.is_none() {
            return Err(Status::not_found(format!("volume {:?} does not exist", r.volume_id)));
        }
        self.backends.check_node(&node).await?;
        let grant = api
            .publish_volume(pb::PublishVolumeRequest {
                volume: id.volume.clone(),
                node: node.clone(),
                read_only: r.readonly || usage.read_only(),
                single_writer: usage.single_writer(),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?
            .into_inner();
        // In a cluster the grant comes from the node holding the data, with its address.
        let nbd = match grant.nbd_address.is_empty() {
            true => Self::nbd_address(&mut api).await?,
            false => grant.nbd_address,
        };
        let ctx = HashMap::from([(CTX_EXPORT.to_string(), grant.export_name), (CTX_NBD.to_string(), nbd)]);
        tracing::info!(volume = %r.volume_id, node, "volume published");
        Ok(Response::new(ControllerPublishVolumeResponse { publish_context: ctx }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        // An unknown volume is as unpublished as it gets.
        let Some(id) = VolumeId::parse(&r.volume_id) else {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        };
        let (_, mut api) = self.backends.locate(id.node.as_deref()).await?;
        let Some(v) = Self::find(&mut api, &id.volume).await? else {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        };
        // No node: unpublish from every node.
        let nodes = if r.node_id.is_empty() { v.published_nodes.clone() } else { vec![r.node_id.clone()] };
        for node in nodes {
            api.unpublish_volume(pb::UnpublishVolumeRequest { volume: id.volume.clone(), node, here: false })
                .await
                .map_err(unavailable)?;
        }
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let (id, _, mut api) = self.volume_api(&r.volume_id).await?;
        if Self::find(&mut api, &id.volume).await?.is_none() {
            return Err(Status::not_found(format!("volume {:?} does not exist", r.volume_id)));
        }
        if let Err(e) = params::parse(&r.parameters) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse { confirmed: None, message: e }));
        }
        let resp = match capability::check_all(&r.volume_capabilities) {
            Ok(_) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                }),
                message: String::new(),
            },
            Err(e) => ValidateVolumeCapabilitiesResponse { confirmed: None, message: e },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let mut entries = Vec::new();
        let cluster = self.backends.cluster().await?;
        for node in self.known_nodes().await? {
            let mut api = self.backends.api(&node).await?;
            let nbd = Self::nbd_address(&mut api).await?;
            let vols =
                api.list_volumes(pb::ListVolumesRequest::default()).await.map_err(unavailable)?.into_inner().volumes;
            for v in vols {
                entries.push(list_volumes_response::Entry {
                    volume: Some(self.csi_volume_in(&node, &v, &nbd, cluster.as_deref())),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: v.published_nodes.clone(),
                        volume_condition: Some(condition(&v)),
                    }),
                });
            }
        }
        let (entries, next_token) = page(entries, r.max_entries, &r.starting_token)?;
        Ok(Response::new(ListVolumesResponse { entries, next_token }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        let (id, node, mut api) = self.volume_api(&r.volume_id).await?;
        let v = Self::find(&mut api, &id.volume)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        let nbd = Self::nbd_address(&mut api).await?;
        let cluster = self.backends.cluster().await?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(self.csi_volume_in(&node, &v, &nbd, cluster.as_deref())),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: v.published_nodes.clone(),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn get_capacity(&self, req: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = capability::check_all(&r.volume_capabilities)
            && !r.volume_capabilities.is_empty()
        {
            // Capacity for a capability we cannot provide is zero.
            tracing::debug!(error = e, "GetCapacity for an unsupported capability");
            return Ok(Response::new(GetCapacityResponse { available_capacity: 0, ..Default::default() }));
        }
        params::parse(&r.parameters).map_err(invalid)?;
        if let Some(nodes) = self.backends.cluster().await? {
            // Per segment: the free space of the nodes up in that zone (or that node), or all.
            let segments = r.accessible_topology.as_ref().map(|t| t.segments.clone()).unwrap_or_default();
            let available: u64 = nodes
                .iter()
                .filter(|n| n.up)
                .filter(|n| segments.get(ZONE_KEY).is_none_or(|z| *z == n.zone))
                .filter(|n| segments.get(TOPOLOGY_KEY).is_none_or(|x| *x == n.name))
                .map(|n| n.available_bytes)
                .sum();
            return Ok(Response::new(GetCapacityResponse {
                available_capacity: available as i64,
                maximum_volume_size: Some(1 << 60),
                minimum_volume_size: Some(SIZE_ALIGN as i64),
            }));
        }
        let node = match r.accessible_topology.as_ref().and_then(|t| t.segments.get(TOPOLOGY_KEY)) {
            Some(n) => n.clone(),
            None if !self.backends.is_template() => self.backends.single_node().await?,
            None => return Err(invalid(format!("accessible_topology with {TOPOLOGY_KEY} is required"))),
        };
        let mut api = match self.backends.api(&node).await {
            Ok(a) => a,
            // A node without a storage server here has no capacity.
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(Response::new(GetCapacityResponse { available_capacity: 0, ..Default::default() }));
            }
            Err(s) => return Err(s),
        };
        let pool = api.get_pool(pb::GetPoolRequest {}).await.map_err(unavailable)?.into_inner();
        Ok(Response::new(GetCapacityResponse {
            available_capacity: pool.available_bytes as i64,
            // Thin volumes may be larger than the free space; the engine caps them at 1 EiB.
            maximum_volume_size: Some(1 << 60),
            minimum_volume_size: Some(SIZE_ALIGN as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Rpc::CreateDeleteVolume,
            Rpc::PublishUnpublishVolume,
            Rpc::ListVolumes,
            Rpc::GetCapacity,
            Rpc::CreateDeleteSnapshot,
            Rpc::ListSnapshots,
            Rpc::CloneVolume,
            Rpc::PublishReadonly,
            Rpc::ExpandVolume,
            Rpc::ListVolumesPublishedNodes,
            Rpc::VolumeCondition,
            Rpc::GetVolume,
            Rpc::SingleNodeMultiWriter,
            Rpc::ModifyVolume,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                r#type: t as i32,
            })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let csi_name = required(&r.name, "name")?;
        required(&r.source_volume_id, "source_volume_id")?;
        let (id, node, mut api) = self.volume_api(&r.source_volume_id).await?;
        let route = self.backends.route(&node);
        let snap_name = server_name(csi_name);
        // Snapshot names are global in CSI: the same name on another volume is a conflict.
        let all = Self::snapshots(&mut api, "").await?;
        if let Some(s) = all.iter().find(|s| s.name == snap_name) {
            if s.volume != id.volume && s.volume_uuid != id.volume {
                return Err(Status::already_exists(format!("snapshot {csi_name:?} already exists for another volume")));
            }
            return Ok(Response::new(CreateSnapshotResponse { snapshot: Some(Self::csi_snapshot(route, s)) }));
        }
        let Some(source) = Self::find(&mut api, &id.volume).await? else {
            return Err(Status::not_found(format!("source volume {:?} does not exist", r.source_volume_id)));
        };
        let s = api
            .create_snapshot(pb::CreateSnapshotRequest {
                volume: source.name.clone(),
                name: snap_name,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?
            .into_inner();
        tracing::info!(name = csi_name, volume = %source.name, "snapshot created");
        Ok(Response::new(CreateSnapshotResponse { snapshot: Some(Self::csi_snapshot(route, &s)) }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        required(&r.snapshot_id, "snapshot_id")?;
        let Some(id) = SnapshotId::parse(&r.snapshot_id) else { return Ok(Response::new(DeleteSnapshotResponse {})) };
        let (_, mut api) = self.backends.locate(id.node.as_deref()).await?;
        match api.delete_snapshot(pb::DeleteSnapshotRequest { key: id.key.clone(), here: false }).await {
            Ok(_) => tracing::info!(snapshot = %r.snapshot_id, "snapshot deleted"),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(unavailable(s)),
        }
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let mut out = Vec::new();
        if !r.snapshot_id.is_empty() {
            // One snapshot, if it exists.
            if let Some(id) = SnapshotId::parse(&r.snapshot_id)
                && let Ok((node, mut api)) = self.backends.locate(id.node.as_deref()).await
            {
                for s in Self::snapshots(&mut api, "").await.unwrap_or_default() {
                    if id.matches(&s.volume, &s.name, &s.uuid) {
                        out.push(Self::csi_snapshot(self.backends.route(&node), &s));
                    }
                }
            }
        } else if !r.source_volume_id.is_empty() {
            // By name or UUID: the volume may be gone while its snapshots remain.
            if let Some(id) = VolumeId::parse(&r.source_volume_id)
                && let Ok((node, mut api)) = self.backends.locate(id.node.as_deref()).await
            {
                for s in Self::snapshots(&mut api, "").await? {
                    if s.volume == id.volume || s.volume_uuid == id.volume {
                        out.push(Self::csi_snapshot(self.backends.route(&node), &s));
                    }
                }
            }
        } else {
            for node in self.known_nodes().await? {
                let mut api = self.backends.api(&node).await?;
                for s in Self::snapshots(&mut api, "").await? {
                    out.push(Self::csi_snapshot(self.backends.route(&node), &s));
                }
            }
        }
        let (page, next_token) = page(out, r.max_entries, &r.starting_token)?;
        let entries = page.into_iter().map(|s| list_snapshots_response::Entry { snapshot: Some(s) }).collect();
        Ok(Response::new(ListSnapshotsResponse { entries, next_token }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        let range = r.capacity_range.as_ref().ok_or_else(|| invalid("capacity_range is required"))?;
        let want = size_for(Some(range))?;
        if let Some(cap) = &r.volume_capability {
            capability::check(cap).map_err(invalid)?;
        }
        let (id, _, mut api) = self.volume_api(&r.volume_id).await?;
        let v = Self::find(&mut api, &id.volume)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        let size = if v.size_bytes >= want {
            if range.limit_bytes > 0 && v.size_bytes > range.limit_bytes as u64 {
                return Err(Status::out_of_range(format!("volume is already {} bytes, above the limit", v.size_bytes)));
            }
            v.size_bytes
        } else {
            let v = api
                .resize_volume(pb::ResizeVolumeRequest { name: id.volume.clone(), size_bytes: want })
                .await
                .map_err(unavailable)?
                .into_inner();
            tracing::info!(volume = %r.volume_id, size = v.size_bytes, "volume expanded");
            v.size_bytes
        };
        // The node refreshes the device size and grows the filesystem.
        Ok(Response::new(ControllerExpandVolumeResponse { capacity_bytes: size as i64, node_expansion_required: true }))
    }

    /// VolumeAttributesClass changes: the QoS keys given replace the volume's; the others stay.
    /// Connected clients get the new limits with their next request.
    async fn controller_modify_volume(
        &self,
        req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let r = req.into_inner();
        required(&r.volume_id, "volume_id")?;
        if r.mutable_parameters.is_empty() {
            return Err(invalid("mutable_parameters is required".to_string()));
        }
        let (id, _, mut api) = self.volume_api(&r.volume_id).await?;
        let v = Self::find(&mut api, &id.volume)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        let mut qos = v.qos.unwrap_or_default();
        params::apply_mutable(&mut qos, &r.mutable_parameters).map_err(invalid)?;
        api.set_volume_qos(pb::SetVolumeQosRequest { name: id.volume.clone(), qos: Some(qos) })
            .await
            .map_err(unavailable)?;
        tracing::info!(volume = %r.volume_id, "volume modified");
        Ok(Response::new(ControllerModifyVolumeResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let r = |req: i64, lim: i64| CapacityRange { required_bytes: req, limit_bytes: lim };
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&r(1, 0))).unwrap(), 4096);
        assert_eq!(size_for(Some(&r(5000, 8192))).unwrap(), 8192);
        assert_eq!(size_for(Some(&r(0, 8192))).unwrap(), 8192);
        assert_eq!(size_for(Some(&r(5000, 6000))).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(size_for(Some(&r(-1, 0))).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(size_for(Some(&r(0, 0))).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(fits(8192, Some(&r(5000, 0))) && !fits(4096, Some(&r(5000, 0))));
    }

    #[test]
    fn pages() {
        let (p, next) = page((0..5).collect(), 2, "").unwrap();
        assert_eq!((p, next.as_str()), (vec![0, 1], "2"));
        let (p, next) = page((0..5).collect(), 2, "4").unwrap();
        assert_eq!((p, next.as_str()), (vec![4], ""));
        assert_eq!(page((0..5).collect::<Vec<_>>(), 0, "x").unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(page((0..5).collect::<Vec<_>>(), -1, "").unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_volume_whose_node_is_down_is_abnormal() {
        let mut v = pb::Volume { name: "v".into(), node: "node-3".into(), ..Default::default() };
        assert!(!condition(&v).abnormal);
        v.unavailable = true;
        let c = condition(&v);
        assert!(c.abnormal && c.message.contains("node-3"), "{c:?}");
    }
}
