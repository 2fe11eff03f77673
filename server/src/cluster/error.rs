//! What can go wrong talking to the cluster store.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot decode {key}: {source}")]
    Record { key: String, source: serde_json::Error },
    #[error("the node's lease expired")]
    LeaseExpired,
    #[error("watch ended: {0}")]
    WatchCanceled(String),
    #[error("etcd did not answer in time ({0})")]
    Timeout(&'static str),
    #[error("reading {path}: {source}")]
    Tls { path: PathBuf, source: std::io::Error },
    #[error("lock poisoned")]
    Poisoned,
    #[error("node {0:?} is down")]
    NodeDown(String),
    #[error("TLS towards other nodes: {0}")]
    PeerTls(String),
    #[error("node {node:?}: {reason}")]
    Peer { node: String, reason: String },
}
