//! The io_uring data path: one ring thread per pool submits reads, writes and fsyncs in batches
//! and completes them out of order. Requests arrive over a channel; an eventfd read that sits on
//! the ring wakes the thread when new ones are queued, so the thread only ever waits in
//! `io_uring_enter`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::mpsc;

use bytes::Bytes;
use io_uring::{IoUring, opcode, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use thinbd_protocol::aligned::AlignedBuf;
use tokio::sync::oneshot;

use crate::space::backend::{BlockStore, FileStore, IoEngine, IoFuture};

const RING_ENTRIES: u32 = 256;
const WAKE: u64 = u64::MAX;

/// A request's result, and when its completion was reaped (with `--stage-latency`).
type Done<T> = oneshot::Sender<(io::Result<T>, Option<Instant>)>;

/// A request for the ring thread, and when it was handed over (with `--stage-latency`).
struct Op {
    kind: OpKind,
    sent: Option<Instant>,
}

enum OpKind {
    Read { offset: u64, len: usize, done: Done<Bytes> },
    Write { offset: u64, data: Bytes, done: Done<()> },
}

/// A request on the ring. Its buffer lives here until the kernel has completed it.
enum InFlight {
    Read { offset: u64, buf: AlignedBuf, filled: usize, done: Done<Bytes>, on_ring: Option<Instant> },
    Write { offset: u64, data: Bytes, written: usize, done: Done<()>, on_ring: Option<Instant> },
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

pub struct UringStore {
    tx: Option<mpsc::Sender<Op>>,
    wake: Arc<EventFd>,
    /// Set when the eventfd was written and the ring thread has not yet looked at the channel:
    /// requests queued meanwhile need no write of their own (one syscall per batch, not per
    /// request).
    woken: Arc<AtomicBool>,
    /// The same file for the synchronous calls (the superblock at start, fdatasync).
    file: FileStore,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UringStore {
    /// Starts the ring thread on `file`; where io_uring is not available (old kernel, seccomp)
    /// the file comes back with the reason, to be driven by threads instead.
    pub fn new(file: FileStore) -> Result<UringStore, (FileStore, io::Error)> {
        let started = (|| {
            let ring = IoUring::new(RING_ENTRIES)?;
            let wake = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).map_err(io::Error::from)?);
            let ring_file = file.try_clone_file()?;
            let (tx, rx) = mpsc::channel();
            let (w, woken) = (wake.clone(), Arc::new(AtomicBool::new(false)));
            let wk = woken.clone();
            let thread = std::thread::Builder::new()
                .name("thinbd-uring".into())
                .spawn(move || run(ring, rx, &ring_file, &w, &wk))?;
            Ok::<_, io::Error>((tx, wake, woken, thread))
        })();
        match started {
            Ok((tx, wake, woken, thread)) => Ok(UringStore { tx: Some(tx), wake, woken, file, thread: Some(thread) }),
            Err(e) => Err((file, e)),
        }
    }

    fn send(&self, kind: OpKind) -> io::Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| io::Error::other("ring stopped"))?;
        tx.send(Op { kind, sent: clock() }).map_err(|_| io::Error::other("ring thread is gone"))?;
        if !self.woken.swap(true, Ordering::AcqRel) {
            self.wake.write(1).map_err(io::Error::from)?;
        }
        Ok(())
    }

    async fn submit_read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let (done, rx) = oneshot::channel();
        self.send(OpKind::Read { offset, len, done })?;
        let (r, reaped) = rx.await.map_err(|_| io::Error::other("ring thread dropped a read"))?;
        observe(crate::stages::RingStage::Wake, reaped);
        r
    }

    async fn submit_write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let (done, rx) = oneshot::channel();
        self.send(OpKind::Write { offset, data, done })?;
        let (r, reaped) = rx.await.map_err(|_| io::Error::other("ring thread dropped a write"))?;
        observe(crate::stages::RingStage::Wake, reaped);
        r
    }
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
    fn alignment(&self) -> u64 {
        self.file.alignment()
    }
    fn engine(&self) -> IoEngine {
        IoEngine::Uring
    }
    fn read(self: Arc<Self>, offset: u64, len: usize) -> IoFuture<Bytes> {
        Box::pin(async move { self.submit_read(offset, len).await })
    }
    fn write(self: Arc<Self>, offset: u64, data: Bytes) -> IoFuture<()> {
        Box::pin(async move { self.submit_write(offset, data).await })
    }
}

