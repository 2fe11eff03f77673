//! A volume's map from virtual to physical cluster. Unmapped clusters read as zeros.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct ExtentMap {
    map: BTreeMap<u64, u64>,
}

/// A run of consecutive virtual clusters that are all unmapped (`physical: None`) or mapped to
/// consecutive physical clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub vstart: u64,
    pub count: u64,
    pub physical: Option<u64>,
}

impl ExtentMap {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u64, u64)>) -> Self {
        ExtentMap { map: pairs.into_iter().collect() }
    }

    pub fn get(&self, v: u64) -> Option<u64> {
        self.map.get(&v).copied()
    }

    pub fn insert(&mut self, v: u64, p: u64) -> Option<u64> {
        self.map.insert(v, p)
    }

    pub fn remove(&mut self, v: u64) -> Option<u64> {
        self.map.remove(&v)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(v, p)| (*v, *p))
    }

    /// Runs covering virtual clusters `start..end`, in order, merged where contiguous.
    pub fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        let mut push = |run: Run| {
            if let Some(last) = out.last_mut() {
                let contiguous = match (last.physical, run.physical) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a + last.count == b,
                    _ => false,
                };
                if contiguous && last.vstart + last.count == run.vstart {
                    last.count += run.count;
                    return;
                }
            }
            out.push(run);
        };
        let mut pos = start;
        for (&v, &p) in self.map.range(start..end) {
            if v > pos {
                push(Run { vstart: pos, count: v - pos, physical: None });
            }
            push(Run { vstart: v, count: 1, physical: Some(p) });
            pos = v + 1;
        }
        if pos < end {
            push(Run { vstart: pos, count: end - pos, physical: None });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_contiguous_mappings_and_holes() {
        let m = ExtentMap::from_pairs([(2, 10), (3, 11), (4, 7), (8, 1)]);
        assert_eq!(
            m.runs(0, 10),
            vec![
                Run { vstart: 0, count: 2, physical: None },
                Run { vstart: 2, count: 2, physical: Some(10) },
                Run { vstart: 4, count: 1, physical: Some(7) },
                Run { vstart: 5, count: 3, physical: None },
                Run { vstart: 8, count: 1, physical: Some(1) },
                Run { vstart: 9, count: 1, physical: None },
            ]
        );
        assert_eq!(m.runs(3, 4), vec![Run { vstart: 3, count: 1, physical: Some(11) }]);
        assert_eq!(ExtentMap::default().runs(0, 3), vec![Run { vstart: 0, count: 3, physical: None }]);
    }
}
