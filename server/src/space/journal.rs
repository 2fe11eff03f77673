//! Write-ahead journal of mapping changes, so that a FLUSH after first writes costs one
//! `fdatasync` of the pool instead of a pool sync plus a durable metadata commit.
//!
//! Grouped (non-durable) metadata commits — a first write's `Map` and `Claim`, a TRIM's `Unmap`
//! and `Free` — each get a sequence number and become records here. Records reach the journal
//! region (the bytes between the pool's superblock and cluster 0) in batches: a fresh
//! cluster's record beside its data write, the rest at the next FLUSH; a FLUSH's sync makes
//! data and records durable together. The metadata store folds the same changes in behind
//! (its grouped commits), and a durable commit of the store (an admin operation, a clean stop,
//! or a checkpoint when the region is half full) records the last sequence it covers, after
//! which the slots of the batches up to there are free. At start, records past that sequence
//! are applied to the store before anything reads it ([`replay`]).
//!
//! Layout: the region is a ring of 4 KiB blocks; block number `b` lives at slot `b % slots`.
//! A batch is a run of consecutive blocks, each naming the batch's first block and length and
//! carrying a checksum, so a batch is used only when every one of its blocks arrived whole.
//! Records are applied in sequence order from the store's sequence on and stop at the first
//! gap: a batch cut by a power loss, or a record that was still waiting for a FLUSH while later
//! ones were written. Nothing past a gap was acknowledged by a FLUSH (a FLUSH writes every
//! record before it syncs), and its sequences are never handed out again.
//!
//! Isolation (invariant 2): one sync makes records and data durable in no particular order, so
//! a record may survive a power cut that loses its cluster's data. That is harmless only for a
//! cluster that read zeros before (above the high-water mark, zeroed at start, with nothing
//! below it in the layers); a record for a reused cluster, or one over a snapshot's data, waits
//! for the FLUSH, which syncs the data before writing it ([`Batch::data_first`]).

use std::sync::Mutex;

use crate::meta::store::MetaOp;

/// The journal's block: the O_DIRECT alignment.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 4] = b"TBJ1";
/// magic 4, crc 4, pool 8, block 8, batch first block 8, batch blocks 4, payload length 4.
const HEADER: usize = 40;
const PAYLOAD: usize = BLOCK - HEADER;

/// One grouped commit: its sequence number and its operations.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub ops: Vec<MetaOp>,
}

/// Whether `op` can be journaled (the operations grouped commits make).
pub fn journaled(op: &MetaOp) -> bool {
    matches!(op, MetaOp::Map { .. } | MetaOp::Unmap { .. } | MetaOp::Claim(_) | MetaOp::Free(_))
}

/// Appends record `seq` of `ops` to `out`: seq, op count, then each op as a tag and its fields
/// (little-endian). Operations [`journaled`] refuses are left out (callers never pass them).
pub fn encode(seq: u64, ops: &[MetaOp], out: &mut Vec<u8>) {
    let ops: Vec<&MetaOp> = ops.iter().filter(|op| journaled(op)).collect();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        match op {
            MetaOp::Map { layer, vcluster, pcluster } => {
                out.push(1);
                [layer, vcluster, pcluster].iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            MetaOp::Unmap { layer, vcluster } => {
                out.push(2);
                [layer, vcluster].iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            MetaOp::Claim(p) => {
                out.push(3);
                out.extend_from_slice(&p.to_le_bytes());
            }
            MetaOp::Free(p) => {
                out.push(4);
                out.extend_from_slice(&p.to_le_bytes());
            }
            _ => {}
        }
    }
}

/// Reads little-endian integers off a byte slice; `None` past its end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
}

/// The records in a batch's payload; `None` if it does not parse to its end.
fn decode(payload: &[u8]) -> Option<Vec<Record>> {
    let mut r = Reader(payload);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let seq = r.u64()?;
        let n = r.u32()? as usize;
        // Each op is at least 9 bytes: a count past what is left is damage, not a huge Vec.
        let mut ops = Vec::with_capacity(n.min(r.0.len() / 9));
        for _ in 0..n {
            ops.push(match r.u8()? {
                1 => MetaOp::Map { layer: r.u64()?, vcluster: r.u64()?, pcluster: r.u64()? },
                2 => MetaOp::Unmap { layer: r.u64()?, vcluster: r.u64()? },
                3 => MetaOp::Claim(r.u64()?),
                4 => MetaOp::Free(r.u64()?),
                _ => return None,
            });
        }
        out.push(Record { seq, ops });
    }
    Some(out)
}

