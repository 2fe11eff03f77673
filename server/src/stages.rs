//! Per-stage request latency (`serve --stage-latency`), to find where requests wait: the NBD
//! session's stages (see [`thinbd_protocol::stages`]) and the io_uring ring's, as histograms
//! on the metrics page (`thinbd_stage_seconds{stage}`). Process-wide and off by default: the
//! ring's submitters and reaper and every session consult one switch, and nothing reads a clock while it is off.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use thinbd_protocol::stages::{SessionStage, StageClock};

use crate::metrics::{DescriptorEncoder, Family, Histogram};
use prometheus_client::metrics::MetricType;

/// A stage of a data request on the io_uring ring, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingStage {
    /// Asked → on the ring (waiting for room: at most 256 requests are on the ring).
    Queue,
    /// On the ring → completion reaped: the kernel and the disk.
    Disk,
    /// Completion reaped → the waiting task running again (the runtime's wake-up).
    Wake,
}

impl RingStage {
    const ALL: [RingStage; 3] = [RingStage::Queue, RingStage::Disk, RingStage::Wake];

    fn name(self) -> &'static str {
        match self {
            RingStage::Queue => "ring_queue",
            RingStage::Disk => "ring_disk",
            RingStage::Wake => "ring_wake",
        }
    }
}

#[derive(Default)]
pub struct Stages {
    session: [Histogram; 4],
    ring: [Histogram; 3],
}

static STAGES: OnceLock<Arc<Stages>> = OnceLock::new();

/// Turns the timing on for the rest of the process.
pub fn enable() -> Arc<Stages> {
    STAGES.get_or_init(Default::default).clone()
}

/// The histograms, when timing is on.
pub fn enabled() -> Option<&'static Arc<Stages>> {
    STAGES.get()
}

impl Stages {
    pub fn ring(&self, stage: RingStage, took: Duration) {
        self.ring[stage as usize].observe(took);
    }

    /// Every stage's histogram: `thinbd_stage_seconds{stage}`.
    pub fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let help = "Time requests spend in each stage (serve --stage-latency).";
        let mut f = Family::start(enc, "thinbd_stage_seconds", help, MetricType::Histogram)?;
        for s in SessionStage::ALL {
            f.series(&[("stage", s.name())], &self.session[s as usize])?;
        }
        for s in RingStage::ALL {
            f.series(&[("stage", s.name())], &self.ring[s as usize])?;
        }
        Ok(())
    }
}

impl StageClock for Stages {
    fn observe(&self, stage: SessionStage, took: Duration) {
        self.session[stage as usize].observe(took);
    }
}
