//! The I/O stack of a volume: what an NBD session calls for each request. One small trait,
//! [`VolumeIo`], is implemented by the volume itself ([`LocalVolume`]) and by wrappers that each
//! add one concern around the next layer down — [`Metered`] (metrics), [`Throttled`] (QoS) —
//! so a new concern (replication, fencing) is one more wrapper, not an edit of the write path.
//! The NBD edge (the `nbd` module) adapts the composed stack to the protocol's `BlockDevice`.

pub mod activity;
pub mod local;
pub mod metered;
pub mod remote;
pub mod replicas;
pub mod throttled;

use std::future::Future;

use bytes::Bytes;
use thinbd_protocol::{Extent, ReadChunk};

use crate::error::EngineError;
pub use activity::{Activity, ActivityRecord};
pub use local::LocalVolume;
pub use metered::Metered;
pub use remote::RemoteVolume;
pub use replicas::{InSyncSet, Linker, Member, Rebuild, Replicas, Shared, WriteOrder};
pub use throttled::Throttled;

/// Block I/O on one open volume or snapshot. Offsets and lengths are already checked against
/// [`VolumeIo::size`] by the caller.
pub trait VolumeIo: Send + Sync + 'static {
    /// `VOLUME` or `VOLUME@SNAPSHOT`, for logs and descriptions.
    fn name(&self) -> String;
    /// The current size (a volume may grow while open).
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Vec<ReadChunk>, EngineError>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// The range reads as zeros from now on and its whole clusters stop being mapped.
    fn trim(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// The range reads as zeros; `unmap` lets whole clusters stop being mapped (NBD's NO_HOLE
    /// clears it).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        unmap: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// Makes every completed write durable, on all connections.
    fn flush(&self) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// `base:allocation` extents from `offset`.
    fn block_status(&self, offset: u64, len: u32) -> impl Future<Output = Result<Vec<Extent>, EngineError>> + Send;
    /// Snapshots (by name) of the same volume that this export's data descends from: those
    /// [`VolumeIo::changed_since`] can compare with.
    fn earlier_snapshots(&self) -> Vec<String>;
    /// Extents from `offset` flagged 1 where clusters changed since `snapshot` (0 elsewhere).
    fn changed_since(
        &self,
        snapshot: &str,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, EngineError>> + Send;
}

impl VolumeIo for LocalVolume {
    fn name(&self) -> String {
        LocalVolume::name(self)
    }
    fn size(&self) -> u64 {
        LocalVolume::size(self)
    }
    fn read_only(&self) -> bool {
        LocalVolume::read_only(self)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, EngineError> {
        LocalVolume::read(self, offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        LocalVolume::write(self, offset, data, fua).await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        LocalVolume::zero(self, offset, len, true, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        LocalVolume::zero(self, offset, len, unmap, fua).await
    }
    async fn flush(&self) -> Result<(), EngineError> {
        LocalVolume::flush(self).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        LocalVolume::block_status(self, offset, len).await
    }
    fn earlier_snapshots(&self) -> Vec<String> {
        LocalVolume::earlier_snapshots(self)
    }
    async fn changed_since(&self, snapshot: &str, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        LocalVolume::changed_since(self, snapshot, offset, len)
    }
}

/// `len` bytes at `offset`, holes as zeros, in one buffer.
pub async fn read_all(v: &impl VolumeIo, offset: u64, len: u32) -> Result<Bytes, EngineError> {
    let mut out = bytes::BytesMut::with_capacity(len as usize);
    for chunk in v.read(offset, len).await? {
        match chunk {
            ReadChunk::Data(d) => out.extend_from_slice(&d),
            ReadChunk::Hole(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    Ok(out.freeze())
}

/// The bottom of an export's stack: the volume here, or on the node that holds it.
pub enum Backing {
    Local(LocalVolume),
    Remote(RemoteVolume),
}

impl VolumeIo for Backing {
    fn name(&self) -> String {
        match self {
            Backing::Local(v) => VolumeIo::name(v),
            Backing::Remote(v) => v.name(),
        }
    }
    fn size(&self) -> u64 {
        match self {
            Backing::Local(v) => VolumeIo::size(v),
            Backing::Remote(v) => v.size(),
        }
    }
    fn read_only(&self) -> bool {
        match self {
            Backing::Local(v) => VolumeIo::read_only(v),
            Backing::Remote(v) => v.read_only(),
        }
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, EngineError> {
        match self {
            Backing::Local(v) => VolumeIo::read(v, offset, len).await,
            Backing::Remote(v) => v.read(offset, len).await,
        }
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        match self {
            Backing::Local(v) => VolumeIo::write(v, offset, data, fua).await,
            Backing::Remote(v) => v.write(offset, data, fua).await,
        }
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        match self {
            Backing::Local(v) => VolumeIo::trim(v, offset, len, fua).await,
            Backing::Remote(v) => v.trim(offset, len, fua).await,
        }
    }
    async fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        match self {
            Backing::Local(v) => VolumeIo::write_zeroes(v, offset, len, unmap, fua).await,
            Backing::Remote(v) => v.write_zeroes(offset, len, unmap, fua).await,
        }
    }
    async fn flush(&self) -> Result<(), EngineError> {
        match self {
            Backing::Local(v) => VolumeIo::flush(v).await,
            Backing::Remote(v) => v.flush().await,
        }
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        match self {
            Backing::Local(v) => VolumeIo::block_status(v, offset, len).await,
            Backing::Remote(v) => v.block_status(offset, len).await,
        }
    }
    /// Changed-block tracking is answered where the layers are; not forwarded yet.
    fn earlier_snapshots(&self) -> Vec<String> {
        match self {
            Backing::Local(v) => VolumeIo::earlier_snapshots(v),
            Backing::Remote(_) => Vec::new(),
        }
    }
    async fn changed_since(&self, snapshot: &str, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        match self {
            Backing::Local(v) => VolumeIo::changed_since(v, snapshot, offset, len).await,
            Backing::Remote(v) => Err(EngineError::Invalid(format!(
                "changed blocks of {} are answered by the node holding it ({})",
                v.name(),
                v.holder()
            ))),
        }
    }
}
