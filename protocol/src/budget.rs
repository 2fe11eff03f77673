//! Byte budgets for request data held in memory: write payloads being read or written and
//! read replies waiting to be sent. A session takes from its own budget and from the server's
//! before it reads a request's payload or starts a read, and gives back when the write is done
//! or the reply is on the socket; when either is spent the reader stops reading
//! (back-pressure), so a client that pipelines large reads and never takes the replies holds at
//! most its session budget, and all clients together at most the server budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A pool of bytes that requests borrow while their data is in memory.
#[derive(Clone)]
pub struct ByteBudget {
    sem: Arc<Semaphore>,
    total: u64,
}

impl ByteBudget {
    pub fn new(bytes: u64) -> Self {
        let total = bytes.clamp(1, Semaphore::MAX_PERMITS as u64);
        ByteBudget { sem: Arc::new(Semaphore::new(total as usize)), total }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn in_use(&self) -> u64 {
        self.total - self.sem.available_permits() as u64
    }

    /// Takes `bytes` (capped at the whole budget, so one large request still fits), waiting
    /// while they are out. `None` only if the budget was closed.
    pub async fn take(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let n = bytes.min(self.total).min(u32::MAX as u64) as u32;
        self.sem.clone().acquire_many_owned(n).await.ok()
    }

    /// Takes `bytes` only if they are free now.
    pub fn try_take(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let n = bytes.min(self.total).min(u32::MAX as u64) as u32;
        self.sem.clone().try_acquire_many_owned(n).ok()
    }
}

/// One session's own budget. Only its session takes from it, and every release happens while
/// that session's task runs (a write's request finishing, a reply written), so the session
/// waits for room by asking again after each of its passes: a counter, no semaphore and no
/// lock per request.
pub(crate) struct SessionBudget {
    held: Arc<AtomicU64>,
    total: u64,
}

/// Bytes taken from a [`SessionBudget`], given back when dropped.
pub(crate) struct Held {
    bytes: u64,
    held: Arc<AtomicU64>,
}

impl SessionBudget {
    pub(crate) fn new(bytes: u64) -> Self {
        SessionBudget { held: Arc::default(), total: bytes.max(1) }
    }

    /// Takes `bytes` (capped at the whole budget, so one large request still runs, alone) if
    /// they are free now.
    pub(crate) fn try_take(&self, bytes: u64) -> Option<Held> {
        let n = bytes.min(self.total);
        // Only releases run concurrently with this, and they only make room.
        if self.held.load(Relaxed) + n > self.total {
            return None;
        }
        self.held.fetch_add(n, Relaxed);
        Some(Held { bytes: n, held: self.held.clone() })
    }

    #[cfg(test)]
    fn in_use(&self) -> u64 {
        self.held.load(Relaxed)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Relaxed);
    }
}

/// What the sessions of one server share: the server-wide byte budget and counters for the
/// metrics endpoint.
pub struct SessionShared {
    pub budget: ByteBudget,
    /// Requests that had to wait for budget before being read.
    pub budget_waits: AtomicU64,
    /// Sessions ended because the client took no reply data for the write timeout.
    pub write_timeouts: AtomicU64,
    /// Where requests' time goes, when the server asks.
    pub stages: Option<Arc<dyn crate::stages::StageClock>>,
}

impl SessionShared {
    pub fn new(budget_bytes: u64) -> Arc<Self> {
        Arc::new(SessionShared {
            budget: ByteBudget::new(budget_bytes),
            budget_waits: AtomicU64::new(0),
            write_timeouts: AtomicU64::new(0),
            stages: None,
        })
    }

    /// The same, timing each request's stages with `clock`.
    pub fn with_stages(budget_bytes: u64, clock: Arc<dyn crate::stages::StageClock>) -> Arc<Self> {
        Arc::new(SessionShared {
            budget: ByteBudget::new(budget_bytes),
            budget_waits: AtomicU64::new(0),
            write_timeouts: AtomicU64::new(0),
            stages: Some(clock),
        })
    }

    pub(crate) fn count_wait(&self) {
        self.budget_waits.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_budget_is_given_back_when_dropped_and_fits_one_oversized_request() {
        let b = SessionBudget::new(100);
        let a = b.try_take(60).expect("free");
        assert!(b.try_take(50).is_none(), "60 + 50 is over 100");
        let c = b.try_take(40).expect("exactly full");
        assert_eq!(b.in_use(), 100);
        drop(a);
        assert_eq!(b.in_use(), 40);
        assert!(b.try_take(1000).is_none(), "an oversized request waits until it is alone");
        drop(c);
        let big = b.try_take(1000).expect("alone, capped at the whole budget");
        assert_eq!(b.in_use(), 100);
        drop(big);
        assert_eq!(b.in_use(), 0);
    }
}
