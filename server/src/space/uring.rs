//! The io_uring data path, driven from the async runtime itself: the task that serves a request
//! puts its read or write on its thread's ring and enters the kernel, and the ring's reaper
//! task, woken through an eventfd registered with the ring (in the runtime's reactor),
//! completes whatever finished. No thread of our own sits between a request and the disk: a
//! request costs one submission syscall and no hand-off to another thread and back (those
//! hand-offs were most of a request's time on two cores; see benches/README). Each thread that
//! submits has a ring of its own: on an NBD session thread its completions wake that thread.
//! At most [`RING_ENTRIES`] requests are on a ring; the next ones queue in the ring's table and
//! go on as earlier ones complete.
//!
//! A request lives in a slot of its ring's table from submission until its task takes the
//! result: the slot holds its buffer while the kernel may use it, then the result and the
//! task's waker. No channel or semaphore per request (they were a tenth of a session thread's
//! time at 4 KiB; benches/README).
//!
//! A thread that drives its own runtime for its whole life ([`dedicate_thread`]: the NBD
//! session threads) gets rings that finish completions only when it asks
//! (`IORING_SETUP_DEFER_TASKRUN`): by default the kernel interrupts the submitting thread to
//! post each completion, which on this project's 2-vCPU machine cost a quarter of the 4 KiB
//! random-write rate (benches/README, "Completions when the thread asks").

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use io_uring::{IoUring, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use thinbd_protocol::aligned::DIRECT_ALIGN;
use thinbd_protocol::huge_buffers::HugeBuf;
use tokio::io::unix::AsyncFd;

use crate::space::backend::{BlockStore, FileStore, IoEngine, IoFuture};

const RING_ENTRIES: u32 = 256;

/// A request for the ring. Its buffer lives here until the kernel has completed it.
struct Request {
    kind: Kind,
    offset: u64,
    /// Bytes transferred so far (a short transfer is resubmitted for the rest).
    moved: usize,
    /// When it went on the ring (with `--stage-latency`).
    on_ring: Option<Instant>,
}

enum Kind {
    Read { buf: ReadBuf },
    Write { data: Bytes },
}

/// What a finished request gives its task: a read's data, or that a write is done.
enum Outcome {
    Read(Bytes),
    Written,
}

/// One request's place in its ring's table, from submission until its task takes the result.
enum Slot {
    Free,
    /// Waiting for room on the ring (in [`Table::queue`]).
    Queued(Request, Option<Waker>),
    /// With the kernel, which may use its buffer until the completion is reaped.
    OnRing(Request, Option<Waker>),
    /// On the ring, but its task is gone: freed when the kernel is done with the buffer.
    Abandoned {
        _held: Request,
    },
    /// Queued, but its task is gone: freed when the queue reaches it.
    Withdrawn,
    /// Finished; the result waits for its task (and when it was reaped, stages timed).
    Done(io::Result<Outcome>, Option<Instant>),
}

/// Now, when stages are timed.
fn clock() -> Option<Instant> {
    crate::stages::enabled().map(|_| Instant::now())
}

/// The time from `from` to now as `stage`, when stages are timed.
fn observe(stage: crate::stages::RingStage, from: Option<Instant>) -> Option<Instant> {
    let (s, from) = (crate::stages::enabled()?, from?);
    let now = Instant::now();
    s.ring(stage, now.saturating_duration_since(from));
    Some(now)
}

/// A ring and what is on it, shared by the submitting tasks and the reaper.
struct Ring {
    ring: IoUring,
    /// The pool file (its descriptor goes into every entry).
    file: Arc<File>,
    /// Held while taking from the completion queue (the reaper, or the last drop).
    cq: Mutex<Reaps>,
    /// Every request of this ring, by slot (the entry's user data). Held while pushing onto the
    /// submission queue too (one producer at a time).
    table: Mutex<Table>,
    /// Completions wait for [`Ring::reap`] to ask for them (`IORING_SETUP_DEFER_TASKRUN`); only
    /// the thread that made the ring, named here, may submit or reap.
    deferred: Option<std::thread::ThreadId>,
    /// Cleared when the reaper is gone (its runtime shut down): the thread needs a new ring.
    reaping: AtomicBool,
}

/// Lists a reap fills and empties, kept to be reused.
#[derive(Default)]
struct Reaps {
    /// Completions taken from the queue: slot and result.
    done: Vec<(u64, i32)>,
    /// The tasks of the requests finished, woken once the table is let go.
    wake: Vec<Waker>,
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots whose requests wait for room on the ring, oldest first.
    queue: VecDeque<usize>,
    /// Requests with the kernel (at most [`RING_ENTRIES`]).
    on_ring: usize,
    /// Set when the store is dropped: nothing more is taken.
    closed: bool,
}

/// A ring and its reaper task (stopped when the store is dropped).
struct Reaped {
    ring: Arc<Ring>,
    reaper: tokio::task::JoinHandle<()>,
}

pub struct UringStore {
    /// Every ring made for this store, one per thread that submitted (see [`UringStore::ring`]).
    rings: Mutex<Vec<Reaped>>,
    /// The pool file for the rings' entries.
    ring_file: Arc<File>,
    /// Which store a thread's ring belongs to.
    id: u64,
    /// The same file for the synchronous calls (the superblock at start, fdatasync).
    file: FileStore,
}

thread_local! {
    /// This thread's ring of each store, by store id. Weak: the store owns its rings.
    static RINGS: RefCell<Vec<(u64, Weak<Ring>)>> = const { RefCell::new(Vec::new()) };
    /// Set by [`dedicate_thread`].
    static DEDICATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Declares that the calling thread drives a current-thread runtime of its own for the rest of
/// its life, so that every submission to and every reap of the rings it makes happen on it.
/// Its rings then defer completion work to the thread's own reaps instead of interrupting it
/// (a ring set up so answers only the thread that made it).
pub fn dedicate_thread() {
    DEDICATED.with(|d| d.set(true));
}

impl UringStore {
    /// Sets up a ring on `file` with its reaper on the current runtime; where io_uring is not
    /// available (old kernel, seccomp, no runtime) the file comes back with the reason, to be
    /// driven by threads instead.
    pub fn new(file: FileStore) -> Result<UringStore, (FileStore, io::Error)> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let ring_file = match file.try_clone_file() {
            Ok(f) => Arc::new(f),
            Err(e) => return Err((file, e)),
        };
        let first = match Ring::start(ring_file.clone()) {
            Ok(r) => r,
            Err(e) => return Err((file, e)),
        };
        let store = UringStore { rings: Mutex::default(), ring_file, id: IDS.fetch_add(1, Ordering::Relaxed), file };
        store.adopt(first);
        Ok(store)
    }

    /// The ring of the calling thread, made on first use with its reaper on the current
    /// runtime. A session thread (`nbd::threads`) thus submits to a ring whose completions
    /// wake that same thread: no hand-off between threads and no lock shared with another.
    fn ring(&self) -> io::Result<Arc<Ring>> {
        if let Some(ring) = self.mine()
            && ring.reaping.load(Ordering::Acquire)
        {
            return Ok(ring);
        }
        let started = Ring::start(self.ring_file.clone())?;
        let ring = started.ring.clone();
        self.adopt(started);
        Ok(ring)
    }

    /// The ring this thread made for this store, if any.
    fn mine(&self) -> Option<Arc<Ring>> {
        RINGS.with(|r| r.borrow().iter().find(|(id, _)| *id == self.id).and_then(|(_, w)| w.upgrade()))
    }

    /// Whether nothing the calling thread submitted is on (or waiting for) its ring.
    fn idle_here(&self) -> bool {
        self.mine().is_none_or(|ring| ring.busy() == 0)
    }

    /// Keeps a ring made on this thread as this thread's.
    fn adopt(&self, started: Reaped) {
        RINGS.with(|r| {
            let mut r = r.borrow_mut();
            r.retain(|(id, w)| *id != self.id && w.strong_count() > 0);
            r.push((self.id, Arc::downgrade(&started.ring)));
        });
        self.rings.lock().unwrap_or_else(|p| p.into_inner()).push(started);
    }

    /// Puts the request on this thread's ring (or in its queue); its outcome is awaited.
    fn submit(&self, kind: Kind, offset: u64) -> io::Result<Submitted> {
        let ring = self.ring()?;
        let slot = ring.take(Request { kind, offset, moved: 0, on_ring: clock() })?;
        Ok(Submitted { ring, slot, finished: false })
    }
}

/// A request taken by a ring, until its task has its outcome. Dropped before that, the slot is
/// given up (the buffer stays with the ring until the kernel is done with it).
struct Submitted {
    ring: Arc<Ring>,
    slot: usize,
    /// The outcome was taken (the slot is free again).
    finished: bool,
}

impl Future for Submitted {
    type Output = io::Result<Outcome>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Outcome>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(Err(io::Error::other("polled after completion")));
        }
        let slot = this.slot;
        let mut table = this.ring.lock_table();
        let Some(s) = table.slots.get_mut(slot) else {
            drop(table);
            this.finished = true;
            return Poll::Ready(Err(io::Error::other("the ring lost a request")));
        };
        match s {
            Slot::Queued(_, waker) | Slot::OnRing(_, waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done(..) => {
                let Slot::Done(result, reaped) = std::mem::replace(s, Slot::Free) else { unreachable!() };
                table.free.push(slot);
                drop(table);
                this.finished = true;
                observe(crate::stages::RingStage::Wake, reaped);
                Poll::Ready(result)
            }
            Slot::Free | Slot::Abandoned { .. } | Slot::Withdrawn => {
                drop(table);
                this.finished = true;
                Poll::Ready(Err(io::Error::other("the ring lost a request")))
            }
        }
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        if !self.finished {
            self.ring.give_up(self.slot);
        }
    }
}

