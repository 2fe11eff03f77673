//! CSI Node service: attach through the kernel's NBD client at stage, format once (blkid says
//! the device is blank) and mount to the staging path; publish bind-mounts the staging mount
//! (filesystem) or the device node (raw block) onto the target.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thinbd_api::csi::node_server::Node;
use thinbd_api::csi::node_service_capability::rpc::Type as Rpc;
use thinbd_api::csi::*;
use tonic::{Request, Response, Status};

use crate::capability::{self, Usage};
use crate::ids::required;
use crate::mounts::{self, MountError};
use crate::{CTX_EXPORT, CTX_MKFS_OPTIONS, CTX_NBD, TOPOLOGY_KEY, attach};

pub struct NodeService {
    pub node_id: String,
    pub max_volumes: i64,
    state: std::sync::Arc<attach::StateDir>,
    /// The storage servers, for CSI inline ephemeral volumes (the node creates those itself).
    backends: std::sync::Arc<crate::backend::Backends>,
    /// Target paths each volume is published at (single-workload modes allow one).
    published: Mutex<HashMap<String, HashSet<PathBuf>>>,
    /// Attach through the local thinbd (the cluster's target) instead of the publish context's
    /// address.
    pub attach_via_local_target: bool,
}

impl NodeService {
    /// `state_dir` keeps reconnect information for attached volumes; a supervisor reconnects
    /// devices whose connections die.
    pub fn new(
        node_id: String,
        max_volumes: i64,
        state_dir: PathBuf,
        backends: std::sync::Arc<crate::backend::Backends>,
    ) -> NodeService {
        let state = std::sync::Arc::new(attach::StateDir(state_dir));
        attach::spawn_supervisor(state.clone());
        NodeService {
            node_id,
            max_volumes,
            state,
            backends,
            published: Mutex::default(),
            attach_via_local_target: false,
        }
    }

    /// The storage server inline ephemeral volumes go to: this node's own (template API) or
    /// the single one.
    async fn local_api(&self) -> Result<(String, crate::backend::Api), Status> {
        let node = if self.backends.is_template() { self.node_id.clone() } else { self.backends.single_node().await? };
        let api = self.backends.api(&node).await?;
        Ok((node, api))
    }