/// How many blocks a payload of `len` bytes takes.
pub fn blocks_for(len: usize) -> u64 {
    len.div_ceil(PAYLOAD).max(1) as u64
}

/// The blocks of one batch starting at block number `first`, ready to write at consecutive
/// block numbers (the caller places each at its slot).
pub fn batch_blocks(pool_tag: u64, first: u64, payload: &[u8]) -> Vec<[u8; BLOCK]> {
    let count = blocks_for(payload.len());
    let mut chunks: Vec<&[u8]> = payload.chunks(PAYLOAD).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut b = [0u8; BLOCK];
            b[0..4].copy_from_slice(MAGIC);
            b[8..16].copy_from_slice(&pool_tag.to_le_bytes());
            b[16..24].copy_from_slice(&(first + i as u64).to_le_bytes());
            b[24..32].copy_from_slice(&first.to_le_bytes());
            b[32..36].copy_from_slice(&(count as u32).to_le_bytes());
            b[36..40].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
            b[HEADER..HEADER + chunk.len()].copy_from_slice(chunk);
            let crc = crc32c::crc32c(&b[8..]);
            b[4..8].copy_from_slice(&crc.to_le_bytes());
            b
        })
        .collect()
}

/// A block that parsed and whose checksum matched.
struct Block<'a> {
    number: u64,
    batch_first: u64,
    batch_len: u64,
    payload: &'a [u8],
}

fn parse_block(pool_tag: u64, b: &[u8]) -> Option<Block<'_>> {
    if b.len() != BLOCK || &b[0..4] != MAGIC {
        return None;
    }
    let mut r = Reader(&b[4..HEADER]);
    let (crc, tag, number, batch_first) = (r.u32()?, r.u64()?, r.u64()?, r.u64()?);
    let (batch_len, len) = (r.u32()? as u64, r.u32()? as usize);
    if crc != crc32c::crc32c(&b[8..]) || tag != pool_tag || len > PAYLOAD {
        return None;
    }
    if batch_len == 0 || number < batch_first || number - batch_first >= batch_len {
        return None;
    }
    Some(Block { number, batch_first, batch_len, payload: &b[HEADER..HEADER + len] })
}

/// What the region holds: the records to apply after sequence `applied`, and the block number
/// to write next.
#[derive(Debug)]
pub struct Replay {
    pub records: Vec<Record>,
    pub next_block: u64,
    /// The highest sequence in any whole batch, applied or not: new records must start above
    /// it, or a record left beyond a gap (never applied) would join them at the next replay.
    pub max_seq: u64,
}

/// Reads the journal region's bytes: every whole batch's records with a sequence past
/// `applied`, in order, up to the first gap. Torn or stale blocks are skipped, never an error:
/// what they held was not acknowledged.
pub fn replay(pool_tag: u64, region: &[u8], applied: u64) -> Replay {
    let blocks: std::collections::BTreeMap<u64, Block<'_>> =
        region.chunks(BLOCK).filter_map(|b| parse_block(pool_tag, b)).map(|b| (b.number, b)).collect();
    let next_block = blocks.keys().next_back().map_or(0, |n| n + 1);
    let mut records = Vec::new();
    let mut starts: Vec<(u64, u64)> =
        blocks.values().filter(|b| b.number == b.batch_first).map(|b| (b.batch_first, b.batch_len)).collect();
    starts.sort_unstable();
    for (first, len) in starts {
        let whole = (first..first + len)
            .map(|n| blocks.get(&n).filter(|b| b.batch_first == first && b.batch_len == len))
            .collect::<Option<Vec<_>>>();
        let Some(parts) = whole else { continue };
        let payload: Vec<u8> = parts.iter().flat_map(|b| b.payload.iter().copied()).collect();
        if let Some(recs) = decode(&payload) {
            records.extend(recs.into_iter().map(|r| (first, r)));
        }
    }
    // A sequence found twice (a torn batch's surviving blocks, then the batch that reused its
    // numbers after a restart): the later batch is the one that counts.
    records.sort_by_key(|(batch, r)| (r.seq, std::cmp::Reverse(*batch)));
    records.dedup_by_key(|(_, r)| r.seq);
    let max_seq = records.last().map_or(0, |(_, r)| r.seq);
    let mut out: Vec<Record> = Vec::new();
    for (_, r) in records {
        let expect = out.last().map_or(applied, |l| l.seq) + 1;
        if r.seq < expect {
            continue;
        }
        if r.seq > expect {
            break;
        }
        out.push(r);
    }
    Replay { records: out, next_block, max_seq }
}

