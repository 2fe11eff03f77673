//! `thinbd serve`: lock the data dir, open the engine, run the NBD, API and metrics listeners,
//! and shut down cleanly on SIGTERM/SIGINT.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use thinbd_api::pb::management_server::ManagementServer;
use thinbd_protocol::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::Api;
use crate::cluster::nodes::NodeRecord;
use crate::cluster::{Cluster, EtcdOptions, PeerTls};
use crate::engine::{Engine, EngineConfig};
use crate::metrics::{DescriptorEncoder, Source};
use crate::nbd::{Catalog, ListenerStats, NbdLimits, serve_nbd};
use thinbd_protocol::SessionLimits;

#[derive(clap::Args)]
pub struct ServeOptions {
    /// Where the pool file, metadata and lock live.
    #[arg(long, default_value = "./thinbd-data")]
    pub data_dir: PathBuf,
    /// Address the NBD server listens on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// Address the management API (gRPC) listens on.
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub api_listen: SocketAddr,
    /// Address of the Prometheus metrics page (`/metrics`).
    #[arg(long, default_value = "127.0.0.1:10811")]
    pub metrics_listen: SocketAddr,
    /// Log lines as text (colours only on a terminal) or JSON, one object per line.
    #[arg(long, value_enum, default_value = "text", env = "THINBD_LOG_FORMAT")]
    pub log_format: thinbd_api::logging::LogFormat,
    /// Pool capacity, e.g. 10GiB (default 10 GiB for a new pool; may grow later).
    #[arg(long, value_parser = crate::size::parse_size)]
    pub capacity: Option<u64>,
    /// Allocation unit, 4KiB to 1MiB (default 64 KiB), fixed when the pool is created.
    #[arg(long, value_parser = crate::size::parse_size)]
    pub cluster_size: Option<u64>,
    /// PEM certificate chain; enables and requires NBD STARTTLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle; clients must present a certificate it signed.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// How pool I/O is done.
    #[arg(long, value_enum, default_value_t = crate::space::backend::IoEngine::Uring)]
    pub io_engine: crate::space::backend::IoEngine,
    /// Pool I/O through the page cache instead of O_DIRECT (for filesystems without O_DIRECT
    /// support, or to compare).
    #[arg(long)]
    pub buffered_io: bool,
    /// Every NBD client, loopback too, must open a grant's export name (see `PublishVolume`).
    #[arg(long)]
    pub require_grants: bool,
    /// Time every request stage by stage (session admit, runtime schedule, execute, reply;
    /// ring queue, disk, wake-up) and show the histograms on the metrics page as
    /// `thinbd_stage_seconds{stage}`: where requests wait. Costs a few clock reads per request.
    #[arg(long)]
    pub stage_latency: bool,
    /// Also a latency histogram per volume on the metrics page
    /// (`thinbd_volume_request_duration_seconds{volume,op}`, 132 series per volume). Off, the
    /// page has one for all volumes together (`thinbd_request_duration_seconds{op}`) and per
    /// volume only counters and gauges.
    #[arg(long)]
    pub volume_latency_metrics: bool,
    /// This storage node's name, reported as its CSI topology segment (default: hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// HOST:PORT at which other machines reach the NBD listener (default: --nbd-listen).
    #[arg(long)]
    pub advertise_nbd: Option<String>,
    /// PEM certificate for the management API: it then speaks TLS and requires client
    /// certificates signed by --api-tls-client-ca.
    #[arg(long, requires_all = ["api_tls_key", "api_tls_client_ca"])]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key of --api-tls-cert.
    #[arg(long, requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    /// PEM CA bundle: API clients must present a certificate it signed.
    #[arg(long, requires = "api_tls_cert")]
    pub api_tls_client_ca: Option<PathBuf>,
    /// Serve even if the consistency check at start finds problems (see `thinbd fsck`).
    #[arg(long)]
    pub force: bool,
    /// Open NBD connections at most (lowered to fit the open-file limit).
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Threads NBD sessions run on, each session wholly on one; 0: one per core.
    #[arg(long, default_value_t = 0)]
    pub nbd_threads: usize,
    /// Connections still negotiating (not yet attached to an export) at most.
    #[arg(long, default_value_t = 128)]
    pub max_handshakes: usize,
    /// Connections still negotiating from one address at most.
    #[arg(long, default_value_t = 16)]
    pub max_handshakes_per_source: usize,
    /// Seconds a client has to finish the NBD handshake.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Request data one NBD session may hold in memory (write payloads, unsent read replies);
    /// beyond it the server stops reading that session's requests.
    #[arg(long, default_value = "64MiB", value_parser = crate::size::parse_size)]
    pub session_memory: u64,
    /// Request data all NBD sessions together may hold in memory.
    #[arg(long, default_value = "1GiB", value_parser = crate::size::parse_size)]
    pub server_memory: u64,
    /// Seconds a client may take no reply data before it is disconnected.
    #[arg(long, default_value_t = 30)]
    pub client_write_timeout: u64,
    /// etcd endpoints (`http://HOST:2379,...`): join the cluster they hold. Without it this is
    /// a single-node system.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// CA of etcd's server certificate (use https:// endpoints).
    #[arg(long, requires = "etcd")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, requires_all = ["etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// Private key of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Seconds without a lease renewal after which the cluster shows this node down.
    #[arg(long, default_value_t = 10)]
    pub node_lease_ttl: u64,
    /// This node's failure domain (a topology segment).
    #[arg(long, default_value = "")]
    pub zone: String,
    /// A topology label `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// HOST:PORT at which other nodes reach the management API (default: --api-listen).
    #[arg(long)]
    pub advertise_api: Option<String>,
    /// CA of the other nodes' certificates: calls to them (forwarded API requests, and a
    /// target's NBD link to the node holding a volume) then use mutual TLS with
    /// --peer-tls-cert/--peer-tls-key as this node's client certificate.
    #[arg(long, requires_all = ["etcd", "peer_tls_cert", "peer_tls_key"])]
    pub peer_tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM) for calls to and from other nodes.
    #[arg(long, requires = "peer_tls_ca")]
    pub peer_tls_cert: Option<PathBuf>,
    /// Private key of --peer-tls-cert.
    #[arg(long, requires = "peer_tls_ca")]
    pub peer_tls_key: Option<PathBuf>,
    /// The name the other nodes' certificates carry (one certificate shared by every storage
    /// node); default: the address dialled.
    #[arg(long, requires = "peer_tls_ca")]
    pub peer_tls_server_name: Option<String>,
    /// Most bytes per second one rebuild copies to a replica (e.g. `100MiB`; 0: unlimited),
    /// so that it stays behind the volumes' own I/O.
    #[arg(long, default_value = "128MiB", value_parser = crate::size::parse_size)]
    pub rebuild_rate: u64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

