//! Group commit: one thread takes every non-durable metadata change queued while the previous
//! transaction ran and commits them all in one, so first writes from many requests share a
//! transaction instead of waiting in line for one each.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::error::{EngineError, poisoned};
use crate::meta::store::{MetaOp, Store};

type CommitJob = (Vec<MetaOp>, tokio::sync::oneshot::Sender<Result<(), EngineError>>);

/// Most commits folded into one transaction.
const BATCH: usize = 512;

pub struct Committer {
    tx: Mutex<Option<std::sync::mpsc::Sender<CommitJob>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Committer {
    /// Starts the commit thread; every commit sets `dirty` (a later durable one clears it).
    pub fn spawn(store: Arc<Store>, dirty: Arc<AtomicBool>) -> Result<Committer, EngineError> {
        let (tx, rx) = std::sync::mpsc::channel::<CommitJob>();
        let thread = std::thread::Builder::new()
            .name("thinbd-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let (mut ops, mut replies) = (first.0, vec![first.1]);
                    while let Ok((o, r)) = rx.try_recv() {
                        ops.extend(o);
                        replies.push(r);
                        if replies.len() >= BATCH {
                            break;
                        }
                    }
                    let r = store.commit(&ops, false, || Ok(()));
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
    pub async fn commit(&self, ops: Vec<MetaOp>) -> Result<(), EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = match self.tx.lock().map_err(|_| poisoned())?.as_ref() {
            Some(c) => c.send((ops, tx)).is_ok(),
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