/// Records not yet written, in sequence order, and the highest sequence among them.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    max: u64,
}

impl Pending {
    fn take(&mut self) -> Pending {
        std::mem::take(self)
    }
}

/// Records kept until written, and where the ring stands.
#[derive(Debug, Default)]
pub struct Ring {
    /// Records that may reach the disk before their clusters' data (fresh clusters whose old
    /// content is zeros): written as soon as a request can ([`Ring::take_eager`]).
    eager: Pending,
    /// Records that must not (see [`Batch::data_first`]): written by a FLUSH after a data sync.
    deferred: Pending,
    /// The last sequence handed out.
    pub committed: u64,
    /// Block number the next batch starts at.
    pub next_block: u64,
    /// Blocks below this hold only records the store has durably: their slots may be reused.
    floor: u64,
    /// Batches written (or lost) above the floor: the block after each, and its highest
    /// sequence.
    written: std::collections::VecDeque<(u64, u64)>,
    slots: u64,
    /// Records on the ring whose changes memory does not show yet (a first write's record
    /// goes out beside its data; memory maps the cluster after the data).
    unapplied: std::collections::BTreeSet<u64>,
    /// A batch up to this sequence was lost (its write or sync failed): FLUSH makes a durable
    /// commit until one covers it.
    lost: Option<u64>,
}

/// A batch taken off the ring for writing.
pub struct Batch {
    pub first_block: u64,
    pub payload: Vec<u8>,
    pub max_seq: u64,
    /// It holds a record of a cluster that may still show an earlier owner's bytes or hide
    /// the layer below's: the clusters' data must be durable before it is written.
    pub data_first: bool,
}

impl Ring {
    pub fn new(slots: u64, next_block: u64, committed: u64) -> Ring {
        Ring { slots, next_block, floor: next_block, committed, ..Ring::default() }
    }

    /// Keeps a grouped commit's ops under the next sequence number, which it returns.
    pub fn push(&mut self, ops: &[MetaOp], data_first: bool) -> u64 {
        self.committed += 1;
        let p = if data_first { &mut self.deferred } else { &mut self.eager };
        p.max = self.committed;
        encode(self.committed, ops, &mut p.bytes);
        self.committed
    }

    /// Marks record `seq` as not yet shown by memory, until [`Ring::applied`].
    pub fn unapplied(&mut self, seq: u64) {
        self.unapplied.insert(seq);
    }

    pub fn applied(&mut self, seq: u64) {
        self.unapplied.remove(&seq);
    }

    /// The last sequence up to which memory shows every record: what a store rewritten from
    /// memory holds.
    pub fn shown(&self) -> u64 {
        self.unapplied.first().map_or(self.committed, |s| s - 1)
    }

    pub fn is_empty(&self) -> bool {
        self.eager.bytes.is_empty() && self.deferred.bytes.is_empty()
    }

    /// Whether `n` more blocks fit now.
    fn room(&self, n: u64) -> bool {
        self.lost.is_none() && self.next_block + n <= self.floor + self.slots
    }

    fn batch(&mut self, payload: Vec<u8>, max_seq: u64, data_first: bool) -> Batch {
        let first_block = self.next_block;
        self.next_block += blocks_for(payload.len());
        self.written.push_back((self.next_block, max_seq));
        Batch { first_block, payload, max_seq, data_first }
    }

    /// Every pending record as a batch (for a FLUSH), if it fits in the slots free now; else
    /// `None` and the caller makes a durable commit instead.
    pub fn take(&mut self) -> Option<Batch> {
        if !self.room(blocks_for(self.eager.bytes.len() + self.deferred.bytes.len())) {
            return None;
        }
        let (eager, deferred) = (self.eager.take(), self.deferred.take());
        let data_first = !deferred.bytes.is_empty();
        let mut payload = eager.bytes;
        payload.extend(deferred.bytes);
        Some(self.batch(payload, eager.max.max(deferred.max), data_first))
    }

    /// The records that may be written before a sync, as a batch, if there are any and they
    /// fit (else they wait for the FLUSH).
    pub fn take_eager(&mut self) -> Option<Batch> {
        if self.eager.bytes.is_empty() || !self.room(blocks_for(self.eager.bytes.len())) {
            return None;
        }
        let eager = self.eager.take();
        Some(self.batch(eager.bytes, eager.max, false))
    }

