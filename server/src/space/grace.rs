//! Grace periods for freed clusters. A read resolves a virtual cluster to a physical one and
//! then reads the pool; if that cluster were freed and handed to another layer in between, the
//! read would return someone else's bytes. Reads therefore run inside a [`ReadGuard`], and
//! freed clusters go back to the allocator only after [`Grace::wait`]: every read that began
//! before the wait (and so possibly before the free) has ended. Two counters, one per epoch
//! parity, as in RCU.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

#[derive(Default)]
pub struct Grace {
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    drained: tokio::sync::Notify,
    /// One wait at a time: each drains the slot the previous one made current.
    waiting: tokio::sync::Mutex<()>,
}

/// Held by a read from resolving its clusters until its pool reads are done.
pub struct ReadGuard<'a> {
    grace: &'a Grace,
    slot: usize,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        if self.grace.active[self.slot].fetch_sub(1, SeqCst) == 1 {
            self.grace.drained.notify_waiters();
        }
    }
}

impl Grace {
    pub fn enter(&self) -> ReadGuard<'_> {
        loop {
            let e = self.epoch.load(SeqCst);
            let slot = (e & 1) as usize;
            self.active[slot].fetch_add(1, SeqCst);
            // A wait that flipped the epoch meanwhile may already have seen this slot empty.
            if self.epoch.load(SeqCst) == e {
                return ReadGuard { grace: self, slot };
            }
            drop(ReadGuard { grace: self, slot });
        }
    }

    /// Returns once every read that entered before this call has ended.
    pub async fn wait(&self) {
        let _one = self.waiting.lock().await;
        let old = (self.epoch.fetch_add(1, SeqCst) & 1) as usize;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.active[old].load(SeqCst) == 0 {
                return;
            }
            drained.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn wait_returns_only_after_earlier_reads_end() {
        let g = Arc::new(Grace::default());
        let g2 = g.clone();
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = std::thread::spawn(move || {
            let _r = g2.enter();
            let _ = entered_tx.send(());
            let _ = end_rx.blocking_recv();
        });
        entered_rx.await.unwrap();
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "wait returned while an earlier read was running");
        // A read that starts after the wait began does not hold it up.
        let _late = g.enter();
        end_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("wait ends").unwrap();
        reader.join().unwrap();
        tokio::time::timeout(Duration::from_secs(5), g.wait()).await.expect_err("the late read still runs");
    }
}
