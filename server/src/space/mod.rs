//! Space: the pool file and what hands out its clusters, and the commits that make both
//! durable. The pool moves bytes through one [`backend::BlockStore`] (file on threads, io_uring,
//! or a fault-injecting disk in tests); the allocator decides which clusters are free; grace
//! periods keep a freed cluster from being reused under a read still using it; the superblock
//! ties the file to its metadata. [`Space`] holds them together with the metadata store's
//! commit paths (grouped non-durable commits, durable commits that sync the pool first) and
//! the journal that makes grouped commits durable at a FLUSH with one sync.

pub mod allocator;
pub mod backend;
pub mod committer;
#[cfg(any(test, feature = "testing"))]
pub mod fault_disk;
pub mod grace;
pub mod journal;
pub mod occupancy;
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
use journal::Journal;
use pool::Pool;

/// How a metadata commit reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Durable when it returns: the pool is synced, then the store commits durably.
    Durable,
    /// Grouped with others and made durable by the next FLUSH (through the journal where the
    /// pool has one). `data_first`: it claims clusters that may still hold an earlier owner's
    /// bytes, so that FLUSH syncs their new data before the record.
    Grouped { data_first: bool },
}

impl Commit {
    pub fn durable_if(durable: bool) -> Commit {
        if durable { Commit::Durable } else { Commit::Grouped { data_first: false } }
    }
}

/// How often a failed metadata store is reopened while it keeps failing (a full disk).
const RECOVERY_RETRY: Duration = Duration::from_secs(1);

/// What the metadata store must hold after it is reopened following an I/O error: the owner of
/// the in-memory view (the engine) computes the changes from what reopened.
pub trait Resync: Send + Sync {
    /// The changes that turn `disk` into the view; the allocator's part is read from `space`
    /// last, so clusters handed out meanwhile are covered.
    fn resync_ops(&self, disk: &Loaded, space: &Space) -> Result<Vec<MetaOp>, EngineError>;
}

/// The store and pool as [`open_journal`] leaves them.
pub struct Opened {
    /// The store's state, the journal's records included.
    pub loaded: Loaded,
    pub journal: Option<Journal>,
    /// Clusters from here up read zeros on disk (`u64::MAX`: unknown).
    pub zeroed_from: u64,
}

/// At start, before anything reads the store: applies the journal's records past the store's
/// last durable commit (the mappings of writes flushed before a crash) in one durable commit,
/// then makes the clusters above the high-water mark read zeros (a crash can leave data there
/// whose mapping never became durable), so that their first writes need one sync. Pools without
/// a journal region (format 1) get none.
pub fn open_journal(store: &Store, pool: &Pool, loaded: Loaded, capacity_clusters: u64) -> Result<Opened, EngineError> {
    let Some((start, len)) = pool.journal_region() else {
        return Ok(Opened { loaded, journal: None, zeroed_from: u64::MAX });
    };
    let tag = loaded.pool_uuid.unwrap_or(0) as u64;
    if let Err(e) = pool.reserve_region(start, len) {
        tracing::warn!(error = %e, "cannot allocate the journal region; a FLUSH on a full disk may fail");
    }
    let region = pool.read_region_blocking(start, len as usize)?;
    let found = journal::replay(tag, region.as_slice(), loaded.journaled);
    let mut loaded = loaded;
    // Records past a gap (written early, before one that never reached the disk) are dropped:
    // the store moves past their sequences so that new records never take them up.
    let skip_to = found.max_seq.max(loaded.journaled);
    if !found.records.is_empty() || skip_to > loaded.journaled {
        let mut ops: Vec<MetaOp> = found.records.iter().flat_map(|r| r.ops.iter().cloned()).collect();
        let changes = ops.len();
        ops.push(MetaOp::SetJournaled(skip_to));
        store.commit(&ops, true, || Ok(()))?;
        if !found.records.is_empty() {
            tracing::info!(
                records = found.records.len(),
                changes,
                "journal replayed: mappings made durable by FLUSH before the stop"
            );
        }
        loaded = store.load()?;
    }
    let cs = loaded.config.cluster_size;
    let zeroed = pool.zero_clusters(loaded.high_water * cs, capacity_clusters * cs)?;
    if zeroed {
        pool.sync_blocking()?;
    }
    let journal = Journal::new(start, len, tag, found.next_block, loaded.journaled);
    let zeroed_from = if zeroed { loaded.high_water } else { u64::MAX };
    Ok(Opened { loaded, journal: Some(journal), zeroed_from })
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
    journal: Option<Arc<Journal>>,
}