impl Drop for UringStore {
    fn drop(&mut self) {
        self.tx.take();
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut ring: IoUring, rx: mpsc::Receiver<Op>, file: &File, wake: &EventFd, woken: &AtomicBool) {
    let fd = types::Fd(file.as_raw_fd());
    let wake_fd = types::Fd(wake.as_fd().as_raw_fd());
    let mut wake_buf = [0u8; 8];
    let mut slots: Vec<Option<InFlight>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut inflight = 0usize;
    let mut queued: std::collections::VecDeque<Op> = Default::default();
    let mut open = true;
    let mut arm_wake = true;
    loop {
        if arm_wake && open {
            let e = opcode::Read::new(wake_fd, wake_buf.as_mut_ptr(), 8).build().user_data(WAKE);
            // SAFETY: `wake_buf` lives for the whole loop, longer than the read it is given to.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                arm_wake = false;
            }
        }
        // Move queued requests onto the ring while there is room.
        while let Some(op) = queued.pop_front() {
            if ring.submission().is_full() {
                queued.push_front(op);
                break;
            }
            let slot = free.pop().unwrap_or_else(|| {
                slots.push(None);
                slots.len() - 1
            });
            let on_ring = observe(crate::stages::RingStage::Queue, op.sent);
            let f = match op.kind {
                OpKind::Read { offset, len, done } => {
                    InFlight::Read { offset, buf: AlignedBuf::zeroed(len), filled: 0, done, on_ring }
                }
                OpKind::Write { offset, data, done } => InFlight::Write { offset, data, written: 0, done, on_ring },
            };
            slots[slot] = Some(f);
            submit(&mut ring, fd, slot, slots[slot].as_mut());
            inflight += 1;
        }
        if !open && inflight == 0 && queued.is_empty() {
            return;
        }
        if let Err(e) = ring.submit_and_wait(1)
            && e.kind() != io::ErrorKind::Interrupted
        {
            // The ring is unusable: fail everything instead of hanging the callers.
            for f in slots.iter_mut().filter_map(Option::take) {
                fail(f, io::Error::new(e.kind(), e.to_string()));
            }
            return;
        }
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            if ud == WAKE {
                arm_wake = true;
                // From here a new request writes the eventfd again; those already queued are
                // taken below.
                woken.swap(false, Ordering::AcqRel);
                loop {
                    match rx.try_recv() {
                        Ok(op) => queued.push_back(op),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                continue;
            }
            let slot = ud as usize;
            let Some(mut f) = slots.get_mut(slot).and_then(Option::take) else { continue };
            if res < 0 {
                fail(f, io::Error::from_raw_os_error(-res));
            } else {
                let n = res as usize;
                let finished = match &mut f {
                    InFlight::Read { buf, filled, .. } => {
                        *filled += n;
                        // End of file: the rest reads as zeros (the buffer already is).
                        n == 0 || *filled == buf.len()
                    }
                    InFlight::Write { data, written, .. } => {
                        *written += n;
                        if n == 0 {
                            fail(f, io::Error::from_raw_os_error(nix::libc::EIO));
                            free.push(slot);
                            inflight -= 1;
                            continue;
                        }
                        *written == data.len()
                    }
                };
                if finished {
                    match f {
                        InFlight::Read { buf, done, on_ring, .. } => {
                            let reaped = observe(crate::stages::RingStage::Disk, on_ring);
                            drop(done.send((Ok(buf.freeze()), reaped)))
                        }
                        InFlight::Write { done, on_ring, .. } => {
                            let reaped = observe(crate::stages::RingStage::Disk, on_ring);
                            drop(done.send((Ok(()), reaped)))
                        }
                    }
                } else {
                    // Short transfer: resubmit the rest.
                    slots[slot] = Some(f);
                    submit(&mut ring, fd, slot, slots[slot].as_mut());
                    continue;
                }
            }
            free.push(slot);
            inflight -= 1;
        }
    }
}

fn fail(f: InFlight, e: io::Error) {
    match f {
        InFlight::Read { done, .. } => drop(done.send((Err(e), None))),
        InFlight::Write { done, .. } => drop(done.send((Err(e), None))),
    }
}

/// Queues the remaining part of `f` on the ring (submitted with the next `submit_and_wait`).
fn submit(ring: &mut IoUring, fd: types::Fd, slot: usize, f: Option<&mut InFlight>) {
    let entry = match f {
        Some(InFlight::Read { offset, buf, filled, .. }) => {
            let rest = &mut buf.as_mut_slice()[*filled..];
            opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32).offset(*offset + *filled as u64).build()
        }
        Some(InFlight::Write { offset, data, written, .. }) => {
            let rest = &data[*written..];
            opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32).offset(*offset + *written as u64).build()
        }
        None => return,
    };
    let entry = entry.user_data(slot as u64);
    // SAFETY: the buffer belongs to the slot's `InFlight`, which stays in `slots` (a Vec whose
    // elements own heap buffers that do not move when the Vec grows) until this request's
    // completion is reaped. Callers check for room first; a resubmission reuses the entry its
    // completion just freed.
    while unsafe { ring.submission().push(&entry) }.is_err() {
        if ring.submit().is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Past the end of the file reads as zeros, as with pread.
        let tail = ring.clone().read((4 << 20) - 10, 100).await.unwrap();
        assert_eq!(tail.len(), 100);
        assert!(tail[10..].iter().all(|b| *b == 0));
        drop(ring);
    }
}
