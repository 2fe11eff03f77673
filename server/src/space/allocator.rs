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
}

impl Allocator {
    pub fn new(free: impl IntoIterator<Item = u64>, high_water: u64, capacity: u64) -> Self {
        Allocator { free: free.into_iter().collect(), pending: Vec::new(), high_water, capacity }
    }

    /// Takes `n` clusters, lowest first so sequential writes land sequentially; all or nothing.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u64>> {
        let from_free = self.free.len().min(n);
        let fresh = (n - from_free) as u64;
        if self.high_water + fresh > self.capacity {
            return None;
        }
        let mut out: Vec<u64> = (0..from_free).filter_map(|_| self.free.pop_first()).collect();
        out.extend(self.high_water..self.high_water + fresh);
        self.high_water += fresh;
        Some(out)
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
        let mut a = Allocator::new([3, 1], 4, 6);
        assert_eq!(a.allocate(3), Some(vec![1, 3, 4]));
        assert_eq!(a.allocate(2), None, "only one cluster left");
        assert_eq!(a.allocate(1), Some(vec![5]));
        assert_eq!(a.available(), 0);
        a.free_later([4]);
        assert_eq!(a.allocate(1), None, "pending frees are not reusable");
        let p = a.take_pending();
        a.release(p);
        assert_eq!(a.allocate(1), Some(vec![4]));
    }
}
