//! The pool: a file (or block device) cut into fixed-size clusters. The extent maps decide which
//! cluster holds what; the pool only moves bytes. Backends are small and synchronous; the pool
//! runs them off the async runtime.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::EngineError;

/// Where pool bytes live: a file here, a fault-injecting memory disk in tests.
pub trait BlockStore: Send + Sync + 'static {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> std::io::Result<()>;
}

pub struct FileStore(File);

impl BlockStore for FileStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

/// How the pool file is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IoEngine {
    /// io_uring on a dedicated ring thread (falls back to `threads` where io_uring is refused).
    #[default]
    Uring,
    /// pread/pwrite on tokio's blocking threads.
    Threads,
}

pub struct Pool {
    store: Arc<dyn BlockStore>,
    uring: Option<Arc<crate::uring::UringStore>>,
}

impl Pool {
    /// Opens or creates the pool file and makes it at least `bytes` long (sparse).
    pub fn open_file(path: &Path, bytes: u64, engine: IoEngine) -> Result<Pool, EngineError> {
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
        let uring = match engine {
            IoEngine::Uring => {
                let dup = file.try_clone().map_err(|e| EngineError::io("dup pool fd", 0, e))?;
                match crate::uring::UringStore::new(dup) {
                    Ok(u) => Some(Arc::new(u)),
                    Err(e) => {
                        tracing::warn!(error = %e, "io_uring is not available; using blocking threads for pool I/O");
                        None
                    }
                }
            }
            IoEngine::Threads => None,
        };
        Ok(Pool { store: Arc::new(FileStore(file)), uring })
    }

    pub fn on(store: Arc<dyn BlockStore>) -> Pool {
        Pool { store, uring: None }
    }

    pub fn engine(&self) -> IoEngine {
        if self.uring.is_some() { IoEngine::Uring } else { IoEngine::Threads }
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, EngineError> {
        if let Some(u) = &self.uring {
            return u.read_at(offset, len).await.map_err(|e| EngineError::io("read", offset, e));
        }
        let store = self.store.clone();
        blocking(move || {
            let mut buf = vec![0u8; len];
            store.read_at(&mut buf, offset).map_err(|e| EngineError::io("read", offset, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    /// Takes the buffer by value so it moves to the I/O thread without a copy.
    pub async fn write_at(&self, offset: u64, data: Bytes) -> Result<(), EngineError> {
        if let Some(u) = &self.uring {
            return u.write_at(offset, data).await.map_err(|e| EngineError::io("write", offset, e));
        }
        let store = self.store.clone();
        blocking(move || store.write_at(&data, offset).map_err(|e| EngineError::io("write", offset, e))).await
    }

    pub fn sync_blocking(&self) -> Result<(), EngineError> {
        self.store.sync().map_err(|e| EngineError::io("fdatasync", 0, e))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| EngineError::Internal(format!("I/O task: {e}")))?
}
