//! The copies of a volume an export writes to: one (the volume here, or on the node holding
//! it) or, for a replicated volume, every member of its in-sync set (protocol C). A write, trim
//! or flush is acknowledged only when every member completed it; a member that failed is
//! removed from the in-sync set — in the cluster store, before the acknowledgement — and
//! dropped. Overlapping writes are never in flight together, so every member applies them in
//! the same order. Reads go to the first member (the local copy when there is one).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use thinbd_protocol::{Extent, ReadChunk};
use tokio::sync::Notify;

use super::activity::Activity;
use super::{Backing, VolumeIo};
use crate::error::{EngineError, poisoned};

/// Where the in-sync set is kept (etcd in a cluster). Removing a member must be durable there
/// before the write it missed is acknowledged; a target that lost its role cannot remove one.
pub trait InSyncSet: Send + Sync {
    fn evict<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send + 'a>>;
}

/// Opens a link from this target to the copy on a node (the session's export and epoch).
pub trait Linker: Send + Sync {
    fn link<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = Result<Backing, EngineError>> + Send + 'a>>;

    /// A read-only link to a layer (snapshot or mark, by name) of the copy on `node`: the
    /// source of a rebuild whose target holds no copy of its own.
    fn link_layer<'a>(
        &'a self,
        node: &'a str,
        layer: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Backing, EngineError>> + Send + 'a>>;
}

/// What every session of one replicated volume on its target node shares: the order of
/// writes (and snapshot or rebuild barriers), which copies are in sync and which are being
/// rebuilt (every session writes to both, and reads only from the first), and a way to link
/// to a copy. One list for all sessions: a copy one session evicted is out for every other
/// before any of them acknowledges another write.
#[derive(Default)]
pub struct Shared {
    pub order: WriteOrder,
    copies: Mutex<Copies>,
    /// Bumped on every change of `copies`: sessions relink when it moved.
    generation: AtomicU64,
    /// A copy joined the in-sync set (suspended writes look again).
    grown: Notify,
    /// The linker of the latest writer's session on the target, and how many are open.
    linker: Mutex<Option<(Arc<dyn Linker>, usize)>>,
    log: Mutex<WriteLog>,
    /// Where writes may be in flight, as recorded for the next target.
    pub activity: Arc<Activity>,
    /// A look for idle regions is scheduled.
    sweep_pending: std::sync::atomic::AtomicBool,
}

/// Ranges a copy that leaves the in-sync set may lack beyond what a mark taken afterwards
/// covers: those written since the last flush every copy completed (a copy that restarts
/// may have lost them), and, per copy that left, those written until its mark is taken.
struct WriteLog {
    /// (sequence, start, end).
    since_flush: Vec<(u64, u64, u64)>,
    next: u64,
    /// Set when more was written unflushed than the log keeps: from this sequence on, a copy
    /// that leaves needs a full rebuild.
    overflow: Option<u64>,
    /// Per copy that left and has no mark yet; `None`: too much to list.
    departed: std::collections::HashMap<String, MissedRanges>,
    /// Per copy whose rebuild stopped (it takes no live writes since): what it may lack in
    /// the part its rebuild had done, for the next rebuild to resume there.
    stopped: std::collections::HashMap<String, MissedRanges>,
    /// Everything written under target epoch `since_epoch` (`None` once too much): what a
    /// copy whose rebuild stopped under the target before may lack in the part that rebuild
    /// had done.
    since_start: MissedRanges,
    since_epoch: Option<u64>,
}

impl Default for WriteLog {
    fn default() -> Self {
        WriteLog {
            since_flush: Vec::new(),
            next: 0,
            overflow: None,
            departed: Default::default(),
            stopped: Default::default(),
            since_start: Some(Vec::new()),
            since_epoch: None,
        }
    }
}

impl WriteLog {
    /// What a copy that stops taking writes now may lack of those written so far.
    fn unflushed(&self) -> MissedRanges {
        match self.overflow {
            Some(_) => None,
            None => Some(self.since_flush.iter().map(|(_, s, e)| (*s, *e)).collect()),
        }
    }
}

