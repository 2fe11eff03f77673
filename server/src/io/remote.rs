//! A volume whose data is on another node: its requests go there over NBD, the link between
//! the node a volume is attached on and the node that holds it. The export name carries the
//! attachment's grant, which the holder checks: a revoked attachment reaches no data this way
//! either (the holder's fence cuts this link's sessions like any other).

use bytes::Bytes;
use thinbd_protocol::client::{Client, ClientError, ClientOptions};
use thinbd_protocol::consts::{CMD_FLAG_FUA, CMD_FLAG_NO_HOLE};
use thinbd_protocol::{Extent, ReadChunk};

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::EngineError;

/// How long opening a link may take: a paused or black-holed node must not hold the session
/// that opens it (a copy out of reach leaves the in-sync set instead).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one request on a link may take before the link counts as lost (its copy leaves
/// the in-sync set, or the client's session ends and it reconnects). Well inside the kernel
/// NBD client's own 30 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub struct RemoteVolume {
    name: String,
    holder: String,
    client: Client,
    /// Cancelled when the link fails (the holder cut it, restarted, or cannot be reached).
    lost: CancellationToken,
}

impl RemoteVolume {
    /// A failure on the link as the engine's error: the holder's NBD errno (ENOSPC, EPERM,
    /// EIO…) survives as the OS error; anything else means the link is gone, which ends the
    /// sessions over it (see [`Self::lost`]).
    fn link_error(&self, op: &'static str, offset: u64, e: ClientError) -> EngineError {
        let source = match e.errno() {
            Some(1) => return EngineError::ReadOnly(format!("the holder refused: {e}")),
            Some(errno) => std::io::Error::from_raw_os_error(errno as i32),
            None => {
                self.lost.cancel();
                std::io::Error::other(e.to_string())
            }
        };
        EngineError::io(op, offset, source)
    }

    /// One request, given up (and the link lost) after [`REQUEST_TIMEOUT`].
    async fn timed<T>(
        &self,
        op: &'static str,
        offset: u64,
        request: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(r) => r.map_err(|e| self.link_error(op, offset, e)),
            Err(_) => {
                self.lost.cancel();
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{} did not answer", self.holder));
                Err(EngineError::io(op, offset, e))
            }
        }
    }
}

impl RemoteVolume {
    /// Opens `export` (a grant's `VOLUME#TOKEN`, with the target's epoch) on the holder's NBD
    /// listener `holder`, over TLS when `tls` is given.
    pub async fn open(
        holder: &str,
        export: &str,
        name: &str,
        tls: Option<(thinbd_protocol::tls::TlsConnector, thinbd_protocol::tls::ServerName<'static>)>,
    ) -> Result<RemoteVolume, EngineError> {
        let options = ClientOptions { tls, ..ClientOptions::new(export) };
        let unreachable =
            |e: String| EngineError::Unavailable(format!("cannot reach the node holding {name} at {holder}: {e}"));
        let client = tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(holder, options))
            .await
            .map_err(|_| unreachable(format!("no answer in {} s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(RemoteVolume { name: name.to_string(), holder: holder.to_string(), client, lost: CancellationToken::new() })
    }

    /// Cancelled when the link fails: the client's session over it should end, so that the
    /// client reconnects and a new link is opened (a restarted holder, a newer epoch).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// The size the holder announced when the link opened.
    pub fn size(&self) -> u64 {
        self.client.size
    }

    pub fn read_only(&self) -> bool {
        self.client.flags & thinbd_protocol::consts::FLAG_READ_ONLY != 0
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, EngineError> {
        let data = self.timed("read", offset, self.client.read(offset, len)).await?;
        Ok(vec![ReadChunk::Data(Bytes::from(data))])
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.timed("write", offset, self.client.write(offset, &data, flags)).await
    }

    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        self.timed("trim", offset, self.client.trim(offset, len)).await?;
        if fua { self.flush().await } else { Ok(()) }
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 } | if unmap { 0 } else { CMD_FLAG_NO_HOLE };
        self.timed("write zeroes", offset, self.client.write_zeroes(offset, len, flags)).await
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        self.timed("flush", 0, self.client.flush()).await
    }

    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        self.timed("block status", offset, self.client.block_status(offset, len, 0)).await
    }
}