    /// Whether a batch was lost that no durable commit covers yet.
    pub fn has_lost(&self) -> bool {
        self.lost.is_some()
    }

    /// A batch with sequences up to `max_seq` did not reach the disk.
    pub fn lose(&mut self, max_seq: u64) {
        self.lost = Some(self.lost.unwrap_or(0).max(max_seq));
    }

    /// Whether more than half the slots hold records the store may not have durably.
    pub fn wants_checkpoint(&self) -> bool {
        (self.next_block - self.floor) * 2 > self.slots
    }

    /// After a durable commit of the store that covers every sequence up to `covered`: the
    /// slots of batches up to there may be reused, and pending records up to there need no
    /// writing.
    pub fn checkpointed(&mut self, covered: u64) {
        while let Some(&(end, max)) = self.written.front() {
            if max > covered {
                break;
            }
            self.floor = end;
            self.written.pop_front();
        }
        if self.written.is_empty() {
            self.floor = self.next_block;
        }
        for p in [&mut self.eager, &mut self.deferred] {
            if p.max <= covered {
                p.take();
            }
        }
        if self.lost.is_some_and(|l| l <= covered) {
            self.lost = None;
        }
    }

    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// The slot (block index in the region) of block number `b`.
    pub fn slot(&self, b: u64) -> u64 {
        b % self.slots
    }
}

/// The journal of one pool: its ring and the locks that order it against the store.
pub struct Journal {
    pub ring: Mutex<Ring>,
    /// One batch write or durable commit at a time: slots are freed only while no batch is
    /// being written.
    pub flushing: tokio::sync::Mutex<()>,
    /// File offset of slot 0.
    pub start: u64,
    /// Every block carries it, so blocks of another pool are never read as ours.
    pub tag: u64,
}