impl Space {
    pub fn new(
        store: Store,
        pool: Pool,
        cs: u64,
        alloc: Allocator,
        journal: Option<Journal>,
    ) -> Result<Arc<Space>, EngineError> {
        let store = Arc::new(store);
        let meta_dirty: Arc<AtomicBool> = Default::default();
        let journal = journal.map(Arc::new);
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
            journal,
        }))
    }

    /// Puts a first write's record on the journal ring before memory shows it (see
    /// `io::local`); `None` without a journal. Memory must follow with [`Space::shown`].
    pub fn journal_ahead(&self, ops: Vec<MetaOp>) -> Option<u64> {
        let j = self.journal.as_ref()?;
        Some(self.committer.journal(j, ops, false, false))
    }

    /// Memory now shows record `seq` (from [`Space::journal_ahead`]).
    pub fn shown(&self, seq: u64) {
        if let Some(j) = &self.journal {
            j.ring.lock().unwrap_or_else(|p| p.into_inner()).applied(seq);
        }
    }

    /// Blocks until the store holds every commit queued so far (journaled ones are folded in
    /// behind the requests that made them): for checks that compare it with memory.
    pub fn settle(&self) -> Result<(), EngineError> {
        self.committer.settle()
    }

    /// Whether FLUSH goes through the journal (pools of format 2 and up).
    pub fn journaled(&self) -> bool {
        self.journal.is_some()
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

    /// Commits `ops`, durably or grouped (see [`Commit`]).
    pub async fn commit(self: &Arc<Self>, ops: Vec<MetaOp>, durable: bool) -> Result<(), EngineError> {
        self.commit_as(ops, Commit::durable_if(durable)).await
    }

    /// A grouped commit joins the group commit (and the journal); a durable one first syncs
    /// the pool (inside the transaction), records the last journal sequence it covers, and
    /// afterwards releases clusters whose frees it made durable.
    pub async fn commit_as(self: &Arc<Self>, ops: Vec<MetaOp>, how: Commit) -> Result<(), EngineError> {
        if let (Commit::Grouped { data_first }, Some(j)) = (how, &self.journal)
            && ops.iter().all(journal::journaled)
        {
            // Never fails (the caller changed memory already); a failed store is recovered by
            // the next durable commit, at the latest when the ring fills.
            self.committer.journal(j, ops, data_first, true);
            return Ok(());
        }
        if self.store.failed() {
            self.recover().await?;
        }
        // With a journal, grouped ops it cannot carry commit durably.
        if matches!(how, Commit::Grouped { .. }) && self.journal.is_none() {
            return self.committer.commit(ops).await;
        }
        let flushing = match &self.journal {
            Some(j) => Some(j.flushing.lock().await),
            None => None,
        };
        let me = self.clone();
        let journaled = self.journal.is_some();
        let (released, covered) = self
            .committer
            .durable(move |covered| {
                let covered = covered.filter(|_| journaled);
                let mut ops = ops;
                ops.extend(covered.map(MetaOp::SetJournaled));
                let mut released = Vec::new();
                let r = me.store.commit(&ops, true, || {
                    // Under redb's writer lock: every non-durable commit so far is in this one.
                    me.meta_dirty.store(false, Relaxed);
                    released = me.alloc()?.take_pending();
                    me.pool.sync_blocking()
                });
                if r.is_err() {
                    me.meta_dirty.store(true, Relaxed);
                    me.alloc()?.free_later(released);
                    return r.map(|()| (Vec::new(), None));
                }
                Ok((released, covered))
            })
            .await?;
        self.checkpointed(covered)?;
        drop(flushing);
        self.release(released).await
    }

    /// After a durable commit that covered journal sequences up to `covered`.
    fn checkpointed(&self, covered: Option<u64>) -> Result<(), EngineError> {
        if let (Some(j), Some(c)) = (&self.journal, covered) {
            j.ring.lock().map_err(|_| poisoned())?.checkpointed(c);
        }
        Ok(())
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
        if let Some(j) = &self.journal {
            return self.flush_journal(j).await;
        }
        let clean = !self.meta_dirty.load(Relaxed) && !self.alloc()?.has_pending();
        if clean {
            return self.sync_pool().await;
        }
        self.commit(Vec::new(), true).await
    }

    async fn sync_pool(self: &Arc<Self>) -> Result<(), EngineError> {
        if self.pool.sync_here() {
            // Once more after a yield: a caller that starts other work beside this sync (a
            // flush on every copy of a replicated volume) gets it going before the thread blocks.
            tokio::task::yield_now().await;
            if self.pool.sync_here() {
                return self.pool.sync_blocking();
            }
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.pool.sync_blocking())
            .await
            .map_err(|e| EngineError::Internal(format!("sync task: {e}")))?
    }

    /// FLUSH with a journal: the records not yet written go into the journal region and one
    /// sync of the pool makes them durable with the data they map (two when a record must
    /// follow its data: [`journal::Batch::data_first`]). Clusters freed before are
    /// reusable after it. When the region has no room, or a batch was lost, a durable commit
    /// does it instead, and a FLUSH that leaves the region more than half full makes one too,
    /// which frees the region.
    async fn flush_journal(self: &Arc<Self>, j: &Arc<Journal>) -> Result<(), EngineError> {
        let flushing = j.flushing.lock().await;
        // Before the batch: every cluster freed so far has its `Free` in the ring already.
        let released = self.alloc()?.take_pending();
        let (batch, slots) = {
            let mut ring = j.ring.lock().map_err(|_| poisoned())?;
            // A lost batch (even an early one, with nothing pending now) needs a durable commit.
            let batch = if ring.is_empty() && !ring.has_lost() { Ok(None) } else { ring.take().map(Some).ok_or(()) };
            (batch, ring.slots())
        };
        let Ok(batch) = batch else {
            // No room in the region, or a batch was lost: a durable commit covers it all.
            self.alloc()?.free_later(released);
            drop(flushing);
            return self.commit(Vec::new(), true).await;
        };
        let written = match &batch {
            None => self.sync_pool().await,
            Some(b) => self.write_batch(j, b, slots).await,
        };
        if let Err(e) = written {
            if let Some(b) = &batch {
                j.ring.lock().map_err(|_| poisoned())?.lose(b.max_seq);
            }
            self.alloc()?.free_later(released);
            return Err(e);
        }
        let full = j.ring.lock().map_err(|_| poisoned())?.wants_checkpoint();
        drop(flushing);
        self.release(released).await?;
        if full {
            self.commit(Vec::new(), true).await?;
        }
        Ok(())
    }

    /// Syncs the data a batch needs first, writes the batch and syncs.
    async fn write_batch(self: &Arc<Self>, j: &Journal, b: &journal::Batch, slots: u64) -> Result<(), EngineError> {
        if b.data_first {
            self.sync_pool().await?;
        }
        self.write_blocks(j, b, slots).await?;
        self.sync_pool().await
    }

    /// Writes the records that may reach the disk before their data, if no batch is being
    /// written now: a first write does this beside its data write, so that the FLUSH after it
    /// has only the sync left. Skipped records wait for the next one (or the FLUSH); a failed
    /// write makes the next FLUSH a durable commit.
    pub async fn journal_early(&self) {
        let Some(j) = &self.journal else { return };
        let Ok(_writing) = j.flushing.try_lock() else { return };
        let taken = match j.ring.lock() {
            Ok(mut r) => r.take_eager().map(|b| (b, r.slots())),
            Err(_) => None,
        };
        let Some((batch, slots)) = taken else { return };
        if let Err(e) = self.write_blocks(j, &batch, slots).await {
            tracing::warn!(error = %e, "journal write failed; the next FLUSH commits the metadata instead");
            if let Ok(mut r) = j.ring.lock() {
                r.lose(batch.max_seq);
            }
        }
    }

    /// Writes a batch's blocks at their slots (one write per run of slots).
    async fn write_blocks(&self, j: &Journal, b: &journal::Batch, slots: u64) -> Result<(), EngineError> {
        let blocks = journal::batch_blocks(j.tag, b.first_block, &b.payload);
        let mut i = 0;
        while i < blocks.len() {
            let slot = (b.first_block + i as u64) % slots;
            let run = (blocks.len() - i).min((slots - slot) as usize);
            let mut buf = thinbd_protocol::aligned::AlignedBuf::zeroed(run * journal::BLOCK);
            for (k, block) in blocks[i..i + run].iter().enumerate() {
                buf.as_mut_slice()[k * journal::BLOCK..(k + 1) * journal::BLOCK].copy_from_slice(block);
            }
            self.pool.write_region(j.start + slot * journal::BLOCK as u64, buf.freeze()).await?;
            i += run;
        }
        Ok(())
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
        let flushing = match &self.journal {
            Some(j) => Some(j.flushing.lock().await),
            None => None,
        };
        let me = self.clone();
        let released = tokio::task::spawn_blocking(move || {
            let disk = me.store.reopen()?;
            // Read before the view: memory shows every record up to here, so the rewritten
            // store holds them and replay must not apply them again.
            let covered = me.journal.as_ref().map(|j| j.ring.lock().map(|r| r.shown())).transpose();
            let covered = covered.map_err(|_| poisoned())?;
            let mut ops = view.resync_ops(&disk, &me)?;
            ops.extend(covered.map(MetaOp::SetJournaled));
            let mut released = Vec::new();
            me.store.rewrite(&ops, || {
                me.meta_dirty.store(false, Relaxed);
                released = me.alloc()?.take_pending();
                me.pool.sync_blocking()
            })?;
            tracing::info!(changes = ops.len(), "metadata store recovered: reopened and brought up to date");
            Ok::<_, EngineError>((released, covered))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("recovery task: {e}")))?;
        let released = released.and_then(|(released, covered)| self.checkpointed(covered).map(|()| released));
        drop(flushing);
        match released {
            Ok(released) => self.release(released).await,
            Err(e) => {
                tracing::warn!(error = %e, "metadata store still unusable; retrying on the next commit");
                Err(e)
            }
        }
    }
}
