//! Target epochs on the node holding a volume. Taking the target role bumps the volume's epoch
//! in etcd; the target sends it on its link (`VOLUME#TOKEN;epoch=N`). The holder persists the
//! highest epoch it promised (in the volume's record), refuses links with an older one, and cuts
//! the sessions of older epochs before the first session of a newer one is admitted, waiting
//! until their started requests finished: a stale target (paused, partitioned, or restarted
//! elsewhere) can never complete a write after a newer one began.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{EngineError, poisoned};

/// How long admitting a newer epoch waits for the older sessions' started requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The sessions of one epoch of one volume.
struct Tenure {
    epoch: u64,
    /// Cancelled when a newer epoch is promised: this epoch's sessions are fenced.
    cut: CancellationToken,
    /// Open handles of this epoch.
    live: Arc<watch::Sender<usize>>,
}

impl Tenure {
    fn new(epoch: u64) -> Tenure {
        Tenure { epoch, cut: CancellationToken::new(), live: Arc::new(watch::Sender::new(0)) }
    }
}

#[derive(Default)]
struct VolumeEpochs {
    current: Option<Tenure>,
    /// Cut tenures whose sessions may still be finishing started requests.
    retired: Vec<Arc<watch::Sender<usize>>>,
}

/// The epoch state of every volume this node holds, by volume UUID.
#[derive(Default)]
pub struct Epochs {
    volumes: Mutex<HashMap<String, VolumeEpochs>>,
}

/// A session admitted at an epoch: `cut` fences it when a newer epoch is promised; dropping it
/// (with the session's handle) tells a waiting newer target that it can touch nothing more.
pub struct EpochSession {
    pub epoch: u64,
    pub cut: CancellationToken,
    live: Arc<watch::Sender<usize>>,
}

impl Drop for EpochSession {
    fn drop(&mut self) {
        self.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Epochs {
    /// `epoch` was committed as `volume`'s promised epoch: the sessions of older epochs are cut.
    pub fn promote(&self, volume: &str, epoch: u64) -> Result<(), EngineError> {
        let mut all = self.volumes.lock().map_err(|_| poisoned())?;
        let v = all.entry(volume.to_string()).or_default();
        match &v.current {
            Some(t) if t.epoch >= epoch => {}
            _ => {
                if let Some(old) = v.current.replace(Tenure::new(epoch)) {
                    old.cut.cancel();
                    v.retired.push(old.live);
                }
            }
        }
        Ok(())
    }

    /// Admits a session at `epoch`, which the caller checked is the promised one, once no
    /// session of an older epoch can still touch the volume.
    pub async fn enter(&self, volume: &str, name: &str, epoch: u64) -> Result<EpochSession, EngineError> {
        loop {
            let draining = {
                let mut all = self.volumes.lock().map_err(|_| poisoned())?;
                let v = all.entry(volume.to_string()).or_default();
                v.retired.retain(|live| *live.borrow() > 0);
                let current = v.current.get_or_insert_with(|| Tenure::new(epoch));
                if current.epoch != epoch {
                    return Err(EngineError::StaleEpoch { volume: name.to_string(), epoch, promised: current.epoch });
                }
                match v.retired.first() {
                    None => {
                        current.live.send_modify(|n| *n += 1);
                        return Ok(EpochSession { epoch, cut: current.cut.clone(), live: current.live.clone() });
                    }
                    Some(live) => live.clone(),
                }
            };
            let mut rx = draining.subscribe();
            if tokio::time::timeout(DRAIN_TIMEOUT, rx.wait_for(|n| *n == 0)).await.is_err() {
                return Err(EngineError::Unavailable(format!(
                    "volume {name:?}: sessions of an older target are still finishing requests; retry"
                )));
            }
        }
    }

    /// The volume is gone.
    pub fn forget(&self, volume: &str) {
        if let Ok(mut all) = self.volumes.lock() {
            all.remove(volume);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newer_epoch_cuts_older_sessions_and_waits_for_them() {
        let e = Arc::new(Epochs::default());
        let old = e.enter("u", "v", 1).await.unwrap();
        e.promote("u", 2).unwrap();
        assert!(old.cut.is_cancelled());
        assert!(matches!(e.enter("u", "v", 1).await, Err(EngineError::StaleEpoch { promised: 2, .. })));
        // The newer session waits until the cut one is gone.
        let waiter = tokio::spawn({
            let e = e.clone();
            async move { e.enter("u", "v", 2).await.map(|s| s.epoch) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "admitted while an older session was still open");
        drop(old);
        assert_eq!(waiter.await.unwrap().unwrap(), 2);
        // A promise of an epoch not newer changes nothing.
        e.promote("u", 1).unwrap();
        assert!(e.enter("u", "v", 2).await.is_ok());
    }
}
