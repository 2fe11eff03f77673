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
}

/// What every session of one replicated volume on its target node shares: the order of
/// writes (and snapshot or rebuild barriers), the copies that joined the in-sync set since the
/// sessions opened (each links to them before its next write), and a way to link to a copy.
#[derive(Default)]
pub struct Shared {
    pub order: WriteOrder,
    joined: Mutex<Vec<String>>,
    generation: AtomicU64,
    linker: Mutex<Option<Arc<dyn Linker>>>,
}

impl Shared {
    /// A copy joined the in-sync set (rebuilt, under the barrier): sessions write to it too.
    pub fn joined(&self, node: &str) -> Result<(), EngineError> {
        self.joined.lock().map_err(|_| poisoned())?.push(node.to_string());
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// How sessions link to copies (the latest session's grant and epoch).
    pub fn linker(&self) -> Option<Arc<dyn Linker>> {
        self.linker.lock().ok()?.clone()
    }

    pub fn set_linker(&self, linker: Arc<dyn Linker>) {
        if let Ok(mut l) = self.linker.lock() {
            *l = Some(linker);
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
    /// Every in-sync copy of a replicated volume.
    Many(InSyncCopies),
}

pub struct InSyncCopies {
    members: RwLock<Vec<Member>>,
    in_sync: Arc<dyn InSyncSet>,
    /// Below this many members nothing more is acknowledged.
    min_insync: usize,
    /// Shared by every session of the volume on this node (multi-conn clients too), so that
    /// overlapping writes from any of them never reach the members in different orders.
    shared: Arc<Shared>,
    /// The `Shared::generation` this session's members reflect.
    seen: AtomicU64,
    linker: Arc<dyn Linker>,
}

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
    ) -> Replicas {
        let seen = AtomicU64::new(shared.generation.load(Ordering::SeqCst));
        shared.set_linker(linker.clone());
        Replicas::Many(InSyncCopies {
            members: RwLock::new(members),
            in_sync,
            min_insync: min_insync.max(1),
            shared,
            seen,
            linker,
        })
    }

    /// The nodes of the copies (still in sync).
    pub fn nodes(&self) -> Vec<String> {
        match self {
            Replicas::One { node, .. } => vec![node.clone()],
            Replicas::Many(m) => {
                m.members.read().map(|m| m.iter().map(|m| m.node.clone()).collect()).unwrap_or_default()
            }
        }
    }
}

impl InSyncCopies {
    /// Links to the copies that joined the in-sync set since this session last looked.
    async fn follow_joins(&self) -> Result<(), EngineError> {
        let generation = self.shared.generation.load(Ordering::SeqCst);
        if generation == self.seen.load(Ordering::SeqCst) {
            return Ok(());
        }
        let joined = self.shared.joined.lock().map_err(|_| poisoned())?.clone();
        for node in joined {
            if self.members.read().map_err(|_| poisoned())?.iter().any(|m| m.node == node) {
                continue;
            }
            let io = Arc::new(self.linker.link(&node).await?);
            self.members.write().map_err(|_| poisoned())?.push(Member { node, io });
        }
        self.seen.store(generation, Ordering::SeqCst);
        Ok(())
    }

    fn members(&self) -> Result<Vec<Member>, EngineError> {
        Ok(self.members.read().map_err(|_| poisoned())?.clone())
    }

    fn first(&self) -> Result<Arc<Backing>, EngineError> {
        let m = self.members.read().map_err(|_| poisoned())?;
        m.first()
            .map(|m| m.io.clone())
            .ok_or_else(|| EngineError::Unavailable("no copy of the volume is in sync".into()))
    }

    /// From the first member; the next ones if it fails.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, EngineError> {
        let mut last = None;
        for m in self.members()? {
            match m.io.read(offset, len).await {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| EngineError::Unavailable("no copy of the volume is in sync".into())))
    }

    /// Runs a change on every member; members that failed it leave the in-sync set before it
    /// is acknowledged. Fails when every member failed (none has it) or too few are left.
    async fn on_every<F, Fut>(&self, range: Option<(u64, u64)>, op: F) -> Result<(), EngineError>
    where
        F: Fn(Arc<Backing>) -> Fut,
        Fut: Future<Output = Result<(), EngineError>>,
    {
        let _ordered = match range {
            Some((start, end)) => Some(self.shared.order.enter(start, end).await?),
            None => None,
        };
        // In order: a copy that joined under a barrier gets every write after it.
        self.follow_joins().await?;
        let members = self.members()?;
        let results = futures_util::future::join_all(members.iter().map(|m| op(m.io.clone()))).await;
        if results.iter().all(Result::is_err) {
            let mut results = results;
            return results.swap_remove(0);
        }
        for (m, r) in members.iter().zip(&results) {
            if let Err(e) = r {
                tracing::warn!(node = %m.node, error = %e, "a replica failed a write: leaving the in-sync set");
                self.in_sync.evict(&m.node).await?;
                self.members.write().map_err(|_| poisoned())?.retain(|x| x.node != m.node);
            }
        }
        let left = self.members.read().map_err(|_| poisoned())?.len();
        if left < self.min_insync {
            return Err(EngineError::Unavailable(format!(
                "{left} copies in sync, fewer than the {} required: writes are not acknowledged",
                self.min_insync
            )));
        }
        Ok(())
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

    async fn enter(&self, start: u64, end: u64) -> Result<Ordered<'_>, EngineError> {
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
}
