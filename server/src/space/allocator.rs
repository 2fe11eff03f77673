//! Physical cluster allocation. Mirrors the store's free list and high-water mark in memory;
//! the store learns of each allocation through a `MetaOp::Claim` in the same transaction as the
//! mapping that uses it.

use std::collections::BTreeSet;

pub struct Allocator {
    free: BTreeSet<u64>,
    /// Freed by a commit that is not durable yet. Reusing such a cluster before then could, after
    /// a crash, hand the old owner (whose mapping comes back) someone else's bytes.
    pending: Vec<u64>,
    high_water: u64,
    capacity: u64,
    /// Clusters from here up read zeros on disk until first handed out (the pool zeroed them at
    /// start); `u64::MAX` where it could not.
    zeroed_from: u64,
}

/// Clusters handed out, and whether any may still hold an earlier owner's bytes on disk (its
/// mapping must not become durable before its new data: see `space::journal`).
pub struct Allocation {
    pub clusters: Vec<u64>,
    pub reused: bool,
}

impl Allocator {
    pub fn new(free: impl IntoIterator<Item = u64>, high_water: u64, capacity: u64) -> Self {
        Allocator { free: free.into_iter().collect(), pending: Vec::new(), high_water, capacity, zeroed_from: u64::MAX }
    }

    /// Clusters from `c` up read zeros on disk.
    pub fn set_zeroed_from(&mut self, c: u64) {
        self.zeroed_from = c;
    }

    /// Takes `n` clusters, lowest first so sequential writes land sequentially; all or nothing.
    pub fn allocate(&mut self, n: usize) -> Option<Allocation> {
        let from_free = self.free.len().min(n);
        let fresh = (n - from_free) as u64;
        if self.high_water + fresh > self.capacity {
            return None;
        }
        let mut out: Vec<u64> = (0..from_free).filter_map(|_| self.free.pop_first()).collect();
        let reused = from_free > 0 || (fresh > 0 && self.high_water < self.zeroed_from);
        out.extend(self.high_water..self.high_water + fresh);
        self.high_water += fresh;
        Some(Allocation { clusters: out, reused })
    }

    /// Returns clusters whose allocation never committed.
    pub fn unallocate(&mut self, clusters: impl IntoIterator<Item = u64>) {
        self.free.extend(clusters);
    }

    pub fn free_later(&mut self, clusters: impl IntoIterator<Item = u64>) {
        self.pending.extend(clusters);
    }

    /// Hands out the pending list; the caller releases it once its durable commit succeeded.
    pub fn take_pending(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending)
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn release(&mut self, clusters: impl IntoIterator<Item = u64>) {
        self.free.extend(clusters);
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Clusters in use (pending frees still count: someone may read them until they are durable).
    pub fn used(&self) -> u64 {
        self.high_water - self.free.len() as u64
    }

    /// Clusters that can still be handed out (pending frees not counted).
    pub fn available(&self) -> u64 {
        self.capacity - self.high_water + self.free.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_free_first_then_fresh_and_refuses_past_capacity() {
        let mut a = Allocator::new([3, 1], 4, 7);
        a.set_zeroed_from(4);
        let got = |a: &mut Allocator, n| a.allocate(n).map(|x| (x.clusters, x.reused));
        assert_eq!(got(&mut a, 3), Some((vec![1, 3, 4], true)));
        assert_eq!(got(&mut a, 1), Some((vec![5], false)), "above the zeroed mark: no earlier owner");
        assert_eq!(got(&mut a, 2), None, "only one cluster left");
        assert_eq!(got(&mut a, 1), Some((vec![6], false)));
        assert_eq!(a.available(), 0);
        a.free_later([4]);
        assert_eq!(got(&mut a, 1), None, "pending frees are not reusable");
        let p = a.take_pending();
        a.release(p);
        assert_eq!(got(&mut a, 1), Some((vec![4], true)), "a freed cluster is reused");
    }
}