impl Ring {
    /// A ring on `file` with its reaper, woken through an eventfd, on the current runtime.
    fn start(file: Arc<File>) -> io::Result<Reaped> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let dedicated =
            DEDICATED.with(|d| d.get()) && runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread;
        // Kernels before 6.1 refuse the flags: a plain ring then.
        let deferred = dedicated
            .then(|| IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(RING_ENTRIES).ok())
            .flatten();
        let (ring, deferred) = match deferred {
            Some(ring) => (ring, Some(std::thread::current().id())),
            None => (IoUring::new(RING_ENTRIES)?, None),
        };
        let events = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(io::Error::from)?;
        ring.submitter().register_eventfd(events.as_raw_fd())?;
        let ring = Arc::new(Ring {
            ring,
            file,
            cq: Mutex::default(),
            table: Default::default(),
            deferred,
            reaping: AtomicBool::new(true),
        });
        let _guard = runtime.enter();
        // SAFETY: an `EventFd` owns its open descriptor for the AsyncFd's whole life and always
        // returns the same one.
        let events = unsafe { AsyncFd::register(events) }.map_err(io::Error::from)?;
        let reaper = runtime.spawn(reap(ring.clone(), events));
        Ok(Reaped { ring, reaper })
    }

    /// The table; a panic elsewhere while it was held leaves it as consistent as any
    /// single-step update does, so it is used on.
    fn lock_table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `r` into a slot of the table: onto the ring (entering the kernel) if there is room,
    /// else into the queue.
    fn take(&self, mut r: Request) -> io::Result<usize> {
        let mut table = self.lock_table();
        if table.closed {
            return Err(io::Error::other("ring closed"));
        }
        let slot = table.free.pop().unwrap_or(table.slots.len());
        if slot == table.slots.len() {
            table.slots.push(Slot::Free);
        }
        if table.on_ring >= RING_ENTRIES as usize {
            table.slots[slot] = Slot::Queued(r, None);
            table.queue.push_back(slot);
            return Ok(slot);
        }
        r.on_ring = observe(crate::stages::RingStage::Queue, r.on_ring);
        let pushed = self.push(&mut table, slot, r, None);
        drop(table);
        if pushed {
            self.ring.submit()?;
        }
        Ok(slot)
    }

    /// Puts `r` (or what is left of it) on the ring in `slot`; `false` if the ring refused it
    /// (the slot is then done with an error).
    fn push(&self, table: &mut Table, slot: usize, mut r: Request, waker: Option<Waker>) -> bool {
        let entry = entry(&self.file, slot, &mut r);
        table.slots[slot] = Slot::OnRing(r, waker);
        // SAFETY: one producer at a time (under the table's lock). The entry's buffer belongs
        // to the slot's request, which stays in the table (its buffer on the heap, not moving
        // when the table grows) until its completion is reaped. At most `RING_ENTRIES` requests
        // are on the ring (`on_ring`) and each push is submitted before the lock is let go, so
        // the push finds room.
        if unsafe { self.ring.submission_shared().push(&entry) }.is_err() {
            if let Slot::OnRing(_, waker) = std::mem::replace(&mut table.slots[slot], Slot::Free) {
                table.slots[slot] = Slot::Done(Err(io::Error::other("the ring is full")), None);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            return false;
        }
        table.on_ring += 1;
        true
    }

    /// A task no longer wants its request's outcome.
    fn give_up(&self, slot: usize) {
        let mut table = self.lock_table();
        let Some(s) = table.slots.get_mut(slot) else { return };
        match std::mem::replace(s, Slot::Free) {
            Slot::OnRing(r, _) => *s = Slot::Abandoned { _held: r },
            Slot::Queued(..) => *s = Slot::Withdrawn,
            Slot::Done(..) => table.free.push(slot),
            other => *s = other,
        }
    }

    /// Requests on the ring or waiting for it.
    fn busy(&self) -> usize {
        let table = self.lock_table();
        table.on_ring + table.queue.len()
    }

    /// Takes every completion on the ring: finished requests are answered, short ones put back,
    /// queued ones put on in the room made.
    fn reap(&self) {
        let Ok(mut reaps) = self.cq.lock() else { return };
        let Reaps { done, wake } = &mut *reaps;
        if self.deferred.is_some() {
            // Runs the completion work the kernel deferred to us, which posts the completions
            // (and signals the eventfd once more: the reaper then finds nothing, harmlessly).
            // SAFETY: no argument is passed.
            let asked =
                unsafe { self.ring.submitter().enter::<nix::libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None) };
            if let Err(e) = asked {
                tracing::warn!(error = %e, "cannot ask the ring for completions");
            }
        }
        done.clear();
        // SAFETY: one consumer at a time (the `cq` lock).
        done.extend(unsafe { self.ring.completion_shared() }.map(|c| (c.user_data(), c.result())));
        if done.is_empty() {
            return;
        }
        let mut pushed = false;
        let mut table = self.lock_table();
        for &(slot, res) in done.iter() {
            let slot = slot as usize;
            let Some(s) = table.slots.get_mut(slot) else { continue };
            let (mut r, waker) = match std::mem::replace(s, Slot::Free) {
                Slot::OnRing(r, waker) => (r, waker),
                Slot::Abandoned { .. } => {
                    // Its task is gone and the kernel is done with the buffer (dropped here).
                    table.on_ring -= 1;
                    table.free.push(slot);
                    continue;
                }
                other => {
                    *s = other;
                    continue;
                }
            };
            table.on_ring -= 1;
            let outcome = if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else {
                let n = res as usize;
                r.moved += n;
                match &r.kind {
                    // End of file: the rest reads as zeros (`ReadBuf::filled` writes them).
                    Kind::Read { buf } if n == 0 || r.moved == buf.len => None,
                    Kind::Write { .. } if n == 0 => Some(Err(io::Error::from_raw_os_error(nix::libc::EIO))),
                    Kind::Write { data } if r.moved == data.len() => None,
                    _ => {
                        // Short: the rest goes on again, in the same slot.
                        pushed |= self.push(&mut table, slot, r, waker);
                        continue;
                    }
                }
            };
            let reaped = observe(crate::stages::RingStage::Disk, r.on_ring);
            let result = outcome.unwrap_or_else(|| {
                Ok(match r.kind {
                    // SAFETY: the completions of this read reported `r.moved` bytes from the
                    // buffer's start written by the kernel (each entry starts where the last
                    // ended, see `entry`).
                    Kind::Read { buf } => Outcome::Read(unsafe { buf.filled(r.moved) }),
                    Kind::Write { .. } => Outcome::Written,
                })
            });
            table.slots[slot] = Slot::Done(result, reaped);
            // No waker yet: its task has not been polled since it submitted, and finds the
            // result when it is.
            wake.extend(waker);
        }
        pushed |= self.unqueue(&mut table);
        drop(table);
        if pushed && let Err(e) = self.ring.submit() {
            tracing::warn!(error = %e, "cannot submit to the ring");
        }
        for w in wake.drain(..) {
            w.wake();
        }
    }

    /// Puts queued requests on the ring while it has room; whether any went on.
    fn unqueue(&self, table: &mut Table) -> bool {
        let mut pushed = false;
        while table.on_ring < RING_ENTRIES as usize
            && let Some(slot) = table.queue.pop_front()
        {
            match std::mem::replace(&mut table.slots[slot], Slot::Free) {
                Slot::Queued(mut r, waker) => {
                    r.on_ring = observe(crate::stages::RingStage::Queue, r.on_ring);
                    pushed |= self.push(table, slot, r, waker)
                }
                Slot::Withdrawn => table.free.push(slot),
                other => table.slots[slot] = other,
            }
        }
        pushed
    }

    /// Refuses new requests and fails the queued ones (the store is going away).
    fn close(&self) {
        let mut table = self.lock_table();
        table.closed = true;
        let mut wake = Vec::new();
        while let Some(slot) = table.queue.pop_front() {
            match std::mem::replace(&mut table.slots[slot], Slot::Free) {
                Slot::Queued(_, waker) => {
                    table.slots[slot] = Slot::Done(Err(io::Error::other("ring closed")), None);
                    wake.extend(waker);
                }
                Slot::Withdrawn => table.free.push(slot),
                other => table.slots[slot] = other,
            }
        }
        drop(table);
        for w in wake {
            w.wake();
        }
    }

    /// Requests with the kernel.
    fn in_flight(&self) -> usize {
        self.lock_table().on_ring
    }
}

