//! Attachment grants: which node may attach which volume, read-write or read-only. The CSI
//! controller creates one per ControllerPublishVolume; the node then asks the NBD server for the
//! grant's export name `VOLUME#TOKEN`, which only holders of the grant know. Revoking a grant
//! ends the sessions opened through it. Single-writer grants keep every other node read-only.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, now_unix};
use crate::error::EngineError;
use crate::layers::layer::poisoned;
use crate::meta::store::{GrantRecord, MetaOp, grant_key};

pub struct Grant {
    pub record: GrantRecord,
    /// Cancelled when the grant is revoked: sessions opened through it are fenced.
    pub revoked: CancellationToken,
    /// Open handles (sessions) through this grant. Checked and counted under the channel's
    /// lock, so an open racing a revocation either is counted before it or refused.
    handles: watch::Sender<usize>,
}

/// One open handle through a grant; dropped with the handle, when no request of its session
/// can touch the volume any more.
pub struct GrantSession {
    grant: Arc<Grant>,
}

impl Drop for GrantSession {
    fn drop(&mut self) {
        self.grant.handles.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// How long a revocation waits for the fenced sessions' started requests.
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);

impl Grant {
    pub fn new(record: GrantRecord) -> Grant {
        Grant { record, revoked: CancellationToken::new(), handles: watch::Sender::new(0) }
    }

    pub fn export_name(&self) -> String {
        format!("{}#{}", self.record.volume, self.record.token)
    }

    /// Counts a new handle, unless the grant is revoked.
    pub fn enter(self: &Arc<Self>) -> Option<GrantSession> {
        let admitted = self.handles.send_if_modified(|n| {
            if self.revoked.is_cancelled() {
                return false;
            }
            *n += 1;
            true
        });
        admitted.then(|| GrantSession { grant: self.clone() })
    }

    /// Revokes and waits until every handle opened through the grant is gone.
    async fn fence(&self) -> Result<(), EngineError> {
        self.handles.send_modify(|_| self.revoked.cancel());
        let mut rx = self.handles.subscribe();
        match tokio::time::timeout(FENCE_TIMEOUT, rx.wait_for(|n| *n == 0)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(EngineError::Unavailable(format!(
                "sessions of node {:?} on volume {:?} are still finishing requests; retry",
                self.record.node, self.record.volume
            ))),
        }
    }
}

/// What a publish asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub read_only: bool,
    /// The volume may have only this one writable attachment (CSI single-node/single-writer
    /// modes); ignored for read-only grants.
    pub single_writer: bool,
}

fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Engine {
    /// Grants `node` access to `volume`. Idempotent: the same request returns the same grant; a
    /// different access mode for the same node, or a writer that would join a single-writer
    /// attachment on another node, is refused.
    pub async fn publish(
        self: &Arc<Self>,
        volume: &str,
        node: &str,
        access: Access,
    ) -> Result<Arc<Grant>, EngineError> {
        if node.is_empty() || node.len() > 256 || node.chars().any(char::is_control) {
            return Err(EngineError::Invalid(format!("invalid node id {node:?}")));
        }
        let _admin = self.admin.lock().await;
        self.volume(volume)?;
        let key = grant_key(volume, node);
        let grants: Vec<Arc<Grant>> = self.grants_of(volume);
        if let Some(g) = grants.iter().find(|g| g.record.node == node) {
            let r = &g.record;
            if r.read_only == access.read_only && (access.read_only || r.single_writer == access.single_writer) {
                return Ok(g.clone());
            }
            return Err(EngineError::AlreadyExists(format!(
                "volume {volume:?} is already published to node {node:?} with other access ({})",
                if r.read_only { "read-only" } else { "read-write" }
            )));
        }
        if !access.read_only {
            let writers: Vec<&Arc<Grant>> = grants.iter().filter(|g| !g.record.read_only).collect();
            if let Some(w) = writers.iter().find(|w| access.single_writer || w.record.single_writer) {
                return Err(EngineError::SingleWriter { volume: volume.to_string(), node: w.record.node.clone() });
            }
        }
        let record = GrantRecord {
            volume: volume.to_string(),
            node: node.to_string(),
            token: new_token(),
            read_only: access.read_only,
            single_writer: access.single_writer && !access.read_only,
            created_unix: now_unix(),
        };
        self.commit(vec![MetaOp::PutGrant(record.clone())], true).await?;
        let grant = Arc::new(Grant::new(record));
        self.grants.write().map_err(|_| poisoned())?.insert(key, grant.clone());
        tracing::info!(volume, node, read_only = access.read_only, "volume published");
        Ok(grant)
    }

    /// Revokes `node`'s grant on `volume` and fences its sessions: when this returns, nothing
    /// they sent can still reach the volume (payloads half-read are dropped, requests not yet
    /// started never start, started ones have finished). Unknown grants are not an error (the
    /// CSI call is idempotent); a revocation whose fence timed out is waited for again.
    pub async fn unpublish(self: &Arc<Self>, volume: &str, node: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        let key = grant_key(volume, node);
        let live = self.grants.read().map_err(|_| poisoned())?.get(&key).cloned();
        let grant = match live {
            Some(grant) => {
                self.commit(vec![MetaOp::DeleteGrant(key.clone())], true).await?;
                self.grants.write().map_err(|_| poisoned())?.remove(&key);
                self.revoking.lock().map_err(|_| poisoned())?.insert(key.clone(), grant.clone());
                grant
            }
            None => match self.revoking.lock().map_err(|_| poisoned())?.get(&key).cloned() {
                Some(grant) => grant,
                None => return Ok(()),
            },
        };
        grant.fence().await?;
        self.revoking.lock().map_err(|_| poisoned())?.remove(&key);
        tracing::info!(volume, node, "volume unpublished");
        Ok(())
    }

    pub fn grants_of(&self, volume: &str) -> Vec<Arc<Grant>> {
        match self.grants.read() {
            Ok(g) => g.values().filter(|g| g.record.volume == volume).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn published_nodes(&self, volume: &str) -> Vec<String> {
        self.grants_of(volume).iter().map(|g| g.record.node.clone()).collect()
    }

    /// The grant of `volume` whose secret is `token` (export name `VOLUME#TOKEN`).
    pub fn grant_for(&self, volume: &str, token: &str) -> Option<Arc<Grant>> {
        let g = self.grants.read().ok()?;
        g.values()
            .find(|g| g.record.volume == volume && constant_time_eq(g.record.token.as_bytes(), token.as_bytes()))
            .cloned()
    }
}

/// Token comparison that does not stop at the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
