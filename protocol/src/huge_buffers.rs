//! Request buffers in transparent huge pages, reused.
//!
//! The disk charges a direct read or write per physically contiguous piece of its buffer. On
//! the paravirtual disk of this project's machine, fio's 128 KiB direct reads run at 1.1 GB/s
//! from ordinary memory (32 pages, wherever the kernel found each) and at 2.2 GB/s from one huge
//! page; 1 MiB writes 1.8 against 3.0 GB/s; even 16 KiB reads gain a third (benches/README,
//! "Buffers in huge pages"). So buffers of [`MIN`] to [`CHUNK`] bytes come from 2 MiB chunks
//! the kernel is asked to back with huge pages (`MADV_HUGEPAGE`), each chunk carved into
//! buffers of one power-of-two size, and every buffer goes back to its size's free list when its
//! last user drops it: a chunk is faulted in (and zeroed) once, not per request. At most
//! [`limit`] bytes are carved, and they stay with the process; past that, for other sizes, and
//! where the kernel has huge pages turned off, callers use ordinary memory as before.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// A huge page, and the largest buffer made here.
pub const CHUNK: usize = 2 << 20;
/// The smallest buffer made here. One page gains nothing from being in a huge one, but taking
/// it from a free list spares the allocator's work (a fresh aligned 4 KiB was ~5% of a session
/// thread at 4k random reads: an 8 KiB allocation each, and glibc consolidating its small bins
/// before every one).
pub const MIN: usize = 4 << 10;
/// Bytes carved at most, unless [`limit`] says otherwise.
pub const DEFAULT_LIMIT: usize = 256 << 20;
/// Chunks asked of the allocator at once (one mapping, so that it comes fresh from the kernel
/// rather than from memory the heap already touched in small pages).
const REGION_CHUNKS: usize = 16;
/// Buffer sizes: `MIN << class` for class 0..CLASSES, up to `CHUNK`.
const CLASSES: usize = (CHUNK / MIN).trailing_zeros() as usize + 1;

type Piece = &'static mut [u8];

struct Pool {
    /// Free buffers of each size.
    free: [Mutex<Vec<Piece>>; CLASSES],
    chunks: Mutex<Chunks>,
    limit: AtomicUsize,
}

struct Chunks {
    /// Chunks not yet carved.
    spare: Vec<Piece>,
    /// Bytes asked of the allocator so far.
    taken: usize,
}

static POOL: Pool = Pool {
    free: [const { Mutex::new(Vec::new()) }; CLASSES],
    chunks: Mutex::new(Chunks { spare: Vec::new(), taken: 0 }),
    limit: AtomicUsize::new(DEFAULT_LIMIT),
};

/// Sets how many bytes may be carved at most (a server's memory budget); buffers already
/// carved stay.
pub fn limit(bytes: usize) {
    POOL.limit.store(bytes, Ordering::Relaxed);
}

/// Whether the kernel backs memory with huge pages when asked (`madvise` or `always`).
fn huge_pages_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok_and(|s| !s.contains("[never]"))
    })
}

/// A buffer of `len` bytes, its first on a [`MIN`]-byte boundary (so also fit for direct I/O).
/// It holds whatever its last user left in it: the caller fills all of it before sharing it.
pub struct HugeBuf {
    /// Empty only once dropped.
    piece: Piece,
    class: usize,
    len: usize,
}

impl HugeBuf {
    /// A buffer for `len` bytes, or `None` when it should come from ordinary memory (outside
    /// [`MIN`]..=[`CHUNK`], huge pages off, or [`limit`] reached).
    pub fn get(len: usize) -> Option<HugeBuf> {
        if !(MIN..=CHUNK).contains(&len) || !huge_pages_on() {
            return None;
        }
        let class = (len.next_power_of_two() / MIN).trailing_zeros() as usize;
        // (Two statements: the free list's lock must be released before carving takes it.)
        let free = lock(&POOL.free[class]).pop();
        let piece = free.or_else(|| carve(class))?;
        Some(HugeBuf { piece, class, len })
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.piece[..self.len]
    }

    /// Shares the buffer; it returns to the pool when the last copy is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for HugeBuf {
    fn as_ref(&self) -> &[u8] {
        &self.piece[..self.len]
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        lock(&POOL.free[self.class]).push(std::mem::take(&mut self.piece));
    }
}