/// Byte ranges a copy that left may lack; `None`: too many to list (it needs a full rebuild).
pub type MissedRanges = Option<Vec<(u64, u64)>>;

/// Most ranges a write log keeps.
const LOG_MAX: usize = 4096;

fn push_capped(ranges: &mut MissedRanges, start: u64, end: u64) {
    if let Some(r) = ranges {
        if r.len() >= LOG_MAX {
            *ranges = None;
        } else {
            r.push((start, end));
        }
    }
}

#[derive(Default)]
struct Copies {
    /// `None` until a session or a rebuild read the set from the cluster store. Behind an
    /// `Arc`: every request looks at it, only membership changes copy it.
    in_sync: Option<Arc<Vec<String>>>,
    /// Copies taking live writes while a rebuild fills them; none serves reads.
    rebuilding: Vec<Rebuild>,
}

/// A copy being rebuilt and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    pub node: String,
    pub done: u64,
    pub total: u64,
}

impl Shared {
    fn copies(&self) -> Result<std::sync::MutexGuard<'_, Copies>, EngineError> {
        self.copies.lock().map_err(|_| poisoned())
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes the in-sync set read from the cluster store, unless sessions here already follow
    /// it (then theirs is newer: every change made here went to the store first).
    pub fn adopt(&self, members: &[String]) -> Result<(), EngineError> {
        let mut c = self.copies()?;
        if c.in_sync.is_none() {
            c.in_sync = Some(Arc::new(members.to_vec()));
            drop(c);
            self.changed();
        }
        Ok(())
    }

    /// Takes the in-sync set the cluster store now records, changed there by an operator
    /// (`set-replicas`, `force-promote`) rather than by this target: call under the write
    /// barrier, so that no write is in flight to a copy that leaves. True when it changed.
    pub fn follow_store(&self, members: &[String]) -> Result<bool, EngineError> {
        let mut c = self.copies()?;
        let before = c.in_sync.clone().unwrap_or_default();
        if c.in_sync.is_none() || *before == members {
            return Ok(false);
        }
        c.in_sync = Some(Arc::new(members.to_vec()));
        c.rebuilding.retain(|r| !members.contains(&r.node));
        drop(c);
        self.changed();
        if members.iter().any(|m| !before.contains(m)) {
            self.grown.notify_waiters();
        }
        Ok(true)
    }

    pub fn in_sync(&self) -> Result<Arc<Vec<String>>, EngineError> {
        Ok(self.copies()?.in_sync.clone().unwrap_or_default())
    }

    /// The copies being rebuilt now.
    pub fn rebuilding(&self) -> Vec<Rebuild> {
        self.copies.lock().map(|c| c.rebuilding.clone()).unwrap_or_default()
    }

    /// Starts sending live writes to `node` (call under the write barrier, so that no write
    /// in flight misses it). False when it is in sync or already being rebuilt.
    pub fn start_rebuild(&self, node: &str, total: u64) -> Result<bool, EngineError> {
        let mut c = self.copies()?;
        if c.in_sync.as_ref().is_some_and(|m| m.iter().any(|x| x == node))
            || c.rebuilding.iter().any(|r| r.node == node)
        {
            return Ok(false);
        }
        c.rebuilding.push(Rebuild { node: node.to_string(), done: 0, total });
        drop(c);
        self.changed();
        Ok(true)
    }

