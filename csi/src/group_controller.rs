//! The CSI GroupController: group snapshots, a point-in-time cut across several volumes of one
//! storage node (thinbd drains every member's writes and commits all snapshot layers in one
//! transaction). A group snapshot's id is `GROUP` (`NODE/GROUP` when nodes are reached through an address
//! template); its members are the snapshots
//! `VOLUME@GROUP`, which the server marks as the group's.

use std::collections::BTreeSet;
use std::sync::Arc;

use thinbd_api::csi::group_controller_server::GroupController;
use thinbd_api::csi::group_controller_service_capability::rpc::Type as GroupRpc;
use thinbd_api::csi::*;
use thinbd_api::pb;
use tonic::{Request, Response, Status};

use crate::backend::{Api, Backends, unavailable};
use crate::controller::ControllerService;
use crate::ids::{VolumeId, required, server_name};

pub struct GroupControllerService {
    pub backends: Arc<Backends>,
}

/// `GROUP` or `NODE/GROUP` into the node it names (if any) and the group.
fn group_id(id: &str) -> Result<(Option<String>, String), Status> {
    let id = required(id, "group_snapshot_id")?;
    Ok(match id.rsplit_once('/') {
        Some((node, group)) => (Some(node.to_string()), group.to_string()),
        None => (None, id.to_string()),
    })
}

async fn members(api: &mut Api, group: &str) -> Result<Vec<pb::Snapshot>, Status> {
    Ok(api
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .map_err(unavailable)?
        .into_inner()
        .snapshots
        .into_iter()
        .filter(|s| s.group == group)
        .collect())
}

/// The group as CSI sees it; `route` as in `Backends::route` (ids name the node or not).
fn group_snapshot(route: Option<&str>, group: &str, snaps: &[pb::Snapshot]) -> VolumeGroupSnapshot {
    let id = match route {
        Some(node) => format!("{node}/{group}"),
        None => group.to_string(),
    };
    let snapshots: Vec<Snapshot> = snaps
        .iter()
        .map(|s| Snapshot { group_snapshot_id: id.clone(), ..ControllerService::csi_snapshot(route, s) })
        .collect();
    let created = snaps.iter().map(|s| s.created_unix_seconds).min().unwrap_or(0);
    VolumeGroupSnapshot {
        group_snapshot_id: id,
        snapshots,
        creation_time: Some(prost_types::Timestamp { seconds: created as i64, nanos: 0 }),
        ready_to_use: true,
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        let cap = GroupControllerServiceCapability {
            r#type: Some(group_controller_service_capability::Type::Rpc(group_controller_service_capability::Rpc {
                r#type: GroupRpc::CreateDeleteGetVolumeGroupSnapshot as i32,
            })),
        };
        Ok(Response::new(GroupControllerGetCapabilitiesResponse { capabilities: vec![cap] }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        let csi_name = required(&r.name, "name")?;
        if r.source_volume_ids.is_empty() {
            return Err(Status::invalid_argument("source_volume_ids is required"));
        }
        let mut on: Option<(String, Api)> = None;
        let mut ids = Vec::new();
        for id in &r.source_volume_ids {
            let v = VolumeId::parse(id).ok_or_else(|| Status::not_found(format!("volume {id:?} does not exist")))?;
            let (node, api) = self.backends.locate(v.node.as_deref()).await?;
            if on.get_or_insert((node.clone(), api)).0 != node {
                return Err(Status::invalid_argument("the volumes of a group snapshot must share a storage node"));
            }
            ids.push(v.volume);
        }
        let (node, mut api) = on.ok_or_else(|| Status::invalid_argument("source_volume_ids is required"))?;
        let route = self.backends.route(&node);
        // By name, whether the ids hold names or UUIDs.
        let mut volumes = BTreeSet::new();
        for id in ids {
            let v = api
                .get_volume(pb::GetVolumeRequest { name: id.clone() })
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::NotFound => Status::not_found(format!("volume {id:?} does not exist")),
                    _ => unavailable(s),
                })?
                .into_inner();
            volumes.insert(v.name);
        }
        let group = server_name(csi_name);
        let existing = members(&mut api, &group).await?;
        if !existing.is_empty() {
            let have: BTreeSet<String> = existing.iter().map(|s| s.volume.clone()).collect();
            if have != volumes {
                return Err(Status::already_exists(format!("group snapshot {csi_name:?} exists with other volumes")));
            }
            return Ok(Response::new(CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(group_snapshot(route, &group, &existing)),
            }));
        }
        let made = api
            .create_snapshot_group(pb::CreateSnapshotGroupRequest {
                name: group.clone(),
                volumes: volumes.into_iter().collect(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound | tonic::Code::AlreadyExists | tonic::Code::InvalidArgument => s,
                _ => unavailable(s),
            })?
            .into_inner();
        tracing::info!(name = csi_name, members = made.snapshots.len(), "group snapshot created");
        Ok(Response::new(CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_snapshot(route, &group, &made.snapshots)),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let (node, group) = group_id(&req.into_inner().group_snapshot_id)?;
        let (_, mut api) = self.backends.locate(node.as_deref()).await?;
        for s in members(&mut api, &group).await? {
            let key = format!("{}@{}", s.volume, s.name);
            match api.delete_snapshot(pb::DeleteSnapshotRequest { key, here: false }).await {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(Response::new(DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let id = req.into_inner().group_snapshot_id;
        let (node, group) = group_id(&id)?;
        let (node, mut api) = self.backends.locate(node.as_deref()).await?;
        let snaps = members(&mut api, &group).await?;
        if snaps.is_empty() {
            return Err(Status::not_found(format!("group snapshot {id:?} does not exist")));
        }
        Ok(Response::new(GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_snapshot(self.backends.route(&node), &group, &snaps)),
        }))
    }
}
