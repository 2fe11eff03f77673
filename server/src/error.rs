//! One error type for the engine, carrying the operation and offset that failed.

use thinbd_protocol::DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{op} at offset {offset}: {source}")]
    Io { op: &'static str, offset: u64, source: std::io::Error },
    #[error("metadata: {0}")]
    Metadata(String),
    /// The metadata store's file could not be written (ENOSPC, EIO…).
    #[error("metadata store I/O: {0}")]
    MetadataIo(std::io::Error),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} is read-only")]
    ReadOnly(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    /// Try again later (a fence still waiting for requests to finish).
    #[error("{0}")]
    Unavailable(String),
    #[error("pool is full")]
    NoSpace,
    #[error("internal: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn io(op: &'static str, offset: u64, source: std::io::Error) -> Self {
        EngineError::Io { op, offset, source }
    }
}

impl<E: Into<redb::Error>> From<E> for EngineError {
    fn from(e: E) -> Self {
        match e.into() {
            redb::Error::Io(io) => EngineError::MetadataIo(io),
            redb::Error::PreviousIo => EngineError::MetadataIo(std::io::Error::other("a previous I/O error")),
            e => EngineError::Metadata(e.to_string()),
        }
    }
}

/// Out of space on the device under the pool or the metadata (the kernel's ENOSPC or EDQUOT).
fn no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(nix::libc::ENOSPC | nix::libc::EDQUOT))
}

impl EngineError {
    /// Whether the cause is a full disk, which clients must hear as ENOSPC.
    pub fn is_no_space(&self) -> bool {
        match self {
            EngineError::NoSpace => true,
            EngineError::Io { source, .. } | EngineError::MetadataIo(source) => no_space(source),
            _ => false,
        }
    }
}

impl From<EngineError> for DeviceError {
    fn from(e: EngineError) -> Self {
        if e.is_no_space() {
            return DeviceError::NoSpace;
        }
        match e {
            EngineError::Invalid(m) => DeviceError::Invalid(m),
            EngineError::ReadOnly(m) => DeviceError::NotPermitted(m),
            other => DeviceError::Io(other.to_string()),
        }
    }
}
