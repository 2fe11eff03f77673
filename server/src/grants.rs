//! Attachment grants: which node may attach which volume, read-write or read-only. The CSI
//! controller creates one per ControllerPublishVolume; the node then asks the NBD server for the
//! grant's export name `VOLUME#TOKEN`, which only holders of the grant know. Revoking a grant
//! ends the sessions opened through it. Single-writer grants keep every other node read-only.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, now_unix};
use crate::error::EngineError;
use crate::layer::poisoned;
use crate::metadata::{GrantRecord, MetaOp, grant_key};

pub struct Grant {
    pub record: GrantRecord,
    /// Cancelled when the grant is revoked: sessions opened through it end.
    pub revoked: CancellationToken,
}

impl Grant {
    pub fn new(record: GrantRecord) -> Grant {
        Grant { record, revoked: CancellationToken::new() }
    }

    pub fn export_name(&self) -> String {
        format!("{}#{}", self.record.volume, self.record.token)
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
                return Err(EngineError::Precondition(format!(
                    "volume {volume:?} is already published read-write to node {:?} for a single writer",
                    w.record.node
                )));
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

    /// Revokes `node`'s grant on `volume` and ends its sessions. Unknown grants are not an error
    /// (the CSI call is idempotent).
    pub async fn unpublish(self: &Arc<Self>, volume: &str, node: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        let key = grant_key(volume, node);
        let Some(grant) = self.grants.read().map_err(|_| poisoned())?.get(&key).cloned() else { return Ok(()) };
        self.commit(vec![MetaOp::DeleteGrant(key.clone())], true).await?;
        self.grants.write().map_err(|_| poisoned())?.remove(&key);
        grant.revoked.cancel();
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

    /// The grant an export name `VOLUME#TOKEN` stands for.
    pub fn grant_for_export(&self, name: &str) -> Option<Arc<Grant>> {
        let (volume, token) = name.split_once('#')?;
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