    /// Records a rebuild's progress; false when it was stopped (a live write failed on it).
    pub fn rebuilt(&self, node: &str, done: u64) -> Result<bool, EngineError> {
        let mut c = self.copies()?;
        match c.rebuilding.iter_mut().find(|r| r.node == node) {
            Some(r) => {
                r.done = done;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Stops sending live writes to a copy being rebuilt; what is written from now on (and
    /// what it may not have made durable) is logged for the rebuild that resumes it.
    pub fn stop_rebuild(&self, node: &str) {
        let was = self.copies.lock().map(|mut c| {
            let before = c.rebuilding.len();
            c.rebuilding.retain(|r| r.node != node);
            c.rebuilding.len() < before
        });
        if was.unwrap_or(false)
            && let Ok(mut log) = self.log.lock()
        {
            let unflushed = log.unflushed();
            log.stopped.insert(node.to_string(), unflushed);
        }
        self.changed();
    }

    /// `node`, whose rebuild stopped, may lack `start..end` (a write it failed).
    fn missed(&self, node: &str, start: u64, end: u64) -> Result<(), EngineError> {
        if let Some(ranges) = self.log.lock().map_err(|_| poisoned())?.stopped.get_mut(node) {
            push_capped(ranges, start, end);
        }
        Ok(())
    }

    /// A session of target epoch `epoch` opens (before it writes): the log of everything
    /// written under that epoch starts here, unless it already runs for it. One `Shared` per
    /// volume lives as long as the process, so it sees every write of its epochs.
    pub fn begin_epoch(&self, epoch: u64) -> Result<(), EngineError> {
        let mut log = self.log.lock().map_err(|_| poisoned())?;
        if log.since_epoch != Some(epoch) {
            (log.since_start, log.since_epoch) = (Some(Vec::new()), Some(epoch));
        }
        Ok(())
    }

    /// For a rebuild that resumes `node`'s copy (call under the barrier, with the copy taking
    /// live writes again) where an earlier rebuild, under target epoch `stopped_under`, had
    /// got: what the copy may lack there — logged since that rebuild stopped here, or, when it
    /// stopped under the target before this one (`epoch`), everything this one wrote.
    /// `None`: too much, or nothing, to tell (no resume).
    pub fn missed_since_stop(&self, node: &str, stopped_under: u64, epoch: u64) -> Result<MissedRanges, EngineError> {
        let mut log = self.log.lock().map_err(|_| poisoned())?;
        Ok(match log.stopped.remove(node) {
            Some(ranges) if stopped_under == epoch => ranges,
            _ if stopped_under + 1 == epoch && log.since_epoch == Some(epoch) => log.since_start.clone(),
            _ => None,
        })
    }

    /// A rebuilt copy joined the in-sync set (under the barrier, after the store recorded it):
    /// sessions read from it too, and suspended writes look again.
    pub fn joined(&self, node: &str) -> Result<(), EngineError> {
        let mut c = self.copies()?;
        c.rebuilding.retain(|r| r.node != node);
        let members = c.in_sync.get_or_insert_with(Default::default);
        if !members.iter().any(|m| m == node) {
            Arc::make_mut(members).push(node.to_string());
        }
        drop(c);
        self.changed();
        self.grown.notify_waiters();
        Ok(())
    }

    /// The store no longer lists `node` as in sync.
    pub fn evicted(&self, node: &str) -> Result<(), EngineError> {
        if let Some(m) = self.copies()?.in_sync.as_mut() {
            Arc::make_mut(m).retain(|x| x != node);
        }
        self.changed();
        Ok(())
    }

    /// A write to `start..end` completed on the in-sync copies.
    fn logged(&self, start: u64, end: u64) -> Result<(), EngineError> {
        let mut guard = self.log.lock().map_err(|_| poisoned())?;
        let log = &mut *guard;
        let seq = log.next;
        log.next += 1;
        if log.since_flush.len() >= LOG_MAX {
            log.overflow.get_or_insert(seq);
        } else {
            log.since_flush.push((seq, start, end));
        }
        for ranges in log.departed.values_mut().chain(log.stopped.values_mut()) {
            push_capped(ranges, start, end);
        }
        push_capped(&mut log.since_start, start, end);
        Ok(())
    }

    /// A flush starts: what was logged before it is durable on every copy that completes it.
    fn flush_started(&self) -> Result<u64, EngineError> {
        Ok(self.log.lock().map_err(|_| poisoned())?.next)
    }

    /// Every in-sync copy completed the flush that started at `upto`: regions idle since may
    /// leave the activity record.
    fn flushed(self: &Arc<Self>, upto: u64) -> Result<(), EngineError> {
        let mut log = self.log.lock().map_err(|_| poisoned())?;
        log.since_flush.retain(|(seq, _, _)| *seq >= upto);
        if log.overflow.is_some_and(|o| o < upto) {
            log.overflow = None;
        }
        drop(log);
        self.sweep()?;
        // Regions written just before this flush are not idle yet: look again once they
        // are, so that a volume left alone sheds its record (a new target then has nothing to
        // reconcile).
        if !self.sweep_pending.swap(true, Ordering::SeqCst) {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(super::activity::IDLE + std::time::Duration::from_millis(100)).await;
                this.sweep_pending.store(false, Ordering::SeqCst);
                if let Err(e) = this.sweep() {
                    tracing::debug!(error = %e, "cannot look for idle regions");
                }
            });
        }
        Ok(())
    }

    /// Idle regions that every copy flushed leave the activity record.
    fn sweep(&self) -> Result<(), EngineError> {
        let unflushed = self.log.lock().map_err(|_| poisoned())?.unflushed();
        self.activity.sweep(unflushed.as_deref())
    }

    /// The last target may have left writes in flight in `ranges` (`None`: anywhere): this
    /// target logs them as its own unflushed writes, so that a copy leaving
    /// before they are reconciled and flushed, or whose rebuild resumes under this target,
    /// gets them again.
    pub fn inherit(&self, ranges: Option<&[(u64, u64)]>) -> Result<(), EngineError> {
        let step = super::activity::REGION;
        match ranges {
            Some(ranges) => {
                for (start, end) in ranges {
                    let mut at = *start;
                    while at < *end {
                        self.logged(at, (at + step).min(*end))?;
                        at += step;
                    }
                }
                Ok(())
            }
            None => {
                let mut guard = self.log.lock().map_err(|_| poisoned())?;
                let log = &mut *guard;
                let seq = log.next;
                log.next += 1;
                log.overflow.get_or_insert(seq);
                for ranges in log.departed.values_mut().chain(log.stopped.values_mut()) {
                    *ranges = None;
                }
                log.since_start = None;
                Ok(())
            }
        }
    }

    /// `node` left the in-sync set: from now until its mark, what it may lack is logged.
    pub fn departed(&self, node: &str) -> Result<(), EngineError> {
        let mut log = self.log.lock().map_err(|_| poisoned())?;
        if log.departed.contains_key(node) {
            return Ok(());
        }
        let ranges = log.unflushed();
        log.departed.insert(node.to_string(), ranges);
        Ok(())
    }

    /// Ends logging for `node` (call under the barrier, with its mark taken): the ranges it may
    /// lack besides what changed since its mark; `Some(None)`: too many to tell, `None`: it
    /// was not being logged.
    pub fn take_departed(&self, node: &str) -> Result<Option<MissedRanges>, EngineError> {
        Ok(self.log.lock().map_err(|_| poisoned())?.departed.remove(node))
    }

    /// How sessions link to copies (the latest writer's session's grant and epoch);
    /// `None` once no such session is open here: rebuilds and scrubs run only beside one.
    pub fn linker(&self) -> Option<Arc<dyn Linker>> {
        self.linker.lock().ok()?.as_ref().map(|(l, _)| l.clone())
    }

    /// A writer's session on the target opens with `linker`: held until the guard drops.
    pub fn attach(self: &Arc<Self>, linker: Arc<dyn Linker>) -> Attached {
        if let Ok(mut l) = self.linker.lock() {
            let sessions = l.as_ref().map_or(0, |(_, n)| *n);
            *l = Some((linker, sessions + 1));
        }
        Attached(self.clone())
    }
}

/// A writer's session on the volume's target; the last one to close takes the linker
/// with it.
pub struct Attached(Arc<Shared>);

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(mut l) = self.0.linker.lock() {
            match l.as_mut() {
                Some((_, n)) if *n > 1 => *n -= 1,
                _ => *l = None,
            }
        }
    }
}

