//! The in-sync set of a replicated volume: the replicas that hold every acknowledged write.
//! Kept in `/thinbd/v1/isr/UUID` with the epoch of the target that last changed it; a target
//! removes a member that failed a write by compare-and-swap before acknowledging the write, and
//! a target of an older epoch cannot change it. A new target uses only its members as sources.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use super::record::{decode, encode};
use super::{Cluster, keys};
use crate::error::EngineError;
use crate::io::InSyncSet;

/// `/thinbd/v1/isr/UUID`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InSync {
    pub members: Vec<String>,
    /// The epoch of the target that last changed the set (0: as created).
    pub epoch: u64,
    /// Copies out of the set that a target is rebuilding, with how far it got: each takes the
    /// live writes and rejoins the set when filled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rebuilding: Vec<Rebuilding>,
    /// Copies that left the set with a mark on the in-sync copies: their rebuild copies what
    /// changed since the mark plus `ranges` (the writes they may lack that it does not cover).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub departed: Vec<Departed>,
    /// Where the target may have writes in flight (its activity record): the next target
    /// makes the copies equal there before serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<Active>,
    /// Members whose node stopped uncleanly since they were last made equal to another copy:
    /// they may lack writes that were unflushed then (all within the activity record), so a new
    /// target reconciles from another member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspect: Vec<String>,
}

/// A target's activity record ([`crate::io::activity`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Active {
    /// The target epoch that wrote it.
    pub epoch: u64,
    /// Byte ranges, aligned to [`crate::io::activity::REGION`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<(u64, u64)>,
    /// Too many ranges to list: anywhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub everywhere: bool,
}

/// Most ranges an activity record lists (a few hundred KiB of JSON in etcd).
const ACTIVE_MAX: usize = 8192;

/// Where a copy left the in-sync set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departed {
    pub node: String,
    /// The in-sync copies that took the mark when it left (see [`super::marks`]).
    #[serde(default)]
    pub marked: Vec<String>,
    /// The mark's name (a hidden snapshot `.MARK` of those copies).
    pub mark: String,
    /// Byte ranges written before the mark that the copy may lack (unflushed when it left, or
    /// written until the mark was taken).
    pub ranges: Vec<(u64, u64)>,
}

/// A copy being rebuilt, as last recorded (every few hundred MiB).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebuilding {
    pub node: String,
    /// Bytes of the volume's address space gone through.
    pub done: u64,
    pub total: u64,
    /// The epoch of the target that recorded it: a later rebuild resumes only under that
    /// target or the next (whose write log covers what the copy missed since).
    #[serde(default)]
    pub epoch: u64,
}

/// A replica's state, as `volume show` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// In the in-sync set: holds every acknowledged write.
    UpToDate,
    /// Taking live writes while a rebuild fills it; serves no reads.
    Rebuilding,
    /// Out of the set: missing writes until a rebuild.
    Outdated,
}

impl InSync {
    pub fn state_of(&self, node: &str) -> ReplicaState {
        if self.members.iter().any(|m| m == node) {
            ReplicaState::UpToDate
        } else if self.rebuilding.iter().any(|r| r.node == node) {
            ReplicaState::Rebuilding
        } else {
            ReplicaState::Outdated
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaState::UpToDate => "UpToDate",
            ReplicaState::Rebuilding => "Rebuilding",
            ReplicaState::Outdated => "Outdated",
        })
    }
}

/// What changing the set came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Shrunk {
    Done,
    /// A target of a newer epoch changed the set: this one is stale.
    Stale {
        newer: u64,
    },
    /// The copy is the last one in the set: a set is never emptied (the write that failed on
    /// it is not acknowledged instead).
    Last,
}

