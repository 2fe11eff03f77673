//! CSI Identity: who we are, what we offer, and whether we are ready.

use std::sync::Arc;

use thinbd_api::csi::identity_server::Identity;
use thinbd_api::csi::plugin_capability::{Service, VolumeExpansion, service, volume_expansion};
use thinbd_api::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    PluginCapability, ProbeRequest, ProbeResponse, plugin_capability,
};
use tonic::{Request, Response, Status};

use crate::backend::Backends;

pub struct IdentityService {
    /// Set when this process runs the controller: readiness then means the API answers.
    pub backends: Option<Arc<Backends>>,
    /// Set when this process runs the node service: readiness then also means the kernel can
    /// attach NBD devices.
    pub node: bool,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: crate::DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let service = |t: service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(Service { r#type: t as i32 })),
        };
        let capabilities = vec![
            service(service::Type::ControllerService),
            service(service::Type::VolumeAccessibilityConstraints),
            service(service::Type::SnapshotMetadataService),
            service(service::Type::GroupControllerService),
            PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ];
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        if self.node {
            tokio::task::spawn_blocking(crate::kernel_modules::nbd_ready)
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(Status::failed_precondition)?;
        }
        if let Some(b) = &self.backends
            && !b.is_template()
        {
            let node = b.single_node().await?;
            let mut api = b.api(&node).await?;
            api.get_pool(thinbd_api::pb::GetPoolRequest {}).await.map_err(crate::backend::unavailable)?;
        }
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