    /// NodePublishVolume of a CSI inline ephemeral volume: create it on the local storage
    /// server, grant this node, attach, format and mount it on the target. Idempotent.
    async fn publish_ephemeral(&self, r: &NodePublishVolumeRequest, usage: &Usage) -> Result<(), Status> {
        use thinbd_api::pb;
        let target = PathBuf::from(&r.target_path);
        if mounts::mounted_at(&target).is_some() {
            return Ok(());
        }
        let size = match r.volume_context.get("size") {
            Some(q) => parse_quantity(q).ok_or_else(|| invalid(format!("size {q:?} is not a quantity like 1Gi")))?,
            None => crate::controller::DEFAULT_SIZE,
        };
        let (storage_node, mut api) = self.local_api().await?;
        let name = crate::ids::server_name(&format!("eph-{}", r.volume_id));
        let volume = match api.get_volume(pb::GetVolumeRequest { name: name.clone() }).await {
            Ok(v) => v.into_inner(),
            Err(_) => {
                let labels = HashMap::from([("csi.ephemeral".to_string(), r.volume_id.clone())]);
                api.create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    size_bytes: size,
                    labels,
                    ..Default::default()
                })
                .await
                .map_err(crate::backend::unavailable)?
                .into_inner()
            }
        };
        let grant = api
            .publish_volume(pb::PublishVolumeRequest {
                volume: name.clone(),
                node: self.node_id.clone(),
                read_only: false,
                single_writer: true,
                ..Default::default()
            })
            .await
            .map_err(crate::backend::unavailable)?
            .into_inner();
        let addr =
            api.get_pool(pb::GetPoolRequest {}).await.map_err(crate::backend::unavailable)?.into_inner().nbd_address;
        let volume_id = crate::ids::VolumeId::of(self.backends.route(&storage_node), &name, &volume.uuid);
        self.state.save(&volume_id, &addr, &grant.export_name).map_err(|e| Status::internal(e.to_string()))?;
        self.state.mark_ephemeral(&target, &volume_id).map_err(|e| Status::internal(e.to_string()))?;
        let index = attach::attach(&volume_id, &addr, &grant.export_name)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let dev = attach::device_path(index);
        let fs = usage.fs_type.clone().unwrap_or_else(|| capability::DEFAULT_FS.to_string());
        let flags = usage.mount_flags.clone();
        blocking(move || {
            std::fs::create_dir_all(&target)?;
            if mounts::signature(&dev)?.is_none() {
                mounts::mkfs(&dev, &fs, None)?;
            }
            mounts::mount_fs(&dev, &target, &fs, &flags, false)
        })
        .await?;
        tracing::info!(volume = %volume_id, target = %r.target_path, "inline ephemeral volume published");
        Ok(())
    }

    /// What the storage side says of the volume, when that is abnormal: its storage node down,
    /// the volume gone, or no thinbd to ask.
    async fn storage_condition(&self, volume_id: &str) -> Option<VolumeCondition> {
        let abnormal = |message: String| Some(VolumeCondition { abnormal: true, message });
        let id = crate::ids::VolumeId::parse(volume_id)?;
        let asked = async {
            let (_, mut api) = self.backends.locate(id.node.as_deref()).await?;
            api.get_volume(thinbd_api::pb::GetVolumeRequest { name: id.volume.clone() }).await
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), asked).await {
            Ok(Ok(v)) if v.get_ref().unavailable => Some(crate::controller::condition(v.get_ref())),
            Ok(Ok(_)) => None,
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => abnormal(format!("volume {volume_id} does not exist")),
            Ok(Err(s)) => abnormal(format!("cannot ask the storage side about the volume: {}", s.message())),
            Err(_) => abnormal("the storage side did not answer about the volume within 5 s".into()),
        }
    }

    /// NodeUnpublishVolume of an inline ephemeral volume (after its unmount): detach it and
    /// delete it from the server.
    async fn remove_ephemeral(&self, target: &Path) -> Result<(), Status> {
        use thinbd_api::pb;
        let Some(volume_id) = self.state.ephemeral(target) else { return Ok(()) };
        if let Some(index) = attach::find(&volume_id) {
            attach::detach(index).await.map_err(|e| Status::internal(e.to_string()))?;
        }
        if let Some(id) = crate::ids::VolumeId::parse(&volume_id) {
            let (_, mut api) = self.backends.locate(id.node.as_deref()).await?;
            api.unpublish_volume(pb::UnpublishVolumeRequest {
                volume: id.volume.clone(),
                node: self.node_id.clone(),
                here: false,
            })
            .await
            .map_err(crate::backend::unavailable)?;
            match api.delete_volume(pb::DeleteVolumeRequest { name: id.volume.clone(), here: false }).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(crate::backend::unavailable(s)),
            }
        }
        self.state.remove(&volume_id);
        self.state.unmark_ephemeral(target);
        tracing::info!(volume = %volume_id, "inline ephemeral volume deleted");
        Ok(())
    }
}

/// A Kubernetes quantity of bytes: `1Gi`, `512Mi`, `10G`, `4096`.
fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    let bytes = n.checked_mul(mult)?;
    Some(bytes.div_ceil(crate::controller::SIZE_ALIGN) * crate::controller::SIZE_ALIGN).filter(|b| *b > 0)
}

fn invalid(m: impl Into<String>) -> Status {
    Status::invalid_argument(m.into())
}

fn mount_status(e: MountError) -> Status {
    match &e {
        MountError::Sys { source: nix::Error::EBUSY, .. } => {
            Status::unavailable(format!("{e}; the volume is in use, try again when it is not"))
        }
        _ => Status::internal(e.to_string()),
    }
}

