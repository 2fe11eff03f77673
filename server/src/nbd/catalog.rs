//! Volumes as NBD exports: the catalog that turns an export name into a volume's I/O stack,
//! and the adapter from that stack to the protocol's `BlockDevice`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use thinbd_protocol::{
    BlockDevice, DeviceError, DeviceInfo, DeviceResult, Export, ExportCatalog, ExportListing, Extent, OpenError,
    ReadChunk,
};
use tracing::debug;

use super::export_name::ExportName;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::io::{Backing, LocalVolume, Metered, RemoteVolume, Throttled, VolumeIo};

/// The I/O stack every export gets: metrics around QoS around the volume (here, or on the node
/// holding it).
pub type VolumeStack = Metered<Throttled<Backing>>;

/// Composes the stack over an opened volume.
pub fn stack(local: LocalVolume) -> VolumeStack {
    let (qos, metrics) = (local.qos(), local.metrics());
    Metered::new(Throttled::new(Backing::Local(local), qos), metrics)
}

/// The stack of a volume served for the node holding it: that node applies the volume's QoS.
pub fn remote_stack(remote: RemoteVolume) -> VolumeStack {
    let unlimited = std::sync::Arc::new(crate::qos::Qos::new(Default::default()));
    Metered::new(Throttled::new(Backing::Remote(remote), unlimited), Default::default())
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

/// Runs `f` to completion on this worker: the catalog answers synchronously, and opening may
/// ask etcd, the node holding the volume, or wait for an older target's sessions.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(f))
}

impl Catalog {
    fn trusted(&self, peer: Option<SocketAddr>) -> bool {
        !self.require_grants && peer.is_some_and(|p| p.ip().is_loopback())
    }

    /// A grant's export name for a volume another node holds: the grant is checked against
    /// its record in etcd; a single writer's makes this node the volume's target (a new epoch,
    /// sent on the link so the holder fences older targets), and requests are forwarded to the
    /// holder, which checks the grant itself too.
    fn open_remote(&self, name: &str, volume: &str, token: &str) -> Result<Export<NbdVolume<VolumeStack>>, OpenError> {
        let Some(cluster) = self.cluster.clone() else { return Err(OpenError::Unknown) };
        let platform = |e: &dyn std::fmt::Display| OpenError::Platform(e.to_string());
        let (remote, holder, epoch) = block_on(async {
            let spec = cluster.volume_spec(volume).await.map_err(|e| platform(&e))?.ok_or(OpenError::Unknown)?;
            if spec.node == cluster.node {
                return Err(OpenError::Unknown);
            }
            let grant = cluster.grant_by_token(&spec.uuid, token).await.map_err(|e| platform(&e))?;
            let grant = grant.ok_or(OpenError::Unknown)?;
            let holder = cluster
                .directory
                .get(&spec.node)
                .filter(|n| n.up)
                .ok_or_else(|| platform(&format!("node {} holding {volume} is down", spec.node)))?;
            let (link, epoch) = if grant.single_writer && !grant.read_only {
                let epoch = cluster.take_target(&spec.uuid).await.map_err(|e| platform(&e))?;
                (super::export_name::with_epoch(name, epoch), Some(epoch))
            } else {
                (name.to_string(), None)
            };
            let address = &holder.record.nbd_address;
            let tls = cluster.peer_tls.as_ref().map(|t| t.nbd_for(address)).transpose().map_err(|e| platform(&e))?;
            let remote = RemoteVolume::open(address, &link, volume, tls).await.map_err(|e| platform(&e))?;
            Ok((remote, spec.node, epoch))
        })?;
        tracing::info!(volume, holder, epoch, "target: serving a volume held by another node");
        let description = format!("thinbd volume {volume} (data on {holder})");
        // A lost link ends the client's session, so that it reconnects (and relinks).
        let fences = vec![remote.lost()];
        Ok(Export { name: name.to_string(), description, device: Arc::new(NbdVolume(remote_stack(remote))), fences })
    }

    /// A session through a grant of a volume held here. The one writer of a single-writer
    /// volume is fenced by target epochs: the epoch its target sent, or, in a cluster, the one
    /// this node takes when the consumer is attached here. Read-only and multi-writer
    /// attachments are fenced by their grants alone.
    fn open_granted(
        &self,
        name: &str,
        grant: Arc<crate::grants::Grant>,
        link_epoch: Option<u64>,
        peer: Option<SocketAddr>,
    ) -> Result<Export<NbdVolume<VolumeStack>>, OpenError> {
        let r = &grant.record;
        let epoch = match (link_epoch, r.single_writer && !r.read_only, &self.cluster) {
            (_, false, _) | (None, true, None) => None,
            (Some(e), true, _) => Some(e),
            (None, true, Some(cluster)) => {
                let uuid = self.engine.volume(&r.volume).map_err(engine_err)?.uuid.clone();
                Some(block_on(cluster.take_target(&uuid)).map_err(|e| OpenError::Platform(e.to_string()))?)
            }
        };
        let at_epoch = match epoch {
            Some(e) => Some(block_on(self.engine.enter_epoch(&r.volume, e)).map_err(engine_err)?),
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
        Ok(Export { name: name.to_string(), description, device: Arc::new(NbdVolume(stack(h))), fences })
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

    fn open(&self, name: &str, peer: Option<SocketAddr>) -> Result<Export<Self::Device>, OpenError> {
        let parsed = ExportName::parse(name).ok_or(OpenError::Unknown)?;
        if let ExportName::Grant { volume, token, epoch } = &parsed {
            return match self.engine.grant_for(volume, token) {
                Some(grant) => self.open_granted(name, grant, *epoch, peer),
                // A target's link is never forwarded further.
                None if epoch.is_some() => Err(OpenError::Unknown),
                None => self.open_remote(name, volume, token),
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
