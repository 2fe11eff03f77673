//! Publishing: the nodes that may be published to, and attachment grants given and revoked
//! through the engine (commit, then the table).

use std::sync::Arc;

use crate::engine::{Engine, now_unix};
use crate::epochs::EpochSession;
use crate::error::EngineError;
use crate::grants::{Access, Grant, Grants};
use crate::meta::store::{MetaOp, NodeRegistration, grant_key};

/// Node names are CSI node ids and NBD grant holders: printable, at most 256 bytes.
fn check_node_name(node: &str) -> Result<(), EngineError> {
    if node.is_empty() || node.len() > 256 || node.chars().any(char::is_control) {
        return Err(EngineError::Invalid(format!("invalid node id {node:?}")));
    }
    Ok(())
}

impl Engine {
    /// Records that `node` exists (the CSI node plugin calls it through the API when kubelet
    /// asks for its node info). Idempotent.
    pub async fn register_node(self: &Arc<Self>, node: &str) -> Result<NodeRegistration, EngineError> {
        check_node_name(node)?;
        let _admin = self.admin.lock().await;
        if let Some(known) = self.registered_nodes().into_iter().find(|n| n.name == node) {
            return Ok(known);
        }
        let rec = NodeRegistration { name: node.to_string(), registered_unix: now_unix() };
        self.space.commit(vec![MetaOp::PutNode(rec.clone())], true).await?;
        self.nodes.write().map_err(|_| crate::error::poisoned())?.insert(node.to_string(), rec.clone());
        tracing::info!(node, "node registered");
        Ok(rec)
    }

    pub fn registered_nodes(&self) -> Vec<NodeRegistration> {
        self.nodes.read().map(|n| n.values().cloned().collect()).unwrap_or_default()
    }

    /// Grants `node` access to `volume`. Idempotent: the same request returns the same grant; a
    /// different access mode for the same node, or a writer that would join a single-writer
    /// attachment on another node, is refused.
    ///
    /// `token`: the grant's secret when another node made it (a replicated volume's grant is
    /// the same on every copy); `None`: a fresh one.
    pub async fn publish(
        self: &Arc<Self>,
        volume: &str,
        node: &str,
        access: Access,
        token: Option<String>,
    ) -> Result<Arc<Grant>, EngineError> {
        check_node_name(node)?;
        let _admin = self.admin.lock().await;
        self.volume(volume)?;
        if let Some(existing) = self.grants.check(volume, node, access)? {
            if token.as_ref().is_some_and(|t| *t != existing.record.token) {
                return Err(EngineError::AlreadyExists(format!(
                    "volume {volume:?} is already published to node {node:?} by another grant; unpublish it first"
                )));
            }
            return Ok(existing);
        }
        let mut record = Grants::record(volume, node, access, now_unix());
        if let Some(token) = token {
            record.token = token;
        }
        self.space.commit(vec![MetaOp::PutGrant(record.clone())], true).await?;
        let grant = Arc::new(Grant::new(record));
        self.grants.insert(grant.clone())?;
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
        let grant = match self.grants.live(&key) {
            Some(grant) => {
                self.space.commit(vec![MetaOp::DeleteGrant(key.clone())], true).await?;
                self.grants.start_revoking(&key)?;
                grant
            }
            None => match self.grants.revoking(&key) {
                Some(grant) => grant,
                None => return Ok(()),
            },
        };
        self.grants.fence(&key, &grant).await?;
        tracing::info!(volume, node, "volume unpublished");
        Ok(())
    }

    pub fn grants_of(&self, volume: &str) -> Vec<Arc<Grant>> {
        self.grants.of(volume)
    }

    pub fn published_nodes(&self, volume: &str) -> Vec<String> {
        self.grants.of(volume).iter().map(|g| g.record.node.clone()).collect()
    }

    /// Admits a target's session at `epoch` (see `crate::epochs`): an epoch newer than the
    /// promised one is committed first and fences the older sessions; an older one is refused.
    pub async fn enter_epoch(self: &Arc<Self>, volume: &str, epoch: u64) -> Result<EpochSession, EngineError> {
        let vol = self.volume(volume)?;
        if epoch > vol.epoch() {
            let _admin = self.admin.lock().await;
            if epoch > vol.epoch() {
                let mut record = vol.record()?;
                record.epoch = epoch;
                self.space.commit(vec![MetaOp::PutVolume(record)], true).await?;
                vol.set_epoch(epoch);
                self.epochs.promote(&vol.uuid, epoch)?;
                tracing::info!(volume, epoch, "new target epoch promised; older targets are fenced");
            }
        }
        let promised = vol.epoch();
        if epoch < promised {
            return Err(EngineError::StaleEpoch { volume: volume.to_string(), epoch, promised });
        }
        self.epochs.enter(&vol.uuid, volume, epoch).await
    }

    /// The grant of `volume` whose secret is `token` (export name `VOLUME#TOKEN`).
    pub fn grant_for(&self, volume: &str, token: &str) -> Option<Arc<Grant>> {
        self.grants.find(volume, token)
    }
}
