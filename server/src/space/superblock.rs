//! The pool file's first block: magic, format version, cluster size and the pool's UUID, which
//! the metadata store records too. A pool file swapped for another pool's, or a metadata file
//! beside the wrong pool, is refused at start instead of being served. Data clusters start at
//! [`data_offset`], after the journal region, so the block never shares a cluster with data.

use crate::error::EngineError;
use crate::meta::uuid::uuid_text;

/// Where cluster 0 starts in a pool of `format` (aligned for every cluster size); the bytes
/// between the superblock's block and there are the journal region. Format 2 pools have 1 MiB
/// (a 255-block journal, checkpointed every ~130 first writes at queue depth 1); format 3 pools
/// 16 MiB (4,095 blocks), so that a durable metadata commit lands in a FLUSH once per ~2,000
/// first writes instead. Format 1 pools have no superblock and start at 0.
pub fn data_offset(format: u32) -> u64 {
    match format {
        0 | 1 => 0,
        2 => 1 << 20,
        _ => 16 << 20,
    }
}
/// The block the superblock is read and written as (the O_DIRECT alignment).
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"THINBDPL";
/// Its fields fit in the first 512-byte sector, so a torn write leaves it old or new.
const LEN: usize = 8 + 4 + 8 + 16 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub format: u32,
    pub cluster_size: u64,
    pub pool_uuid: u128,
}

/// What the first block holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Valid(Superblock),
    /// All zeros: a pool whose creation was cut before the superblock was written.
    Blank,
    Invalid(String),
}

impl Superblock {
    pub fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.format.to_le_bytes());
        b[12..20].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[20..36].copy_from_slice(&self.pool_uuid.to_le_bytes());
        let crc = crc32fast::hash(&b[..LEN - 4]);
        b[LEN - 4..LEN].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Found {
        if b.len() < LEN {
            return Found::Invalid(format!("the pool file is too short for a superblock ({} bytes)", b.len()));
        }
        if b.iter().all(|x| *x == 0) {
            return Found::Blank;
        }
        if &b[0..8] != MAGIC {
            return Found::Invalid("the pool file does not start with a thinbd superblock (wrong magic)".into());
        }
        let crc = u32::from_le_bytes([b[LEN - 4], b[LEN - 3], b[LEN - 2], b[LEN - 1]]);
        if crc32fast::hash(&b[..LEN - 4]) != crc {
            return Found::Invalid("the pool superblock is damaged (checksum mismatch)".into());
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Found::Valid(Superblock {
            format: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            cluster_size: u64_at(12),
            pool_uuid: u128::from_le_bytes(b[20..36].try_into().unwrap_or_default()),
        })
    }

    /// Refuses a superblock that is not the one the metadata describes.
    pub fn matches(&self, want: &Superblock) -> Result<(), EngineError> {
        if self.pool_uuid != want.pool_uuid {
            return Err(EngineError::Metadata(format!(
                "the pool file belongs to pool {}, the metadata to pool {}: files from different pools",
                uuid_text(self.pool_uuid),
                uuid_text(want.pool_uuid)
            )));
        }
        if self.format != want.format || self.cluster_size != want.cluster_size {
            return Err(EngineError::Metadata(format!(
                "the pool file says format {} with {}-byte clusters, the metadata format {} with {}-byte clusters",
                self.format, self.cluster_size, want.format, want.cluster_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::uuid::new_uuid;

    #[test]
    fn round_trip_and_damage() {
        let sb = Superblock { format: 2, cluster_size: 65536, pool_uuid: new_uuid() };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b), Found::Valid(sb));
        assert_eq!(Superblock::decode(&[0u8; BLOCK]), Found::Blank);
        b[13] ^= 1;
        assert!(matches!(Superblock::decode(&b), Found::Invalid(m) if m.contains("checksum")));
        let other = Superblock { pool_uuid: new_uuid(), ..sb };
        assert!(sb.matches(&other).is_err());
        assert!(uuid_text(sb.pool_uuid).chars().nth(14) == Some('4'));
        // Every format's data starts on a boundary of the largest cluster (1 MiB).
        assert_eq!([1, 2, 3, 4].map(data_offset), [0, 1 << 20, 16 << 20, 16 << 20]);
    }
}
