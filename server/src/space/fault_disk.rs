//! A memory disk that behaves like a real one across a power cut: writes since the last sync may
//! be lost, kept, reordered or torn at sector granularity when [`FaultDisk::crash`] is called.
//! It can also fail I/O with EIO or ENOSPC on demand. Used by the crash-torture tests for both
//! the pool and the redb file.

use std::sync::{Arc, Mutex};

use crate::space::backend::BlockStore;

const SECTOR: usize = 512;

#[derive(Default)]
struct State {
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// What reads see now: durable plus every write since the last sync.
    current: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<(u64, Vec<u8>)>,
    fail_writes: Option<std::io::ErrorKind>,
    fail_reads: bool,
    /// Syncs left before every sync fails with EIO (writes still land, unsynced).
    syncs_left: Option<usize>,
    /// Reads take this long (on the calling thread), so tests can hold a read in flight.
    read_delay: Option<std::time::Duration>,
    /// As O_DIRECT: pool I/O whose offset, length or buffer address is not a multiple of this
    /// fails with EINVAL (0: any alignment).
    align: usize,
}

#[derive(Clone, Default)]
pub struct FaultDisk(Arc<Mutex<State>>);

/// A tiny deterministic generator, so a crash replays from its seed.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

fn io_err(kind: std::io::ErrorKind) -> std::io::Error {
    match kind {
        std::io::ErrorKind::StorageFull => std::io::Error::from_raw_os_error(28),
        _ => std::io::Error::from_raw_os_error(5),
    }
}

impl FaultDisk {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock only happens in a failing test.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on writes fail with EIO (`Other`) or ENOSPC (`StorageFull`); `None` heals.
    pub fn fail_writes(&self, kind: Option<std::io::ErrorKind>) {
        self.lock().fail_writes = kind;
    }

    /// After `n` more syncs succeed, every sync fails with EIO and makes nothing durable (the
    /// moment a power cut strikes inside a FLUSH); `None` heals.
    pub fn fail_syncs_after(&self, n: Option<usize>) {
        self.lock().syncs_left = n;
    }

    pub fn fail_reads(&self, on: bool) {
        self.lock().fail_reads = on;
    }

    /// Every read waits `delay` before it copies the data (`None`: no wait).
    pub fn delay_reads(&self, delay: Option<std::time::Duration>) {
        self.lock().read_delay = delay;
    }

    /// Makes pool I/O demand O_DIRECT alignment, to prove the pool never issues anything else.
    pub fn require_alignment(&self, align: usize) {
        self.lock().align = align;
    }

    fn check_alignment(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let a = self.lock().align;
        if a > 1
            && (!offset.is_multiple_of(a as u64)
                || !buf.len().is_multiple_of(a)
                || !(buf.as_ptr() as usize).is_multiple_of(a))
        {
            return Err(std::io::Error::from_raw_os_error(22));
        }
        Ok(())
    }

    pub fn unsynced_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// Simulates a power cut and returns the disk as it would come back: each unsynced write is
    /// kept, lost, or torn (a random subset of its sectors), decided by `rng`.
    pub fn crash(&self, rng: &mut XorShift) -> FaultDisk {
        let st = self.lock();
        let mut image = st.durable.clone();
        for (off, data) in &st.pending {
            let off = *off as usize;
            let end = off + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            match rng.below(3) {
                0 => image[off..end].copy_from_slice(data),
                1 => {}
                _ => {
                    let mut s = 0;
                    while s < data.len() {
                        let n = (SECTOR - (off + s) % SECTOR).min(data.len() - s);
                        if rng.below(2) == 0 {
                            image[off + s..off + s + n].copy_from_slice(&data[s..s + n]);
                        }
                        s += n;
                    }
                }
            }
        }
        let len = st.current.len();
        image.resize(len, 0);
        let align = st.align;
        FaultDisk(Arc::new(Mutex::new(State { durable: image.clone(), current: image, align, ..State::default() })))
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let delay = self.lock().read_delay;
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let st = self.lock();
        if st.fail_reads {
            return Err(io_err(std::io::ErrorKind::Other));
        }
        let off = offset as usize;
        let avail = st.current.len().saturating_sub(off).min(buf.len());
        if avail > 0 {
            buf[..avail].copy_from_slice(&st.current[off..off + avail]);
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut st = self.lock();
        if let Some(kind) = st.fail_writes {
            return Err(io_err(kind));
        }
        let off = offset as usize;
        if st.current.len() < off + buf.len() {
            st.current.resize(off + buf.len(), 0);
        }
        st.current[off..off + buf.len()].copy_from_slice(buf);
        st.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync_all(&self) -> std::io::Result<()> {
        let mut st = self.lock();
        if st.fail_writes.is_some() || st.syncs_left == Some(0) {
            return Err(io_err(std::io::ErrorKind::Other));
        }
        if let Some(n) = st.syncs_left.as_mut() {
            *n -= 1;
        }
        // What reads see becomes durable: the writes since the last sync, applied in order
        // (cheaper than copying the whole image; `set_len` keeps both lengths in step).
        let st = &mut *st;
        for (off, data) in st.pending.drain(..) {
            let (off, end) = (off as usize, off as usize + data.len());
            if st.durable.len() < end {
                st.durable.resize(end, 0);
            }
            st.durable[off..end].copy_from_slice(&data);
        }
        st.durable.resize(st.current.len(), 0);
        Ok(())
    }

    /// The same disk as a redb storage backend.
    pub fn redb_backend(&self) -> RedbFaultDisk {
        RedbFaultDisk(self.clone())
    }
}

impl BlockStore for FaultDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check_alignment(buf, offset)?;
        self.read(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check_alignment(buf, offset)?;
        self.write(buf, offset)
    }
    fn alignment(&self) -> u64 {
        self.lock().align.max(1) as u64
    }
    fn sync(&self) -> std::io::Result<()> {
        self.sync_all()
    }
    /// Like a hole punched in a file: reads see zeros at once; until the next sync a power cut
    /// may keep, lose or tear it (as a write of zeros).
    fn punch(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        let have = self.lock().current.len() as u64;
        let end = (offset + len).min(have);
        if offset < end {
            self.write(&vec![0u8; (end - offset) as usize], offset)?;
        }
        Ok(true)
    }
}

pub struct RedbFaultDisk(FaultDisk);

impl std::fmt::Debug for RedbFaultDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbFaultDisk")
    }
}

impl redb::StorageBackend for RedbFaultDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.0.lock().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.0.read(out, offset)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        // Length changes are treated as durable at once, like a journaled filesystem's metadata.
        let mut st = self.0.lock();
        st.current.resize(len as usize, 0);
        st.durable.resize(len as usize, 0);
        // Unsynced writes past a cut are gone with it, and must not come back at the next sync.
        st.pending.retain_mut(|(off, data)| {
            data.truncate((len.saturating_sub(*off)) as usize);
            !data.is_empty()
        });
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.0.sync_all()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.0.write(data, offset)
    }
}