/// One copy: the node holding it and the way to reach it.
#[derive(Clone)]
pub struct Member {
    pub node: String,
    pub io: Arc<Backing>,
}

/// The copies an export's requests go to.
pub enum Replicas {
    /// One copy (the volume here, or on the node holding it): requests go straight to it.
    One { node: String, io: Backing },
    /// Every in-sync copy of a replicated volume, and the copies being rebuilt.
    Many(InSyncCopies),
}

pub struct InSyncCopies {
    /// This session's links to the copies (the local one first: it serves the reads). Behind
    /// an `Arc` so that a request takes them without copying the list.
    links: RwLock<Arc<Vec<Member>>>,
    in_sync: Arc<dyn InSyncSet>,
    /// Below this many in-sync copies writes wait (suspended) rather than be acknowledged.
    min_insync: usize,
    /// Shared by every session of the volume on this node (multi-conn clients too), so that
    /// overlapping writes from any of them never reach the members in different orders.
    shared: Arc<Shared>,
    /// The `Shared::generation` this session's links reflect.
    seen: AtomicU64,
    linker: Arc<dyn Linker>,
    /// A writer's session on the target: counted while it lasts.
    _attached: Option<Attached>,
}

/// How long a write waits, suspended, for enough copies to be in sync again before it fails.
/// Long enough for a node to restart and its copy to be rebuilt; the kernel's NBD client waits
/// as long as its own timeout.
pub const SUSPEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

