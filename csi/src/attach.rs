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
    size(index).is_some_and(|s| s > 0)
}

/// Size in bytes of device `index` as the kernel sees it.
pub fn size(index: u32) -> Option<u64> {
    sys(index, "size").and_then(|s| s.parse::<u64>().ok()).map(|sectors| sectors * 512)
}

/// TLS for the node's NBD connections: STARTTLS in user space, then kernel TLS.
pub struct NbdTls {
    pub connector: tokio_rustls::TlsConnector,
    /// The name the server's certificate must carry (default: the host of the address).
    pub server_name: Option<String>,
}

static NBD_TLS: std::sync::OnceLock<NbdTls> = std::sync::OnceLock::new();

/// Makes every later attach and reconnect use TLS (set once at startup).
pub fn use_tls(tls: NbdTls) {
    let _ = NBD_TLS.set(tls);
}

async fn connection(addr: &str, export: &str) -> Result<thinbd_protocol::client::KernelHandoff, AttachError> {
    let fail = |message: String| AttachError::Handshake { addr: addr.into(), message };
    let Some(tls) = NBD_TLS.get() else {
        return handshake_for_kernel(addr, export).await.map_err(|e| fail(e.to_string()));
    };
    let host = match &tls.server_name {
        Some(n) => n.clone(),
        None => addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']).to_string(),
    };
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| fail(format!("server name {host:?}: {e}")))?;
    let mut h = thinbd_protocol::client::handshake_for_kernel_tls(addr, export, &tls.connector, name)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if let Some((version, secrets)) = h.tls.take() {
        crate::ktls::install(&h.socket, version, secrets).map_err(|e| fail(e.to_string()))?;
    }
    Ok(h)
}

async fn sockets(addr: &str, export: &str) -> Result<(Vec<std::net::TcpStream>, u64, u16), AttachError> {
    let first = connection(addr, export).await?;
    let (size, flags) = (first.size, first.flags);
    let mut socks = vec![first.socket];
    if flags & FLAG_CAN_MULTI_CONN != 0 {
        for _ in 1..CONNECTIONS {
            socks.push(connection(addr, export).await?.socket);
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

/// Where the node remembers how to reach each attached volume (server address and export
/// name), so it can reconnect a device after the server restarts, also after its own restart.
/// Files are 0600: the export name is the grant's secret.
pub struct StateDir(pub PathBuf);

impl StateDir {
    fn file(&self, volume_id: &str) -> PathBuf {
        let name: String = volume_id.bytes().map(|b| format!("{b:02x}")).collect();
        self.0.join(name)
    }

    pub fn save(&self, volume_id: &str, addr: &str, export: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&self.0)?;
        let tmp = self.file(volume_id).with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        writeln!(f, "{addr}\n{export}")?;
        f.sync_all()?;
        std::fs::rename(tmp, self.file(volume_id))
    }

    pub fn load(&self, volume_id: &str) -> Option<(String, String)> {
        let text = std::fs::read_to_string(self.file(volume_id)).ok()?;
        let mut lines = text.lines();
        Some((lines.next()?.to_string(), lines.next()?.to_string()))
    }

    pub fn remove(&self, volume_id: &str) {
        let _ = std::fs::remove_file(self.file(volume_id));
    }

    fn ephemeral_file(&self, target: &Path) -> PathBuf {
        let name: String = target.as_os_str().as_encoded_bytes().iter().map(|b| format!("{b:02x}")).collect();
        self.0.join(format!("eph-{name}"))
    }

    /// Remembers that `target` holds the inline ephemeral volume `volume_id`.
    pub fn mark_ephemeral(&self, target: &Path, volume_id: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.0)?;
        std::fs::write(self.ephemeral_file(target), volume_id)
    }

    pub fn ephemeral(&self, target: &Path) -> Option<String> {
        std::fs::read_to_string(self.ephemeral_file(target)).ok()
    }

    pub fn unmark_ephemeral(&self, target: &Path) {
        let _ = std::fs::remove_file(self.ephemeral_file(target));
    }
}

/// The volume a device serves, from its backend identifier.
fn volume_of(index: u32) -> Option<String> {
    sys(index, "backend")?.strip_prefix("thinbd:").map(str::to_string)
}

/// Keeps attached devices connected: when the kernel announces that a device's connections
/// died (server restart, network failure), negotiate fresh ones and hand them over, retrying
/// every second for as long as the kernel holds the I/O (the dead-connection timeout).
pub fn spawn_supervisor(state: std::sync::Arc<StateDir>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let listener = match Nbd::open().and_then(|n| n.link_dead_listener()) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch NBD connections; devices will not reconnect by themselves");
            return;
        }
    };
    std::thread::Builder::new()
        .name("nbd-link-watch".into())
        .spawn(move || {
            while let Ok(index) = listener.next() {
                if tx.send(index).is_err() {
                    return;
                }
            }
        })
        .ok();
    tokio::spawn(async move {
        let busy = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        while let Some(index) = rx.recv().await {
            if !busy.lock().is_ok_and(|mut b| b.insert(index)) {
                continue;
            }
            let (state, busy) = (state.clone(), busy.clone());
            tokio::spawn(async move {
                keep_connected(index, &state).await;
                if let Ok(mut b) = busy.lock() {
                    b.remove(&index);
                }
            });
        }
    });
}

async fn keep_connected(index: u32, state: &StateDir) {
    let Some(volume_id) = volume_of(index) else { return };
    let Some((addr, export)) = state.load(&volume_id) else {
        tracing::warn!(device = index, volume = %volume_id, "connection died and no reconnect information is stored");
        return;
    };
    tracing::warn!(device = index, volume = %volume_id, "NBD connection died; reconnecting");
    let deadline = Instant::now() + Duration::from_secs(DEAD_CONN_TIMEOUT);
    while Instant::now() < deadline && volume_of(index).as_deref() == Some(volume_id.as_str()) {
        match reconnect(index, &volume_id, &addr, &export).await {
            Ok(()) => {
                tracing::info!(device = index, volume = %volume_id, "reconnected");
                return;
            }
            Err(e) => tracing::debug!(device = index, error = %e, "reconnect failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::error!(device = index, volume = %volume_id, "could not reconnect within the dead-connection timeout");
}
