//! Snapshots in the cluster: a record per snapshot under its UUID, written by the node that
//! holds it, so that any node can list snapshots and route a request naming one (by UUID, as
//! CSI does) to that node — also after its source volume was deleted.

use etcd_client::GetOptions;
use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use super::record::{decode, encode};
use super::{Cluster, keys};

/// `/thinbd/v1/snapshots/UUID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSpec {
    pub uuid: String,
    pub name: String,
    /// The volume it was taken of (its name then, and its UUID).
    pub volume: String,
    pub volume_uuid: String,
    pub size_bytes: u64,
    /// The node holding its layers.
    pub node: String,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

impl Cluster {
    pub async fn put_snapshot(&self, spec: &SnapshotSpec) -> Result<(), ClusterError> {
        let key = keys::snapshot(&spec.uuid);
        self.client.clone().put(key.clone(), encode(&key, spec)?, None).await?;
        Ok(())
    }

    pub async fn delete_snapshot_spec(&self, uuid: &str) -> Result<(), ClusterError> {
        self.client.clone().delete(keys::snapshot(uuid), None).await?;
        Ok(())
    }

    pub async fn snapshot_spec(&self, uuid: &str) -> Result<Option<SnapshotSpec>, ClusterError> {
        let resp = self.client.clone().get(keys::snapshot(uuid), None).await?;
        resp.kvs().first().map(|kv| decode(kv.key(), kv.value())).transpose()
    }

    pub async fn snapshot_specs(&self) -> Result<Vec<SnapshotSpec>, ClusterError> {
        let resp = self.client.clone().get(keys::SNAPSHOTS, Some(GetOptions::new().with_prefix())).await?;
        resp.kvs().iter().map(|kv| decode(kv.key(), kv.value())).collect()
    }
}
