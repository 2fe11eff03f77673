//! How many clients the calling thread serves, as the thread's owner declares it (the NBD
//! session threads, `nbd::threads`). A thread that serves one client may run a short blocking
//! call such as the FLUSH's `fdatasync` itself when nothing else of its client is waiting
//! ([`backend::BlockStore::sync_here`](super::backend::BlockStore::sync_here)): the hand-off to
//! a blocking thread and back costs more than the wait it spares (benches/README, "A FLUSH on
//! its session's thread"). Threads nobody declared (the daemon's runtime, blocking threads)
//! never count as alone.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

thread_local! {
    static CLIENTS: RefCell<Option<Arc<AtomicUsize>>> = const { RefCell::new(None) };
}

/// Declares `clients` as the count of clients the calling thread serves, for the rest of its
/// life (its owner keeps the count current).
pub fn declare(clients: Arc<AtomicUsize>) {
    CLIENTS.with(|c| *c.borrow_mut() = Some(clients));
}

/// Whether the calling thread was declared and serves at most one client now.
pub fn alone() -> bool {
    CLIENTS.with(|c| c.borrow().as_ref().is_some_and(|n| n.load(Relaxed) <= 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_alone_only_when_declared_with_one_client() {
        std::thread::spawn(|| {
            assert!(!alone(), "undeclared");
            let n = Arc::new(AtomicUsize::new(1));
            declare(n.clone());
            assert!(alone());
            n.store(2, Relaxed);
            assert!(!alone(), "two clients");
            n.store(0, Relaxed);
            assert!(alone());
        })
        .join()
        .unwrap();
        assert!(!alone(), "another thread's declaration is its own");
    }
}
