//! Volumes in the cluster: a spec per volume under its UUID, and its name as a unique label
//! pointing at the UUID, written together in one compare-and-swap transaction. The spec says
//! which node holds the data; placement picks that node.

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use super::nodes::NodeRecord;
use super::record::decode;
use super::{Cluster, keys};

/// `/thinbd/v1/volumes/UUID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub uuid: String,
    pub name: String,
    pub size_bytes: u64,
    /// The storage node that holds the data (the first replica).
    pub node: String,
    pub created_unix: u64,
    /// Nodes holding a copy, `node` first; empty for a volume of one copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// Copies that must stay in sync for writes to be acknowledged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_insync: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl VolumeSpec {
    /// The nodes holding a copy, `node` first.
    pub fn copies(&self) -> Vec<String> {
        if self.replicas.is_empty() { vec![self.node.clone()] } else { self.replicas.clone() }
    }

    pub fn replicated(&self) -> bool {
        self.replicas.len() > 1
    }
}

/// Why no node can take a volume.
#[derive(Debug, thiserror::Error)]
#[error("{} storage node{} up{}{}", if *copies > 1 { format!("fewer than {copies}") } else { "no".to_string() }, if *copies > 1 { "s are" } else { " is" }, if zone.is_empty() { String::new() } else { format!(" in zone {zone:?}") }, if nodes.is_empty() { String::new() } else { format!(" among {}", nodes.join(", ")) })]
pub struct NoNode {
    pub zone: String,
    pub nodes: Vec<String>,
    /// Copies asked for.
    pub copies: usize,
}

/// What [`Cluster::adopt_volume`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    Known,
    Recorded,
    /// Recorded under its UUID; its name belongs to another volume.
    NameTaken,
}

impl Cluster {
    /// Where a new volume goes: among the nodes that are up (in `zone`, among `nodes` when
    /// given), the one with the most free space left after what is already provisioned on it
    /// (volumes are thin, so free space alone would send every new volume to one node). Ties go
    /// to the first preferred node, then by name.
    pub async fn place(&self, zone: &str, nodes: &[String]) -> Result<Result<NodeRecord, NoNode>, ClusterError> {
        Ok(self.place_copies(zone, nodes, &[], 1).await?.map(|mut n| n.remove(0)))
    }

    /// `copies` distinct nodes for a volume's replicas, none of `taken` (nodes holding copies
    /// already), ranked as [`Self::place`] ranks them; nodes of a zone not used yet (by the
    /// chosen or the taken) come before the others.
    /// How many nodes are up to take a copy in `zone` (any when empty), among `nodes` (any when
    /// empty).
    pub fn nodes_for_copies(&self, zone: &str, nodes: &[String]) -> usize {
        self.directory
            .list()
            .into_iter()
            .filter(|v| v.up && (zone.is_empty() || v.record.zone == zone))
            .filter(|v| nodes.is_empty() || nodes.contains(&v.record.name))
            .count()
    }

    pub async fn place_copies(
        &self,
        zone: &str,
        nodes: &[String],
        taken: &[String],
        copies: usize,
    ) -> Result<Result<Vec<NodeRecord>, NoNode>, ClusterError> {
        let specs = self.volume_specs().await?;
        let provisioned = |n: &str| {
            specs.iter().filter(|s| s.copies().iter().any(|c| c == n)).map(|s| s.size_bytes as i128).sum::<i128>()
        };
        let rank = |n: &str| nodes.iter().position(|p| p == n).unwrap_or(usize::MAX);
        let mut candidates: Vec<NodeRecord> = self
            .directory
            .list()
            .into_iter()
            .filter(|v| v.up && (zone.is_empty() || v.record.zone == zone))
            .filter(|v| nodes.is_empty() || nodes.contains(&v.record.name))
            .filter(|v| !taken.contains(&v.record.name))
            .map(|v| v.record)
            .collect();
        let used_zones: Vec<String> = self
            .directory
            .list()
            .into_iter()
            .filter(|v| taken.contains(&v.record.name))
            .map(|v| v.record.zone)
            .collect();
        let room = |r: &NodeRecord| r.available_bytes as i128 - provisioned(&r.name);
        candidates
            .sort_by(|a, b| room(b).cmp(&room(a)).then(rank(&a.name).cmp(&rank(&b.name))).then(a.name.cmp(&b.name)));
        let no_node = || NoNode { zone: zone.to_string(), nodes: nodes.to_vec(), copies };
        if candidates.len() < copies.max(1) {
            return Ok(Err(no_node()));
        }
        let mut chosen: Vec<NodeRecord> = Vec::new();
        while chosen.len() < copies.max(1) {
            let fresh_zone = candidates
                .iter()
                .position(|c| chosen.iter().all(|x| x.zone != c.zone) && !used_zones.contains(&c.zone));
            chosen.push(candidates.remove(fresh_zone.unwrap_or(0)));
        }
        Ok(Ok(chosen))
    }

