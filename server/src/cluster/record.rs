//! Records in etcd are JSON; a value that does not decode names its key.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::ClusterError;

pub fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, ClusterError> {
    serde_json::to_vec(value).map_err(|e| ClusterError::Record { key: key.to_string(), source: e })
}

pub fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(value)
        .map_err(|e| ClusterError::Record { key: String::from_utf8_lossy(key).into_owned(), source: e })
}
