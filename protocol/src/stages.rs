//! Where a request's time goes inside a session, for a server that asks
//! ([`crate::SessionShared::with_stages`]): from its header being read to its reply being on the
//! socket. Off by default: then no clock is read.

use std::time::Duration;

/// A stage of one request in a session, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStage {
    /// Header read → payload read, memory budget and in-flight slot granted, request started.
    Admit,
    /// Started → first polled by the connection's task.
    Schedule,
    /// The device's work: everything below the protocol.
    Execute,
    /// Device done → the reply written to the socket (encoding, waiting for the connection's
    /// task to get to it, the write that carried it).
    Reply,
}

impl SessionStage {
    pub const ALL: [SessionStage; 4] =
        [SessionStage::Admit, SessionStage::Schedule, SessionStage::Execute, SessionStage::Reply];

    pub fn name(self) -> &'static str {
        match self {
            SessionStage::Admit => "admit",
            SessionStage::Schedule => "schedule",
            SessionStage::Execute => "execute",
            SessionStage::Reply => "reply",
        }
    }
}

/// Takes the time of each stage of each request.
pub trait StageClock: Send + Sync {
    fn observe(&self, stage: SessionStage, took: Duration);
}
