//! Per-stage request latency (`serve --stage-latency`), to find where requests wait: the NBD
//! session's stages (see [`thinbd_protocol::stages`]) and the io_uring ring's, as histograms
//! on the metrics page (`thinbd_stage_seconds{stage}`). Process-wide and off by default: the
//! ring's submitters and reaper and every session consult one switch, and nothing reads a clock while it is off.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use thinbd_protocol::stages::{SessionStage, StageClock};

use crate::metrics::Histogram;

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

    /// Prometheus text of every stage.
    pub fn render(&self) -> String {
        let name = "thinbd_stage_seconds";
        let mut out = format!(
            "# HELP {name} Time requests spend in each stage (serve --stage-latency).\n# TYPE {name} histogram\n"
        );
        for s in SessionStage::ALL {
            self.session[s as usize].render(&mut out, name, &format!("stage=\"{}\"", s.name()));
        }
        for s in RingStage::ALL {
            self.ring[s as usize].render(&mut out, name, &format!("stage=\"{}\"", s.name()));
        }
        out
    }
}

impl StageClock for Stages {
    fn observe(&self, stage: SessionStage, took: Duration) {
        self.session[stage as usize].observe(took);
    }
}