    /// Records a new volume: its name must be free. `Ok(false)`: the name is taken.
    pub async fn reserve_volume(&self, spec: &VolumeSpec) -> Result<bool, ClusterError> {
        let name_key = keys::volume_name(&spec.name);
        let mut ops = vec![
            TxnOp::put(name_key.clone(), spec.uuid.clone(), None),
            TxnOp::put(keys::volume(&spec.uuid), encode(spec)?, None),
        ];
        if spec.replicated() {
            // Every copy is in sync at creation (all empty).
            let set = super::isr::InSync { members: spec.copies(), ..Default::default() };
            let key = keys::isr(&spec.uuid);
            ops.push(TxnOp::put(key.clone(), super::record::encode(&key, &set)?, None));
        }
        let txn = Txn::new().when([Compare::create_revision(name_key, CompareOp::Equal, 0)]).and_then(ops);
        Ok(self.client.clone().txn(txn).await?.succeeded())
    }

    /// Forgets a volume (deleted, or its creation failed), if `spec` is still what is recorded.
    pub async fn release_volume(&self, spec: &VolumeSpec) -> Result<(), ClusterError> {
        let name_key = keys::volume_name(&spec.name);
        let txn = Txn::new().when([Compare::value(name_key.clone(), CompareOp::Equal, spec.uuid.clone())]).and_then([
            TxnOp::delete(name_key, None),
            TxnOp::delete(keys::volume(&spec.uuid), None),
            TxnOp::delete(keys::target(&spec.uuid), None),
            TxnOp::delete(keys::isr(&spec.uuid), None),
            TxnOp::delete(keys::grants_of(&spec.uuid), Some(etcd_client::DeleteOptions::new().with_prefix())),
        ]);
        self.client.clone().txn(txn).await?;
        Ok(())
    }

    /// Records a volume that was made before this node joined the cluster (or while etcd
    /// lost it), unless the cluster knows it. A name another volume took leaves it
    /// reachable by UUID only.
    pub async fn adopt_volume(&self, spec: &VolumeSpec) -> Result<Adopted, ClusterError> {
        let mut client = self.client.clone();
        if client.get(keys::volume(&spec.uuid), None).await?.count() > 0 {
            return Ok(Adopted::Known);
        }
        if self.reserve_volume(spec).await? {
            return Ok(Adopted::Recorded);
        }
        let key = keys::volume(&spec.uuid);
        let txn = Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key,
            encode(spec)?,
            None,
        )]);
        client.txn(txn).await?;
        Ok(Adopted::NameTaken)
    }

    /// Changes volume `uuid`'s spec by compare-and-swap (a resize, a lowered `min_insync`).
    pub async fn update_spec(&self, uuid: &str, change: impl Fn(&mut VolumeSpec)) -> Result<(), ClusterError> {
        let key = keys::volume(uuid);
        let mut client = self.client.clone();
        loop {
            let resp = client.get(key.clone(), None).await?;
            let Some(kv) = resp.kvs().first() else { return Ok(()) };
            let mut spec: VolumeSpec = decode(kv.key(), kv.value())?;
            change(&mut spec);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())])
                .and_then([TxnOp::put(key.clone(), encode(&spec)?, None)]);
            if client.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
    }

    /// The spec of the volume `reference` (a name or UUID) names.
    pub async fn volume_spec(&self, reference: &str) -> Result<Option<VolumeSpec>, ClusterError> {
        let mut client = self.client.clone();
        let uuid = match client.get(keys::volume_name(reference), None).await?.kvs().first() {
            Some(kv) => String::from_utf8_lossy(kv.value()).into_owned(),
            None => reference.to_string(),
        };
        match client.get(keys::volume(&uuid), None).await?.kvs().first() {
            Some(kv) => Ok(Some(decode(kv.key(), kv.value())?)),
            None => Ok(None),
        }
    }

    pub async fn volume_specs(&self) -> Result<Vec<VolumeSpec>, ClusterError> {
        let resp = self.client.clone().get(keys::VOLUMES, Some(GetOptions::new().with_prefix())).await?;
        resp.kvs().iter().map(|kv| decode(kv.key(), kv.value())).collect()
    }
}

fn encode(spec: &VolumeSpec) -> Result<Vec<u8>, ClusterError> {
    super::record::encode(&keys::volume(&spec.uuid), spec)
}
