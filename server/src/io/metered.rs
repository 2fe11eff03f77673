//! Request counts, errors, bytes and latency per volume, around the next layer of the stack.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::Bytes;
use thinbd_protocol::{Extent, ReadChunk};
use tracing::warn;

use super::VolumeIo;
use crate::error::EngineError;
use crate::metrics::{Op, VolumeMetrics};

pub struct Metered<V> {
    inner: V,
    metrics: Arc<VolumeMetrics>,
}

impl<V: VolumeIo> Metered<V> {
    pub fn new(inner: V, metrics: Arc<VolumeMetrics>) -> Self {
        Metered { inner, metrics }
    }

    pub fn inner(&self) -> &V {
        &self.inner
    }

    async fn measure<T>(&self, op: Op, f: impl Future<Output = Result<T, EngineError>>) -> Result<T, EngineError> {
        let started = Instant::now();
        let r = f.await;
        self.metrics.record(op, started, r.as_ref().err().map(EngineError::kind));
        if let Err(e) = &r
            && !e.is_no_space()
        {
            warn!(volume = %self.inner.name(), ?op, error = %e, "request failed");
        }
        r
    }
}

impl<V: VolumeIo> VolumeIo for Metered<V> {
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
        let r = self.measure(Op::Read, self.inner.read(offset, len)).await?;
        self.metrics.bytes_read.fetch_add(len as u64, Relaxed);
        Ok(r)
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let n = data.len() as u64;
        self.measure(Op::Write, self.inner.write(offset, data, fua)).await?;
        self.metrics.bytes_written.fetch_add(n, Relaxed);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        self.measure(Op::Trim, self.inner.trim(offset, len, fua)).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        self.measure(Op::WriteZeroes, self.inner.write_zeroes(offset, len, unmap, fua)).await
    }
    async fn flush(&self) -> Result<(), EngineError> {
        self.measure(Op::Flush, self.inner.flush()).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        self.measure(Op::BlockStatus, self.inner.block_status(offset, len)).await
    }
    fn earlier_snapshots(&self) -> Vec<String> {
        self.inner.earlier_snapshots()
    }
    async fn changed_since(&self, snapshot: &str, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        self.inner.changed_since(snapshot, offset, len).await
    }
}