impl Shrunk {
    /// For a target of `epoch` of `volume` that changed the set: fenced when a newer target
    /// changed it first.
    pub fn fenced(self, volume: &str, epoch: u64) -> Result<(), EngineError> {
        match self {
            Shrunk::Done | Shrunk::Last => Ok(()),
            Shrunk::Stale { newer } => {
                Err(EngineError::StaleEpoch { volume: volume.to_string(), epoch, promised: newer })
            }
        }
    }
}

impl Cluster {
    pub async fn in_sync(&self, uuid: &str) -> Result<Option<InSync>, ClusterError> {
        let resp = self.client.clone().get(keys::isr(uuid), None).await?;
        resp.kvs().first().map(|kv| decode(kv.key(), kv.value())).transpose()
    }

    /// Removes `node` from volume `uuid`'s in-sync set, as its target of `epoch`.
    pub async fn shrink_in_sync(&self, uuid: &str, node: &str, epoch: u64) -> Result<Shrunk, ClusterError> {
        let changed = self.change_in_sync(uuid, epoch, |set| {
            if set.members.iter().all(|x| x == node) && !set.members.is_empty() {
                return Err(Shrunk::Last);
            }
            let before = set.members.len();
            set.members.retain(|x| x != node);
            Ok(set.members.len() != before)
        });
        let r = changed.await?;
        if r == Shrunk::Done {
            tracing::warn!(volume = %uuid, node, epoch, "replica left the in-sync set");
        }
        Ok(r)
    }

    /// Adds a rebuilt copy to volume `uuid`'s in-sync set, as its target of `epoch`.
    pub async fn grow_in_sync(&self, uuid: &str, node: &str, epoch: u64) -> Result<Shrunk, ClusterError> {
        let changed = self.change_in_sync(uuid, epoch, |set| {
            set.rebuilding.retain(|r| r.node != node);
            set.departed.retain(|d| d.node != node);
            if !set.members.iter().any(|x| x == node) {
                set.members.push(node.to_string());
            }
            Ok(true)
        });
        let r = changed.await?;
        if r == Shrunk::Done {
            tracing::info!(volume = %uuid, node, epoch, "replica rejoined the in-sync set");
        }
        Ok(r)
    }

    /// Records how far the rebuild of `node`'s copy got (`None`: it stopped), as the target
    /// of `epoch`.
    pub async fn note_rebuild(
        &self,
        uuid: &str,
        epoch: u64,
        node: &str,
        progress: Option<(u64, u64)>,
    ) -> Result<Shrunk, ClusterError> {
        self.change_in_sync(uuid, epoch, |set| {
            set.rebuilding.retain(|r| r.node != node);
            if let Some((done, total)) = progress {
                set.rebuilding.push(Rebuilding { node: node.to_string(), done, total, epoch });
            }
            Ok(true)
        })
        .await
    }

    /// Records (`Some`) or forgets (`None`) where `node`'s copy left the set, as the target of
    /// `epoch`.
    pub async fn note_departure(
        &self,
        uuid: &str,
        epoch: u64,
        node: &str,
        departed: Option<Departed>,
    ) -> Result<Shrunk, ClusterError> {
        self.change_in_sync(uuid, epoch, |set| {
            set.departed.retain(|d| d.node != node);
            set.departed.extend(departed.clone());
            Ok(true)
        })
        .await
    }

    /// Replaces the activity record of volume `uuid` with `ranges`, as its target of `epoch`;
    /// `equal`: members just made equal to a copy that is not suspect (no longer suspect).
    pub async fn record_activity(
        &self,
        uuid: &str,
        epoch: u64,
        ranges: &[(u64, u64)],
        equal: &[String],
    ) -> Result<Shrunk, ClusterError> {
        self.change_in_sync(uuid, epoch, |set| {
            let everywhere = ranges.len() > ACTIVE_MAX;
            let ranges = if everywhere { Vec::new() } else { ranges.to_vec() };
            set.active = Some(Active { epoch, ranges, everywhere });
            set.suspect.retain(|n| !equal.contains(n));
            Ok(true)
        })
        .await
    }

