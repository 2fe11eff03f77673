//! Targets: the node a volume is attached on serves it (forwarding to the node holding the
//! data). Taking that role is a compare-and-swap on `/thinbd/v1/targets/UUID` that bumps the
//! volume's epoch, so two nodes can never both believe they took the same epoch.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use super::record::{decode, encode};
use super::{Cluster, keys};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub node: String,
    /// Bumped by every take-over (a restart of the same target included).
    pub epoch: u64,
}

/// Where a writer's sessions are served: see [`Cluster::join_target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// This node is the target, at this epoch.
    Here(u64),
    /// Another node is.
    At(String),
}

impl Cluster {
    /// Makes this node the target of volume `uuid` and returns its epoch. The epoch belongs to
    /// this process's tenure: more connections (multi-conn, a reconnect) while this node still
    /// holds the role keep it; a restart, or taking the role back from another node, bumps it.
    pub async fn take_target(&self, uuid: &str) -> Result<u64, ClusterError> {
        let key = keys::target(uuid);
        let mut client = self.client.clone();
        let held = self.targets.lock().map_err(|_| ClusterError::Poisoned)?.get(uuid).copied();
        loop {
            let resp = client.get(key.clone(), None).await?;
            let (current, revision) = match resp.kvs().first() {
                Some(kv) => (Some(decode::<Target>(kv.key(), kv.value())?), kv.mod_revision()),
                None => (None, 0),
            };
            if let (Some(epoch), Some(c)) = (held, &current)
                && c.node == self.node
                && c.epoch == epoch
            {
                return Ok(epoch);
            }
            let next = Target { node: self.node.clone(), epoch: current.map_or(0, |t| t.epoch) + 1 };
            let unchanged = match revision {
                0 => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                r => Compare::mod_revision(key.clone(), CompareOp::Equal, r),
            };
            let value = encode(&key, &next)?;
            let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(key.clone(), value, None)]);
            if client.txn(txn).await?.succeeded() {
                self.targets.lock().map_err(|_| ClusterError::Poisoned)?.insert(uuid.to_string(), next.epoch);
                return Ok(next.epoch);
            }
            // Another node took it in between: read again and bump past it.
        }
    }

    /// For one more writer of a volume that several may write (multi-writer grants of a
    /// replicated volume): the live target's node when another node up holds the role (its
    /// sessions go there, so that one node orders every write), else this node takes it (see
    /// [`Self::take_target`]; two nodes taking it at once end with the newer epoch, and the
    /// copies refuse the older one's links).
    pub async fn join_target(&self, uuid: &str) -> Result<Joined, ClusterError> {
        let held = self.targets.lock().map_err(|_| ClusterError::Poisoned)?.get(uuid).copied();
        match self.target(uuid).await? {
            Some(t) if t.node == self.node && Some(t.epoch) == held => Ok(Joined::Here(t.epoch)),
            Some(t) if t.node != self.node && self.directory.get(&t.node).is_some_and(|n| n.up) => {
                Ok(Joined::At(t.node))
            }
            _ => Ok(Joined::Here(self.take_target(uuid).await?)),
        }
    }

    /// The volume's current target, if it ever had one.
    pub async fn target(&self, uuid: &str) -> Result<Option<Target>, ClusterError> {
        let resp = self.client.clone().get(keys::target(uuid), None).await?;
        resp.kvs().first().map(|kv| decode(kv.key(), kv.value())).transpose()
    }
}
