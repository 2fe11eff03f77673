//! A volume whose data is on another node: its requests go there over NBD, the link between
//! the node a volume is attached on and the node that holds it. The export name carries the
//! attachment's grant, which the holder checks: a revoked attachment reaches no data this way
//! either (the holder's fence cuts this link's sessions like any other).

use bytes::Bytes;
use thinbd_protocol::client::{Client, ClientError, ClientOptions};
use thinbd_protocol::consts::{CMD_FLAG_FUA, CMD_FLAG_NO_HOLE};
use thinbd_protocol::{Extent, ReadChunk};

use tokio_util::sync::CancellationToken;

use crate::error::EngineError;

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
        let client = Client::connect(holder, options)
            .await
            .map_err(|e| EngineError::Unavailable(format!("cannot reach the node holding {name} at {holder}: {e}")))?;
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
        let data = self.client.read(offset, len).await.map_err(|e| self.link_error("read", offset, e))?;
        Ok(vec![ReadChunk::Data(Bytes::from(data))])
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.client.write(offset, &data, flags).await.map_err(|e| self.link_error("write", offset, e))
    }

    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        self.client.trim(offset, len).await.map_err(|e| self.link_error("trim", offset, e))?;
        if fua { self.flush().await } else { Ok(()) }
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 } | if unmap { 0 } else { CMD_FLAG_NO_HOLE };
        self.client.write_zeroes(offset, len, flags).await.map_err(|e| self.link_error("write zeroes", offset, e))
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        self.client.flush().await.map_err(|e| self.link_error("flush", 0, e))
    }

    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        self.client.block_status(offset, len, 0).await.map_err(|e| self.link_error("block status", offset, e))
    }
}