    /// This node stopped uncleanly: where it is a member of volume `uuid`'s in-sync set, its
    /// copy becomes suspect (not fenced by epochs: it changes no membership).
    pub async fn note_suspect(&self, uuid: &str) -> Result<bool, ClusterError> {
        let key = keys::isr(uuid);
        let mut client = self.client.clone();
        loop {
            let resp = client.get(key.clone(), None).await?;
            let Some(kv) = resp.kvs().first() else { return Ok(false) };
            let mut set: InSync = decode(kv.key(), kv.value())?;
            if !set.members.contains(&self.node) || set.suspect.contains(&self.node) {
                return Ok(false);
            }
            set.suspect.push(self.node.clone());
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())])
                .and_then([TxnOp::put(key.clone(), encode(&key, &set)?, None)]);
            if client.txn(txn).await?.succeeded() {
                return Ok(true);
            }
        }
    }

    /// Changes volume `uuid`'s in-sync set by compare-and-swap as its target of `epoch`
    /// (`change` says whether it changed it, or refuses); refused when a newer target changed
    /// the set.
    async fn change_in_sync(
        &self,
        uuid: &str,
        epoch: u64,
        change: impl Fn(&mut InSync) -> Result<bool, Shrunk>,
    ) -> Result<Shrunk, ClusterError> {
        let (key, target_key) = (keys::isr(uuid), keys::target(uuid));
        let mut client = self.client.clone();
        loop {
            // The set and the volume's target, read at one revision: a target that another one
            // took over from is fenced here even before the newer one changed the set.
            let read = Txn::new().and_then([TxnOp::get(key.clone(), None), TxnOp::get(target_key.clone(), None)]);
            let read = client.txn(read).await?.op_responses();
            let got = |i: usize| match read.get(i) {
                Some(etcd_client::TxnOpResponse::Get(g)) => g.kvs().first().cloned(),
                _ => None,
            };
            let Some(kv) = got(0) else { return Ok(Shrunk::Done) };
            let mut set: InSync = decode(kv.key(), kv.value())?;
            let (target, target_revision) = match got(1) {
                Some(t) => (decode::<super::targets::Target>(t.key(), t.value())?.epoch, t.mod_revision()),
                None => (0, 0),
            };
            if set.epoch.max(target) > epoch {
                return Ok(Shrunk::Stale { newer: set.epoch.max(target) });
            }
            match change(&mut set) {
                Ok(true) => {}
                Ok(false) => return Ok(Shrunk::Done),
                Err(refused) => return Ok(refused),
            }
            set.epoch = epoch;
            let target_unchanged = match target_revision {
                0 => Compare::create_revision(target_key.clone(), CompareOp::Equal, 0),
                r => Compare::mod_revision(target_key.clone(), CompareOp::Equal, r),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()), target_unchanged])
                .and_then([TxnOp::put(key.clone(), encode(&key, &set)?, None)]);
            if client.txn(txn).await?.succeeded() {
                return Ok(Shrunk::Done);
            }
        }
    }
}

