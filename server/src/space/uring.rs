//! The io_uring data path, driven from the async runtime itself: the task that serves a request
//! puts its read or write on its thread's ring and enters the kernel, and the ring's reaper
//! task, woken through an eventfd registered with the ring (in the runtime's reactor),
//! completes whatever finished. No thread of our own sits between a request and the disk: a
//! request costs one submission syscall and no hand-off to another thread and back (those
//! hand-offs were most of a request's time on two cores; see benches/README). Each thread that
//! submits has a ring of its own: on an NBD session thread its completions wake that thread.
//! At most [`RING_ENTRIES`] requests are on a ring; the next ones wait for room.
//!
//! A thread that drives its own runtime for its whole life ([`dedicate_thread`]: the NBD
//! session threads) gets rings that finish completions only when it asks
//! (`IORING_SETUP_DEFER_TASKRUN`): by default the kernel interrupts the submitting thread to
//! post each completion, which on this project's 2-vCPU machine cost a quarter of the 4 KiB
//! random-write rate (benches/README, "Completions when the thread asks").

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use io_uring::{IoUring, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use thinbd_protocol::aligned::DIRECT_ALIGN;
use thinbd_protocol::huge_buffers::HugeBuf;
use tokio::io::unix::AsyncFd;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::space::backend::{BlockStore, FileStore, IoEngine, IoFuture};

const RING_ENTRIES: u32 = 256;

/// A request's result, and when its completion was reaped (with `--stage-latency`).
type Done<T> = oneshot::Sender<(io::Result<T>, Option<Instant>)>;

/// A request on the ring. Its buffer lives here until the kernel has completed it; the permit
/// is its room on the ring.
struct InFlight {
    kind: Kind,
    offset: u64,
    /// Bytes transferred so far (a short transfer is resubmitted for the rest).
    moved: usize,
    on_ring: Option<Instant>,
    _room: OwnedSemaphorePermit,
}

enum Kind {
    Read { buf: ReadBuf, done: Done<Bytes> },
    Write { data: Bytes, done: Done<()> },
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
    cq: Mutex<()>,
    /// Requests on the ring, by slot (the entry's user data), and the free slots. Held while
    /// pushing onto the submission queue too (one producer at a time).
    slots: Mutex<Slots>,
    room: Arc<Semaphore>,
    /// Completions wait for [`Ring::reap`] to ask for them (`IORING_SETUP_DEFER_TASKRUN`); only
    /// the thread that made the ring, named here, may submit or reap.
    deferred: Option<std::thread::ThreadId>,
    /// Cleared when the reaper is gone (its runtime shut down): the thread needs a new ring.
    reaping: AtomicBool,
}

#[derive(Default)]
struct Slots {
    on_ring: Vec<Option<InFlight>>,
    free: Vec<usize>,
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
        self.mine().is_none_or(|ring| ring.room.available_permits() == RING_ENTRIES as usize)
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

    async fn submit(&self, kind: Kind, offset: u64) -> io::Result<()> {
        let sent = clock();
        let ring = self.ring()?;
        let room = ring.room.clone().acquire_owned().await.map_err(|_| io::Error::other("ring closed"))?;
        let on_ring = observe(crate::stages::RingStage::Queue, sent);
        let f = InFlight { kind, offset, moved: 0, on_ring, _room: room };
        ring.put(f)
    }

    async fn submit_read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let (done, rx) = oneshot::channel();
        self.submit(Kind::Read { buf: ReadBuf::new(len), done }, offset).await?;
        let (r, reaped) = rx.await.map_err(|_| io::Error::other("the ring dropped a read"))?;
        observe(crate::stages::RingStage::Wake, reaped);
        r
    }

    async fn submit_write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let (done, rx) = oneshot::channel();
        self.submit(Kind::Write { data, done }, offset).await?;
        let (r, reaped) = rx.await.map_err(|_| io::Error::other("the ring dropped a write"))?;
        observe(crate::stages::RingStage::Wake, reaped);
        r
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
            cq: Mutex::new(()),
            slots: Default::default(),
            room: Arc::new(Semaphore::new(RING_ENTRIES as usize)),
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

    /// Puts `f` (or what is left of it) on the ring in a free slot and enters the kernel.
    fn put(&self, f: InFlight) -> io::Result<()> {
        {
            let mut slots = self.slots.lock().map_err(|_| io::Error::other("ring poisoned"))?;
            let slot = slots.free.pop().unwrap_or(slots.on_ring.len());
            if slot == slots.on_ring.len() {
                slots.on_ring.push(None);
            }
            let entry = entry(&self.file, slot, slots.on_ring[slot].insert(f));
            // SAFETY: one producer at a time (under the `slots` lock). The entry's buffer belongs
            // to the slot's `InFlight`, which stays in `slots` (its buffer on the heap, not
            // moving when the Vec grows) until its completion is reaped. Room for it was taken
            // from `room`: never more requests than entries on the ring, so the push finds room.
            if unsafe { self.ring.submission_shared().push(&entry) }.is_err() {
                let f = slots.on_ring[slot].take();
                slots.free.push(slot);
                drop(slots);
                if let Some(f) = f {
                    fail(f, io::Error::other("the ring is full"));
                }
                return Ok(());
            }
        }
        self.ring.submit()?;
        Ok(())
    }

    /// Takes every completion on the ring: finished requests are answered, short ones put back.
    fn reap(&self) {
        let Ok(_cq) = self.cq.lock() else { return };
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
        // SAFETY: one consumer at a time (the `cq` lock).
        let done: Vec<(u64, i32)> =
            unsafe { self.ring.completion_shared() }.map(|c| (c.user_data(), c.result())).collect();
        for (slot, res) in done {
            let taken = match self.slots.lock() {
                Ok(mut slots) => {
                    let f = slots.on_ring.get_mut(slot as usize).and_then(Option::take);
                    if f.is_some() {
                        slots.free.push(slot as usize);
                    }
                    f
                }
                Err(_) => None,
            };
            let Some(mut f) = taken else { continue };
            if res < 0 {
                fail(f, io::Error::from_raw_os_error(-res));
                continue;
            }
            let n = res as usize;
            f.moved += n;
            let finished = match &f.kind {
                // End of file: the rest reads as zeros (`ReadBuf::filled` writes them).
                Kind::Read { buf, .. } => n == 0 || f.moved == buf.len,
                Kind::Write { data, .. } => {
                    if n == 0 {
                        fail(f, io::Error::from_raw_os_error(nix::libc::EIO));
                        continue;
                    }
                    f.moved == data.len()
                }
            };
            if !finished {
                if let Err(e) = self.put(f) {
                    tracing::warn!(error = %e, "cannot resubmit the rest of a short transfer");
                }
                continue;
            }
            let reaped = observe(crate::stages::RingStage::Disk, f.on_ring);
            match f.kind {
                Kind::Read { buf, done } => {
                    // SAFETY: the completions of this read reported `f.moved` bytes from the
                    // buffer's start written by the kernel (each entry starts where the last
                    // ended, see `entry`).
                    let data = unsafe { buf.filled(f.moved) };
                    drop(done.send((Ok(data), reaped)))
                }
                Kind::Write { done, .. } => drop(done.send((Ok(()), reaped))),
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.lock().map_or(0, |s| s.on_ring.iter().filter(|f| f.is_some()).count())
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

fn fail(f: InFlight, e: io::Error) {
    match f.kind {
        Kind::Read { done, .. } => drop(done.send((Err(e), None))),
        Kind::Write { done, .. } => drop(done.send((Err(e), None))),
    }
}

/// The entry for the remaining part of `f`.
fn entry(file: &File, slot: usize, f: &mut InFlight) -> squeue::Entry {
    let fd = types::Fd(file.as_raw_fd());
    let at = f.offset + f.moved as u64;
    let e = match &mut f.kind {
        Kind::Read { buf, .. } => {
            let rest = buf.len - f.moved;
            opcode::Read::new(fd, buf.at(f.moved), rest as u32).offset(at).build()
        }
        Kind::Write { data, .. } => {
            let rest = &data[f.moved..];
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
        Box::pin(async move { self.submit_read(offset, len).await })
    }
    fn write(self: Arc<Self>, offset: u64, data: Bytes) -> IoFuture<()> {
        Box::pin(async move { self.submit_write(offset, data).await })
    }
}

impl Drop for UringStore {
    /// Stops the reapers and waits for what is still on the rings: the kernel may write into
    /// those buffers until each request completes.
    fn drop(&mut self) {
        let rings = std::mem::take(&mut *self.rings.lock().unwrap_or_else(|p| p.into_inner()));
        for Reaped { ring, reaper } in rings {
            reaper.abort();
            ring.room.close();
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
}
