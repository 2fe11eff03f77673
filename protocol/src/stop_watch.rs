//! A session's watch on its two stop tokens, read with a plain load wherever the session asks.
//!
//! The session asks "cut? shut down?" on every poll of its task, many times per request. A
//! `CancellationToken` answers under a lock, and a fresh `cancelled()` future registers with
//! the token (another lock) and unregisters when dropped: at 4k random reads that was ~6% of a
//! session thread. Here each token's `cancelled()` future is made once and polled again only
//! after it woke us; between wake-ups the answer is a field.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub(crate) struct StopWatch {
    fence: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    woken: Arc<Woken>,
    /// The waker last given to `woken` (a task's stays the same: registering again is skipped).
    registered: Option<Waker>,
    fenced: bool,
    shut: bool,
}

/// Set when a token's future may have become ready; passes the wake-up on to the session.
struct Woken {
    flag: AtomicBool,
    session: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.session.wake();
    }
}

impl StopWatch {
    pub(crate) fn new(fence: &CancellationToken, shutdown: &CancellationToken) -> StopWatch {
        StopWatch {
            fence: Box::pin(fence.clone().cancelled_owned()),
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
            // Set, so that the first `refresh` polls (and so registers) both futures.
            woken: Arc::new(Woken { flag: AtomicBool::new(true), session: AtomicWaker::new() }),
            registered: None,
            fenced: false,
            shut: false,
        }
    }

    /// Takes in a fence or shutdown that came since the last call; the task polling `cx` is
    /// woken when one comes later.
    pub(crate) fn refresh(&mut self, cx: &mut Context<'_>) {
        let woken = self.woken.flag.swap(false, Ordering::AcqRel);
        if woken {
            // A wake-up takes the registered waker out.
            self.registered = None;
        }
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.woken.session.register(cx.waker());
            self.registered = Some(cx.waker().clone());
        }
        if !woken {
            return;
        }
        let waker = Waker::from(self.woken.clone());
        let mut inner = Context::from_waker(&waker);
        if !self.fenced {
            self.fenced = self.fence.as_mut().poll(&mut inner).is_ready();
        }
        if !self.shut {
            self.shut = self.shutdown.as_mut().poll(&mut inner).is_ready();
        }
    }

    /// The session was cut, as of the last [`StopWatch::refresh`].
    pub(crate) fn fenced(&self) -> bool {
        self.fenced
    }

    /// The session was told to drain and end, as of the last [`StopWatch::refresh`].
    pub(crate) fn shut(&self) -> bool {
        self.shut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting_waker() -> (Waker, Arc<std::sync::atomic::AtomicUsize>) {
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(n.clone()))), n)
    }

    #[test]
    fn sees_each_token_after_it_fires_and_wakes_the_task() {
        let (fence, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let mut w = StopWatch::new(&fence, &shutdown);
        let (waker, wakes) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        w.refresh(&mut cx);
        assert!(!w.fenced() && !w.shut());

        shutdown.cancel();
        assert_eq!(wakes.load(Ordering::SeqCst), 1, "a shutdown wakes the session's task");
        w.refresh(&mut cx);
        assert!(w.shut() && !w.fenced());

        fence.cancel();
        assert_eq!(wakes.load(Ordering::SeqCst), 2, "so does a fence");
        w.refresh(&mut cx);
        assert!(w.fenced());
    }

    #[test]
    fn a_token_cancelled_before_the_watch_is_seen_at_once() {
        let (fence, shutdown) = (CancellationToken::new(), CancellationToken::new());
        fence.cancel();
        let mut w = StopWatch::new(&fence, &shutdown);
        let (waker, _) = counting_waker();
        w.refresh(&mut Context::from_waker(&waker));
        assert!(w.fenced() && !w.shut());
    }
}