impl Cluster {
    /// Sets volume `uuid`'s in-sync set to `members` (a volume that becomes replicated, or
    /// copies removed), keeping its epoch and what it records of the other copies; `removed`
    /// (a copy deleted) is forgotten. Returns where `removed` had left, if it had: its mark is
    /// the caller's to delete.
    pub async fn set_in_sync(
        &self,
        uuid: &str,
        members: Vec<String>,
        removed: Option<&str>,
    ) -> Result<Option<Departed>, ClusterError> {
        let key = keys::isr(uuid);
        let mut client = self.client.clone();
        loop {
            let resp = client.get(key.clone(), None).await?;
            let (before, unchanged) = match resp.kvs().first() {
                Some(kv) => (
                    decode::<InSync>(kv.key(), kv.value())?,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (InSync::default(), Compare::create_revision(key.clone(), CompareOp::Equal, 0)),
            };
            let gone = |node: &str| removed == Some(node);
            let left = before.departed.iter().find(|d| gone(&d.node)).cloned();
            let set = InSync {
                members: members.clone(),
                epoch: before.epoch,
                rebuilding: before.rebuilding.into_iter().filter(|r| !gone(&r.node)).collect(),
                departed: before.departed.into_iter().filter(|d| !gone(&d.node)).collect(),
                active: before.active,
                suspect: before.suspect.into_iter().filter(|n| !gone(n)).collect(),
            };
            let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(key.clone(), encode(&key, &set)?, None)]);
            if client.txn(txn).await?.succeeded() {
                return Ok(left);
            }
        }
    }

    /// Makes `node` the only in-sync copy of volume `uuid` (force-promote); returns the members
    /// it replaced and the departures it forgot (their marks are the caller's to delete). The
    /// set's epoch becomes the volume's current target epoch, so no older
    /// target can change it afterwards.
    pub async fn force_in_sync(&self, uuid: &str, node: &str) -> Result<(Vec<String>, Vec<Departed>), ClusterError> {
        let key = keys::isr(uuid);
        let epoch = self.target(uuid).await?.map_or(0, |t| t.epoch);
        let mut client = self.client.clone();
        loop {
            let resp = client.get(key.clone(), None).await?;
            let (before, revision, old_epoch, active, departed) = match resp.kvs().first() {
                Some(kv) => {
                    let set: InSync = decode(kv.key(), kv.value())?;
                    (set.members, kv.mod_revision(), set.epoch, set.active, set.departed)
                }
                None => (Vec::new(), 0, 0, None, Vec::new()),
            };
            // The activity record stays: the next target reconciles the copies it lists.
            let set =
                InSync { members: vec![node.to_string()], epoch: epoch.max(old_epoch), active, ..Default::default() };
            let unchanged = match revision {
                0 => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                r => Compare::mod_revision(key.clone(), CompareOp::Equal, r),
            };
            let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(key.clone(), encode(&key, &set)?, None)]);
            if client.txn(txn).await?.succeeded() {
                return Ok((before, departed));
            }
        }
    }
}

/// The in-sync set as a target of one epoch changes it.
pub struct TargetInSync {
    pub cluster: Arc<Cluster>,
    pub uuid: String,
    pub volume: String,
    pub epoch: u64,
    /// Called with a copy's node once it left the set (a single writer's target starts
    /// rebuilding it: it comes back when its node or the network does).
    pub after_evict: Option<Box<dyn Fn(String) + Send + Sync>>,
}

/// How long a write waits for etcd to record an eviction before it fails (unacknowledged).
const EVICT_PATIENCE: Duration = Duration::from_secs(60);

impl InSyncSet for TargetInSync {
    /// Waits while etcd cannot be reached: a write is never acknowledged while a member that
    /// lacks it is still listed.
    fn evict<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send + 'a>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + EVICT_PATIENCE;
            let mut pause = Duration::from_millis(100);
            loop {
                match self.cluster.shrink_in_sync(&self.uuid, node, self.epoch).await {
                    Ok(Shrunk::Done) => {
                        if let Some(f) = &self.after_evict {
                            f(node.to_string());
                        }
                        return Ok(());
                    }
                    Ok(Shrunk::Last) => {
                        return Err(EngineError::Unavailable(format!(
                            "{node} holds the only in-sync copy of {} and failed: the write is not acknowledged",
                            self.volume
                        )));
                    }
                    Ok(Shrunk::Stale { newer }) => {
                        return Err(EngineError::StaleEpoch {
                            volume: self.volume.clone(),
                            epoch: self.epoch,
                            promised: newer,
                        });
                    }
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::warn!(error = %e, node, "cannot record a replica's eviction yet; the write waits");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        return Err(EngineError::Unavailable(format!(
                            "cannot record that {node} left the in-sync set: {e}"
                        )));
                    }
                }
            }
        })
    }
}
