//! The cluster: with `serve --etcd`, nodes share state in etcd (key layout in [`keys`]).
//! Without it nothing here runs and thinbd is the single-node system.

pub mod error;
pub mod grants;
pub mod isr;
pub mod keys;
pub mod layer_source;
pub mod marks;
pub mod nodes;
pub mod rebuild;
mod record;
pub mod scrub;
pub mod snapshots;
pub mod targets;
pub mod volumes;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use prometheus_client::metrics::MetricType;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DescriptorEncoder, Family};

pub use error::ClusterError;
use nodes::{Directory, NodeRecord};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// CA of etcd's server certificate (TLS).
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for an etcd that requires them.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A node that has not renewed its lease for this long is down.
    pub lease_ttl: Duration,
}

/// How this node calls the others when they require mutual TLS: the management API and the
/// NBD link from a target to the node holding a volume.
#[derive(Clone)]
pub struct PeerTls {
    pub api: thinbd_api::tls::ApiClientTls,
    pub nbd: thinbd_protocol::tls::TlsConnector,
    /// The name their certificates carry, when it is not the address dialled.
    pub server_name: Option<String>,
}

impl PeerTls {
    pub fn load(ca: &Path, cert: &Path, key: &Path, server_name: Option<String>) -> Result<PeerTls, ClusterError> {
        let nbd = thinbd_protocol::tls::client_connector(ca, Some((cert, key)))
            .map_err(|e| ClusterError::PeerTls(e.to_string()))?;
        let api = thinbd_api::tls::ApiClientTls {
            ca: ca.to_path_buf(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            server_name: server_name.clone(),
        };
        Ok(PeerTls { api, nbd, server_name })
    }

    /// The TLS a link to the NBD listener at `address` (`HOST:PORT`) uses.
    pub fn nbd_for(
        &self,
        address: &str,
    ) -> Result<(thinbd_protocol::tls::TlsConnector, thinbd_protocol::tls::ServerName<'static>), ClusterError> {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = thinbd_protocol::tls::ServerName::try_from(name.to_string())
            .map_err(|e| ClusterError::PeerTls(format!("server name {name:?}: {e}")))?;
        Ok((self.nbd.clone(), name))
    }
}

/// This node's membership: the etcd client, and the view of all nodes.
pub struct Cluster {
    pub client: Client,
    pub directory: Arc<Directory>,
    pub node: String,
    /// Management API clients of other nodes, by address.
    peers: std::sync::Mutex<std::collections::HashMap<String, Peer>>,
    /// Volumes (by UUID) this process took the target role of, with the epoch it took.
    targets: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Mutual TLS towards the other nodes, when they require it.
    pub peer_tls: Option<PeerTls>,
    /// What the sessions of each replicated volume this node serves as target share (write
    /// order, barriers, joined copies).
    shared: std::sync::Mutex<std::collections::HashMap<String, Arc<crate::io::Shared>>>,
    /// This node's pool: its copies hold the marks rebuilds start from.
    engine: std::sync::OnceLock<Arc<crate::engine::Engine>>,
    /// Most bytes per second a rebuild copies (0: unlimited).
    rebuild_rate: std::sync::atomic::AtomicU64,
    /// The task keeping this node registered; it revokes the lease on shutdown.
    registration: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The daemon's runtime, for long background work started from an NBD session's thread
    /// (a rebuild), which would otherwise share that thread with the sessions placed on it.
    runtime: tokio::runtime::Handle,
}

/// Another node's management API.
pub type Peer = thinbd_api::pb::management_client::ManagementClient<tonic::transport::Channel>;

impl Cluster {
    /// Connects, registers this node (with `record`, re-read on every renewal so free space
    /// stays current) and starts following the other nodes; both end with `shutdown`.
    pub async fn join(
        opts: &EtcdOptions,
        peer_tls: Option<PeerTls>,
        record: impl Fn() -> NodeRecord + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let client = connect(opts).await?;
        let node = record().name;
        let directory = Arc::new(Directory::default());
        tokio::spawn(directory.clone().follow(client.clone(), shutdown.clone()));
        let registration = tokio::spawn(nodes::keep_registered(client.clone(), record, opts.lease_ttl, shutdown));
        let cluster = Arc::new(Cluster {
            client,
            directory,
            node,
            peers: Default::default(),
            targets: Default::default(),
            peer_tls,
            shared: Default::default(),
            engine: Default::default(),
            rebuild_rate: Default::default(),
            registration: std::sync::Mutex::new(Some(registration)),
            runtime: tokio::runtime::Handle::current(),
        });
        Ok(cluster)
    }

