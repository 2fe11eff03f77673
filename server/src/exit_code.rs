//! The CLI's exit codes, so that scripts tell "no such volume" from "the daemon is down"
//! without parsing messages. Listed in `thinbd --help` and the README.

/// Why a command failed; its value is the process's exit code. 2 is clap's for bad usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Other = 1,
    NotFound = 3,
    InUse = 4,
    Unreachable = 5,
    Invalid = 6,
    NoSpace = 7,
    Denied = 8,
}

/// What `thinbd --help` says about exit codes.
pub const HELP: &str = "Exit codes: 0 done; 1 failed for another reason; 2 bad usage; 3 not found \
(volume, snapshot, node); 4 in use or in a conflicting state (attached, has snapshots, exists \
already, fenced); 5 unreachable (the daemon, another node or etcd, or no answer in time); 6 \
invalid request; 7 no space; 8 permission denied.";

/// A command's failure with its kind kept (the daemon's gRPC status, or not reaching it).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub failure: Failure,
    message: String,
}

impl CommandError {
    pub fn new(failure: Failure, message: impl Into<String>) -> Self {
        CommandError { failure, message: message.into() }
    }

    /// The daemon's answer: the message it gave, the kind its status code means.
    pub fn from_status(s: tonic::Status) -> Self {
        use tonic::Code;
        let failure = match s.code() {
            Code::NotFound => Failure::NotFound,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => Failure::InUse,
            Code::Unavailable | Code::DeadlineExceeded => Failure::Unreachable,
            Code::InvalidArgument | Code::OutOfRange => Failure::Invalid,
            Code::ResourceExhausted => Failure::NoSpace,
            Code::PermissionDenied | Code::Unauthenticated => Failure::Denied,
            _ => Failure::Other,
        };
        CommandError::new(failure, s.message())
    }
}

/// The exit code for an error a command returned: its kind where one is known, else 1.
pub fn of(e: &anyhow::Error) -> u8 {
    // As the error or a context of it (anyhow finds both), or as a cause further down.
    let found = e.downcast_ref::<CommandError>().or_else(|| e.chain().find_map(|c| c.downcast_ref::<CommandError>()));
    found.map_or(Failure::Other, |c| c.failure) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_documented_exit_codes() {
        let code = |c: tonic::Code| of(&anyhow::Error::new(CommandError::from_status(tonic::Status::new(c, "x"))));
        assert_eq!(code(tonic::Code::NotFound), 3);
        assert_eq!(code(tonic::Code::FailedPrecondition), 4);
        assert_eq!(code(tonic::Code::Unavailable), 5);
        assert_eq!(code(tonic::Code::InvalidArgument), 6);
        assert_eq!(code(tonic::Code::ResourceExhausted), 7);
        assert_eq!(code(tonic::Code::PermissionDenied), 8);
        assert_eq!(code(tonic::Code::Internal), 1);
        // Context added on the way up keeps the kind.
        let wrapped = anyhow::Error::new(CommandError::new(Failure::NotFound, "no volume")).context("deleting");
        assert_eq!(of(&wrapped), 3);
        let as_context = anyhow::anyhow!("connection refused")
            .context(CommandError::new(Failure::Unreachable, "cannot reach thinbd"))
            .context("listing volumes");
        assert_eq!(of(&as_context), 5);
        assert_eq!(of(&anyhow::anyhow!("plain")), 1);
    }
}