/// `IORING_ENTER_GETEVENTS` (the io-uring crate does not export the enter flags).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// Wakes on the eventfd the kernel signals with each completion and reaps.
async fn reap(ring: Arc<Ring>, events: AsyncFd<EventFd>) {
    /// Marks the ring unreaped when the reaper ends: aborted, or dropped with its runtime.
    struct Reaping<'a>(&'a AtomicBool);
    impl Drop for Reaping<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _reaping = Reaping(&ring.reaping);
    loop {
        let Ok(mut ready) = events.readable().await else { return };
        // Reset the counter first: a completion posted after this signals again. (Nonblocking:
        // a counter already reset reads as EAGAIN.)
        let _ = events.get_ref().read();
        ready.clear_ready();
        ring.reap();
    }
}

/// A read's buffer, on a 4 KiB boundary for O_DIRECT: in a huge page where
/// [`thinbd_protocol::huge_buffers`] has one for the size (the disk then takes it in one piece),
/// else fresh from the heap and left uninitialised for the kernel to fill (zeroing it first was
/// 5% of a 128 KiB read's CPU).
struct ReadBuf {
    mem: ReadMem,
    len: usize,
}

enum ReadMem {
    Huge(HugeBuf),
    /// Length 0; the bytes live in its spare capacity from `start` until [`ReadBuf::filled`].
    Heap {
        vec: Vec<u8>,
        start: usize,
    },
}

