//! One error type for the engine, carrying the operation and offset that failed.

use thinbd_protocol::DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{op} at offset {offset}: {source}")]
    Io { op: &'static str, offset: u64, source: std::io::Error },
    #[error("metadata: {0}")]
    Metadata(String),
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
        EngineError::Metadata(e.into().to_string())
    }
}

impl From<EngineError> for DeviceError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NoSpace => DeviceError::NoSpace,
            EngineError::Invalid(m) => DeviceError::Invalid(m),
            EngineError::ReadOnly(m) => DeviceError::NotPermitted(m),
            other => DeviceError::Io(other.to_string()),
        }
    }
}