impl Replicas {
    /// A volume with one copy, on `node` (empty: here).
    pub fn single(node: &str, io: Backing) -> Replicas {
        Replicas::One { node: node.to_string(), io }
    }

    /// A replicated volume's in-sync members (the local copy first, it serves the reads).
    pub fn replicated(
        members: Vec<Member>,
        in_sync: Arc<dyn InSyncSet>,
        min_insync: usize,
        shared: Arc<Shared>,
        linker: Arc<dyn Linker>,
        attached: Option<Attached>,
    ) -> Result<Replicas, EngineError> {
        let nodes: Vec<String> = members.iter().map(|m| m.node.clone()).collect();
        shared.adopt(&nodes)?;
        Ok(Replicas::Many(InSyncCopies {
            links: RwLock::new(Arc::new(members)),
            in_sync,
            min_insync: min_insync.max(1),
            shared,
            // Not the current generation: the first request reconciles with the shared list.
            seen: AtomicU64::new(u64::MAX),
            linker,
            _attached: attached,
        }))
    }

    /// The nodes of the copies in sync.
    pub fn nodes(&self) -> Vec<String> {
        match self {
            Replicas::One { node, .. } => vec![node.clone()],
            Replicas::Many(m) => m.shared.in_sync().map(|s| s.to_vec()).unwrap_or_default(),
        }
    }
}

impl InSyncCopies {
    /// Makes this session's links match the shared lists: links to copies that joined or
    /// started rebuilding, drops the ones evicted.
    async fn follow(&self) -> Result<(), EngineError> {
        let generation = self.shared.generation.load(Ordering::SeqCst);
        if generation == self.seen.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (in_sync, rebuilding) = {
            let c = self.shared.copies()?;
            (c.in_sync.clone().unwrap_or_default(), c.rebuilding.iter().map(|r| r.node.clone()).collect::<Vec<_>>())
        };
        let wanted = |n: &String| in_sync.contains(n) || rebuilding.contains(n);
        self.drop_links(|m| !wanted(&m.node))?;
        for node in in_sync.iter().chain(&rebuilding) {
            if self.links.read().map_err(|_| poisoned())?.iter().any(|m| &m.node == node) {
                continue;
            }
            match self.linker.link(node).await {
                Ok(io) => {
                    let mut links = self.links.write().map_err(|_| poisoned())?;
                    Arc::make_mut(&mut links).push(Member { node: node.clone(), io: Arc::new(io) });
                }
                Err(e) if rebuilding.contains(node) => {
                    tracing::warn!(node, error = %e, "cannot link to a copy being rebuilt: its rebuild stops");
                    self.shared.stop_rebuild(node);
                }
                Err(e) => {
                    tracing::warn!(node, error = %e, "cannot link to an in-sync copy: it leaves the set");
                    self.shared.departed(node)?;
                    self.in_sync.evict(node).await?;
                    self.shared.evicted(node)?;
                }
            }
        }
        self.seen.store(generation, Ordering::SeqCst);
        Ok(())
    }