impl Journal {
    pub fn new(start: u64, len: u64, tag: u64, next_block: u64, applied: u64) -> Journal {
        Journal {
            ring: Mutex::new(Ring::new(len / BLOCK as u64, next_block, applied)),
            flushing: tokio::sync::Mutex::new(()),
            start,
            tag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> Record {
        Record {
            seq,
            ops: vec![
                MetaOp::Map { layer: seq, vcluster: seq * 2, pcluster: seq * 3 },
                MetaOp::Claim(seq * 3),
                MetaOp::Unmap { layer: 1, vcluster: seq },
                MetaOp::Free(seq + 7),
            ],
        }
    }

    fn region(slots: usize) -> Vec<u8> {
        vec![0u8; slots * BLOCK]
    }

    /// Writes the ring's next batch into `region` as the pool would.
    fn write(ring: &mut Ring, region: &mut [u8]) -> Batch {
        let b = ring.take().expect("fits");
        for (i, block) in batch_blocks(9, b.first_block, &b.payload).iter().enumerate() {
            let at = ring.slot(b.first_block + i as u64) as usize * BLOCK;
            region[at..at + BLOCK].copy_from_slice(block);
        }
        b
    }

    fn ops_of(seq: u64) -> Vec<MetaOp> {
        rec(seq).ops
    }

    #[test]
    fn records_round_trip_across_blocks() {
        let mut ring = Ring::new(8, 0, 0);
        // About 3 blocks of records in one batch.
        for s in 1..=300 {
            ring.push(&ops_of(s), false);
        }
        let mut r = region(8);
        let b = write(&mut ring, &mut r);
        assert_eq!((b.first_block, b.max_seq), (0, 300));
        let got = replay(9, &r, 0);
        assert_eq!(got.next_block, blocks_for(b.payload.len()));
        assert_eq!(got.records.len(), 300);
        assert_eq!(format!("{:?}", got.records[41]), format!("{:?}", rec(42)));
        assert_eq!(replay(9, &r, 250).records.first().map(|r| r.seq), Some(251), "applied ones are skipped");
        assert!(replay(10, &r, 0).records.is_empty(), "another pool's blocks are ignored");
    }

    #[test]
    fn a_torn_block_drops_its_batch_and_everything_after() {
        let mut ring = Ring::new(16, 0, 0);
        let mut r = region(16);
        for batch in 0..3u64 {
            for s in batch * 100 + 1..=batch * 100 + 100 {
                ring.push(&ops_of(s), false);
            }
            write(&mut ring, &mut r);
        }
        assert_eq!(replay(9, &r, 0).records.len(), 300);
        // The second batch's second block loses a sector.
        let torn = (ring.slot(3) as usize) * BLOCK + 1024;
        let whole = replay(9, &r, 0);
        r[torn..torn + 512].fill(0);
        let cut = replay(9, &r, 0);
        assert!(cut.records.len() < whole.records.len());
        let last = cut.records.last().map_or(0, |r| r.seq);
        assert_eq!(last, 100, "the first batch survives; the torn one and the one after are dropped");
        assert_eq!(cut.next_block, whole.next_block, "later slots are still not reused");
    }

    #[test]
    fn slots_are_reused_only_after_a_checkpoint() {
        let mut ring = Ring::new(4, 0, 0);
        let mut r = region(4);
        for s in 1..=3 {
            ring.push(&ops_of(s), false);
            write(&mut ring, &mut r);
        }
        ring.push(&ops_of(4), false);
        assert!(ring.wants_checkpoint());
        write(&mut ring, &mut r);
        // A durable commit that covers only 1..=2 (3 and 4 still queued for the store) frees
        // the first two slots.
        ring.checkpointed(2);
        ring.push(&ops_of(5), false);
        ring.push(&ops_of(6), false);
        assert!(blocks_for(ring.eager.bytes.len()) == 1);
        let b = write(&mut ring, &mut r);
        assert_eq!(ring.slot(b.first_block), 0);
        ring.push(&ops_of(7), false);
        write(&mut ring, &mut r);
        ring.push(&ops_of(8), false);
        assert!(ring.take().is_none(), "slots of 3 and 4 are still needed");
        ring.checkpointed(7);
        write(&mut ring, &mut r);
        ring.push(&ops_of(9), true);
        // Record 8 went to slot 2; 9 takes slot 3.
        let b = write(&mut ring, &mut r);
        assert!(b.data_first);
        assert_eq!((b.first_block, ring.slot(b.first_block)), (7, 3));
        let got = replay(9, &r, 6);
        assert_eq!(got.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7, 8, 9]);
        assert_eq!(got.next_block, 8);
        // Replaying again from the same region after the store took record 9 applies nothing.
        assert!(replay(9, &r, 9).records.is_empty());
    }

    #[test]
    fn records_written_early_wait_for_the_deferred_ones_before_them() {
        let mut ring = Ring::new(8, 0, 0);
        let mut r = region(8);
        ring.push(&ops_of(1), false);
        ring.push(&ops_of(2), true);
        ring.push(&ops_of(3), false);
        let b = ring.take_eager().expect("fresh records");
        for (i, block) in batch_blocks(9, b.first_block, &b.payload).iter().enumerate() {
            let at = ring.slot(b.first_block + i as u64) as usize * BLOCK;
            r[at..at + BLOCK].copy_from_slice(block);
        }
        assert_eq!(b.max_seq, 3);
        let seqs = |r: &[u8]| replay(9, r, 0).records.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&r), vec![1], "3 is not applied before 2 is on disk");
        assert!(ring.take_eager().is_none());
        assert_eq!(replay(9, &r, 0).max_seq, 3, "3 is never reused after a restart");
        let b = write(&mut ring, &mut r);
        assert!(b.data_first);
        assert_eq!(seqs(&r), vec![1, 2, 3]);
        // A batch whose write failed: nothing is pending, yet the FLUSH must not pass with a
        // bare sync until a durable commit covers it.
        ring.lose(3);
        assert!(ring.is_empty() && ring.has_lost() && ring.take().is_none());
        ring.checkpointed(2);
        assert!(ring.has_lost());
        ring.checkpointed(3);
        assert!(!ring.has_lost());
    }

    #[test]
    fn a_rewrite_from_memory_covers_only_what_memory_shows() {
        let mut ring = Ring::new(8, 0, 0);
        ring.push(&ops_of(1), false);
        let ahead = ring.push(&ops_of(2), false);
        ring.unapplied(ahead);
        ring.push(&ops_of(3), false);
        assert_eq!(ring.shown(), 1, "record 2 is not in memory yet");
        ring.applied(ahead);
        assert_eq!(ring.shown(), 3);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut r = region(4);
        for b in r.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert!(replay(9, &r, 0).records.is_empty());
        assert!(decode(&[1, 2, 3]).is_none());
        let mut huge = Vec::new();
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_none());
    }
}