impl ReadBuf {
    fn new(len: usize) -> ReadBuf {
        let mem = match HugeBuf::get(len) {
            Some(b) => ReadMem::Huge(b),
            None => {
                let vec = Vec::with_capacity(len + DIRECT_ALIGN - 1);
                let start = thinbd_protocol::aligned::to_boundary(vec.as_ptr());
                ReadMem::Heap { vec, start }
            }
        };
        ReadBuf { mem, len }
    }

    /// Where the kernel writes the buffer's bytes from `at` on.
    fn at(&mut self, at: usize) -> *mut u8 {
        match &mut self.mem {
            ReadMem::Huge(b) => b.as_mut_slice()[at..].as_mut_ptr(),
            ReadMem::Heap { vec, start } => vec.spare_capacity_mut()[*start + at..].as_mut_ptr().cast(),
        }
    }

    /// The data, once the kernel wrote its first `filled` bytes; the rest (past the end of the
    /// file) reads as zeros.
    ///
    /// # Safety
    /// The first `filled` bytes (from [`ReadBuf::at`]`(0)`) must have been written.
    unsafe fn filled(self, filled: usize) -> Bytes {
        let (mut vec, start) = match self.mem {
            ReadMem::Huge(mut b) => {
                b.as_mut_slice()[filled..].fill(0);
                return b.freeze();
            }
            ReadMem::Heap { vec, start } => (vec, start),
        };
        let end = start + self.len;
        let spare = vec.spare_capacity_mut();
        spare[..start].fill(std::mem::MaybeUninit::new(0));
        spare[start + filled..end].fill(std::mem::MaybeUninit::new(0));
        // SAFETY: bytes [0, start) and [start + filled, end) were written just above and
        // [start, start + filled) by the kernel (the caller's promise); `end` is within the
        // capacity reserved in `new`.
        unsafe { vec.set_len(end) };
        // `Bytes::from` keeps the allocation where it is (no shrink), so the alignment holds.
        Bytes::from(vec).slice(start..end)
    }
}