fn usage_of(cap: Option<&VolumeCapability>) -> Result<Usage, Status> {
    capability::check(cap.ok_or_else(|| invalid("volume_capability is required"))?).map_err(invalid)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, MountError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))?.map_err(mount_status)
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let usage = usage_of(r.volume_capability.as_ref())?;
        let (Some(export), Some(addr)) = (r.publish_context.get(CTX_EXPORT), r.publish_context.get(CTX_NBD)) else {
            return Err(Status::failed_precondition(
                "publish_context has no thinbd export: was ControllerPublishVolume called?",
            ));
        };
        let addr = match self.attach_via_local_target {
            true => {
                let (_, mut api) = self.local_api().await?;
                let pool =
                    api.get_pool(thinbd_api::pb::GetPoolRequest {}).await.map_err(crate::backend::unavailable)?;
                pool.into_inner().nbd_address
            }
            false => addr.clone(),
        };
        let addr = &addr;
        self.state.save(&volume_id, addr, export).map_err(|e| Status::internal(format!("saving attach state: {e}")))?;
        let index = attach::attach(&volume_id, addr, export).await.map_err(|e| match e {
            attach::AttachError::Handshake { .. } => Status::unavailable(e.to_string()),
            _ => Status::internal(e.to_string()),
        })?;
        let dev = attach::device_path(index);
        let Some(fs) = usage.fs_type.clone() else {
            // Raw block: the device is the staged volume.
            return Ok(Response::new(NodeStageVolumeResponse {}));
        };
        let mkfs_opts = r.volume_context.get(CTX_MKFS_OPTIONS).cloned();
        let flags = usage.mount_flags.clone();
        let read_only = usage.read_only();
        blocking(move || {
            std::fs::create_dir_all(&staging)?;
            match mounts::mounted_at(&staging) {
                Some(src) if Path::new(&src) == dev => return Ok(()),
                Some(src) => {
                    return Err(MountError::Tool {
                        program: "stage".into(),
                        message: format!("{} already has {src} mounted", staging.display()),
                    });
                }
                None => {}
            }
            match mounts::signature(&dev)? {
                None if read_only => {
                    return Err(MountError::Tool {
                        program: "stage".into(),
                        message: "a read-only volume without a filesystem cannot be mounted".into(),
                    });
                }
                None => mounts::mkfs(&dev, &fs, mkfs_opts.as_deref())?,
                Some(t) if t == fs => {}
                Some(t) => {
                    return Err(MountError::Tool {
                        program: "stage".into(),
                        message: format!("the volume holds {t}, not {fs}; it is not reformatted"),
                    });
                }
            }
            mounts::mount_fs(&dev, &staging, &fs, &flags, read_only)
        })
        .await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        blocking(move || mounts::unmount(&staging)).await?;
        if let Some(index) = attach::find(&volume_id) {
            attach::detach(index).await.map_err(|e| Status::internal(e.to_string()))?;
            tracing::info!(volume = %volume_id, device = index, "detached");
        }
        self.state.remove(&volume_id);
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?.to_string();
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let staging = PathBuf::from(&r.staging_target_path);
        let usage = usage_of(r.volume_capability.as_ref())?;
        if r.volume_context.get("csi.storage.k8s.io/ephemeral").is_some_and(|v| v == "true") {
            self.publish_ephemeral(&r, &usage).await?;
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        required(&r.staging_target_path, "staging_target_path")?;
        let read_only = r.readonly || usage.read_only();
        let index = attach::find(&volume_id)
            .ok_or_else(|| Status::failed_precondition(format!("volume {volume_id} is not staged on this node")))?;
        let dev = attach::device_path(index);
        if usage.single_workload() {
            // Publishes this process made, and mounts of the device found on the system (they
            // survive a plugin restart): any other than the staging path and this target.
            let known: Vec<PathBuf> = self
                .published
                .lock()
                .map_err(|_| Status::internal("lock"))?
                .get(&volume_id)
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default();
            let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            let (t, st) = (canon(&target), canon(&staging));
            if let Some(other) =
                known.into_iter().chain(mounts::mountpoints_of(&dev)).find(|p| canon(p) != t && canon(p) != st)
            {
                return Err(Status::failed_precondition(format!(
                    "volume is single-writer and already published at {}",
                    other.display()
                )));
            }
        }
        let block = usage.fs_type.is_none();
        let t = target.clone();
        blocking(move || {
            if mounts::mounted_at(&t).is_some() {
                return Ok(());
            }
            if block {
                if let Some(parent) = t.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if !t.exists() {
                    std::fs::File::create(&t)?;
                }
                mounts::bind(&dev, &t, read_only)
            } else {
                if mounts::mounted_at(&staging).is_none() {
                    return Err(MountError::Tool {
                        program: "publish".into(),
                        message: format!("{} is not mounted", staging.display()),
                    });
                }
                std::fs::create_dir_all(&t)?;
                mounts::bind(&staging, &t, read_only)
            }
        })
        .await?;
        self.published.lock().map_err(|_| Status::internal("lock"))?.entry(volume_id).or_default().insert(target);
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?.to_string();
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let t = target.clone();
        blocking(move || {
            mounts::unmount(&t)?;
            match std::fs::metadata(&t) {
                Ok(m) if m.is_dir() => std::fs::remove_dir(&t)?,
                Ok(_) => std::fs::remove_file(&t)?,
                Err(_) => {}
            }
            Ok(())
        })
        .await?;
        if let Ok(mut p) = self.published.lock()
            && let Some(set) = p.get_mut(&volume_id)
        {
            set.remove(&target);
        }
        self.remove_ephemeral(&target).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?.to_string();
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let meta =
            std::fs::metadata(&path).map_err(|_| Status::not_found(format!("{} does not exist", path.display())))?;
        let index = attach::find(&volume_id);
        // A down storage node is the cause to name first: the device may still look connected
        // (to this node's target) while nothing behind it answers.
        let condition = Some(match (self.storage_condition(&volume_id).await, index) {
            (Some(abnormal), _) => abnormal,
            (None, Some(i)) => VolumeCondition { abnormal: false, message: format!("attached as /dev/nbd{i}") },
            (None, None) => {
                VolumeCondition { abnormal: true, message: "no connected NBD device for this volume".into() }
            }
        });
        let usage = if meta.is_dir() {
            let st = nix::sys::statvfs::statvfs(&path).map_err(|e| Status::internal(format!("statvfs: {e}")))?;
            let f = st.fragment_size() as i64;
            vec![
                VolumeUsage {
                    available: st.blocks_available() as i64 * f,
                    total: st.blocks() as i64 * f,
                    used: (st.blocks() - st.blocks_free()) as i64 * f,
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: st.files_available() as i64,
                    total: st.files() as i64,
                    used: (st.files() - st.files_free()) as i64,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            let total = index.and_then(attach::size).unwrap_or(0) as i64;
            vec![VolumeUsage { available: 0, total, used: 0, unit: volume_usage::Unit::Bytes as i32 }]
        };
        Ok(Response::new(NodeGetVolumeStatsResponse { usage, volume_condition: condition }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required(&r.volume_id, "volume_id")?.to_string();
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let index = attach::find(&volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {volume_id} is not attached on this node")))?;
        let current = attach::size(index).unwrap_or(0);
        // The controller grew the volume to exactly this size (or kept a larger one).
        let want = crate::controller::size_for(r.capacity_range.as_ref())?;
        if want > current {
            attach::resize(index, &volume_id, want).await.map_err(|e| Status::internal(e.to_string()))?;
        }
        let dev = attach::device_path(index);
        let meta =
            std::fs::metadata(&path).map_err(|_| Status::not_found(format!("{} does not exist", path.display())))?;
        if meta.is_dir() {
            blocking(move || {
                let fs = mounts::fstype_at(&path).unwrap_or_default();
                mounts::grow(&dev, &path, &fs)
            })
            .await?;
        }
        let size = attach::size(index).unwrap_or(want) as i64;
        tracing::info!(volume = %volume_id, size, "expanded on the node");
        Ok(Response::new(NodeExpandVolumeResponse { capacity_bytes: size }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Rpc::StageUnstageVolume,
            Rpc::GetVolumeStats,
            Rpc::ExpandVolume,
            Rpc::VolumeCondition,
            Rpc::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    /// Kubelet asks when it registers the plugin: the node registers itself with its storage
    /// server here, so volumes can be published to it (until then kubelet retries).
    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        let (_, mut api) = self.local_api().await?;
        let me = api
            .register_node(thinbd_api::pb::RegisterNodeRequest { name: self.node_id.clone() })
            .await
            .map_err(crate::backend::unavailable)?
            .into_inner();
        let mut segments = HashMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())]);
        // A cluster node's zone (serve --zone) is the topology volumes are placed by.
        if !me.zone.is_empty() {
            segments.insert(crate::ZONE_KEY.to_string(), me.zone);
        }
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(Topology { segments }),
        }))
    }
}
