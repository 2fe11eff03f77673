//! The threads NBD sessions run on: one single-threaded runtime per core, each session wholly
//! on one of them.
//!
//! On the daemon's work-stealing runtime a request crossed threads several times: a worker
//! woken by a completion wakes a second one to look for more work, and a task could move to
//! whichever worker was free. At queue depth 1 that was 8.5 context switches per write and
//! FLUSH pair; here it is 5.9, qemu-nbd's 5 (benches/README, "A runtime per session thread").
//! A session's socket, its requests and their ring completions (each thread submits to a ring
//! of its own, see `space::uring`) are handled by one thread; the sessions spread over the
//! cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use anyhow::Context;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A thread running a single-threaded runtime, and how many sessions it has.
struct SessionThread {
    handle: Handle,
    sessions: Arc<AtomicUsize>,
}

pub struct SessionThreads {
    threads: Vec<SessionThread>,
    /// Ends the threads' runtimes (each dropped on its own thread).
    stop: CancellationToken,
}

/// A session's place on its thread; the count goes down when the session ends.
pub struct Placed {
    sessions: Arc<AtomicUsize>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.sessions.fetch_sub(1, Relaxed);
    }
}

impl SessionThreads {
    /// `n` threads; 0 means one per core.
    pub fn start(n: usize) -> anyhow::Result<SessionThreads> {
        let n = match n {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let stop = CancellationToken::new();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting an NBD session runtime")?;
            let handle = rt.handle().clone();
            let stop = stop.clone();
            let sessions = Arc::<AtomicUsize>::default();
            let declared = sessions.clone();
            std::thread::Builder::new()
                .name(format!("nbd-{i}"))
                .spawn(move || {
                    crate::space::occupancy::declare(declared);
                    crate::space::uring::dedicate_thread();
                    rt.block_on(stop.cancelled_owned())
                })
                .context("starting an NBD session thread")?;
            threads.push(SessionThread { handle, sessions });
        }
        Ok(SessionThreads { threads, stop })
    }

    /// The thread with the fewest sessions, for a new one.
    pub fn place(&self) -> (Handle, Placed) {
        let t = self.threads.iter().min_by_key(|t| t.sessions.load(Relaxed)).unwrap_or(&self.threads[0]);
        t.sessions.fetch_add(1, Relaxed);
        (t.handle.clone(), Placed { sessions: t.sessions.clone() })
    }
}

impl Drop for SessionThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_go_to_the_least_busy_thread_and_run_there() {
        let threads = SessionThreads::start(2).unwrap();
        let (a, pa) = threads.place();
        let (b, pb) = threads.place();
        let name = |h: Handle| async move {
            h.spawn(async { std::thread::current().name().map(str::to_string) }).await.unwrap()
        };
        let (na, nb) = (name(a).await, name(b).await);
        assert_ne!(na, nb, "two sessions, two threads");
        assert!(na.unwrap().starts_with("nbd-"));
        drop(pa);
        let (c, _pc) = threads.place();
        assert_eq!(name(c).await, Some("nbd-0".into()), "the thread whose session ended takes the next");
        drop(pb);
    }
}