impl ServeOptions {
    /// The NBD listener's limits; connections are capped below the open-file limit so that
    /// the API, the metadata store and the pool always have descriptors left.
    fn nbd_limits(&self) -> NbdLimits {
        const RESERVED_FDS: usize = 256;
        let fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft as usize)
            .unwrap_or(1024);
        let fit = fds.saturating_sub(RESERVED_FDS).max(16);
        if self.max_connections > fit {
            warn!(max_connections = self.max_connections, open_file_limit = fds, "--max-connections lowered to {fit}");
        }
        NbdLimits {
            max_connections: self.max_connections.min(fit),
            max_handshakes: self.max_handshakes.max(1),
            max_handshakes_per_source: self.max_handshakes_per_source.max(1),
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
            session: SessionLimits {
                max_session_bytes: self.session_memory,
                write_timeout: Duration::from_secs(self.client_write_timeout.max(1)),
                ..SessionLimits::default()
            },
            server_bytes: self.server_memory,
            session_threads: self.nbd_threads,
        }
    }
}

/// Holds the data dir's lock for the life of the daemon.
pub fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<Flock<File>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let path = dir.join("lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!("data dir {} is in use by another thinbd (cannot lock {}: {e})", dir.display(), path.display())
    })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// Every NBD connection is a file descriptor; the usual soft limit of 1024 is too low for a
/// storage node, so raise it to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!(error = %e, soft, "cannot raise the open-file limit");
    }
}

pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    raise_fd_limit();
    let stages = opts.stage_latency.then(crate::stages::enable);
    let _lock = lock_data_dir(&opts.data_dir)?;
    let unclean = mark_running(&opts.data_dir)?;
    let engine = Engine::open(&EngineConfig {
        data_dir: opts.data_dir.clone(),
        capacity: opts.capacity,
        cluster_size: opts.cluster_size,
        io_engine: opts.io_engine,
        buffered_io: opts.buffered_io,
        force: opts.force,
    })
    .with_context(|| format!("opening pool in {}", opts.data_dir.display()))?;
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Some(thinbd_protocol::tls::server_acceptor(c, k, opts.tls_client_ca.as_deref())?),
        (None, None) if opts.tls_client_ca.is_some() => bail!("--tls-client-ca needs --tls-cert and --tls-key"),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let nbd = bind(opts.nbd_listen, "NBD").await?;
    let api = bind(opts.api_listen, "the management API").await?;
    let metrics = bind(opts.metrics_listen, "metrics").await?;
    let pool = engine.pool_info();
    info!(
        data_dir = %opts.data_dir.display(),
        capacity = pool.capacity,
        cluster_size = pool.cluster_size,
        volumes = pool.volumes,
        nbd = %opts.nbd_listen,
        api = %opts.api_listen,
        metrics = %opts.metrics_listen,
        tls = tls.is_some(),
        io_engine = engine.io_engine().name(),
        direct_io = engine.direct_io(),
        io_unit = engine.io_unit(),
        journal_blocks = engine.journal_blocks(),
        "thinbd serving"
    );
    if engine.io_engine() != opts.io_engine {
        warn!(
            requested = opts.io_engine.name(),
            io_engine = engine.io_engine().name(),
            "pool I/O does not use the requested engine (io_uring refused by the kernel or a seccomp profile): \
             slower, and more CPU per request; `thinbd status` and thinbd_pool_info show it"
        );
    }
    let shutdown = CancellationToken::new();
    let node_name = match &opts.node_name {
        Some(n) => n.clone(),
        None => {
            nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
        }
    };
    let nbd_address = opts.advertise_nbd.clone().unwrap_or_else(|| opts.nbd_listen.to_string());
    let this_node = {
        let (engine, name, nbd) = (engine.clone(), node_name.clone(), nbd_address.clone());
        let api = opts.advertise_api.clone().unwrap_or_else(|| opts.api_listen.to_string());
        let zone = opts.zone.clone();
        let labels: std::collections::BTreeMap<String, String> = opts.labels.iter().cloned().collect();
        move || {
            let pool = engine.pool_info();
            NodeRecord {
                name: name.clone(),
                nbd_address: nbd.clone(),
                api_address: api.clone(),
                capacity_bytes: pool.capacity,
                available_bytes: pool.capacity.saturating_sub(pool.used),
                zone: zone.clone(),
                labels: labels.clone(),
            }
        }
    };
    let cluster = match opts.etcd.is_empty() {
        true => None,
        false => {
            let etcd = EtcdOptions {
                endpoints: opts.etcd.clone(),
                ca: opts.etcd_ca.clone(),
                cert: opts.etcd_cert.clone(),
                key: opts.etcd_key.clone(),
                lease_ttl: Duration::from_secs(opts.node_lease_ttl.max(2)),
            };
            let peer_tls = match (&opts.peer_tls_ca, &opts.peer_tls_cert, &opts.peer_tls_key) {
                (Some(ca), Some(cert), Some(key)) => Some(
                    PeerTls::load(ca, cert, key, opts.peer_tls_server_name.clone())
                        .context("loading the certificates for calls to other nodes")?,
                ),
                _ => None,
            };
            let joined = Cluster::join(&etcd, peer_tls, this_node.clone(), shutdown.clone())
                .await
                .with_context(|| format!("joining the cluster at {}", opts.etcd.join(",")))?;
            info!(node = %node_name, etcd = %opts.etcd.join(","), "cluster joined");
            joined.set_rebuild_rate(opts.rebuild_rate);
            joined.set_engine(engine.clone());
            adopt_local(&engine, &joined).await.context("recording this node's volumes in the cluster")?;
            if unclean {
                note_suspect_copies(&engine, &joined).await.context("recording this node's copies as suspect")?;
            }
            // Copies of volumes served here come back in sync when their nodes register again.
            let registrations = joined.directory.registrations();
            tokio::spawn(crate::cluster::rebuild::on_registration(joined.clone(), registrations, shutdown.clone()));
            Some(joined)
        }
    };
    let catalog =
        Arc::new(Catalog { engine: engine.clone(), require_grants: opts.require_grants, cluster: cluster.clone() });
    let config = ServerConfig { tls, ..ServerConfig::default() };
    let limits = opts.nbd_limits();
    // Request buffers kept in huge pages count against the memory all sessions may hold.
    thinbd_protocol::huge_buffers::limit(
        usize::try_from(limits.server_bytes).unwrap_or(usize::MAX).min(thinbd_protocol::huge_buffers::DEFAULT_LIMIT),
    );
    let stats = ListenerStats::new(&limits, stages.clone());
    let nbd_task = tokio::spawn(serve_nbd(nbd, catalog, config, limits, stats.clone(), shutdown.clone()));

    let api_shutdown = shutdown.clone();
    let mut api_builder = tonic::transport::Server::builder();
    if let (Some(c), Some(k), Some(ca)) = (&opts.api_tls_cert, &opts.api_tls_key, &opts.api_tls_client_ca) {
        let tls = thinbd_api::tls::api_server_tls(c, k, ca)?;
        api_builder = api_builder.tls_config(tls).context("management API TLS")?;
    }
    // grpc.health.v1 for probes and load balancers: SERVING until shutdown starts.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ManagementServer<Api>>().await;
    let api_task = tokio::spawn(
        api_builder
            .add_service(health_service)
            .add_service(ManagementServer::new(Api {
                engine: engine.clone(),
                node_name,
                nbd_address,
                cluster: cluster.clone(),
                this_node: Box::new(this_node),
                io_engine_requested: opts.io_engine,
            }))
            // Small answers (a checksum, a node record) go out at once: without NODELAY, Nagle
            // held each behind the peer's delayed ACK, 40 ms per call between nodes.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(api).with_nodelay(Some(true)),
                async move { api_shutdown.cancelled().await },
            ),
    );

    // The metrics page: each part writes its series when scraped.
    let mut registry = prometheus_client::registry::Registry::default();
    crate::metrics::set_per_volume_latency(opts.volume_latency_metrics);
    let e = engine.clone();
    registry
        .register_collector(Box::new(Source("engine", move |enc: &mut DescriptorEncoder<'_>| e.encode_metrics(enc))));
    registry.register_collector(Box::new(Source("nbd", move |enc: &mut DescriptorEncoder<'_>| stats.encode(enc))));
    let (io_engine, requested, direct_io) = (engine.io_engine().name(), opts.io_engine.name(), engine.direct_io());
    registry.register_collector(Box::new(Source("info", move |enc: &mut DescriptorEncoder<'_>| {
        crate::metrics::encode_info(enc, io_engine, requested, direct_io)
    })));
    if let Some(s) = crate::stages::enabled() {
        registry.register_collector(Box::new(Source("stages", move |enc: &mut DescriptorEncoder<'_>| s.encode(enc))));
    }
    if let Some(c) = cluster.clone() {
        registry.register_collector(Box::new(Source("cluster", move |enc: &mut DescriptorEncoder<'_>| {
            c.encode_metrics(enc)
        })));
    }
    let registry = Arc::new(registry);
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = crate::metrics::encode(&registry);
            async move { ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body) }
        }),
    );
    // Liveness: the process answers. Readiness: it is not stopping and its metadata store
    // takes commits (the reason otherwise, with 503).
    let ready_engine = engine.clone();
    let ready_shutdown = shutdown.clone();
    let router = router.route("/healthz", axum::routing::get(|| async { "ok\n" })).route(
        "/readyz",
        axum::routing::get(move || {
            let reason = if ready_shutdown.is_cancelled() {
                Some("shutting down".to_string())
            } else {
                ready_engine.not_ready()
            };
            async move {
                match reason {
                    Some(r) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n")),
                    None => (axum::http::StatusCode::OK, "ready\n".to_string()),
                }
            }
        }),
    );
    let metrics_shutdown = shutdown.clone();
    let metrics_task = tokio::spawn(async move {
        axum::serve(metrics, router).with_graceful_shutdown(async move { metrics_shutdown.cancelled().await }).await
    });

    wait_for_signal().await?;
    info!("shutting down: finishing in-flight requests");
    health.set_not_serving::<ManagementServer<Api>>().await;
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(30), nbd_task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "NBD listener"),
        Err(_) => warn!("NBD sessions did not finish within 30 s"),
        _ => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), metrics_task).await;
    if let Some(c) = &cluster {
        c.leave().await;
    }
    engine.checkpoint().await.context("final flush")?;
    std::fs::remove_file(opts.data_dir.join(RUNNING))
        .with_context(|| format!("removing {}", opts.data_dir.join(RUNNING).display()))?;
    info!("stopped cleanly");
    Ok(())
}

