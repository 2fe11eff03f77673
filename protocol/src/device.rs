//! What the session driver needs from a block device. The server crate implements it for volumes;
//! tests implement it in memory.

use std::future::Future;

use bytes::Bytes;

use crate::consts;

/// One piece of a read: either bytes or a range known to read as zeros (a hole), so the session
/// can answer with `NBD_REPLY_TYPE_OFFSET_HOLE` without sending zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    Data(Bytes),
    Hole(u32),
}

impl ReadChunk {
    pub fn len(&self) -> u32 {
        match self {
            ReadChunk::Data(b) => b.len() as u32,
            ReadChunk::Hole(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An extent as reported by `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    /// `STATE_HOLE` and/or `STATE_ZERO`, or 0 for allocated data.
    pub flags: u32,
}

/// Errors a device reports; each maps to the errno the spec allows on the wire.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("no space left in the pool")]
    NoSpace,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not permitted: {0}")]
    NotPermitted(String),
    #[error("not supported")]
    NotSupported,
    #[error("server is shutting down")]
    Shutdown,
}

impl DeviceError {
    pub fn errno(&self) -> u32 {
        match self {
            DeviceError::Io(_) => consts::EIO,
            DeviceError::NoSpace => consts::ENOSPC,
            DeviceError::Invalid(_) => consts::EINVAL,
            DeviceError::NotPermitted(_) => consts::EPERM,
            DeviceError::NotSupported => consts::ENOTSUP,
            DeviceError::Shutdown => consts::ESHUTDOWN,
        }
    }
}

pub type DeviceResult<T> = Result<T, DeviceError>;

/// Capabilities the export advertises in its transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub size: u64,
    pub read_only: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_cache: bool,
    pub can_multi_conn: bool,
    /// Preferred I/O size (NBD_INFO_BLOCK_SIZE preferred).
    pub preferred_block: u32,
}

/// A block device served over NBD. Offsets and lengths are already checked against `info().size`
/// by the session driver before any method is called. Futures are `Send` because the session
/// runs requests concurrently on the tokio runtime.
pub trait BlockDevice: Send + Sync + 'static {
    fn info(&self) -> DeviceInfo;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = DeviceResult<Vec<ReadChunk>>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = DeviceResult<()>> + Send;
    /// Makes every write completed before it durable, on all connections (multi-conn).
    fn flush(&self) -> impl Future<Output = DeviceResult<()>> + Send;
    fn trim(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = DeviceResult<()>> + Send;
    /// `may_unmap` is false for NBD_CMD_FLAG_NO_HOLE; `fast_only` for NBD_CMD_FLAG_FAST_ZERO.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> impl Future<Output = DeviceResult<()>> + Send;
    /// `base:allocation` extents from `offset`, covering at most `len` bytes and at least one byte.
    fn block_status(&self, offset: u64, len: u32) -> impl Future<Output = DeviceResult<Vec<Extent>>> + Send;
    fn cache(&self, _offset: u64, _len: u32) -> impl Future<Output = DeviceResult<()>> + Send {
        async { Ok(()) }
    }
    /// Meta contexts besides `base:allocation` that match `query`: a full context name, or a
    /// namespace prefix ending in `:` (NBD_OPT_LIST_META_CONTEXT).
    fn meta_contexts(&self, _query: &str) -> Vec<String> {
        Vec::new()
    }
    /// Extents of one of [`BlockDevice::meta_contexts`], like [`BlockDevice::block_status`].
    fn context_status(
        &self,
        _context: &str,
        _offset: u64,
        _len: u32,
    ) -> impl Future<Output = DeviceResult<Vec<Extent>>> + Send {
        async { Err(DeviceError::NotSupported) }
    }
}
