//! Buffers whose first byte sits on a 4 KiB boundary, so O_DIRECT pool I/O can use them as they
//! are: write payloads are read from the socket straight into one and handed to the ring without
//! another copy. Made without `unsafe` by over-allocating and slicing.

use bytes::Bytes;

/// Alignment of buffer addresses, offsets and lengths for direct I/O (covers 512 B and 4 KiB
/// logical blocks).
pub const DIRECT_ALIGN: usize = 4096;

pub struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        // `vec!` of zeros is one calloc; the extra bytes leave room to slide to the boundary.
        let vec = vec![0u8; len + DIRECT_ALIGN - 1];
        let start = (vec.as_ptr() as usize).wrapping_neg() % DIRECT_ALIGN;
        AlignedBuf { vec, start, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }

    /// Shares the buffer without moving it, so the alignment carries over.
    pub fn freeze(self) -> Bytes {
        Bytes::from(self.vec).slice(self.start..self.start + self.len)
    }
}

pub fn is_aligned(b: &[u8]) -> bool {
    (b.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_stay_aligned_through_freeze() {
        for len in [0, 1, 511, 4096, 65536, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert!(is_aligned(b.as_slice()));
            assert_eq!(b.len(), len);
            if len > 0 {
                b.as_mut_slice()[len - 1] = 7;
            }
            let f = b.freeze();
            assert!(is_aligned(&f), "len {len}");
            assert_eq!(f.len(), len);
            assert!(f[..len.saturating_sub(1)].iter().all(|x| *x == 0));
        }
    }
}
