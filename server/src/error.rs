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
    /// Refused while NBD sessions have it open (`what`: `volume "v"`, `snapshot "v@s"`).
    #[error("{what} has {sessions} open NBD session(s); disconnect them first")]
    InUse { what: String, sessions: u32 },
    /// Refused while nodes hold attachment grants on it.
    #[error("volume {volume:?} is published to {}; unpublish it first", nodes.join(", "))]
    Published { volume: String, nodes: Vec<String> },
    /// A single-writer attachment elsewhere keeps other writers out.
    #[error("volume {volume:?} is already published read-write to node {node:?} for a single writer")]
    SingleWriter { volume: String, node: String },
    /// A target whose epoch is older than one this node promised: a newer target took over.
    #[error("volume {volume:?}: epoch {epoch} is stale, a target with epoch {promised} took over")]
    StaleEpoch { volume: String, epoch: u64, promised: u64 },
    /// Shrinking would discard data.
    #[error("volume {volume:?} is {size} bytes; shrinking to {requested} is not supported (it would discard data)")]
    Shrink { volume: String, size: u64, requested: u64 },
    /// The metadata store refused an operation (not an I/O error), with redb's error as cause.
    #[error("metadata store: {0}")]
    Store(#[source] Box<redb::Error>),
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

    /// The same failure for each of several waiters (one group commit, many requests): I/O
    /// errors keep their kind and OS error, so a full disk still reads as ENOSPC to every client.
    pub fn for_each_waiter(&self) -> EngineError {
        let copy = |io: &std::io::Error| match io.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::new(io.kind(), io.to_string()),
        };
        match self {
            EngineError::MetadataIo(io) => EngineError::MetadataIo(copy(io)),
            EngineError::Io { op, offset, source } => EngineError::Io { op, offset: *offset, source: copy(source) },
            EngineError::NoSpace => EngineError::NoSpace,
            other => EngineError::Metadata(other.to_string()),
        }
    }

    /// A refusal because of the state of things (gRPC FAILED_PRECONDITION).
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            EngineError::ReadOnly(_)
                | EngineError::InUse { .. }
                | EngineError::Published { .. }
                | EngineError::SingleWriter { .. }
                | EngineError::StaleEpoch { .. }
                | EngineError::Shrink { .. }
        )
    }
}

impl<E: Into<redb::Error>> From<E> for EngineError {
    fn from(e: E) -> Self {
        match e.into() {
            redb::Error::Io(io) => EngineError::MetadataIo(io),
            redb::Error::PreviousIo => EngineError::MetadataIo(std::io::Error::other("a previous I/O error")),
            e => EngineError::Store(Box::new(e)),
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

/// What kind of failure an [`EngineError`] is, for metrics (`thinbd_volume_errors_by_kind_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The pool's disk failed a read, write or sync.
    Io,
    /// The pool or the disk under it is full.
    NoSpace,
    /// The metadata store failed or refused.
    Metadata,
    /// Writing to something read-only.
    ReadOnly,
    /// A request that makes no sense (out of range, bad arguments).
    Invalid,
    /// Refused because of the state of things (in use, published, stale epoch…).
    Refused,
    /// Not there, or not reachable now (a peer or fence).
    Unavailable,
    Internal,
}

impl ErrorKind {
    /// Every kind, in declaration order (`kind as usize` indexes it).
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Io,
        ErrorKind::NoSpace,
        ErrorKind::Metadata,
        ErrorKind::ReadOnly,
        ErrorKind::Invalid,
        ErrorKind::Refused,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Metadata => "metadata",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Refused => "refused",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        if self.is_no_space() {
            return ErrorKind::NoSpace;
        }
        match self {
            EngineError::Io { .. } => ErrorKind::Io,
            EngineError::Metadata(_) | EngineError::MetadataIo(_) | EngineError::Store(_) => ErrorKind::Metadata,
            EngineError::ReadOnly(_) => ErrorKind::ReadOnly,
            EngineError::Invalid(_) => ErrorKind::Invalid,
            EngineError::AlreadyExists(_)
            | EngineError::InUse { .. }
            | EngineError::Published { .. }
            | EngineError::SingleWriter { .. }
            | EngineError::StaleEpoch { .. }
            | EngineError::Shrink { .. } => ErrorKind::Refused,
            EngineError::NotFound(_) | EngineError::Unavailable(_) => ErrorKind::Unavailable,
            EngineError::NoSpace => ErrorKind::NoSpace,
            EngineError::Internal(_) => ErrorKind::Internal,
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

/// A lock whose holder panicked: the state it guards cannot be trusted.
pub(crate) fn poisoned() -> EngineError {
    EngineError::Internal("lock poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_listed_in_declaration_order() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
    }

    #[test]
    fn every_waiter_of_a_failed_group_commit_sees_the_same_kind_of_failure() {
        let full = EngineError::MetadataIo(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
        assert!(full.is_no_space() && full.for_each_waiter().is_no_space());
        let eio = EngineError::MetadataIo(std::io::Error::from_raw_os_error(nix::libc::EIO));
        let copy = eio.for_each_waiter();
        assert!(
            !copy.is_no_space()
                && matches!(copy, EngineError::MetadataIo(ref e) if e.raw_os_error() == Some(nix::libc::EIO))
        );
        assert!(matches!(EngineError::Internal("x".into()).for_each_waiter(), EngineError::Metadata(_)));
    }
}
