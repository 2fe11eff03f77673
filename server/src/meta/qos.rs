//! A volume's QoS limits as stored with it (the token buckets that enforce them are in the
//! I/O stack's `Throttled` layer).

use serde::{Deserialize, Serialize};

/// A volume's limits; 0 means unlimited. Bandwidths are in bytes per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QosLimits {
    pub iops: u64,
    pub read_iops: u64,
    pub write_iops: u64,
    pub bandwidth: u64,
    pub read_bandwidth: u64,
    pub write_bandwidth: u64,
    /// How long (ms) a volume may run at full speed on what it saved while idle; 0: the
    /// default of 100 ms.
    pub burst_ms: u64,
}

pub const DEFAULT_BURST_MS: u64 = 100;

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        [self.iops, self.read_iops, self.write_iops, self.bandwidth, self.read_bandwidth, self.write_bandwidth]
            .iter()
            .all(|v| *v == 0)
    }

    pub(crate) fn burst_secs(&self) -> f64 {
        (if self.burst_ms == 0 { DEFAULT_BURST_MS } else { self.burst_ms }) as f64 / 1000.0
    }

    /// Rates in bucket order: iops total/read/write, bandwidth total/read/write.
    pub(crate) fn rates(&self) -> [u64; 6] {
        [self.iops, self.read_iops, self.write_iops, self.bandwidth, self.read_bandwidth, self.write_bandwidth]
    }
}