    fn links(&self) -> Result<Arc<Vec<Member>>, EngineError> {
        Ok(self.links.read().map_err(|_| poisoned())?.clone())
    }

    fn drop_links(&self, gone: impl Fn(&Member) -> bool) -> Result<(), EngineError> {
        let mut links = self.links.write().map_err(|_| poisoned())?;
        if links.iter().any(&gone) {
            Arc::make_mut(&mut links).retain(|m| !gone(m));
        }
        Ok(())
    }

    /// The first in-sync copy (any copy when none is): size, name and access of the volume.
    /// Asked on every request, so it copies no list.
    fn first(&self) -> Result<Arc<Backing>, EngineError> {
        let (in_sync, links) = (self.shared.in_sync()?, self.links()?);
        let first = links.iter().find(|m| in_sync.contains(&m.node)).or(links.first());
        first.map(|m| m.io.clone()).ok_or_else(|| EngineError::Unavailable("no copy of the volume is in sync".into()))
    }

    /// From the first in-sync copy; the next ones if it fails. Never from a copy being rebuilt.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, EngineError> {
        self.follow().await?;
        let (in_sync, links) = (self.shared.in_sync()?, self.links()?);
        let mut last = None;
        for io in links.iter().filter(|m| in_sync.contains(&m.node)).map(|m| &m.io) {
            match io.read(offset, len).await {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| EngineError::Unavailable("no copy of the volume is in sync".into())))
    }

    /// Runs a change on every copy (in sync or being rebuilt). In-sync copies that failed it
    /// leave the set in the store before it is acknowledged; a copy being rebuilt that failed
    /// it stops being rebuilt. Fails when no in-sync copy has it; waits (suspended) while
    /// fewer than `min_insync` copies are in sync.
    async fn on_every<F, Fut>(&self, range: Option<(u64, u64)>, op: F) -> Result<(), EngineError>
    where
        F: Fn(Arc<Backing>) -> Fut,
        Fut: Future<Output = Result<(), EngineError>>,
    {
        let ordered = match range {
            Some((start, end)) => Some(self.shared.order.enter(start, end).await?),
            None => None,
        };
        // Recorded before any copy sees it: if this target dies with it in flight, the next
        // one makes the copies agree there.
        let _active = match range {
            Some((start, end)) => Some(self.shared.activity.enter(start, end).await?),
            None => None,
        };
        let flush_from = match range {
            None => Some(self.shared.flush_started()?),
            Some(_) => None,
        };
        // In order: a copy that joined or started rebuilding under a barrier gets every write
        // after it.
        self.follow().await?;
        let links = self.links()?;
        let results = futures_util::future::join_all(links.iter().map(|m| op(m.io.clone()))).await;
        let in_sync = self.shared.in_sync()?;
        let held = |m: &Member, r: &Result<(), EngineError>| r.is_ok() && in_sync.contains(&m.node);
        if !links.iter().zip(&results).any(|(m, r)| held(m, r)) {
            // No in-sync copy has it: nothing to evict, the request fails.
            let mut failures = links.iter().zip(results).filter(|(m, _)| in_sync.contains(&m.node));
            return match failures.next() {
                Some((_, r)) => r,
                None => Err(EngineError::Unavailable("no copy of the volume is in sync".into())),
            };
        }
        if let Some((start, end)) = range {
            self.shared.logged(start, end)?;
        }
        for (m, r) in links.iter().zip(&results) {
            let Err(e) = r else { continue };
            if in_sync.contains(&m.node) {
                tracing::warn!(node = %m.node, error = %e, "a replica failed a write: leaving the in-sync set");
                self.shared.departed(&m.node)?;
                self.in_sync.evict(&m.node).await?;
                self.shared.evicted(&m.node)?;
            } else {
                tracing::warn!(node = %m.node, error = %e, "a copy being rebuilt failed a write: its rebuild stops");
                self.shared.stop_rebuild(&m.node);
                if let Some((start, end)) = range {
                    self.shared.missed(&m.node, start, end)?;
                }
            }
            self.drop_links(|x| x.node == m.node)?;
        }
        if let Some(upto) = flush_from {
            self.shared.flushed(upto)?;
        }
        // Every copy still in sync has it. Wait for more without holding the range: the
        // rebuild that brings a copy back copies it.
        drop(ordered);
        self.enough_in_sync().await
    }

    /// Waits (up to [`SUSPEND_PATIENCE`]) until at least `min_insync` copies are in sync.
    async fn enough_in_sync(&self) -> Result<(), EngineError> {
        if self.shared.in_sync()?.len() >= self.min_insync {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + SUSPEND_PATIENCE;
        let mut told = false;
        loop {
            let grown = self.shared.grown.notified();
            tokio::pin!(grown);
            grown.as_mut().enable();
            let left = self.shared.in_sync()?.len();
            if left >= self.min_insync {
                if told {
                    tracing::info!(copies = left, "enough copies in sync again: suspended writes go on");
                }
                return Ok(());
            }
            if !told {
                tracing::warn!(copies = left, min_insync = self.min_insync, "too few copies in sync: writes wait");
                told = true;
            }
            if tokio::time::timeout_at(deadline, grown).await.is_err() {
                return Err(EngineError::Unavailable(format!(
                    "{left} copies in sync, fewer than the {} required, for {} s: the write is not acknowledged",
                    self.min_insync,
                    SUSPEND_PATIENCE.as_secs()
                )));
            }
        }
    }
}

