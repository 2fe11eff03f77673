//! Per-volume QoS: IOPS and bandwidth limits (read, write, total) shared by every connection of
//! the volume, changeable while clients are connected. Requests reserve from token buckets
//! ([`rate_limiter`]) and wait out any debt; `io::Throttled` is the I/O-stack layer that asks.

pub mod rate_limiter;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rate_limiter::TokenBucket;

pub use crate::meta::qos::QosLimits;

/// What a request is counted as.
#[derive(Clone, Copy)]
pub enum Class {
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

    /// Waits until a request of `class` moving `bytes` may go on.
    pub async fn admit(&self, class: Class, bytes: u64) {
        let wait = self.reserve(class, bytes);
        if !wait.is_zero() {
            self.throttled_requests.fetch_add(1, Relaxed);
            self.throttled_ns.fetch_add(wait.as_nanos() as u64, Relaxed);
            tokio::time::sleep(wait).await;
        }
    }
}
