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

/// Entries in pages of [`PAGE`] consecutive virtual clusters, the pages in a B-tree: a lookup
/// searches a tree a page's worth (64×) smaller than one keyed by cluster, then indexes an
/// array. A page costs 512 bytes however few of its clusters are mapped: under 1% of the 64 KiB
/// of data behind even a lone mapped cluster, and a full page takes 8 bytes per cluster, a
/// third of what a tree entry does.
#[derive(Debug, Default, Clone)]
pub struct ExtentMap {
    pages: BTreeMap<u64, Box<Page>>,
    /// Entries, zero marks included.
    entries: usize,
    /// Entries that hold a physical cluster.
    data: usize,
}

/// Virtual clusters per page.
const PAGE: u64 = 64;
/// A page's slot with no entry. Physical clusters are numbered from 0 up to the pool's size,
/// far below this and [`ZERO_MARK`].
const NO_ENTRY: u64 = u64::MAX - 1;

#[derive(Debug, Clone)]
struct Page {
    slots: [u64; PAGE as usize],
    used: u32,
}

impl Page {
    fn empty() -> Box<Page> {
        Box::new(Page { slots: [NO_ENTRY; PAGE as usize], used: 0 })
    }

    /// Entries of page `number`, in order.
    fn entries(&self, number: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let base = number * PAGE;
        self.slots.iter().enumerate().filter(|(_, p)| **p != NO_ENTRY).map(move |(i, p)| (base + i as u64, *p))
    }
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
        let mut map = ExtentMap::default();
        for (v, p) in pairs {
            map.insert(v, p);
        }
        map
    }

    pub fn get(&self, v: u64) -> Mapping {
        match self.pages.get(&(v / PAGE)) {
            Some(page) => match page.slots[(v % PAGE) as usize] {
                NO_ENTRY => Mapping::Hole,
                p => mapping_of(p),
            },
            None => Mapping::Hole,
        }
    }

    pub fn insert(&mut self, v: u64, p: u64) -> Option<u64> {
        debug_assert_ne!(p, NO_ENTRY, "not a physical cluster");
        let page = self.pages.entry(v / PAGE).or_insert_with(Page::empty);
        let old = std::mem::replace(&mut page.slots[(v % PAGE) as usize], p);
        let old = if old == NO_ENTRY {
            page.used += 1;
            self.entries += 1;
            None
        } else {
            Some(old)
        };
        if p != ZERO_MARK {
            self.data += 1;
        }
        if old.is_some_and(|o| o != ZERO_MARK) {
            self.data -= 1;
        }
        old
    }

    pub fn remove(&mut self, v: u64) -> Option<u64> {
        let std::collections::btree_map::Entry::Occupied(mut page) = self.pages.entry(v / PAGE) else { return None };
        let old = std::mem::replace(&mut page.get_mut().slots[(v % PAGE) as usize], NO_ENTRY);
        if old == NO_ENTRY {
            return None;
        }
        page.get_mut().used -= 1;
        if page.get().used == 0 {
            page.remove();
        }
        self.entries -= 1;
        if old != ZERO_MARK {
            self.data -= 1;
        }
        Some(old)
    }

    /// Entries, zero marks included.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Entries that hold a physical cluster.
    pub fn data_clusters(&self) -> usize {
        self.data
    }

    /// Entries in order of virtual cluster.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pages.iter().flat_map(|(n, page)| page.entries(*n))
    }

    /// Entries for virtual clusters `start..end`, in order.
    pub fn range(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let pages = if start < end { start / PAGE..(end - 1) / PAGE + 1 } else { 0..0 };
        self.pages.range(pages).flat_map(|(n, page)| page.entries(*n)).filter(move |(v, _)| (start..end).contains(v))
    }

    /// This map alone over virtual clusters `start..end`, merged where contiguous.
    pub fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        let mut out = Vec::new();
        let mut pos = start;
        for (v, p) in self.range(start, end) {
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

    /// The paged map against a plain ordered map under random inserts, zero marks and removes,
    /// across page edges: every lookup, range, count and the order of iteration agree.
    #[test]
    fn pages_behave_as_one_ordered_map() {
        let mut model = BTreeMap::new();
        let mut m = ExtentMap::default();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for step in 0..20_000 {
            // Virtual clusters over five pages and one far away, so pages fill, empty and go.
            let v = if next(10) == 0 { 1_000_000 + next(3) } else { next(5 * PAGE) };
            match next(4) {
                0 => assert_eq!(m.remove(v), model.remove(&v), "remove {v} at step {step}"),
                1 => assert_eq!(m.insert(v, ZERO_MARK), model.insert(v, ZERO_MARK)),
                _ => {
                    let p = next(1 << 40);
                    assert_eq!(m.insert(v, p), model.insert(v, p));
                }
            }
            let probe = next(6 * PAGE);
            let expected = model.get(&probe).map_or(Mapping::Hole, |p| mapping_of(*p));
            assert_eq!(m.get(probe), expected, "get {probe} at step {step}");
            if step % 97 == 0 {
                let (a, b) = (next(6 * PAGE), next(6 * PAGE));
                let (a, b) = (a.min(b), a.max(b) + next(2));
                let want: Vec<_> = model.range(a..b).map(|(v, p)| (*v, *p)).collect();
                assert_eq!(m.range(a, b).collect::<Vec<_>>(), want, "range {a}..{b}");
                assert_eq!(m.iter().collect::<Vec<_>>(), model.iter().map(|(v, p)| (*v, *p)).collect::<Vec<_>>());
                assert_eq!(m.len(), model.len());
                assert_eq!(m.data_clusters(), model.values().filter(|p| **p != ZERO_MARK).count());
                assert_eq!(
                    m.pages.len(),
                    model.keys().map(|v| v / PAGE).collect::<std::collections::BTreeSet<_>>().len(),
                    "empty pages go"
                );
            }
        }
        assert!(m.range(7, 7).next().is_none() && m.range(9, 3).next().is_none(), "empty ranges");
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