/// The entry for the remaining part of `r`.
fn entry(file: &File, slot: usize, r: &mut Request) -> squeue::Entry {
    let fd = types::Fd(file.as_raw_fd());
    let at = r.offset + r.moved as u64;
    let e = match &mut r.kind {
        Kind::Read { buf } => {
            let rest = buf.len - r.moved;
            opcode::Read::new(fd, buf.at(r.moved), rest as u32).offset(at).build()
        }
        Kind::Write { data } => {
            let rest = &data[r.moved..];
            opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32).offset(at).build()
        }
    };
    e.user_data(slot as u64)
}

/// Data requests go through the ring; the synchronous calls (the superblock at start) use the
/// file directly.
impl BlockStore for UringStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_at(buf, offset)
    }
    /// Every write acknowledged so far has completed in the kernel, so fdatasync covers it.
    fn sync(&self) -> io::Result<()> {
        self.file.sync()
    }
    fn sync_here(&self) -> bool {
        crate::space::occupancy::alone() && self.idle_here()
    }
    fn alignment(&self) -> u64 {
        self.file.alignment()
    }
    fn engine(&self) -> IoEngine {
        IoEngine::Uring
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.file.punch(offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.reserve(offset, len)
    }
    fn read(self: Arc<Self>, offset: u64, len: usize) -> IoFuture<Bytes> {
        Box::pin(async move {
            match self.submit(Kind::Read { buf: ReadBuf::new(len) }, offset)?.await? {
                Outcome::Read(data) => Ok(data),
                Outcome::Written => Err(io::Error::other("a read came back as a write")),
            }
        })
    }
    fn write(self: Arc<Self>, offset: u64, data: Bytes) -> IoFuture<()> {
        Box::pin(async move { self.submit(Kind::Write { data }, offset)?.await.map(|_| ()) })
    }
}

