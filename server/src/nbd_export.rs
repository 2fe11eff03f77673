//! Volumes as NBD exports: the `BlockDevice` impl (with metrics), the export catalog and the
//! TCP listener.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thinbd_protocol::{
    BlockDevice, DeviceError, DeviceInfo, DeviceResult, Export, ExportCatalog, ExportListing, Extent, OpenError,
    ReadChunk, ServerConfig, SessionLimits, SessionShared, Stop,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::engine::{Engine, VolumeHandle};
use crate::error::EngineError;
use crate::metrics::Op;

async fn measured<T>(h: &VolumeHandle, op: Op, f: impl Future<Output = Result<T, EngineError>>) -> DeviceResult<T> {
    let started = Instant::now();
    let r = f.await;
    h.metrics().record(op, started, r.is_ok());
    r.map_err(|e| {
        if !matches!(e, EngineError::NoSpace) {
            warn!(volume = %h.name(), ?op, error = %e, "request failed");
        }
        DeviceError::from(e)
    })
}

impl BlockDevice for VolumeHandle {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size(),
            read_only: self.read_only(),
            can_trim: true,
            can_zero: true,
            can_cache: true,
            can_multi_conn: true,
            preferred_block: 4096,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Vec<ReadChunk>> {
        measured(self, Op::Read, VolumeHandle::read(self, offset, len)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        measured(self, Op::Write, VolumeHandle::write(self, offset, data, fua)).await
    }

    async fn flush(&self) -> DeviceResult<()> {
        measured(self, Op::Flush, VolumeHandle::flush(self)).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        measured(self, Op::Trim, self.zero(offset, len, true, fua)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_unmap: bool, fast: bool, fua: bool) -> DeviceResult<()> {
        if fast && !may_unmap {
            // Zeroing without unmapping means writing zeros: not fast.
            return Err(DeviceError::NotSupported);
        }
        measured(self, Op::WriteZeroes, self.zero(offset, len, may_unmap, fua)).await
    }

    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        measured(self, Op::BlockStatus, VolumeHandle::block_status(self, offset, len)).await
    }
}

/// The engine's volumes as exports. Loopback clients may open volumes by name unless grants are
/// required; everyone else needs a grant's export name (`VOLUME#TOKEN`).
pub struct Catalog {
    pub engine: Arc<Engine>,
    pub require_grants: bool,
}

impl Catalog {
    fn trusted(&self, peer: Option<SocketAddr>) -> bool {
        !self.require_grants && peer.is_some_and(|p| p.ip().is_loopback())
    }
}

fn describe(h: &VolumeHandle, name: &str) -> String {
    if h.read_only() { format!("thinbd {name} (read-only)") } else { format!("thinbd volume {name}") }
}

impl ExportCatalog for Catalog {
    type Device = VolumeHandle;

    fn open(&self, name: &str, peer: Option<SocketAddr>) -> Result<Export<VolumeHandle>, OpenError> {
        let engine_err = |e: EngineError| match e {
            EngineError::NotFound(_) => OpenError::Unknown,
            e => OpenError::Platform(e.to_string()),
        };
        if name.contains('#') {
            let grant = self.engine.grant_for_export(name).ok_or(OpenError::Unknown)?;
            // Counted before the volume is opened: a revocation from here on waits for us.
            let session = grant.enter().ok_or(OpenError::Unknown)?;
            let r = &grant.record;
            let mut h = self.engine.open_export(&r.volume).map_err(engine_err)?.through_grant(session);
            if r.read_only {
                h = h.into_read_only();
            }
            debug!(volume = %r.volume, node = %r.node, ?peer, read_only = r.read_only, "export opened through grant");
            let description = describe(&h, &r.volume);
            return Ok(Export {
                name: name.to_string(),
                description,
                device: Arc::new(h),
                revoked: Some(grant.revoked.clone()),
            });
        }
        if !self.trusted(peer) {
            return Err(OpenError::Policy(
                "an attachment grant is required: open the export name that `thinbd volume publish` printed \
                 (VOLUME#TOKEN; in an NBD URI write the # as %23)"
                    .into(),
            ));
        }
        let h = self.engine.open_export(name).map_err(engine_err)?;
        Ok(Export { name: name.to_string(), description: describe(&h, name), device: Arc::new(h), revoked: None })
    }