    /// After shutdown was signalled: waits (a few seconds at most) until the lease is revoked,
    /// so that the others see this node down at once rather than after its lease.
    pub async fn leave(&self) {
        let task = self.registration.lock().ok().and_then(|mut r| r.take());
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }

    pub fn set_engine(&self, engine: Arc<crate::engine::Engine>) {
        let _ = self.engine.set(engine);
    }

    pub fn engine(&self) -> Option<&Arc<crate::engine::Engine>> {
        self.engine.get()
    }

    /// Runs `work` on the daemon's runtime, wherever it is started from.
    pub fn spawn_background(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        drop(self.runtime.spawn(work));
    }

    pub fn set_rebuild_rate(&self, bytes_per_second: u64) {
        self.rebuild_rate.store(bytes_per_second, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn rebuild_rate(&self) -> u64 {
        self.rebuild_rate.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The replicated volumes this node serves as target now (their UUIDs).
    pub fn served(&self) -> Vec<String> {
        let Ok(all) = self.shared.lock() else { return Vec::new() };
        // The map holds one reference; sessions (and work on their behalf) hold the others.
        all.iter().filter(|(_, s)| Arc::strong_count(s) > 1).map(|(u, _)| u.clone()).collect()
    }

    /// What volume `uuid`'s sessions on this node share (made when first asked, kept for the
    /// life of the process: its write log must see every write of the target's epoch, also
    /// between sessions).
    pub fn shared(&self, uuid: &str) -> Arc<crate::io::Shared> {
        let Ok(mut all) = self.shared.lock() else { return Default::default() };
        all.entry(uuid.to_string()).or_default().clone()
    }

    /// The management API of node `name`, which must be up.
    pub fn peer(&self, name: &str) -> Result<Peer, ClusterError> {
        let node = self.directory.get(name).filter(|n| n.up).ok_or_else(|| ClusterError::NodeDown(name.to_string()))?;
        let address = node.record.api_address;
        let mut peers = self.peers.lock().map_err(|_| ClusterError::Poisoned)?;
        if let Some(p) = peers.get(&address) {
            return Ok(p.clone());
        }
        let endpoint = thinbd_api::tls::api_endpoint(&address, self.peer_tls.as_ref().map(|t| &t.api))
            .map_err(|e| ClusterError::Peer { node: name.to_string(), reason: e.to_string() })?
            .connect_timeout(Duration::from_secs(5));
        let p = Peer::new(endpoint.connect_lazy());
        peers.insert(address, p.clone());
        Ok(p)
    }

    /// `thinbd_cluster_node_up{node}` per known node, and the rebuilds this node is the target of.
    pub fn encode_metrics(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let help = "Whether a cluster node's lease is live (1) or it is down (0).";
        let mut f = Family::start(enc, "thinbd_cluster_node_up", help, MetricType::Gauge)?;
        for n in self.directory.list() {
            f.gauge(&[("node", &n.record.name)], u64::from(n.up))?;
        }
        let live: Vec<(String, Arc<crate::io::Shared>)> = match self.shared.lock() {
            Ok(all) => all.iter().map(|(u, s)| (u.clone(), s.clone())).collect(),
            Err(_) => Vec::new(),
        };
        let rebuilds: Vec<(String, crate::io::Rebuild)> =
            live.iter().flat_map(|(uuid, shared)| shared.rebuilding().into_iter().map(|r| (uuid.clone(), r))).collect();
        let help = "Bytes gone through by a copy's rebuild on this target, of thinbd_rebuild_total_bytes.";
        let mut f = Family::start(enc, "thinbd_rebuild_done_bytes", help, MetricType::Gauge)?;
        for (uuid, r) in &rebuilds {
            f.gauge(&[("volume_uuid", uuid), ("node", &r.node)], r.done)?;
        }
        let help = "Size of a volume whose copy this target is rebuilding.";
        let mut f = Family::start(enc, "thinbd_rebuild_total_bytes", help, MetricType::Gauge)?;
        for (uuid, r) in &rebuilds {
            f.gauge(&[("volume_uuid", uuid), ("node", &r.node)], r.total)?;
        }
        Ok(())
    }
}

async fn connect(opts: &EtcdOptions) -> Result<Client, ClusterError> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| ClusterError::Tls { path: p.clone(), source: e });
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
    if let Some(ca) = &opts.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&opts.cert, &opts.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    let connecting = Client::connect(&opts.endpoints, Some(options));
    let mut client = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| ClusterError::Timeout("connecting"))??;
    // Fail at start, not later, when etcd is not there.
    tokio::time::timeout(Duration::from_secs(10), client.status())
        .await
        .map_err(|_| ClusterError::Timeout("asking etcd's status"))??;
    Ok(client)
}