impl Drop for UringStore {
    /// Stops the reapers and waits for what is still on the rings: the kernel may write into
    /// those buffers until each request completes.
    fn drop(&mut self) {
        let rings = std::mem::take(&mut *self.rings.lock().unwrap_or_else(|p| p.into_inner()));
        for Reaped { ring, reaper } in rings {
            reaper.abort();
            ring.close();
            let foreign = ring.deferred.is_some_and(|owner| owner != std::thread::current().id());
            if foreign && ring.in_flight() > 0 {
                // Another thread's deferred ring (it answers only that thread) with requests
                // still on it: the kernel may yet write into their buffers, so the ring and its
                // buffers are kept, not freed.
                std::mem::forget(ring);
                continue;
            }
            while ring.in_flight() > 0 {
                if ring.ring.submit_and_wait(1).is_err() {
                    break;
                }
                ring.reap();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store on a new pool file of `len` bytes, made on `rt`; `None` (the test is skipped)
    /// where io_uring is not available.
    fn store_on(rt: &tokio::runtime::Runtime, len: u64) -> Option<(tempfile::TempDir, Arc<UringStore>)> {
        let dir = tempfile::tempdir().unwrap();
        let f = FileStore::open(&dir.path().join("pool"), false).unwrap();
        f.set_len(len).unwrap();
        match rt.block_on(async { UringStore::new(f) }) {
            Ok(s) => Some((dir, Arc::new(s))),
            Err((_, e)) => {
                eprintln!("SKIPPED: io_uring unavailable here: {e}");
                None
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_reads_and_writes_complete_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileStore::open(&dir.path().join("pool"), false).unwrap();
        f.set_len(4 << 20).unwrap();
        let ring = match UringStore::new(f) {
            Ok(r) => Arc::new(r),
            Err((_, e)) => {
                eprintln!("SKIPPED: io_uring unavailable here: {e}");
                return;
            }
        };
        // More requests than ring entries, of odd sizes and offsets.
        let mut tasks = Vec::new();
        for i in 0..1000u64 {
            let ring = ring.clone();
            tasks.push(tokio::spawn(async move {
                let off = i * 4000 + 7;
                let data = Bytes::from(vec![(i % 251) as u8; 3001]);
                ring.clone().write(off, data.clone()).await.unwrap();
                assert_eq!(ring.clone().read(off, 3001).await.unwrap(), data);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        ring.sync().unwrap();
        // Past the end of the file reads as zeros, as with pread (the buffer is not zeroed
        // before the kernel fills it: the short read's tail is).
        ring.clone().write((4 << 20) - 10, Bytes::from(vec![9u8; 10])).await.unwrap();
        let tail = ring.clone().read((4 << 20) - 10, 100).await.unwrap();
        assert_eq!(tail.len(), 100);
        assert!(thinbd_protocol::aligned::is_aligned(&tail));
        assert!(tail[..10].iter().all(|b| *b == 9));
        assert!(tail[10..].iter().all(|b| *b == 0));
        drop(ring);
    }

    /// Large reads land in reused huge-page buffers (`thinbd_protocol::huge_buffers`), which
    /// hold an earlier read's bytes: a read cut short by the end of the file still reads zeros
    /// past it, not those.
    #[tokio::test]
    async fn a_reused_read_buffer_shows_nothing_of_its_last_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileStore::open(&dir.path().join("pool"), false).unwrap();
        let len = 1u64 << 20;
        f.set_len(len).unwrap();
        let Ok(ring) = UringStore::new(f).map(Arc::new) else { return };
        ring.clone().write(0, Bytes::from(vec![0xab; len as usize])).await.unwrap();
        for round in 0..20 {
            let full = ring.clone().read(0, 96 << 10).await.unwrap();
            assert!(full.iter().all(|b| *b == 0xab));
            drop(full);
            let short = ring.clone().read(len - 4096, 96 << 10).await.unwrap();
            assert_eq!(short.len(), 96 << 10);
            assert!(thinbd_protocol::aligned::is_aligned(&short));
            assert!(short[..4096].iter().all(|b| *b == 0xab), "round {round}");
            assert!(short[4096..].iter().all(|b| *b == 0), "round {round}: past the end of the file");
        }
    }

    /// A thread's requests go to that thread's ring, and a thread whose runtime ended (the
    /// ring's reaper with it) gets a new ring on the next runtime instead of waiting forever.
    #[test]
    fn each_thread_and_runtime_has_a_ring_of_its_own() {
        let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let first = runtime();
        let Some((_dir, store)) = store_on(&first, 1 << 20) else { return };
        let data = Bytes::from(vec![5u8; 4096]);
        first.block_on(store.clone().write(0, data.clone())).unwrap();
        assert_eq!(store.rings.lock().unwrap().len(), 1);
        drop(first);
        let second = runtime();
        let in_time = |f| async { tokio::time::timeout(std::time::Duration::from_secs(10), f).await };
        let read = second.block_on(in_time(store.clone().read(0, 4096)));
        assert_eq!(read.expect("served by a new ring, not the one whose reaper is gone").unwrap(), data);
        assert_eq!(store.rings.lock().unwrap().len(), 2);
        let other = store.clone();
        let expect = data.clone();
        std::thread::spawn(move || assert_eq!(runtime().block_on(other.clone().read(0, 4096)).unwrap(), expect))
            .join()
            .unwrap();
        assert_eq!(store.rings.lock().unwrap().len(), 3, "the other thread made its own");
        second.block_on(store.clone().write(4096, data.clone())).unwrap();
        assert_eq!(store.rings.lock().unwrap().len(), 3, "this thread's ring is reused");
    }

    /// A dedicated thread's ring defers completions to its reaps: many requests at once still
    /// complete with the right data, and the store dropped on another thread while a request
    /// is on that ring keeps the ring (the kernel may still write into the buffer) instead of
    /// waiting on a ring that answers only its own thread.
    #[test]
    fn a_dedicated_thread_gets_a_deferred_ring_that_completes_everything() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            dedicate_thread();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let Some((dir, store)) = store_on(&rt, 4 << 20) else { return };
            let deferred = store.mine().unwrap().deferred;
            if deferred.is_none() {
                eprintln!("SKIPPED: this kernel has no IORING_SETUP_DEFER_TASKRUN");
                return;
            }
            assert_eq!(deferred, Some(std::thread::current().id()));
            rt.block_on(async {
                let mut tasks = Vec::new();
                for i in 0..600u64 {
                    let store = store.clone();
                    tasks.push(tokio::spawn(async move {
                        let data = Bytes::from(vec![(i % 251) as u8; 4096]);
                        store.clone().write(i * 4096, data.clone()).await.unwrap();
                        assert_eq!(store.clone().read(i * 4096, 4096).await.unwrap(), data);
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                let mut read = store.clone().read(0, 4096);
                assert!(futures_util::poll!(&mut read).is_pending(), "on the ring");
            });
            assert_eq!(store.mine().unwrap().in_flight(), 1);
            tx.send((dir, store)).unwrap();
            // The runtime (and with it the reaper) ends with this thread.
        });
        let Ok((_dir, store)) = rx.recv() else { return };
        drop(store);
    }

    /// A FLUSH may sync on the calling thread only where that thread serves one client and has
    /// nothing on its ring; elsewhere it goes to a blocking thread.
    #[test]
    fn a_sync_runs_here_only_on_a_thread_alone_with_nothing_in_flight() {
        use std::sync::atomic::AtomicUsize;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let Some((_dir, store)) = store_on(&rt, 1 << 20) else { return };
        assert!(!store.sync_here(), "a thread nobody declared");
        let clients = Arc::new(AtomicUsize::new(1));
        crate::space::occupancy::declare(clients.clone());
        assert!(store.sync_here());
        rt.block_on(async {
            let mut read = store.clone().read(0, 4096);
            // Polled once: on the ring, and not reaped before this task yields.
            assert!(futures_util::poll!(&mut read).is_pending());
            assert!(!store.sync_here(), "a read of this thread's is on the ring");
            read.await.unwrap();
        });
        assert!(store.sync_here(), "the read completed");
        clients.store(2, Ordering::Relaxed);
        assert!(!store.sync_here(), "the thread serves two clients");
    }

    /// Requests given up by their tasks — on the ring (the kernel still owns their buffers) or
    /// queued for room — leave the others to complete with the right data, and every slot comes
    /// back free once the ring is done with them.
    #[test]
    fn requests_given_up_on_or_off_the_ring_leave_the_rest_whole() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let Some((_dir, store)) = store_on(&rt, 4 << 20) else { return };
        rt.block_on(async {
            let n = 3 * RING_ENTRIES as u64;
            for i in 0..n {
                store.clone().write(i * 4096, Bytes::from(vec![(i % 251) as u8; 4096])).await.unwrap();
            }
            let mut reads: Vec<_> = (0..n).map(|i| Some(store.clone().read(i * 4096, 4096))).collect();
            for r in reads.iter_mut().flatten() {
                assert!(futures_util::poll!(r).is_pending());
            }
            let ring = store.mine().unwrap();
            assert_eq!(ring.in_flight(), RING_ENTRIES as usize, "as many on the ring as it holds");
            assert_eq!(ring.busy(), n as usize, "the rest queued");
            // Every third given up: some on the ring, some queued.
            for r in reads.iter_mut().step_by(3) {
                *r = None;
            }
            for (i, r) in reads.into_iter().enumerate() {
                if let Some(r) = r {
                    assert_eq!(r.await.unwrap(), Bytes::from(vec![(i as u64 % 251) as u8; 4096]), "read {i}");
                }
            }
            // The abandoned ones still on the ring finish in the kernel and are reaped.
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while ring.busy() > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("every request leaves the ring");
            let table = ring.lock_table();
            assert!(table.slots.iter().all(|s| matches!(s, Slot::Free)));
            assert_eq!(table.free.len(), table.slots.len(), "every slot back on the free list");
        });
    }
}
