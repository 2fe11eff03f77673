//! The QoS layer of the I/O stack: reads and writes wait for the volume's limits
//! ([`crate::qos::Qos`]) before going down; TRIM and WRITE_ZEROES count as write operations
//! without bytes; FLUSH and BLOCK_STATUS are not limited.

use bytes::Bytes;
use thinbd_protocol::{Extent, ReadChunk};

use super::VolumeIo;
use crate::error::EngineError;
use crate::qos::{Class, Qos};

pub struct Throttled<V> {
    inner: V,
    qos: std::sync::Arc<Qos>,
}

impl<V: VolumeIo> Throttled<V> {
    pub fn new(inner: V, qos: std::sync::Arc<Qos>) -> Self {
        Throttled { inner, qos }
    }

    pub fn inner(&self) -> &V {
        &self.inner
    }
}

impl<V: VolumeIo> VolumeIo for Throttled<V> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, EngineError> {
        self.qos.admit(Class::Read, len as u64).await;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        self.qos.admit(Class::Write, data.len() as u64).await;
        self.inner.write(offset, data, fua).await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        self.qos.admit(Class::Write, 0).await;
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        self.qos.admit(Class::Write, 0).await;
        self.inner.write_zeroes(offset, len, unmap, fua).await
    }
    async fn flush(&self) -> Result<(), EngineError> {
        self.inner.flush().await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        self.inner.block_status(offset, len).await
    }
    fn earlier_snapshots(&self) -> Vec<String> {
        self.inner.earlier_snapshots()
    }
    async fn changed_since(&self, snapshot: &str, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        self.inner.changed_since(snapshot, offset, len).await
    }
}