/// A lock on a list whose every state is valid: a panic while holding it loses nothing.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Cuts a chunk into buffers of `class`, keeps all but one on its free list and returns that
/// one; `None` once [`limit`] bytes are carved.
fn carve(class: usize) -> Option<Piece> {
    let chunk = take_chunk()?;
    let mut pieces = chunk.chunks_exact_mut(MIN << class);
    let first = pieces.next()?;
    lock(&POOL.free[class]).extend(pieces);
    Some(first)
}

fn take_chunk() -> Option<Piece> {
    let mut chunks = lock(&POOL.chunks);
    if let Some(c) = chunks.spare.pop() {
        return Some(c);
    }
    let want = REGION_CHUNKS * CHUNK;
    if chunks.taken + want > POOL.limit.load(Ordering::Relaxed) {
        return None;
    }
    chunks.taken += want;
    // Zeroed memory this large is a fresh mapping (untouched: the kernel zeroes each page as it
    // is first faulted in, as a huge page once advised). It is never freed.
    let region: Piece = Box::leak(vec![0u8; want + CHUNK].into_boxed_slice());
    let pad = (region.as_ptr() as usize).wrapping_neg() % CHUNK;
    let (_, rest) = region.split_at_mut(pad);
    let (aligned, _) = rest.split_at_mut(want);
    // SAFETY: advice only: MADV_HUGEPAGE changes how the kernel backs the range with pages, not
    // what it holds or who may use it; the range lies within `region`, which is never freed.
    let advised = unsafe { rustix::mm::madvise(aligned.as_mut_ptr().cast(), want, rustix::mm::Advice::LinuxHugepage) };
    if let Err(e) = advised {
        tracing::debug!(error = %e, "huge pages refused: buffers work, in small pages");
    }
    let mut all: Vec<Piece> = aligned.chunks_exact_mut(CHUNK).collect();
    let first = all.pop();
    chunks.spare.extend(all);
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_separate_and_reused() {
        if !huge_pages_on() {
            return;
        }
        // 16 KiB buffers: a size no other test of this crate asks for, so that none takes ours.
        let mut a = HugeBuf::get(16 << 10).unwrap();
        let mut b = HugeBuf::get(12 << 10).unwrap();
        assert_eq!(a.as_ref().len(), 16 << 10);
        assert_eq!(b.as_ref().len(), 12 << 10);
        for (buf, fill) in [(&mut a, 1u8), (&mut b, 2u8)] {
            assert_eq!((buf.as_mut_slice().as_ptr() as usize) % (16 << 10), 0, "on its size's boundary");
            buf.as_mut_slice().fill(fill);
        }
        let a_at = a.as_ref().as_ptr() as usize;
        let class = ((16 << 10) / MIN).trailing_zeros() as usize;
        let on_free_list = || lock(&POOL.free[class]).iter().any(|p| p.as_ptr() as usize == a_at);
        let shared = a.freeze();
        assert!(shared.iter().all(|x| *x == 1), "one buffer's bytes are not the other's");
        assert!(b.as_ref().iter().all(|x| *x == 2));
        let copy = shared.clone();
        drop(shared);
        assert!(!on_free_list(), "still in use");
        drop(copy);
        assert!(on_free_list(), "back on its free list once the last copy went");
        assert!(HugeBuf::get(MIN - 1).is_none() && HugeBuf::get(CHUNK + 1).is_none(), "sizes outside the pool");
    }

    #[test]
    fn the_kernel_backs_a_buffer_with_one_huge_page() {
        if !huge_pages_on() {
            return;
        }
        let mut buf = HugeBuf::get(CHUNK).unwrap();
        buf.as_mut_slice().fill(7);
        let at = buf.as_mut_slice().as_ptr() as usize;
        // The mapping that holds the buffer, from /proc/self/smaps.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut huge = None;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&at);
            } else if inside && let Some(kb) = line.strip_prefix("AnonHugePages:") {
                huge = kb.trim().trim_end_matches(" kB").trim().parse::<usize>().ok();
            }
        }
        assert!(huge.unwrap() >= CHUNK >> 10, "the buffer's mapping has a huge page: {huge:?} kB");
    }
}
