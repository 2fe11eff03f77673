//! Attachment grants in the cluster. The node holding a volume keeps its grants, secret tokens
//! included, in its redb and checks them on every link (its fence stays where the data is);
//! it mirrors each grant to `/thinbd/v1/grants/UUID/NODE` with a hash of the token instead of
//! the token. From there any node can tell a volume's attachments, and a target checks the
//! grant it was handed, and learns its access, before it takes the volume's epoch.

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ClusterError;
use super::record::{decode, encode};
use super::{Cluster, keys};

/// `/thinbd/v1/grants/UUID/NODE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantEntry {
    /// The volume's name when the grant was made.
    pub volume: String,
    pub node: String,
    pub read_only: bool,
    pub single_writer: bool,
    /// SHA-256 of the token (hex): enough to recognise it, useless to attach with.
    pub token_sha256: String,
    pub created_unix: u64,
}

pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    /// Records a grant of volume `uuid`, if the volume is still recorded.
    pub async fn put_grant(&self, uuid: &str, entry: &GrantEntry) -> Result<(), ClusterError> {
        let key = keys::grant(uuid, &entry.node);
        let txn = Txn::new()
            .when([Compare::create_revision(keys::volume(uuid), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(key.clone(), encode(&key, entry)?, None)]);
        self.client.clone().txn(txn).await?;
        Ok(())
    }

    pub async fn delete_grant(&self, uuid: &str, node: &str) -> Result<(), ClusterError> {
        self.client.clone().delete(keys::grant(uuid, node), None).await?;
        Ok(())
    }

    pub async fn grants(&self, uuid: &str) -> Result<Vec<GrantEntry>, ClusterError> {
        let resp = self.client.clone().get(keys::grants_of(uuid), Some(GetOptions::new().with_prefix())).await?;
        resp.kvs().iter().map(|kv| decode(kv.key(), kv.value())).collect()
    }

    /// The grant of volume `uuid` whose token is `token`.
    pub async fn grant_by_token(&self, uuid: &str, token: &str) -> Result<Option<GrantEntry>, ClusterError> {
        let hash = token_hash(token);
        Ok(self.grants(uuid).await?.into_iter().find(|g| g.token_sha256 == hash))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(super::token_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
