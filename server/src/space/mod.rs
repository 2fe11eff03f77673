//! Space: the pool file and what hands out its clusters, and the commits that make both
//! durable. The pool moves bytes through one [`backend::BlockStore`] (file on threads, io_uring,
//! or a fault-injecting disk in tests); the allocator decides which clusters are free; grace
//! periods keep a freed cluster from being reused under a read still using it; the superblock
//! ties the file to its metadata. [`Space`] holds them together with the metadata store's
//! commit paths (grouped non-durable commits, durable commits that sync the pool first).

pub mod allocator;
pub mod backend;
pub mod committer;
#[cfg(any(test, feature = "testing"))]
pub mod fault_disk;
pub mod grace;
pub mod pool;
pub mod superblock;
pub mod uring;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::error::{EngineError, poisoned};
use crate::meta::store::{Loaded, MetaOp, Store};
use allocator::Allocator;
use committer::Committer;
use pool::Pool;

/// How often a failed metadata store is reopened while it keeps failing (a full disk).
const RECOVERY_RETRY: Duration = Duration::from_secs(1);

/// What the metadata store must hold after it is reopened following an I/O error: the owner of
/// the in-memory view (the engine) computes the changes from what reopened.
pub trait Resync: Send + Sync {
    /// The changes that turn `disk` into the view; the allocator's part is read from `space`
    /// last, so clusters handed out meanwhile are covered.
    fn resync_ops(&self, disk: &Loaded, space: &Space) -> Result<Vec<MetaOp>, EngineError>;
}

pub struct Space {
    pub pool: Pool,
    /// Bytes per cluster.
    pub cs: u64,
    /// Freed clusters are reused only after the reads that may have resolved to them.
    pub grace: grace::Grace,
    store: Arc<Store>,
    committer: Committer,
    alloc: Mutex<Allocator>,
    /// Set by non-durable metadata commits, cleared by durable ones.
    meta_dirty: Arc<AtomicBool>,
    /// One metadata store recovery at a time, and when the last one was tried.
    recovery: tokio::sync::Mutex<Option<Instant>>,
    resync: OnceLock<Weak<dyn Resync>>,
}

impl Space {
    pub fn new(store: Store, pool: Pool, cs: u64, alloc: Allocator) -> Result<Arc<Space>, EngineError> {
        let store = Arc::new(store);
        let meta_dirty: Arc<AtomicBool> = Default::default();
        let committer = Committer::spawn(store.clone(), meta_dirty.clone())?;
        Ok(Arc::new(Space {
            pool,
            cs,
            grace: Default::default(),
            store,
            committer,
            alloc: Mutex::new(alloc),
            meta_dirty,
            recovery: Default::default(),
            resync: OnceLock::new(),
        }))
    }

    /// Who knows what the store must hold (see [`Resync`]); without one a failed store stays
    /// failed.
    pub fn set_resync(&self, resync: Weak<dyn Resync>) {
        let _ = self.resync.set(resync);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn alloc(&self) -> Result<MutexGuard<'_, Allocator>, EngineError> {
        self.alloc.lock().map_err(|_| poisoned())
    }

    /// Commits `ops`. A non-durable commit joins the group commit; a durable one first syncs
    /// the pool (inside the transaction) and afterwards releases clusters whose frees it made
    /// durable.
    pub async fn commit(self: &Arc<Self>, ops: Vec<MetaOp>, durable: bool) -> Result<(), EngineError> {
        if self.store.failed() {
            self.recover().await?;
        }
        if !durable {
            return self.committer.commit(ops).await;
        }
        let me = self.clone();
        let released = tokio::task::spawn_blocking(move || {
            let mut released = Vec::new();
            let r = me.store.commit(&ops, durable, || {
                // Under redb's writer lock: every non-durable commit so far is in this one.
                me.meta_dirty.store(false, Relaxed);
                released = me.alloc()?.take_pending();
                me.pool.sync_blocking()
            });
            if r.is_err() {
                me.meta_dirty.store(true, Relaxed);
                me.alloc()?.free_later(released);
                return r.map(|()| Vec::new());
            }
            Ok(released)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("commit task: {e}")))??;
        self.release(released).await
    }

    /// Gives freed clusters back to the allocator once no read can still be using them.
    pub async fn release(&self, clusters: Vec<u64>) -> Result<(), EngineError> {
        if clusters.is_empty() {
            return Ok(());
        }
        self.grace.wait().await;
        self.alloc()?.release(clusters);
        Ok(())
    }

    /// Makes every completed write durable (NBD FLUSH; covers all connections).
    /// When no mapping changed since the last durable commit (overwrites only), syncing the
    /// pool is enough: the metadata on disk already describes every completed write.
    pub async fn flush(self: &Arc<Self>) -> Result<(), EngineError> {
        let clean = !self.meta_dirty.load(Relaxed) && !self.alloc()?.has_pending();
        if clean {
            let me = self.clone();
            return tokio::task::spawn_blocking(move || me.pool.sync_blocking())
                .await
                .map_err(|e| EngineError::Internal(format!("sync task: {e}")))?;
        }
        self.commit(Vec::new(), true).await
    }

    /// Recovery of the metadata store after an I/O error (a full or failing disk under the data
    /// dir). redb refuses every transaction after one until it is closed and opened again; what
    /// it then holds may lack the commits since the last durable one. Memory holds every commit
    /// that succeeded (it changes only after a commit did), so its owner's view ([`Resync`]) is
    /// written back over what reopened, in one durable transaction: no restart, and nothing
    /// acknowledged is lost. While the disk stays full this is tried at most once a second and
    /// every commit fails with the store's error (ENOSPC to clients).
    async fn recover(self: &Arc<Self>) -> Result<(), EngineError> {
        let mut last = self.recovery.lock().await;
        if !self.store.failed() {
            return Ok(());
        }
        if last.is_some_and(|t| t.elapsed() < RECOVERY_RETRY) {
            return Err(self.store.failure());
        }
        *last = Some(Instant::now());
        let Some(view) = self.resync.get().and_then(Weak::upgrade) else { return Err(self.store.failure()) };
        let me = self.clone();
        let released = tokio::task::spawn_blocking(move || {
            let disk = me.store.reopen()?;
            let ops = view.resync_ops(&disk, &me)?;
            let mut released = Vec::new();
            me.store.rewrite(&ops, || {
                me.meta_dirty.store(false, Relaxed);
                released = me.alloc()?.take_pending();
                me.pool.sync_blocking()
            })?;
            tracing::info!(changes = ops.len(), "metadata store recovered: reopened and brought up to date");
            Ok::<_, EngineError>(released)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("recovery task: {e}")))?;
        match released {
            Ok(released) => self.release(released).await,
            Err(e) => {
                tracing::warn!(error = %e, "metadata store still unusable; retrying on the next commit");
                Err(e)
            }
        }
    }
}
