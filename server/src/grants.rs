//! Attachment grants: which node may attach which volume, read-write or read-only. The CSI
//! controller creates one per ControllerPublishVolume; the node then asks the NBD server for the
//! grant's export name `VOLUME#TOKEN`, which only holders of the grant know. Revoking a grant
//! ends the sessions opened through it. Single-writer grants keep every other node read-only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::EngineError;
use crate::error::poisoned;
use crate::meta::store::GrantRecord;

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

/// The grants of one engine: live ones by `grant_key`, and revoked ones whose sessions are
/// still being fenced (a retried revocation waits for them again).
#[derive(Default)]
pub struct Grants {
    live: RwLock<BTreeMap<String, Arc<Grant>>>,
    revoking: Mutex<BTreeMap<String, Arc<Grant>>>,
}

impl Grants {
    pub fn load(records: Vec<GrantRecord>) -> Grants {
        let live = records.into_iter().map(|g| (g.key(), Arc::new(Grant::new(g)))).collect();
        Grants { live: RwLock::new(live), revoking: Default::default() }
    }

    /// The live grants of `volume`.
    pub fn of(&self, volume: &str) -> Vec<Arc<Grant>> {
        match self.live.read() {
            Ok(g) => g.values().filter(|g| g.record.volume == volume).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn records(&self) -> Vec<GrantRecord> {
        self.live.read().map(|g| g.values().map(|g| g.record.clone()).collect()).unwrap_or_default()
    }

    /// The grant of `volume` whose secret is `token` (export name `VOLUME#TOKEN`).
    pub fn find(&self, volume: &str, token: &str) -> Option<Arc<Grant>> {
        let g = self.live.read().ok()?;
        g.values()
            .find(|g| g.record.volume == volume && constant_time_eq(g.record.token.as_bytes(), token.as_bytes()))
            .cloned()
    }

    /// Whether `node` may get `access` to `volume`: `Ok(Some(grant))` when it already has that
    /// grant (publish is idempotent), `Ok(None)` when a new one may be made; a different access
    /// mode for the same node, or a writer next to a single-writer attachment, is refused.
    pub fn check(&self, volume: &str, node: &str, access: Access) -> Result<Option<Arc<Grant>>, EngineError> {
        let grants = self.of(volume);
        if let Some(g) = grants.iter().find(|g| g.record.node == node) {
            let r = &g.record;
            if r.read_only == access.read_only && (access.read_only || r.single_writer == access.single_writer) {
                return Ok(Some(g.clone()));
            }
            return Err(EngineError::AlreadyExists(format!(
                "volume {volume:?} is already published to node {node:?} with other access ({})",
                if r.read_only { "read-only" } else { "read-write" }
            )));
        }
        if !access.read_only
            && let Some(w) =
                grants.iter().find(|w| !w.record.read_only && (access.single_writer || w.record.single_writer))
        {
            return Err(EngineError::SingleWriter { volume: volume.to_string(), node: w.record.node.clone() });
        }
        Ok(None)
    }

    /// A new grant's record (its token fresh from the system's random source).
    pub fn record(volume: &str, node: &str, access: Access, created_unix: u64) -> GrantRecord {
        GrantRecord {
            volume: volume.to_string(),
            node: node.to_string(),
            token: new_token(),
            read_only: access.read_only,
            single_writer: access.single_writer && !access.read_only,
            created_unix,
        }
    }

    pub fn insert(&self, grant: Arc<Grant>) -> Result<(), EngineError> {
        self.live.write().map_err(|_| poisoned())?.insert(grant.record.key(), grant);
        Ok(())
    }

    pub fn live(&self, key: &str) -> Option<Arc<Grant>> {
        self.live.read().ok()?.get(key).cloned()
    }

    /// The live grant leaves the table for the fencing one (its deletion is committed).
    pub fn start_revoking(&self, key: &str) -> Result<(), EngineError> {
        if let Some(g) = self.live.write().map_err(|_| poisoned())?.remove(key) {
            self.revoking.lock().map_err(|_| poisoned())?.insert(key.to_string(), g);
        }
        Ok(())
    }

    pub fn revoking(&self, key: &str) -> Option<Arc<Grant>> {
        self.revoking.lock().ok()?.get(key).cloned()
    }

    /// Revokes `grant` and waits until its sessions are fenced; then it is forgotten.
    pub async fn fence(&self, key: &str, grant: &Grant) -> Result<(), EngineError> {
        grant.fence().await?;
        self.revoking.lock().map_err(|_| poisoned())?.remove(key);
        Ok(())
    }
}

/// Token comparison that does not stop at the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