/// Present while a daemon runs on the data directory: found at start, the last one stopped
/// without its final flush (killed, crashed, power cut).
const RUNNING: &str = "thinbd.running";

/// Makes the [`RUNNING`] marker durable; true when it was already there.
fn mark_running(dir: &std::path::Path) -> anyhow::Result<bool> {
    let path = dir.join(RUNNING);
    let unclean = path.exists();
    let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    if unclean {
        warn!("the last run on this data directory did not stop cleanly");
    }
    Ok(unclean)
}

/// After an unclean stop, this node's copies of replicated volumes may lack writes that were
/// not flushed: each becomes suspect in its in-sync record, so that the next target
/// reconciles it from another copy instead of from it.
async fn note_suspect_copies(engine: &Engine, cluster: &Cluster) -> Result<(), crate::cluster::ClusterError> {
    let mut noted = Vec::new();
    for v in engine.list() {
        let replicated = cluster.volume_spec(&v.uuid).await?.is_some_and(|s| s.replicated());
        if replicated && cluster.note_suspect(&v.uuid).await? {
            noted.push(v.name.clone());
        }
    }
    if !noted.is_empty() {
        warn!(volumes = %noted.join(", "), "copies that may lack unflushed writes: their targets reconcile them");
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}

/// Records in etcd the volumes and snapshots of this pool that the cluster does not know:
/// made before the node joined a cluster, or while it ran alone.
async fn adopt_local(engine: &Engine, cluster: &Cluster) -> Result<(), crate::cluster::ClusterError> {
    use crate::cluster::volumes::{Adopted, VolumeSpec};
    let (mut recorded, mut renamed) = (0, Vec::new());
    for v in engine.list() {
        let spec = VolumeSpec {
            uuid: v.uuid.clone(),
            name: v.name.clone(),
            size_bytes: v.size(),
            node: cluster.node.clone(),
            created_unix: v.created_unix,
            replicas: Vec::new(),
            min_insync: 0,
        };
        match cluster.adopt_volume(&spec).await? {
            Adopted::Known => {}
            Adopted::Recorded => recorded += 1,
            Adopted::NameTaken => renamed.push(format!("{} ({})", v.name, v.uuid)),
        }
    }
    for s in engine.list_snapshots(None) {
        // A replicated volume's snapshots are recorded where they are taken; one a copy holds
        // that the cluster does not know was deleted while the copy was away (its rebuild
        // deletes it there).
        let replicated = cluster.volume_spec(&s.volume_uuid).await?.is_some_and(|v| v.replicated());
        if !replicated && cluster.snapshot_spec(&s.uuid).await?.is_none() {
            let pb = crate::api::convert::snapshot_to_pb(engine, &cluster.node, &s);
            cluster.put_snapshot(&crate::api::convert::snapshot_spec(&pb)).await?;
            recorded += 1;
        }
    }
    if recorded > 0 {
        info!(recorded, "recorded this pool's volumes and snapshots in the cluster");
    }
    if !renamed.is_empty() {
        warn!(volumes = %renamed.join(", "), "volumes whose names other volumes of the cluster hold: reachable by UUID");
    }
    Ok(())
}
