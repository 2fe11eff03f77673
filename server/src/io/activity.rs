//! Where a replicated volume's target may have writes in flight: the regions it wrote to
//! lately, recorded in the cluster store before the first write into each. A target that
//! crashes can leave a write that some copies applied and others did not (never acknowledged,
//! but readable from one copy and not another: a read could go back in time after the next
//! failover). The next target compares the copies in the recorded regions only and makes them
//! equal before it serves the volume, like DRBD's activity log.
//!
//! A region leaves the record lazily: when no write into it is in flight, none has entered it
//! for [`IDLE`], and every copy completed a flush since its last write.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{EngineError, poisoned};

/// The unit of the record: a 4 MiB region of the volume's address space.
pub const REGION: u64 = 4 << 20;

/// A region written less recently than this, and flushed since, may leave the record.
pub const IDLE: Duration = Duration::from_secs(5);

/// Where the record is kept (the volume's in-sync record in etcd), as one target epoch writes
/// it: a newer target's record refuses an older one's.
pub trait ActivityRecord: Send + Sync {
    /// Replaces the record with `ranges` (byte ranges, region-aligned, merged).
    fn record<'a>(
        &'a self,
        ranges: Vec<(u64, u64)>,
    ) -> Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send + 'a>>;
}

/// One volume's activity on its target node (in [`super::Shared`]).
#[derive(Default)]
pub struct Activity {
    state: Mutex<State>,
    /// One change of the record at a time, and a new target's take-over before any.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The target epoch whose record this is, and where it is kept; none: writes are not
    /// recorded (a session not fenced by epochs, or a volume with one copy).
    record: Option<(u64, Arc<dyn ActivityRecord>)>,
    /// Regions the record holds (a region about to leave it is out of here first).
    recorded: BTreeSet<u64>,
    /// Per region: writes in flight, and when the last one entered.
    busy: HashMap<u64, (u32, Instant)>,
    /// When idle regions were last looked for.
    swept: Option<Instant>,
}

fn regions(start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
    start / REGION..=end.saturating_sub(1).max(start) / REGION
}

