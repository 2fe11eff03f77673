//! Volumes as NBD exports: the `BlockDevice` impl (with metrics), the export catalog and the
//! TCP listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thinbd_protocol::{
    BlockDevice, DeviceError, DeviceInfo, DeviceResult, Export, ExportCatalog, ExportListing, Extent, OpenError,
    ReadChunk, ServerConfig, SessionLimits,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::engine::{Engine, VolumeHandle};
use crate::error::EngineError;
use crate::metrics::Op;

async fn measured<T>(h: &VolumeHandle, op: Op, f: impl Future<Output = Result<T, EngineError>>) -> DeviceResult<T> {
    let started = Instant::now();
    let r = f.await;
    h.metrics().record(op, started, r.is_ok());
    r.map_err(|e| {
        if !matches!(e, EngineError::NoSpace) {
            warn!(volume = %h.name(), ?op, error = %e, "request failed");
        }
        DeviceError::from(e)
    })
}

impl BlockDevice for VolumeHandle {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size(),
            read_only: self.read_only(),
            can_trim: true,
            can_zero: true,
            can_cache: true,
            can_multi_conn: true,
            preferred_block: 4096,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Vec<ReadChunk>> {
        measured(self, Op::Read, VolumeHandle::read(self, offset, len)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        measured(self, Op::Write, VolumeHandle::write(self, offset, data, fua)).await
    }

    async fn flush(&self) -> DeviceResult<()> {
        measured(self, Op::Flush, VolumeHandle::flush(self)).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        measured(self, Op::Trim, self.zero(offset, len, true, fua)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_unmap: bool, fast: bool, fua: bool) -> DeviceResult<()> {
        if fast && !may_unmap {
            // Zeroing without unmapping means writing zeros: not fast.
            return Err(DeviceError::NotSupported);
        }
        measured(self, Op::WriteZeroes, self.zero(offset, len, may_unmap, fua)).await
    }

    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        measured(self, Op::BlockStatus, VolumeHandle::block_status(self, offset, len)).await
    }
}

/// The engine's volumes as exports. Loopback clients may open volumes by name unless grants are
/// required; everyone else needs a grant's export name (`VOLUME#TOKEN`).
pub struct Catalog {
    pub engine: Arc<Engine>,
    pub require_grants: bool,
}

impl Catalog {
    fn trusted(&self, peer: Option<SocketAddr>) -> bool {
        !self.require_grants && peer.is_some_and(|p| p.ip().is_loopback())
    }
}

fn describe(h: &VolumeHandle, name: &str) -> String {
    if h.read_only() { format!("thinbd {name} (read-only)") } else { format!("thinbd volume {name}") }
}

impl ExportCatalog for Catalog {
    type Device = VolumeHandle;

    fn open(&self, name: &str, peer: Option<SocketAddr>) -> Result<Export<VolumeHandle>, OpenError> {
        let engine_err = |e: EngineError| match e {
            EngineError::NotFound(_) => OpenError::Unknown,
            e => OpenError::Platform(e.to_string()),
        };
        if name.contains('#') {
            let grant = self.engine.grant_for_export(name).ok_or(OpenError::Unknown)?;
            let r = &grant.record;
            let mut h = self.engine.open_export(&r.volume).map_err(engine_err)?;
            if r.read_only {
                h = h.into_read_only();
            }
            debug!(volume = %r.volume, node = %r.node, ?peer, read_only = r.read_only, "export opened through grant");
            let description = describe(&h, &r.volume);
            return Ok(Export {
                name: name.to_string(),
                description,
                device: Arc::new(h),
                revoked: Some(grant.revoked.clone()),
            });
        }
        if !self.trusted(peer) {
            return Err(OpenError::Policy("this server requires an attachment grant's export name".into()));
        }
        let h = self.engine.open_export(name).map_err(engine_err)?;
        Ok(Export { name: name.to_string(), description: describe(&h, name), device: Arc::new(h), revoked: None })
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

/// Accepts NBD connections until `shutdown`, then waits for sessions to finish their requests.
pub async fn serve_nbd(
    listener: TcpListener,
    catalog: Arc<Catalog>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut sessions = JoinSet::new();
    let limits = SessionLimits { max_payload: config.max_payload, ..SessionLimits::default() };
    let config = Arc::new(config);
    loop {
        while sessions.try_join_next().is_some() {}
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let catalog = catalog.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        sessions.spawn(async move {
            // A client that never finishes the handshake must not hold a slot forever.
            let neg = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(60), thinbd_protocol::negotiate(Box::new(sock), &*catalog, &config, Some(peer))) => r,
                _ = shutdown.cancelled() => return,
            };
            match neg {
                Ok(Ok(Some(neg))) => {
                    let export = neg.export.name.clone();
                    info!(%peer, export, tls = neg.tls, structured = neg.structured, "NBD session started");
                    // A revoked grant ends the session like a shutdown does.
                    let stop = shutdown.child_token();
                    if let Some(revoked) = neg.export.revoked.clone() {
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = revoked.cancelled() => stop.cancel(),
                                _ = stop.cancelled() => {}
                            }
                        });
                    }
                    let ended = stop.clone().drop_guard();
                    let r = thinbd_protocol::serve(neg, limits, stop).await;
                    drop(ended);
                    match r {
                        Ok(()) => info!(%peer, export, "NBD session ended"),
                        Err(e) => info!(%peer, export, error = %e, "NBD session closed"),
                    }
                }
                Ok(Ok(None)) => debug!(%peer, "client ended the handshake"),
                Ok(Err(e)) => debug!(%peer, error = %e, "handshake failed"),
                Err(_) => debug!(%peer, "handshake timed out"),
            }
        });
    }
    while sessions.join_next().await.is_some() {}
    Ok(())
}