    fn list(&self, peer: Option<SocketAddr>) -> Vec<ExportListing> {
        if !self.trusted(peer) {
            return Vec::new();
        }
        self.engine
            .list()
            .iter()
            .map(|v| ExportListing { name: v.name.clone(), description: format!("thinbd volume {}", v.name) })
            .collect()
    }
}

/// Connection admission: how many connections and handshakes may be open at once. Every
/// connection costs a file descriptor; unauthenticated ones (still negotiating) are bounded
/// overall and per source address, so a flood of idle connections cannot take the descriptors
/// that sessions, the management API and the metadata store need.
#[derive(Debug, Clone, Copy)]
pub struct NbdLimits {
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    pub handshake_timeout: Duration,
    pub session: SessionLimits,
    /// Bytes of request data all sessions together may hold in memory.
    pub server_bytes: u64,
}

/// Counters for the metrics endpoint.
pub struct ListenerStats {
    pub connections: AtomicUsize,
    pub handshakes: AtomicUsize,
    pub rejected_connections: AtomicU64,
    pub evicted_handshakes: AtomicU64,
    pub evicted_per_source: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub shared: Arc<SessionShared>,
    pending: Mutex<Pending>,
}

impl ListenerStats {
    pub fn new(limits: &NbdLimits) -> Arc<Self> {
        Arc::new(ListenerStats {
            connections: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            rejected_connections: AtomicU64::new(0),
            evicted_handshakes: AtomicU64::new(0),
            evicted_per_source: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            shared: SessionShared::new(limits.server_bytes),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// Prometheus text for the listener's gauges and counters.
    pub fn render(&self) -> String {
        let sh = &self.shared;
        let lines = [
            ("thinbd_nbd_connections", "gauge", "Open NBD connections.", self.connections.load(Relaxed) as u64),
            ("thinbd_nbd_handshakes", "gauge", "Connections still negotiating.", self.handshakes.load(Relaxed) as u64),
            (
                "thinbd_nbd_rejected_connections_total",
                "counter",
                "Connections closed at accept: --max-connections reached.",
                self.rejected_connections.load(Relaxed),
            ),
            (
                "thinbd_nbd_evicted_handshakes_total",
                "counter",
                "Oldest unfinished handshakes closed to admit new connections (--max-handshakes).",
                self.evicted_handshakes.load(Relaxed),
            ),
            (
                "thinbd_nbd_evicted_per_source_total",
                "counter",
                "Oldest unfinished handshakes of a source closed to admit its new ones (--max-handshakes-per-source).",
                self.evicted_per_source.load(Relaxed),
            ),
            (
                "thinbd_nbd_handshake_timeouts_total",
                "counter",
                "Connections closed for not finishing the handshake in time.",
                self.handshake_timeouts.load(Relaxed),
            ),
            (
                "thinbd_nbd_write_timeouts_total",
                "counter",
                "Sessions closed because the client took no reply data for --client-write-timeout.",
                sh.write_timeouts.load(Relaxed),
            ),
            (
                "thinbd_nbd_throttled_requests_total",
                "counter",
                "Requests that waited for memory budget before being read (back-pressure).",
                sh.budget_waits.load(Relaxed),
            ),
            (
                "thinbd_nbd_buffered_bytes",
                "gauge",
                "Request data held in memory (payloads and unsent replies).",
                sh.budget.in_use(),
            ),
            ("thinbd_nbd_buffered_bytes_limit", "gauge", "--server-memory.", sh.budget.total()),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in lines {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        out
    }
}

/// A connection slot, and a handshake slot while negotiating; released on drop.
struct Admitted {
    stats: Arc<ListenerStats>,
    handshake: Option<u64>,
    /// Cancelled when a newer connection needs the handshake slot.
    evicted: CancellationToken,
}

impl Admitted {
    /// Admits a connection, or says which limit refused it. Handshakes are never refused:
    /// when a source, or the server, has as many unfinished ones as allowed, the oldest of them
    /// is closed to make room. An honest client finishes its handshake in milliseconds, so idle
    /// connections, however many and from however many addresses, cannot keep it out, nor
    /// hold more than `max_handshakes` descriptors.
    fn admit(stats: &Arc<ListenerStats>, limits: &NbdLimits, ip: IpAddr) -> Result<Admitted, &'static str> {
        if stats.connections.fetch_add(1, Relaxed) >= limits.max_connections {
            stats.connections.fetch_sub(1, Relaxed);
            stats.rejected_connections.fetch_add(1, Relaxed);
            return Err("--max-connections");
        }
        let mut a = Admitted { stats: stats.clone(), handshake: None, evicted: CancellationToken::new() };
        let mut hs = stats.pending.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = hs.per_source.get(&ip).map_or(0, Vec::len);
        if from_source >= limits.max_handshakes_per_source {
            if let Some(&oldest) = hs.per_source.get(&ip).and_then(|v| v.first()) {
                hs.evict(oldest);
                stats.evicted_per_source.fetch_add(1, Relaxed);
            }
        } else if hs.by_age.len() >= limits.max_handshakes
            && let Some(&oldest) = hs.by_age.keys().next()
        {
            hs.evict(oldest);
            stats.evicted_handshakes.fetch_add(1, Relaxed);
        }
        hs.next += 1;
        let seq = hs.next;
        hs.by_age.insert(seq, (ip, a.evicted.clone()));
        hs.per_source.entry(ip).or_default().push(seq);
        stats.handshakes.store(hs.by_age.len(), Relaxed);
        a.handshake = Some(seq);
        Ok(a)
    }

    /// The handshake is over (either way): its slot goes back.
    fn negotiated(&mut self) {
        if let Some(seq) = self.handshake.take() {
            let mut hs = self.stats.pending.lock().unwrap_or_else(|p| p.into_inner());
            hs.forget(seq);
            self.stats.handshakes.store(hs.by_age.len(), Relaxed);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.negotiated();
        self.stats.connections.fetch_sub(1, Relaxed);
    }
}

/// Connections still negotiating, by admission order.
#[derive(Default)]
struct Pending {
    next: u64,
    /// Oldest first; the token closes the connection.
    by_age: BTreeMap<u64, (IpAddr, CancellationToken)>,
    /// Oldest first.
    per_source: HashMap<IpAddr, Vec<u64>>,
}

impl Pending {
    fn forget(&mut self, seq: u64) -> Option<CancellationToken> {
        let (ip, token) = self.by_age.remove(&seq)?;
        if let Some(v) = self.per_source.get_mut(&ip) {
            v.retain(|s| *s != seq);
            if v.is_empty() {
                self.per_source.remove(&ip);
            }
        }
        Some(token)
    }

    fn evict(&mut self, seq: u64) {
        if let Some(token) = self.forget(seq) {
            token.cancel();
        }
    }
}

/// What a session logs for its export: the volume, never a grant's token.
fn loggable(export: &str) -> &str {
    export.split_once('#').map_or(export, |(volume, _)| volume)
}

/// Accepts NBD connections until `shutdown`, then waits for sessions to finish their requests.
pub async fn serve_nbd(
    listener: TcpListener,
    catalog: Arc<Catalog>,
    config: ServerConfig,
    limits: NbdLimits,
    stats: Arc<ListenerStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut sessions = JoinSet::new();
    let session_limits = SessionLimits { max_payload: config.max_payload, ..limits.session };
    let config = Arc::new(config);
    let mut warned = Instant::now() - Duration::from_secs(60);
    loop {
        while sessions.try_join_next().is_some() {}
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let mut admitted = match Admitted::admit(&stats, &limits, peer.ip()) {
            Ok(a) => a,
            Err(limit) => {
                drop(sock);
                if warned.elapsed() > Duration::from_secs(10) {
                    warned = Instant::now();
                    warn!(%peer, limit, "refusing NBD connections: limit reached (see thinbd_nbd_rejected_* metrics)");
                }
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let catalog = catalog.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        sessions.spawn(async move {
            // A client that never finishes the handshake must not hold a slot for long.
            let evicted = admitted.evicted.clone();
            let neg = tokio::select! {
                r = tokio::time::timeout(limits.handshake_timeout, thinbd_protocol::negotiate(Box::new(sock), &*catalog, &config, Some(peer))) => r,
                _ = shutdown.cancelled() => return,
                _ = evicted.cancelled() => return,
            };
            admitted.negotiated();
            match neg {
                Ok(Ok(Some(neg))) => {
                    let export = loggable(&neg.export.name).to_string();
                    info!(%peer, export, tls = neg.tls, structured = neg.structured, "NBD session started");
                    // A revoked grant fences the session; a shutdown drains it.
                    let fence = neg.export.revoked.clone().unwrap_or_default();
                    let stop = Stop { shutdown, fence };
                    let r = thinbd_protocol::serve(neg, session_limits, stats.shared.clone(), stop).await;
                    match r {
                        Ok(()) => info!(%peer, export, "NBD session ended"),
                        Err(e) => info!(%peer, export, error = %e, "NBD session closed"),
                    }
                }
                Ok(Ok(None)) => debug!(%peer, "client ended the handshake"),
                Ok(Err(e)) => debug!(%peer, error = %e, "handshake failed"),
                Err(_) => {
                    stats.handshake_timeouts.fetch_add(1, Relaxed);
                    debug!(%peer, "handshake timed out")
                }
            }
            drop(admitted);
        });
    }
    while sessions.join_next().await.is_some() {}
    Ok(())
}
