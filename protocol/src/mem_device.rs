//! A small in-memory block device with 4 KiB allocation granularity, for protocol tests, the
//! fuzz target and benchmarks of the codec without a disk.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::consts::{STATE_HOLE, STATE_ZERO};
use crate::device::{BlockDevice, DeviceError, DeviceInfo, DeviceResult, Extent, ReadChunk};
use crate::handshake::{Export, ExportCatalog, ExportListing, OpenError};

const BLOCK: u64 = 4096;

/// One entry per 4 KiB block; `None` is a hole.
type Blocks = Vec<Option<Box<[u8]>>>;

pub struct MemDevice {
    size: u64,
    read_only: bool,
    blocks: Mutex<Blocks>,
}

impl MemDevice {
    pub fn new(size: u64, read_only: bool) -> Self {
        let n = size.div_ceil(BLOCK) as usize;
        MemDevice { size, read_only, blocks: Mutex::new(vec![None; n]) }
    }

    fn lock(&self) -> DeviceResult<std::sync::MutexGuard<'_, Blocks>> {
        self.blocks.lock().map_err(|_| DeviceError::Io("poisoned".into()))
    }

    fn zero_range(&self, offset: u64, len: u32, unmap: bool) -> DeviceResult<()> {
        let mut blocks = self.lock()?;
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end {
            let i = (pos / BLOCK) as usize;
            let within = pos % BLOCK;
            let n = (BLOCK - within).min(end - pos);
            if within == 0 && n == BLOCK && unmap {
                blocks[i] = None;
            } else if let Some(b) = blocks[i].as_mut() {
                b[within as usize..(within + n) as usize].fill(0);
            }
            pos += n;
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size,
            read_only: self.read_only,
            can_trim: true,
            can_zero: true,
            can_cache: true,
            can_multi_conn: true,
            preferred_block: BLOCK as u32,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Vec<ReadChunk>> {
        let blocks = self.lock()?;
        let mut out: Vec<ReadChunk> = Vec::new();
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end {
            let i = (pos / BLOCK) as usize;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min((end - pos) as usize);
            match (&blocks[i], out.last_mut()) {
                (None, Some(ReadChunk::Hole(h))) => *h += n as u32,
                (None, _) => out.push(ReadChunk::Hole(n as u32)),
                (Some(b), _) => out.push(ReadChunk::Data(Bytes::copy_from_slice(&b[within..within + n]))),
            }
            pos += n as u64;
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> DeviceResult<()> {
        let mut blocks = self.lock()?;
        let mut pos = offset;
        let mut src = &data[..];
        while !src.is_empty() {
            let i = (pos / BLOCK) as usize;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(src.len());
            let b = blocks[i].get_or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
            b[within..within + n].copy_from_slice(&src[..n]);
            src = &src[n..];
            pos += n as u64;
        }
        Ok(())
    }

    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> DeviceResult<()> {
        self.zero_range(offset, len, true)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_unmap: bool, _fast: bool, _fua: bool) -> DeviceResult<()> {
        self.zero_range(offset, len, may_unmap)
    }

    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        let chunks = self.read(offset, len).await?;
        let mut out: Vec<Extent> = Vec::new();
        for c in chunks {
            let flags = if matches!(c, ReadChunk::Hole(_)) { STATE_HOLE | STATE_ZERO } else { 0 };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += c.len(),
                _ => out.push(Extent { length: c.len(), flags }),
            }
        }
        Ok(out)
    }
}

/// A catalog of named in-memory exports.
#[derive(Default, Clone)]
pub struct MemCatalog {
    pub exports: Vec<(String, Arc<MemDevice>)>,
}

impl ExportCatalog for MemCatalog {
    type Device = MemDevice;

    async fn open(&self, name: &str, _peer: Option<SocketAddr>) -> Result<Export<MemDevice>, OpenError> {
        self.exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, d)| Export {
                name: n.clone(),
                description: format!("memory export {n}"),
                device: d.clone(),
                fences: Vec::new(),
            })
            .ok_or(OpenError::Unknown)
    }

    fn list(&self, _peer: Option<SocketAddr>) -> Vec<ExportListing> {
        self.exports.iter().map(|(n, _)| ExportListing { name: n.clone(), description: String::new() }).collect()
    }
}