/// Region indexes as merged byte ranges.
pub fn ranges_of(regions: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in regions {
        let (s, e) = (r * REGION, (r + 1) * REGION);
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// A write's hold on its regions: they stay recorded until it is dropped.
pub struct Entered<'a> {
    activity: &'a Activity,
    regions: std::ops::RangeInclusive<u64>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.activity.state.lock() {
            for r in self.regions.clone() {
                if let Some((n, _)) = s.busy.get_mut(&r) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
}

impl Activity {
    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, EngineError> {
        self.state.lock().map_err(|_| poisoned())
    }

    /// Whether the record of target epoch `epoch` is in place (its take-over is done).
    pub fn current(&self, epoch: u64) -> bool {
        self.state.lock().is_ok_and(|s| s.record.as_ref().is_some_and(|(e, _)| *e == epoch))
    }

    /// Held by a new target while it takes over (reconciles what the last one left in
    /// flight): sessions of its epoch wait, and no record changes meanwhile.
    pub async fn take_over(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writing.lock().await
    }

    /// The record of target epoch `epoch` starts empty, kept by `record` (call under
    /// [`Activity::take_over`], once the store holds an empty record of that epoch).
    pub fn begin(&self, epoch: u64, record: Arc<dyn ActivityRecord>) -> Result<(), EngineError> {
        let mut s = self.state()?;
        s.record = Some((epoch, record));
        s.recorded.clear();
        Ok(())
    }

    /// A write (or trim) of `start..end` is about to go to the copies: returns once its
    /// regions are in the record. Concurrent writes into new regions share one change of it.
    pub async fn enter(&self, start: u64, end: u64) -> Result<Entered<'_>, EngineError> {
        let wanted = regions(start, end);
        let record = {
            let mut s = self.state()?;
            let now = Instant::now();
            for r in wanted.clone() {
                let e = s.busy.entry(r).or_insert((0, now));
                *e = (e.0 + 1, now);
            }
            match &s.record {
                Some((_, record)) if !wanted.clone().all(|r| s.recorded.contains(&r)) => Some(record.clone()),
                _ => None,
            }
        };
        let entered = Entered { activity: self, regions: wanted.clone() };
        let Some(record) = record else { return Ok(entered) };
        let _writing = self.writing.lock().await;
        let next = {
            let s = self.state()?;
            if wanted.clone().all(|r| s.recorded.contains(&r)) {
                return Ok(entered);
            }
            // Every region a write waits for, not only ours.
            let mut next = s.recorded.clone();
            next.extend(s.busy.iter().filter(|(_, (n, _))| *n > 0).map(|(r, _)| *r));
            next
        };
        record.record(ranges_of(&next)).await?;
        self.state()?.recorded = next;
        Ok(entered)
    }

    /// After a flush every copy completed: regions idle for [`IDLE`] and not in `unflushed`
    /// (`None`: too much unflushed to tell) leave the record, in the background, at most every
    /// [`IDLE`].
    pub fn sweep(self: &Arc<Self>, unflushed: Option<&[(u64, u64)]>) -> Result<(), EngineError> {
        let Some(unflushed) = unflushed else { return Ok(()) };
        let mut s = self.state()?;
        let now = Instant::now();
        if s.record.is_none() || s.recorded.is_empty() || s.swept.is_some_and(|t| now - t < IDLE) {
            return Ok(());
        }
        s.swept = Some(now);
        let mut keep: BTreeSet<u64> = unflushed.iter().flat_map(|(a, b)| regions(*a, *b)).collect();
        keep.retain(|r| s.recorded.contains(r));
        s.busy.retain(|_, (n, at)| *n > 0 || now - *at < IDLE);
        keep.extend(s.recorded.iter().filter(|r| s.busy.contains_key(r)));
        if keep.len() == s.recorded.len() {
            return Ok(());
        }
        let Some((epoch, record)) = s.record.clone() else { return Ok(()) };
        // Out of `recorded` before the store drops them: a write entering one of them now
        // waits for the change below, then puts it back.
        s.recorded = keep.clone();
        drop(s);
        let this = self.clone();
        tokio::spawn(async move {
            let _writing = this.writing.lock().await;
            if !this.current(epoch) {
                return;
            }
            let Ok(now) = this.state.lock().map(|s| s.recorded.clone()) else { return };
            if let Err(e) = record.record(ranges_of(&now)).await {
                tracing::debug!(error = %e, "cannot drop idle regions from the activity record yet");
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Kept(Mutex<Vec<Vec<(u64, u64)>>>);

    impl ActivityRecord for Kept {
        fn record<'a>(
            &'a self,
            ranges: Vec<(u64, u64)>,
        ) -> Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send + 'a>> {
            Box::pin(async move {
                self.0.lock().unwrap().push(ranges);
                Ok(())
            })
        }
    }

    #[test]
    fn regions_merge_into_ranges() {
        let set: BTreeSet<u64> = [0, 1, 3].into_iter().collect();
        assert_eq!(ranges_of(&set), vec![(0, 2 * REGION), (3 * REGION, 4 * REGION)]);
        assert_eq!(regions(REGION - 1, REGION + 1), 0..=1);
        assert_eq!(regions(REGION, 2 * REGION), 1..=1);
    }

    #[tokio::test]
    async fn a_region_is_recorded_before_its_first_write_and_leaves_when_idle_and_flushed() {
        let kept = Arc::new(Kept::default());
        let a = Arc::new(Activity::default());
        // Before the take-over nothing is recorded.
        drop(a.enter(0, 4096).await.unwrap());
        assert!(kept.0.lock().unwrap().is_empty());
        a.begin(7, kept.clone()).unwrap();
        assert!(a.current(7) && !a.current(8));
        let w = a.enter(REGION + 10, REGION + 20).await.unwrap();
        assert_eq!(kept.0.lock().unwrap().last().unwrap(), &vec![(REGION, 2 * REGION)]);
        // Already recorded: no change of the record.
        drop(a.enter(REGION, REGION + 4096).await.unwrap());
        assert_eq!(kept.0.lock().unwrap().len(), 1);
        drop(w);
        // Written just now: kept.
        a.sweep(Some(&[])).unwrap();
        assert_eq!(a.state().unwrap().recorded.len(), 1);
        // Idle, flushed: leaves; unflushed: stays.
        {
            let mut s = a.state().unwrap();
            s.swept = None;
            let old = Instant::now() - IDLE * 2;
            s.busy.insert(1, (0, old));
        }
        a.sweep(Some(&[(REGION, REGION + 1)])).unwrap();
        assert_eq!(a.state().unwrap().recorded.len(), 1, "an unflushed region left the record");
        a.state().unwrap().swept = None;
        a.sweep(None).unwrap();
        assert_eq!(a.state().unwrap().recorded.len(), 1, "too much unflushed to tell, yet a region left");
        a.sweep(Some(&[])).unwrap();
        assert!(a.state().unwrap().recorded.is_empty());
        for _ in 0..100 {
            if kept.0.lock().unwrap().last().is_some_and(|r| r.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(kept.0.lock().unwrap().last().unwrap(), &Vec::<(u64, u64)>::new());
        // A write in flight keeps its region however old its entry.
        let w = a.enter(0, 1).await.unwrap();
        {
            let mut s = a.state().unwrap();
            s.swept = None;
            s.busy.get_mut(&0).unwrap().1 = Instant::now() - IDLE * 2;
        }
        a.sweep(Some(&[])).unwrap();
        assert_eq!(a.state().unwrap().recorded.len(), 1, "a region with a write in flight left the record");
        drop(w);
    }
}
