//! One layer's map from virtual to physical cluster. A layer only holds the clusters written
//! while it was a volume's top; lookups fall through to the parent layer. [`ZERO_MARK`] says
//! "reads as zeros, do not look further" (a TRIM over data inherited from a snapshot).

use std::collections::BTreeMap;

pub use crate::meta::store::ZERO_MARK;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this map: ask the parent (or zeros at the root).
    Hole,
    /// Explicitly zero.
    Zero,
    /// Physical cluster.
    Data(u64),
}

#[derive(Debug, Default, Clone)]
pub struct ExtentMap {
    map: BTreeMap<u64, u64>,
    data: usize,
}

/// A run of consecutive virtual clusters with the same kind of mapping; for `Data`, the physical
/// clusters are consecutive too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub vstart: u64,
    pub count: u64,
    pub mapping: Mapping,
}

impl Run {
    pub fn physical(&self) -> Option<u64> {
        match self.mapping {
            Mapping::Data(p) => Some(p),
            _ => None,
        }
    }
}

/// Appends `run` to `out`, merging it into the last run where contiguous.
pub fn push_run(out: &mut Vec<Run>, run: Run) {
    if let Some(last) = out.last_mut()
        && last.vstart + last.count == run.vstart
    {
        let merge = match (last.mapping, run.mapping) {
            (Mapping::Hole, Mapping::Hole) | (Mapping::Zero, Mapping::Zero) => true,
            (Mapping::Data(a), Mapping::Data(b)) => a + last.count == b,
            _ => false,
        };
        if merge {
            last.count += run.count;
            return;
        }
    }
    out.push(run);
}

fn mapping_of(p: u64) -> Mapping {
    if p == ZERO_MARK { Mapping::Zero } else { Mapping::Data(p) }
}

impl ExtentMap {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let map: BTreeMap<u64, u64> = pairs.into_iter().collect();
        let data = map.values().filter(|p| **p != ZERO_MARK).count();
        ExtentMap { map, data }
    }

    pub fn get(&self, v: u64) -> Mapping {
        self.map.get(&v).map_or(Mapping::Hole, |p| mapping_of(*p))
    }

    pub fn insert(&mut self, v: u64, p: u64) -> Option<u64> {
        let old = self.map.insert(v, p);
        if p != ZERO_MARK {
            self.data += 1;
        }
        if old.is_some_and(|o| o != ZERO_MARK) {
            self.data -= 1;
        }
        old
    }

    pub fn remove(&mut self, v: u64) -> Option<u64> {
        let old = self.map.remove(&v);
        if old.is_some_and(|o| o != ZERO_MARK) {
            self.data -= 1;
        }
        old
    }

    /// Entries, zero marks included.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries that hold a physical cluster.
    pub fn data_clusters(&self) -> usize {
        self.data
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(v, p)| (*v, *p))
    }

    pub fn range(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.range(start..end).map(|(v, p)| (*v, *p))
    }

    /// This map alone over virtual clusters `start..end`, merged where contiguous.
    pub fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        let mut out = Vec::new();
        let mut pos = start;
        for (&v, &p) in self.map.range(start..end) {
            if v > pos {
                push_run(&mut out, Run { vstart: pos, count: v - pos, mapping: Mapping::Hole });
            }
            push_run(&mut out, Run { vstart: v, count: 1, mapping: mapping_of(p) });
            pos = v + 1;
        }
        if pos < end {
            push_run(&mut out, Run { vstart: pos, count: end - pos, mapping: Mapping::Hole });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(vstart: u64, count: u64, p: u64) -> Run {
        Run { vstart, count, mapping: Mapping::Data(p) }
    }
    fn hole(vstart: u64, count: u64) -> Run {
        Run { vstart, count, mapping: Mapping::Hole }
    }

    #[test]
    fn runs_merge_contiguous_mappings_and_holes() {
        let m = ExtentMap::from_pairs([(2, 10), (3, 11), (4, 7), (5, ZERO_MARK), (6, ZERO_MARK), (8, 1)]);
        assert_eq!(
            m.runs(0, 10),
            vec![
                hole(0, 2),
                data(2, 2, 10),
                data(4, 1, 7),
                Run { vstart: 5, count: 2, mapping: Mapping::Zero },
                hole(7, 1),
                data(8, 1, 1),
                hole(9, 1),
            ]
        );
        assert_eq!(m.runs(3, 4), vec![data(3, 1, 11)]);
        assert_eq!(ExtentMap::default().runs(0, 3), vec![hole(0, 3)]);
        assert_eq!(m.data_clusters(), 4);
    }

    #[test]
    fn data_count_follows_inserts_and_removes() {
        let mut m = ExtentMap::default();
        m.insert(1, 5);
        m.insert(1, ZERO_MARK);
        assert_eq!(m.data_clusters(), 0);
        m.insert(1, 6);
        m.insert(2, 7);
        assert_eq!(m.data_clusters(), 2);
        m.remove(1);
        m.remove(9);
        assert_eq!((m.data_clusters(), m.len()), (1, 1));
    }
}
