//! Nodes: each registers its record and keeps an `alive` key under a lease it renews; a node
//! whose lease ran out (killed, paused, cut off) is down. Every node keeps a view of all nodes,
//! filled once and then kept current by a watch (no polling).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::error::ClusterError;
use super::keys;
use super::record::decode;

/// What a node tells the cluster about itself (`/thinbd/v1/nodes/NODE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeRecord {
    pub name: String,
    /// Where NBD clients and other nodes reach its NBD listener.
    pub nbd_address: String,
    /// Where its management API listens.
    pub api_address: String,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    /// Failure domain (`--zone`); empty if not given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A node as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub record: NodeRecord,
    /// Its lease is live.
    pub up: bool,
}

/// The nodes of the cluster, kept current by a watch.
pub struct Directory {
    records: RwLock<BTreeMap<String, NodeRecord>>,
    alive: RwLock<BTreeSet<String>>,
    /// The name of every node that registers (starts, or comes back after its lease ran out).
    registered: tokio::sync::broadcast::Sender<String>,
}

impl Default for Directory {
    fn default() -> Directory {
        Directory {
            records: Default::default(),
            alive: Default::default(),
            registered: tokio::sync::broadcast::Sender::new(64),
        }
    }
}

impl Directory {
    /// Nodes as they register, from now on.
    pub fn registrations(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.registered.subscribe()
    }

    pub fn list(&self) -> Vec<NodeView> {
        let alive = self.alive.read().map(|a| a.clone()).unwrap_or_default();
        let records = self.records.read().map(|r| r.clone()).unwrap_or_default();
        records.into_values().map(|record| NodeView { up: alive.contains(&record.name), record }).collect()
    }

    pub fn get(&self, name: &str) -> Option<NodeView> {
        let record = self.records.read().ok()?.get(name)?.clone();
        let up = self.alive.read().ok()?.contains(name);
        Some(NodeView { record, up })
    }

    /// Follows the cluster's nodes until `shutdown`: reads them all, then applies every change
    /// from the next revision on; starts over after an error (etcd unreachable, history
    /// compacted).
    pub async fn follow(self: Arc<Self>, client: Client, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.sync_and_watch(client.clone()) => r,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cluster view: reading nodes from etcd failed; retrying");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next()) => {}
            }
        }
    }

    async fn sync_and_watch(&self, mut client: Client) -> Result<(), ClusterError> {
        let nodes = client.get(keys::NODES, Some(GetOptions::new().with_prefix())).await?;
        let revision = nodes.header().map(|h| h.revision()).unwrap_or(0);
        let alive = client.get(keys::ALIVE, Some(GetOptions::new().with_prefix().with_revision(revision))).await?;
        let mut records = BTreeMap::new();
        for kv in nodes.kvs() {
            if let Some(name) = keys::name_under(kv.key(), keys::NODES) {
                records.insert(name.to_string(), decode(kv.key(), kv.value())?);
            }
        }
        let up: BTreeSet<String> =
            alive.kvs().iter().filter_map(|kv| keys::name_under(kv.key(), keys::ALIVE)).map(str::to_string).collect();
        *self.records.write().map_err(|_| ClusterError::Poisoned)? = records;
        *self.alive.write().map_err(|_| ClusterError::Poisoned)? = up;
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = client.watch(keys::ROOT, Some(options)).await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                return Err(ClusterError::WatchCanceled(resp.cancel_reason().to_string()));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let put = ev.event_type() == EventType::Put;
                if let Some(name) = keys::name_under(kv.key(), keys::NODES) {
                    let mut records = self.records.write().map_err(|_| ClusterError::Poisoned)?;
                    match put {
                        true => records.insert(name.to_string(), decode(kv.key(), kv.value())?),
                        false => records.remove(name),
                    };
                } else if let Some(name) = keys::name_under(kv.key(), keys::ALIVE) {
                    let mut alive = self.alive.write().map_err(|_| ClusterError::Poisoned)?;
                    if put {
                        alive.insert(name.to_string());
                        let _ = self.registered.send(name.to_string());
                    } else {
                        alive.remove(name);
                        tracing::warn!(node = name, "node is down (its lease ended)");
                    }
                }
            }
        }
        Err(ClusterError::WatchCanceled("the watch stream ended".into()))
    }
}

/// Keeps this node registered until `shutdown`: its record, and its `alive` key under a lease
/// renewed every third of `ttl`. A lease that ran out (the process was paused longer than
/// `ttl`) or a lost connection starts a new registration. On shutdown the lease is revoked,
/// so the node shows down at once.
pub async fn keep_registered(
    client: Client,
    record: impl Fn() -> NodeRecord + Send + Sync,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        match registration(client.clone(), &record, ttl, &shutdown).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "cluster registration lost; registering again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

async fn registration(
    mut client: Client,
    record: &(impl Fn() -> NodeRecord + Send + Sync),
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<(), ClusterError> {
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let lease = client.lease_grant(ttl_secs, None).await?.id();
    let mut current = record();
    let name = current.name.clone();
    client.put(keys::node(&name), encode(&current)?, None).await?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    client.put(keys::alive(&name), started, Some(PutOptions::new().with_lease(lease))).await?;
    tracing::info!(node = %name, lease, ttl = ttl_secs, "registered in the cluster");
    let (mut keeper, mut replies) = client.lease_keep_alive(lease).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(ttl_secs as u64 * 1000 / 3));
    loop {
        let renewal = async {
            tick.tick().await;
            keeper.keep_alive().await?;
            match tokio::time::timeout(Duration::from_secs(ttl_secs as u64), replies.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return Err(ClusterError::LeaseExpired),
                Ok(Ok(None)) => return Err(ClusterError::WatchCanceled("the lease stream ended".into())),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(ClusterError::Timeout("renewing the lease")),
            }
            let now = record();
            if now != current {
                client.put(keys::node(&name), encode(&now)?, None).await?;
                current = now;
            }
            Ok::<(), ClusterError>(())
        };
        // A stop is seen whatever the renewal is waiting for.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = renewal => r?,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.clone().lease_revoke(lease)).await;
    Ok(())
}

fn encode(r: &NodeRecord) -> Result<Vec<u8>, ClusterError> {
    super::record::encode(&keys::node(&r.name), r)
}

/// 100 ms doubling to 5 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        self.0 = (self.0 + 1).min(6);
        Duration::from_millis((100u64 << self.0).min(5000))
    }
}
