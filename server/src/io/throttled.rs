//! Per-volume QoS: IOPS and bandwidth limits (read, write, total) shared by every connection of
//! the volume, changeable while clients are connected. Reads and writes reserve from token
//! buckets ([`super::rate_limiter`]) and wait out any debt before going down the stack; TRIM and
//! WRITE_ZEROES count as write operations without bytes; FLUSH and BLOCK_STATUS are not limited.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thinbd_protocol::{Extent, ReadChunk};

use super::VolumeIo;
use super::rate_limiter::TokenBucket;
use crate::error::EngineError;

pub use crate::meta::qos::QosLimits;

#[derive(Clone, Copy)]
enum Class {
    Read,
    Write,
}

/// The limits and buckets of one volume, shared by its sessions.
pub struct Qos {
    state: Mutex<(QosLimits, [Option<TokenBucket>; 6])>,
    /// Fast path: nothing to do when unlimited.
    limited: AtomicBool,
    pub throttled_requests: AtomicU64,
    pub throttled_ns: AtomicU64,
}

impl Qos {
    pub fn new(limits: QosLimits) -> Self {
        let q = Qos {
            state: Mutex::new((QosLimits::default(), Default::default())),
            limited: AtomicBool::new(false),
            throttled_requests: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        };
        q.set(limits);
        q
    }

    pub fn limits(&self) -> QosLimits {
        self.state.lock().map(|s| s.0).unwrap_or_default()
    }

    /// New limits, in force for the next request of every session.
    pub fn set(&self, limits: QosLimits) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let burst = limits.burst_secs();
        for (slot, rate) in st.1.iter_mut().zip(limits.rates()) {
            *slot = match (slot.take(), rate) {
                (_, 0) => None,
                (Some(mut b), r) => {
                    b.reconfigure(r, r as f64 * burst, now);
                    Some(b)
                }
                (None, r) => Some(TokenBucket::new(r, r as f64 * burst, now)),
            };
        }
        st.0 = limits;
        self.limited.store(!limits.is_unlimited(), Relaxed);
    }

    /// How long a request of `class` moving `bytes` must wait; reserves its tokens.
    fn reserve(&self, class: Class, bytes: u64) -> Duration {
        if !self.limited.load(Relaxed) {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (ops, bw) = match class {
            Class::Read => ([0, 1], [3, 4]),
            Class::Write => ([0, 2], [3, 5]),
        };
        let mut wait = Duration::ZERO;
        for i in ops {
            if let Some(b) = &mut st.1[i] {
                wait = wait.max(b.reserve(1.0, now));
            }
        }
        if bytes > 0 {
            for i in bw {
                if let Some(b) = &mut st.1[i] {
                    wait = wait.max(b.reserve(bytes as f64, now));
                }
            }
        }
        wait
    }

    async fn admit(&self, class: Class, bytes: u64) {
        let wait = self.reserve(class, bytes);
        if !wait.is_zero() {
            self.throttled_requests.fetch_add(1, Relaxed);
            self.throttled_ns.fetch_add(wait.as_nanos() as u64, Relaxed);
            tokio::time::sleep(wait).await;
        }
    }
}

pub struct Throttled<V> {
    inner: V,
    qos: std::sync::Arc<Qos>,
}

impl<V: VolumeIo> Throttled<V> {
    pub fn new(inner: V, qos: std::sync::Arc<Qos>) -> Self {
        Throttled { inner, qos }
    }

    pub fn inner(&self) -> &V {
        &self.inner
    }
}

impl<V: VolumeIo> VolumeIo for Throttled<V> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>, EngineError> {
        self.qos.admit(Class::Read, len as u64).await;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        self.qos.admit(Class::Write, data.len() as u64).await;
        self.inner.write(offset, data, fua).await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        self.qos.admit(Class::Write, 0).await;
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, unmap: bool, fua: bool) -> Result<(), EngineError> {
        self.qos.admit(Class::Write, 0).await;
        self.inner.write_zeroes(offset, len, unmap, fua).await
    }
    async fn flush(&self) -> Result<(), EngineError> {
        self.inner.flush().await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        self.inner.block_status(offset, len).await
    }
    fn earlier_snapshots(&self) -> Vec<String> {
        self.inner.earlier_snapshots()
    }
    async fn changed_since(&self, snapshot: &str, offset: u64, len: u32) -> Result<Vec<Extent>, EngineError> {
        self.inner.changed_since(snapshot, offset, len).await
    }
}
