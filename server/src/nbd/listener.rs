//! The NBD listener: admits connections within the descriptor and handshake limits, runs the
//! negotiation, then a session per export, fenced when its grant is revoked.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::MetricType;
use thinbd_protocol::{ServerConfig, SessionLimits, SessionShared, Stop};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::catalog::Catalog;
use super::export_name::ExportName;
use super::threads::SessionThreads;
use crate::metrics::{self, DescriptorEncoder, Family};

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
    /// Threads the sessions run on (see [`SessionThreads`]); 0: one per core.
    pub session_threads: usize,
}

/// Counters for the metrics endpoint.
pub struct ListenerStats {
    pub connections: AtomicUsize,
    pub handshakes: AtomicUsize,
    pub rejected_connections: AtomicU64,
    pub evicted_handshakes: AtomicU64,
    pub evicted_per_source: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    /// Handshakes that failed, by [`ProtocolError::kind`](thinbd_protocol::ProtocolError::kind).
    handshake_failures: [AtomicU64; thinbd_protocol::ProtocolError::KINDS.len()],
    pub shared: Arc<SessionShared>,
    pending: Mutex<Pending>,
}

impl ListenerStats {
    /// `stages`: time each request's session stages (`serve --stage-latency`).
    pub fn new(limits: &NbdLimits, stages: Option<Arc<crate::stages::Stages>>) -> Arc<Self> {
        let shared = match stages {
            Some(s) => SessionShared::with_stages(limits.server_bytes, s),
            None => SessionShared::new(limits.server_bytes),
        };
        Arc::new(ListenerStats {
            connections: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            rejected_connections: AtomicU64::new(0),
            evicted_handshakes: AtomicU64::new(0),
            evicted_per_source: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            handshake_failures: Default::default(),
            shared,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// The listener's gauges and counters on the metrics page.
    pub fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let sh = &self.shared;
        let gauges = [
            ("thinbd_nbd_connections", "Open NBD connections.", self.connections.load(Relaxed) as u64),
            ("thinbd_nbd_handshakes", "Connections still negotiating.", self.handshakes.load(Relaxed) as u64),
            (
                "thinbd_nbd_buffered_bytes",
                "Request data held in memory (payloads and unsent replies).",
                sh.budget.in_use(),
            ),
            ("thinbd_nbd_buffered_bytes_limit", "--server-memory.", sh.budget.total()),
        ];
        for (name, help, v) in gauges {
            metrics::gauge(enc, name, help, v)?;
        }
        let counters = [
            (
                "thinbd_nbd_rejected_connections",
                "Connections closed at accept: --max-connections reached.",
                self.rejected_connections.load(Relaxed),
            ),
            (
                "thinbd_nbd_evicted_handshakes",
                "Oldest unfinished handshakes closed to admit new connections (--max-handshakes).",
                self.evicted_handshakes.load(Relaxed),
            ),
            (
                "thinbd_nbd_evicted_per_source",
                "Oldest unfinished handshakes of a source closed to admit its new ones (--max-handshakes-per-source).",
                self.evicted_per_source.load(Relaxed),
            ),
            (
                "thinbd_nbd_handshake_timeouts",
                "Connections closed for not finishing the handshake in time.",
                self.handshake_timeouts.load(Relaxed),
            ),
            (
                "thinbd_nbd_write_timeouts",
                "Sessions closed because the client took no reply data for --client-write-timeout.",
                sh.write_timeouts.load(Relaxed),
            ),
            (
                "thinbd_nbd_throttled_requests",
                "Requests that waited for memory budget before being read (back-pressure).",
                sh.budget_waits.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            metrics::counter(enc, name, help, v)?;
        }
        let help = "Handshakes that failed, by reason (timeouts: thinbd_nbd_handshake_timeouts_total).";
        let mut f = Family::start(enc, "thinbd_nbd_handshake_failures", help, MetricType::Counter)?;
        for (reason, n) in thinbd_protocol::ProtocolError::KINDS.iter().zip(&self.handshake_failures) {
            f.counter(&[("reason", reason)], n.load(Relaxed))?;
        }
        Ok(())
    }

    fn handshake_failed(&self, e: &thinbd_protocol::ProtocolError) {
        if let Some(i) = thinbd_protocol::ProtocolError::KINDS.iter().position(|k| *k == e.kind()) {
            self.handshake_failures[i].fetch_add(1, Relaxed);
        }
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
    let threads = SessionThreads::start(limits.session_threads)?;
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
        // The socket moves to the session's thread (registered there with that runtime).
        let sock = match sock.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, error = %e, "cannot hand the connection to a session thread");
                continue;
            }
        };
        let (thread, placed) = threads.place();
        let catalog = catalog.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        let session = async move {
            let _placed = placed;
            let sock = match tokio::net::TcpStream::from_std(sock) {
                Ok(s) => s,
                Err(e) => {
                    warn!(%peer, error = %e, "cannot register the connection on its session thread");
                    return;
                }
            };
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
                    let export = ExportName::parse(&neg.export.name).map(|n| n.loggable()).unwrap_or_default();
                    info!(%peer, export, tls = neg.tls, structured = neg.structured, "NBD session started");
                    // A revoked grant or a newer target epoch fences the session; a shutdown
                    // drains it.
                    let fence = CancellationToken::new();
                    let fences = neg.export.fences.clone();
                    let stop = Stop { shutdown, fence: fence.clone() };
                    let r = tokio::select! {
                        r = thinbd_protocol::serve(neg, session_limits, stats.shared.clone(), stop) => r,
                        never = any_cancelled(&fences, &fence) => match never {},
                    };
                    match r {
                        Ok(()) => info!(%peer, export, "NBD session ended"),
                        Err(e) => info!(%peer, export, error = %e, "NBD session closed"),
                    }
                }
                Ok(Ok(None)) => debug!(%peer, "client ended the handshake"),
                Ok(Err(e)) => {
                    stats.handshake_failed(&e);
                    debug!(%peer, error = %e, "handshake failed")
                }
                Err(_) => {
                    stats.handshake_timeouts.fetch_add(1, Relaxed);
                    debug!(%peer, "handshake timed out")
                }
            }
            drop(admitted);
        };
        sessions.spawn_on(session, &thread);
    }
    while sessions.join_next().await.is_some() {}
    drop(threads);
    Ok(())
}

/// Cancels `fence` when any of `fences` is cancelled; never returns (dropped with the session).
async fn any_cancelled(fences: &[CancellationToken], fence: &CancellationToken) -> std::convert::Infallible {
    if !fences.is_empty() {
        futures_util::future::select_all(fences.iter().map(|f| Box::pin(f.cancelled()))).await;
        fence.cancel();
    }
    std::future::pending().await
}
