//! The requests a session has started, run by the session's own task instead of a task each:
//! a completion then wakes that one task, with no spawn per request and no wake-up of another
//! worker thread to run it.
//!
//! Not `futures::FuturesUnordered`: that one wakes its own task again after every pass over
//! its futures (to let others run), and on tokio's multi-threaded runtime such a self-wake is
//! queued as a yield that unparks the other worker: two futex calls and a context switch per
//! request at queue depth 1, a third of its CPU time. Here a task is woken only when one of its
//! requests is.
//!
//! A session's requests are all one future type, so a slot keeps its allocation from one
//! request to the next: a request's future (~5 KiB, every layer of the volume stack nested in
//! it) is written into a box that is already there instead of a fresh one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Started requests, each in a slot with a waker of its own.
pub struct InFlight<F> {
    /// Empty (`None`) when free.
    slots: Vec<Pin<Box<Option<F>>>>,
    wakers: Vec<Waker>,
    free: Vec<usize>,
    running: usize,
    woken: Arc<Woken>,
    /// Slots started since the last pass: only this task starts requests, so they are listed
    /// here without taking the lock of `woken`.
    started: Vec<usize>,
    /// The slots being polled in this pass (kept to reuse its allocation).
    batch: Vec<usize>,
}

/// Slots whose requests were woken since the last pass, and the session task to wake.
#[derive(Default)]
struct Woken {
    slots: Mutex<Vec<usize>>,
    session: AtomicWaker,
}

struct SlotWaker {
    slot: usize,
    woken: Arc<Woken>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.mark(self.slot);
    }
}

impl Woken {
    fn mark(&self, slot: usize) {
        // A poisoned lock only means a panic while pushing an index: the list is still usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
        self.session.wake();
    }
}

impl<F> Default for InFlight<F> {
    fn default() -> Self {
        InFlight {
            slots: Vec::new(),
            wakers: Vec::new(),
            free: Vec::new(),
            running: 0,
            woken: Arc::default(),
            started: Vec::new(),
            batch: Vec::new(),
        }
    }
}

impl<F: Future> InFlight<F> {
    /// Starts `job`: it is first polled by the next [`InFlight::poll`] (which the session
    /// calls next anyway: waking its task from inside itself would queue it as a yield).
    pub fn push(&mut self, job: F) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = self.slots.len();
                self.slots.push(Box::pin(None));
                self.wakers.push(Waker::from(Arc::new(SlotWaker { slot, woken: self.woken.clone() })));
                slot
            }
        };
        self.slots[slot].as_mut().set(Some(job));
        self.running += 1;
        self.started.push(slot);
    }

    /// Requests started and not yet finished.
    pub fn len(&self) -> usize {
        self.running
    }

    /// Polls the requests woken since the last call, handing what the finished ones return to
    /// `done`; ready once none is running.
    pub fn poll(&mut self, cx: &mut Context<'_>, done: &mut impl FnMut(F::Output)) -> Poll<()> {
        self.woken.session.register(cx.waker());
        std::mem::swap(&mut self.batch, &mut *self.woken.slots.lock().unwrap_or_else(|p| p.into_inner()));
        self.batch.append(&mut self.started);
        for &slot in &self.batch {
            // A wake may come late (from a finished request, or twice): an empty slot is
            // skipped, and polling a request that was not woken is harmless.
            let Some(job) = self.slots.get_mut(slot).and_then(|s| s.as_mut().as_pin_mut()) else { continue };
            if let Poll::Ready(out) = job.poll(&mut Context::from_waker(&self.wakers[slot])) {
                done(out);
                self.slots[slot].as_mut().set(None);
                self.free.push(slot);
                self.running -= 1;
            }
        }
        self.batch.clear();
        if self.running == 0 { Poll::Ready(()) } else { Poll::Pending }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn runs_every_job_to_its_end_and_reuses_slots() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut jobs = InFlight::<Pin<Box<dyn Future<Output = usize> + Send>>>::default();
        let mut outputs = Vec::new();
        for round in 0..3 {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let d = done.clone();
            jobs.push(Box::pin(async move {
                let _ = rx.await;
                d.fetch_add(1, Ordering::Relaxed);
                2 * round + 1
            }));
            let d = done.clone();
            jobs.push(Box::pin(async move {
                tokio::task::yield_now().await;
                d.fetch_add(1, Ordering::Relaxed);
                2 * round
            }));
            let waiting = std::future::poll_fn(|cx| jobs.poll(cx, &mut |n| outputs.push(n)));
            tokio::select! {
                _ = waiting => panic!("finished before its wake"),
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            }
            assert_eq!(done.load(Ordering::Relaxed), 2 * round + 1, "the yielding job ran");
            tx.send(()).unwrap();
            std::future::poll_fn(|cx| jobs.poll(cx, &mut |n| outputs.push(n))).await;
            assert_eq!(done.load(Ordering::Relaxed), 2 * round + 2);
            assert_eq!(jobs.running, 0);
        }
        assert_eq!(jobs.slots.len(), 2, "slots are reused");
        assert_eq!(outputs, (0..6).collect::<Vec<_>>(), "each job's output, in the order they finished");
    }
}