/// A volume of one copy costs one match per request; a replicated one reads from its first
/// member and changes every member.
impl VolumeIo for Replicas {
    fn name(&self) -> String {
        match self {
            Replicas::One { io, .. } => io.name(),
            Replicas::Many(m) => m.first().map(|f| f.name()).unwrap_or_default(),
        }
    }
    fn size(&self) -> u64 {
        match self {
            Replicas::One { io, .. } => io.size(),
            Replicas::Many(m) => m.first().map(|f| f.size()).unwrap_or(0),
        }
    }
    fn read_only(&self) -> bool {
        match self {
            Replicas::One { io, .. } => io.read_only(),
            Replicas::Many(m) => m.first().map(|f| f.read_only()).unwrap_or(true),
        }
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, EngineError> {
        match self {
            Replicas::One { io, .. } => io.read(offset, len).await,
            Replicas::Many(m) => m.read(offset, len).await,
        }
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let m = match self {
            Replicas::One { io, .. } => return io.write(offset, data, fua).await,
            Replicas::Many(m) => m,
        };
        let range = (offset, offset + data.len() as u64);
        m.on_every(Some(range), |io| {
            let data = data.clone();
            async move { io.write(offset, data, fua).await }
        })
        .await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        match self {
            Replicas::One { io, .. } => io.trim(offset, len, fua).await,
            Replicas::Many(m) => {
                m.on_every(Some((offset, offset + len as u64)), |io| async move { io.trim(offset, len, fua).await })
                    .await
            }
        }
    }
    async fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        match self {
            Replicas::One { io, .. } => io.write_zeroes(offset, len, unmap, fua).await,
            Replicas::Many(m) => {
                let range = Some((offset, offset + len as u64));
                m.on_every(range, |io| async move { io.write_zeroes(offset, len, unmap, fua).await }).await
            }
        }
    }
    async fn flush(&self) -> Result<(), EngineError> {
        match self {
            Replicas::One { io, .. } => io.flush().await,
            Replicas::Many(m) => m.on_every(None, |io| async move { io.flush().await }).await,
        }
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        match self {
            Replicas::One { io, .. } => io.block_status(offset, len).await,
            Replicas::Many(m) => m.first()?.block_status(offset, len).await,
        }
    }
    fn earlier_snapshots(&self) -> Vec<String> {
        match self {
            Replicas::One { io, .. } => io.earlier_snapshots(),
            Replicas::Many(m) => m.first().map(|f| f.earlier_snapshots()).unwrap_or_default(),
        }
    }
    async fn changed_since(&self, snapshot: &str, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        match self {
            Replicas::One { io, .. } => io.changed_since(snapshot, offset, len).await,
            Replicas::Many(m) => m.first()?.changed_since(snapshot, offset, len).await,
        }
    }
}

