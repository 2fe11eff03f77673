//! The pool: one file (or block device) cut into fixed-size clusters. Positional I/O only; the
//! extent maps decide which cluster holds what.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::error::EngineError;

pub struct Pool {
    file: Arc<File>,
    cluster_size: u64,
}

impl Pool {
    /// Opens or creates the pool file and makes it at least `bytes` long (sparse).
    pub fn open_file(path: &Path, bytes: u64, cluster_size: u64) -> Result<Pool, EngineError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| EngineError::io("open pool", 0, e))?;
        let len = file.metadata().map_err(|e| EngineError::io("stat pool", 0, e))?.len();
        if len < bytes {
            file.set_len(bytes).map_err(|e| EngineError::io("grow pool", bytes, e))?;
        }
        Ok(Pool { file: Arc::new(file), cluster_size })
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> Result<bytes::Bytes, EngineError> {
        let file = self.file.clone();
        blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map_err(|e| EngineError::io("read", offset, e))?;
            Ok(bytes::Bytes::from(buf))
        })
        .await
    }

    /// Writes `data[range]` at `offset`; takes the buffer by value so it can move to the I/O
    /// thread without a copy.
    pub async fn write_at(&self, offset: u64, data: bytes::Bytes) -> Result<(), EngineError> {
        let file = self.file.clone();
        blocking(move || file.write_all_at(&data, offset).map_err(|e| EngineError::io("write", offset, e))).await
    }

    pub async fn sync(&self) -> Result<(), EngineError> {
        let file = self.file.clone();
        blocking(move || file.sync_data().map_err(|e| EngineError::io("fdatasync", 0, e))).await
    }

    pub fn sync_blocking(&self) -> Result<(), EngineError> {
        self.file.sync_data().map_err(|e| EngineError::io("fdatasync", 0, e))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| EngineError::Internal(format!("I/O task: {e}")))?
}
