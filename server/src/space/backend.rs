//! Where pool bytes live. Every backend — the pool file on blocking threads, the same file
//! through io_uring, a fault-injecting memory disk in tests — implements [`BlockStore`], so the
//! pool above never asks which one it has.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use thinbd_protocol::aligned::{AlignedBuf, DIRECT_ALIGN};

use crate::error::EngineError;

/// A read or write in flight on a backend.
pub type IoFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

/// A pool backend. The synchronous calls are the backend's own; the asynchronous ones default
/// to running them on tokio's blocking threads, and a backend with an asynchronous engine of its
/// own (io_uring) overrides them.
pub trait BlockStore: Send + Sync + 'static {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Whether [`BlockStore::sync`] may run on the calling (async runtime) thread now rather
    /// than on a blocking thread: the thread serves one client ([`super::occupancy`]) and none
    /// of its I/O on this store is in flight, so blocking it holds up nothing else.
    fn sync_here(&self) -> bool {
        false
    }
    /// Granularity of offsets, lengths and buffer addresses the store accepts.
    fn alignment(&self) -> u64 {
        1
    }
    /// How requests reach the device.
    fn engine(&self) -> IoEngine {
        IoEngine::Threads
    }
    /// Makes `len` bytes at `offset` read as zeros without writing them, where the store can
    /// (`Ok(false)`: it cannot; nothing changed). Durable after the next [`BlockStore::sync`].
    fn punch(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Allocates `len` bytes at `offset` on the device without changing what they read, so
    /// that writing there later cannot fail for want of space (a sparse file's holes).
    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Reads `len` bytes at `offset` into a buffer aligned for direct I/O.
    fn read(self: Arc<Self>, offset: u64, len: usize) -> IoFuture<Bytes> {
        Box::pin(async move {
            let task = tokio::task::spawn_blocking(move || {
                let mut buf = AlignedBuf::zeroed(len);
                self.read_at(buf.as_mut_slice(), offset).map(|()| buf.freeze())
            });
            task.await.map_err(io::Error::other)?
        })
    }

    /// Writes `data` at `offset`; takes the buffer by value so it moves to the I/O thread
    /// without a copy.
    fn write(self: Arc<Self>, offset: u64, data: Bytes) -> IoFuture<()> {
        Box::pin(async move {
            let task = tokio::task::spawn_blocking(move || self.write_at(&data, offset));
            task.await.map_err(io::Error::other)?
        })
    }
}

/// How the pool file is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IoEngine {
    /// io_uring driven from the async runtime (falls back to `threads` where io_uring is refused).
    #[default]
    Uring,
    /// pread/pwrite on tokio's blocking threads.
    Threads,
}

impl IoEngine {
    /// As `--io-engine` spells it.
    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Uring => "uring",
            IoEngine::Threads => "threads",
        }
    }
}

/// The pool file, read and written with pread/pwrite.
pub struct FileStore {
    file: File,
    align: u64,
}

impl FileStore {
    /// Opens or creates the pool file; with `direct` O_DIRECT, or buffered with a warning where
    /// the filesystem refuses it.
    pub fn open(path: &Path, direct: bool) -> Result<FileStore, EngineError> {
        let open = |flags: i32| {
            OpenOptions::new().read(true).write(true).create(true).truncate(false).custom_flags(flags).open(path)
        };
        let (file, align) = match direct {
            true => match open(nix::libc::O_DIRECT) {
                Ok(f) => {
                    let align = direct_alignment(&f);
                    (f, align)
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    tracing::warn!(path = %path.display(), "the filesystem refuses O_DIRECT; pool I/O goes through the page cache");
                    (open(0).map_err(|e| EngineError::io("open pool", 0, e))?, 1)
                }
                Err(e) => return Err(EngineError::io("open pool", 0, e)),
            },
            false => (open(0).map_err(|e| EngineError::io("open pool", 0, e))?, 1),
        };
        Ok(FileStore { file, align })
    }

    pub fn file_len(&self) -> Result<u64, EngineError> {
        Ok(self.file.metadata().map_err(|e| EngineError::io("stat pool", 0, e))?.len())
    }

    /// Another descriptor of the same open file (for the io_uring ring).
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    pub fn set_len(&self, bytes: u64) -> Result<(), EngineError> {
        self.file.set_len(bytes).map_err(|e| EngineError::io("grow pool", bytes, e))
    }
}

/// The offset and length granularity direct I/O on `file` needs, as the kernel reports it
/// (statx `STATX_DIOALIGN`, Linux 6.1): the device's logical block, often 512 bytes. A 512-byte
/// write then goes to the disk as it is instead of as a read-modify-write of 4 KiB. Buffers
/// stay 4 KiB-aligned ([`AlignedBuf`]), so only a filesystem that wants more than that in
/// memory, or one that does not say, gets 4 KiB.
fn direct_alignment(file: &File) -> u64 {
    use rustix::fs::{AtFlags, StatxFlags, statx};
    let Ok(st) = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) else {
        return DIRECT_ALIGN as u64;
    };
    let (offset, memory) = (st.stx_dio_offset_align as u64, st.stx_dio_mem_align as u64);
    let told = st.stx_mask & StatxFlags::DIOALIGN.bits() != 0;
    if told && offset.is_power_of_two() && offset <= DIRECT_ALIGN as u64 && memory <= DIRECT_ALIGN as u64 {
        offset
    } else {
        DIRECT_ALIGN as u64
    }
}

impl BlockStore for FileStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn alignment(&self) -> u64 {
        self.align
    }
    /// A hole punched in a regular file; a block device is left alone (zeroing one would write
    /// every byte).
    fn punch(&self, offset: u64, len: u64) -> io::Result<bool> {
        use nix::fcntl::{FallocateFlags, fallocate};
        if len == 0 || !self.file.metadata()?.file_type().is_file() {
            return Ok(len == 0);
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, flags, offset as i64, len as i64) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{FallocateFlags, fallocate};
        if len == 0 || !self.file.metadata()?.file_type().is_file() {
            return Ok(());
        }
        match fallocate(&self.file, FallocateFlags::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64) {
            // A filesystem without fallocate: the holes fill as they are written.
            Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
