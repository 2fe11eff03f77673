//! The metadata store's one writer: a thread that runs every commit in the order it was queued.
//! Grouped (non-durable) commits queued while the previous transaction ran are committed
//! together, so first writes from many requests share a transaction instead of waiting in line
//! for one each. Durable commits run on the same thread, after every grouped commit queued
//! before them, so a durable commit knows exactly which journal records it covers.
//!
//! With a journal, a grouped commit's record goes onto the journal's ring as it is queued and
//! the caller does not wait for the store: the journal makes it durable at the next FLUSH and
//! the store folds it in behind. Without one, the caller waits for the transaction.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::error::{EngineError, poisoned};
use crate::meta::store::{MetaOp, Store};
use crate::space::journal::Journal;

type Reply = tokio::sync::oneshot::Sender<Result<(), EngineError>>;

/// A durable commit run on the thread; gets the last journal sequence committed before it.
type Durable = Box<dyn FnOnce(Option<u64>) + Send>;

enum Job {
    /// `seq`: its journal sequence; `reply`: `None` when the caller does not wait.
    Grouped {
        ops: Vec<MetaOp>,
        seq: Option<u64>,
        reply: Option<Reply>,
    },
    Durable(Durable),
}

/// Most commits folded into one transaction.
const BATCH: usize = 512;
/// How long journaled commits (which nobody waits for) are gathered before one transaction.
/// The journal holds them durably meanwhile, and a durable commit ends the wait at once. Every
/// 5 ms, QD1 first writes paid a redb transaction per ~20 records on the thread beside them
/// (two cores): at 50 ms their write p99 fell by a fifth (benches/README, "First writes at
/// QD1").
const FOLD_DELAY: std::time::Duration = std::time::Duration::from_millis(50);

pub struct Committer {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The commit thread's loop.
fn run(rx: Receiver<Job>, store: Arc<Store>, dirty: Arc<AtomicBool>) {
    let mut folded: Option<u64> = None;
    let mut next = None;
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let (mut ops, mut replies) = match job {
            Job::Durable(f) => {
                f(folded);
                continue;
            }
            Job::Grouped { ops, seq, reply } => {
                folded = seq.or(folded);
                (ops, vec![reply])
            }
        };
        // Nobody waits for journaled commits: gather them for a while, so that redb's
        // per-transaction work is paid once per many first writes, not once per request.
        let deadline = std::time::Instant::now() + FOLD_DELAY;
        while replies.len() < BATCH {
            let waited = replies.iter().all(Option::is_none);
            let job = match rx.try_recv() {
                Ok(j) => Ok(j),
                Err(_) if waited => rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())),
                Err(_) => break,
            };
            match job {
                Ok(Job::Grouped { ops: o, seq, reply }) => {
                    ops.extend(o);
                    folded = seq.or(folded);
                    replies.push(reply);
                }
                // A durable commit waits for this batch, then runs.
                Ok(durable) => {
                    next = Some(durable);
                    break;
                }
                Err(_) => break,
            }
        }
        let r = store.commit(&ops, false, || Ok(()));
        dirty.store(true, Relaxed);
        if let Err(e) = &r
            && replies.iter().all(Option::is_none)
        {
            // Journaled: the records are safe in the ring; the store is rewritten from memory
            // when it recovers.
            tracing::debug!(error = %e, "grouped metadata commit failed");
        }
        for reply in replies.into_iter().flatten() {
            let _ = reply.send(r.as_ref().map(|_| ()).map_err(EngineError::for_each_waiter));
        }
    }
}

impl Committer {
    /// Starts the commit thread; every grouped commit sets `dirty` (a durable one clears it).
    pub fn spawn(store: Arc<Store>, dirty: Arc<AtomicBool>) -> Result<Committer, EngineError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("thinbd-commit".into())
            .spawn(move || run(rx, store, dirty))
            .map_err(|e| EngineError::Internal(format!("cannot start the commit thread: {e}")))?;
        Ok(Committer { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) })
    }

    fn send(&self, job: Job) -> Result<(), EngineError> {
        let sent = match self.tx.lock().map_err(|_| poisoned())?.as_ref() {
            Some(c) => c.send(job).is_ok(),
            None => false,
        };
        sent.then_some(()).ok_or_else(|| EngineError::Internal("commit thread is gone".into()))
    }

    /// Commits `ops` non-durably together with whatever else is queued, and waits for it.
    pub async fn commit(&self, ops: Vec<MetaOp>) -> Result<(), EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Grouped { ops, seq: None, reply: Some(tx) })?;
        rx.await.map_err(|_| EngineError::Internal("commit thread dropped a commit".into()))?
    }

    /// Puts `ops` on the journal's ring as its next record and queues them for the store,
    /// without waiting: once this returns, the next FLUSH makes them durable. The record and
    /// the queue take the same order (one lock), which the store's commits keep. `shown`:
    /// memory already shows the change (else the caller reports it with `Ring::applied`).
    pub fn journal(&self, journal: &Journal, ops: Vec<MetaOp>, data_first: bool, shown: bool) -> u64 {
        let mut ring = journal.ring.lock().unwrap_or_else(|p| p.into_inner());
        let seq = ring.push(&ops, data_first);
        if !shown {
            ring.unapplied(seq);
        }
        if self.send(Job::Grouped { ops, seq: Some(seq), reply: None }).is_err() {
            // Stopping: the ring still has the record for the final FLUSH.
            tracing::debug!(seq, "commit thread gone; the record stays in the journal");
        }
        seq
    }

    /// Runs `f` on the commit thread after every commit queued before it, with the last
    /// journal sequence those covered (`None`: no journaled commit yet).
    pub async fn durable<T: Send + 'static>(
        &self,
        f: impl FnOnce(Option<u64>) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Durable(Box::new(move |covered| {
            let _ = tx.send(f(covered));
        })))?;
        rx.await.map_err(|_| EngineError::Internal("commit thread dropped a commit".into()))?
    }

    /// Blocks until every commit queued so far is in the store (not necessarily durably).
    pub fn settle(&self) -> Result<(), EngineError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(Job::Durable(Box::new(move |_| {
            let _ = tx.send(());
        })))?;
        rx.recv().map_err(|_| EngineError::Internal("commit thread dropped a commit".into()))
    }
}

impl Drop for Committer {
    /// Stops the commit thread, so the store it holds closes and a reopen finds the file free.
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take())
            // Dropped by a durable commit's last reference, on the thread itself: it ends
            // when the channel is found closed.
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}
