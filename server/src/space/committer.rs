//! Group commit: one thread takes every non-durable metadata change queued while the previous
//! transaction ran and commits them all in one, so first writes from many requests share a
//! transaction instead of waiting in line for one each. Where the pool has a journal, each
//! transaction's ops go onto its ring as one record, under the journal's commit order.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::error::{EngineError, poisoned};
use crate::meta::store::{MetaOp, Store};
use crate::space::journal::Journal;

/// Ops, whether they claim clusters that may hold an earlier owner's bytes, and the reply.
type CommitJob = (Vec<MetaOp>, bool, tokio::sync::oneshot::Sender<Result<(), EngineError>>);

/// Most commits folded into one transaction.
const BATCH: usize = 512;

pub struct Committer {
    tx: Mutex<Option<std::sync::mpsc::Sender<CommitJob>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Committer {
    /// Starts the commit thread; every commit sets `dirty` (a later durable one clears it).
    pub fn spawn(
        store: Arc<Store>,
        dirty: Arc<AtomicBool>,
        journal: Option<Arc<Journal>>,
    ) -> Result<Committer, EngineError> {
        let (tx, rx) = std::sync::mpsc::channel::<CommitJob>();
        let thread = std::thread::Builder::new()
            .name("thinbd-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let (mut ops, mut data_first, mut replies) = (first.0, first.1, vec![first.2]);
                    while let Ok((o, d, r)) = rx.try_recv() {
                        ops.extend(o);
                        data_first |= d;
                        replies.push(r);
                        if replies.len() >= BATCH {
                            break;
                        }
                    }
                    let r = match &journal {
                        Some(j) => match j.order.lock() {
                            Ok(_order) => store.commit(&ops, false, || Ok(())).and_then(|()| {
                                j.ring.lock().map(|mut ring| ring.push(ops, data_first)).map_err(|_| poisoned())
                            }),
                            Err(_) => Err(poisoned()),
                        },
                        None => store.commit(&ops, false, || Ok(())),
                    };
                    dirty.store(true, Relaxed);
                    for reply in replies {
                        let _ = reply.send(r.as_ref().map(|_| ()).map_err(EngineError::for_each_waiter));
                    }
                }
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the commit thread: {e}")))?;
        Ok(Committer { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) })
    }

    /// Commits `ops` non-durably together with whatever else is queued.
    pub async fn commit(&self, ops: Vec<MetaOp>, data_first: bool) -> Result<(), EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = match self.tx.lock().map_err(|_| poisoned())?.as_ref() {
            Some(c) => c.send((ops, data_first, tx)).is_ok(),
            None => false,
        };
        if !sent {
            return Err(EngineError::Internal("commit thread is gone".into()));
        }
        rx.await.map_err(|_| EngineError::Internal("commit thread dropped a commit".into()))?
    }
}

impl Drop for Committer {
    /// Stops the commit thread, so the store it holds closes and a reopen finds the file free.
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}
