//! The NBD protocol for thinbd: handshake, transmission, a server session driver generic over
//! [`BlockDevice`], and an async [`client::Client`]. (The gRPC definitions are in `thinbd-api`.)

pub mod aligned;
pub mod budget;
pub mod client;
pub mod consts;
pub mod device;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod handshake;
pub mod huge_buffers;
mod in_flight;
pub mod io;
#[cfg(feature = "testing")]
pub mod mem_device;
mod reply_queue;
pub mod session;
pub mod stages;
mod stop_watch;
pub mod tls;
pub mod wire;

pub use budget::{ByteBudget, SessionShared};
pub use device::{BlockDevice, DeviceError, DeviceInfo, DeviceResult, Extent, ReadChunk};
pub use handshake::{Export, ExportCatalog, ExportListing, Negotiated, OpenError, ServerConfig, negotiate};
pub use session::{SessionLimits, Stop, serve};

/// Why a connection ended abnormally. Every variant closes the connection; none panics.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("TLS: {0}")]
    Tls(String),
}

impl ProtocolError {
    /// Every [`ProtocolError::kind`], for metrics that show each one, zero or not.
    pub const KINDS: [&'static str; 5] = ["io", "bad_magic", "malformed", "refused", "tls"];

    /// A short name for what went wrong (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::Io(_) => "io",
            ProtocolError::BadMagic(_) => "bad_magic",
            ProtocolError::Malformed(_) => "malformed",
            ProtocolError::Refused(_) => "refused",
            ProtocolError::Tls(_) => "tls",
        }
    }
}
