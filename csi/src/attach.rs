//! Attaching a volume as /dev/nbdN: negotiate with the storage server in user space (one
//! connection, or two when the server allows multi-conn), hand the sockets to the kernel over
//! netlink with a backend identifier naming the volume, and find the device again later by
//! that identifier (idempotent stage, plugin restarts).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thinbd_protocol::client::handshake_for_kernel;
use thinbd_protocol::consts::FLAG_CAN_MULTI_CONN;

use crate::nbd_netlink::{DeviceConfig, Nbd};

/// Connections per device when the server advertises multi-conn (the kernel spreads requests
/// over them).
pub const CONNECTIONS: usize = 2;
pub const BLOCK_SIZE: u64 = 4096;
/// Seconds before an unanswered request marks its connection dead.
pub const IO_TIMEOUT: u64 = 30;
/// Seconds I/O waits for a reconnect once every connection is dead, before failing.
pub const DEAD_CONN_TIMEOUT: u64 = 120;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("NBD handshake with {addr}: {message}")]
    Handshake { addr: String, message: String },
    #[error(transparent)]
    Netlink(#[from] crate::nbd_netlink::NetlinkError),
    #[error("{0}")]
    Device(String),
}

pub fn backend_id(volume_id: &str) -> String {
    format!("thinbd:{volume_id}")
}

pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

fn sys(index: u32, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/{file}")).ok().map(|s| s.trim().to_string())
}

/// The connected device serving `volume_id`, if any.
pub fn find(volume_id: &str) -> Option<u32> {
    let want = backend_id(volume_id);
    let entries = std::fs::read_dir("/sys/block").ok()?;
    entries.filter_map(Result::ok).find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let index: u32 = name.strip_prefix("nbd")?.parse().ok()?;
        (sys(index, "backend").as_deref() == Some(want.as_str()) && connected(index)).then_some(index)
    })
}

/// Whether device `index` is connected (it has a size and a handling task).
pub fn connected(index: u32) -> bool {
    sys(index, "size").and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s > 0)
}

/// Size in bytes of device `index` as the kernel sees it.
pub fn size(index: u32) -> Option<u64> {
    sys(index, "size").and_then(|s| s.parse::<u64>().ok()).map(|sectors| sectors * 512)
}

async fn sockets(addr: &str, export: &str) -> Result<(Vec<std::net::TcpStream>, u64, u16), AttachError> {
    let err =
        |e: thinbd_protocol::client::ClientError| AttachError::Handshake { addr: addr.into(), message: e.to_string() };
    let first = handshake_for_kernel(addr, export).await.map_err(err)?;
    let (size, flags) = (first.size, first.flags);
    let mut socks = vec![first.socket];
    if flags & FLAG_CAN_MULTI_CONN != 0 {
        for _ in 1..CONNECTIONS {
            socks.push(handshake_for_kernel(addr, export).await.map_err(err)?.socket);
        }
    }
    Ok((socks, size, flags))
}

/// Attaches `export` from the server at `addr` for `volume_id`, or finds the device already
/// attached; returns its index.
pub async fn attach(volume_id: &str, addr: &str, export: &str) -> Result<u32, AttachError> {
    if let Some(i) = find(volume_id) {
        return Ok(i);
    }
    let (socks, size, flags) = sockets(addr, export).await?;
    let cfg = DeviceConfig {
        size,
        block_size: BLOCK_SIZE,
        server_flags: flags,
        io_timeout: IO_TIMEOUT,
        dead_conn_timeout: DEAD_CONN_TIMEOUT,
        backend: backend_id(volume_id),
    };
    let index = tokio::task::spawn_blocking(move || {
        let nbd = Nbd::open()?;
        let refs: Vec<&std::net::TcpStream> = socks.iter().collect();
        nbd.connect(&cfg, &refs)
    })
    .await
    .map_err(|e| AttachError::Device(format!("attach task: {e}")))??;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !connected(index) {
        if Instant::now() > deadline {
            return Err(AttachError::Device(format!("/dev/nbd{index} did not come up")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(volume = volume_id, device = %device_path(index).display(), size, connections = if flags & FLAG_CAN_MULTI_CONN != 0 { CONNECTIONS } else { 1 }, "attached");
    Ok(index)
}

/// Gives device `index` of `volume_id` fresh connections (the server restarted or the network
/// failed).
pub async fn reconnect(index: u32, volume_id: &str, addr: &str, export: &str) -> Result<(), AttachError> {
    let (socks, _, _) = sockets(addr, export).await?;
    let backend = backend_id(volume_id);
    tokio::task::spawn_blocking(move || {
        let nbd = Nbd::open()?;
        let refs: Vec<&std::net::TcpStream> = socks.iter().collect();
        nbd.reconfigure(index, &backend, &refs)
    })
    .await
    .map_err(|e| AttachError::Device(format!("reconnect task: {e}")))??;
    Ok(())
}

/// Grows device `index` of `volume_id` to `size` bytes.
pub async fn resize(index: u32, volume_id: &str, size: u64) -> Result<(), AttachError> {
    let backend = backend_id(volume_id);
    tokio::task::spawn_blocking(move || Nbd::open()?.resize(index, &backend, size, BLOCK_SIZE))
        .await
        .map_err(|e| AttachError::Device(format!("resize task: {e}")))??;
    Ok(())
}

pub async fn detach(index: u32) -> Result<(), AttachError> {
    tokio::task::spawn_blocking(move || Nbd::open()?.disconnect(index))
        .await
        .map_err(|e| AttachError::Device(format!("detach task: {e}")))??;
    let deadline = Instant::now() + Duration::from_secs(10);
    while connected(index) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The device node a path refers to, if it is one of ours.
pub fn index_of(dev: &Path) -> Option<u32> {
    dev.file_name()?.to_str()?.strip_prefix("nbd")?.parse().ok()
}