/// Keeps overlapping writes from being in flight together (each waits for the earlier ones it
/// overlaps), so that every member applies them in the same order; a barrier (a snapshot of
/// every member) holds them all.
#[derive(Default)]
pub struct WriteOrder {
    in_flight: Mutex<Vec<(u64, u64, u64)>>,
    next: AtomicU64,
    done: Notify,
}

pub struct Ordered<'a> {
    order: &'a WriteOrder,
    id: u64,
}

impl Drop for Ordered<'_> {
    fn drop(&mut self) {
        if let Ok(mut v) = self.order.in_flight.lock() {
            v.retain(|(_, _, id)| *id != self.id);
        }
        self.order.done.notify_waiters();
    }
}

impl WriteOrder {
    /// Waits until no write is in flight and holds new ones until the guard is dropped.
    pub async fn barrier(&self) -> Result<Ordered<'_>, EngineError> {
        self.enter(0, u64::MAX).await
    }

    /// Waits until no write overlapping `start..end` is in flight and holds new ones that
    /// overlap it until the guard is dropped.
    pub async fn enter(&self, start: u64, end: u64) -> Result<Ordered<'_>, EngineError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            {
                let mut v = self.in_flight.lock().map_err(|_| poisoned())?;
                if !v.iter().any(|(s, e, _)| *s < end && start < *e) {
                    v.push((start, end, id));
                    return Ok(Ordered { order: self, id });
                }
            }
            done.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_writes_wait_for_each_other_and_others_do_not() {
        let order = Arc::new(WriteOrder::default());
        let first = order.enter(0, 4096).await.unwrap();
        // Disjoint: admitted at once.
        let beside = order.enter(4096, 8192).await.unwrap();
        let waiter = tokio::spawn({
            let order = order.clone();
            async move {
                let _g = order.enter(1024, 2048).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "an overlapping write went in flight beside another");
        drop(beside);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished());
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_stopped_rebuild_resumes_with_what_was_written_since_and_unflushed() {
        let shared = Arc::new(Shared::default());
        shared.adopt(&["a".to_string()]).unwrap();
        shared.begin_epoch(5).unwrap();
        // Stopped under the target before (epoch 4), nothing written since: nothing missed.
        assert_eq!(shared.missed_since_stop("b", 4, 5).unwrap(), Some(vec![]));
        assert!(shared.start_rebuild("b", 1 << 20).unwrap());
        shared.logged(0, 10).unwrap();
        let upto = shared.flush_started().unwrap();
        shared.flushed(upto).unwrap();
        shared.logged(20, 30).unwrap();
        shared.stop_rebuild("b");
        shared.logged(40, 50).unwrap();
        // Unflushed when it stopped, and written since; not what a completed flush covered.
        assert_eq!(shared.missed_since_stop("b", 5, 5).unwrap(), Some(vec![(20, 30), (40, 50)]));
        // Taken; under this epoch nothing else can tell what it missed.
        assert_eq!(shared.missed_since_stop("b", 5, 5).unwrap(), None);
        // Under the epoch before: everything this epoch wrote.
        assert_eq!(shared.missed_since_stop("b", 4, 5).unwrap(), Some(vec![(0, 10), (20, 30), (40, 50)]));
        // Older, or a log of another epoch: no resume.
        assert_eq!(shared.missed_since_stop("b", 3, 5).unwrap(), None);
        assert_eq!(shared.missed_since_stop("b", 5, 6).unwrap(), None);
        // A new epoch starts its own log.
        shared.begin_epoch(6).unwrap();
        assert_eq!(shared.missed_since_stop("b", 5, 6).unwrap(), Some(vec![]));
        // Stopping a copy that was not being rebuilt logs nothing for it; past the cap, too
        // much to tell.
        shared.stop_rebuild("c");
        for i in 0..=LOG_MAX as u64 {
            shared.logged(i, i + 1).unwrap();
        }
        assert_eq!(shared.missed_since_stop("c", 5, 6).unwrap(), None);
    }
}
