//! Buffers whose first byte sits on a 4 KiB boundary, so O_DIRECT pool I/O can use them as they
//! are: write payloads are read from the socket straight into one and handed to the ring without
//! another copy. Made without `unsafe` by over-allocating and slicing.

use bytes::Bytes;

/// Alignment of buffer addresses, offsets and lengths for direct I/O (covers 512 B and 4 KiB
/// logical blocks).
pub const DIRECT_ALIGN: usize = 4096;

/// How many bytes from `p` to the next 4 KiB boundary (0 when `p` is on one): where an
/// over-allocated buffer starts its aligned part.
pub fn to_boundary(p: *const u8) -> usize {
    (p as usize).wrapping_neg() % DIRECT_ALIGN
}

pub struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        // `vec!` of zeros is one calloc; the extra bytes leave room to slide to the boundary.
        let vec = vec![0u8; len + DIRECT_ALIGN - 1];
        let start = to_boundary(vec.as_ptr());
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

/// Reads exactly `len` bytes from `rd` into a buffer on a 4 KiB boundary (in a huge page where
/// [`crate::huge_buffers`] has one for the size, else fresh): what `rd`
/// already buffered is copied, the rest is read from the socket straight into the buffer (a
/// 128 KiB write's payload would otherwise be copied twice, socket → read buffer → payload).
/// The buffer is not zeroed first: the bytes land in the spare capacity of a `BytesMut` slid
/// to the boundary, which tokio fills without exposing uninitialised memory.
pub async fn read_aligned<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut tokio::io::BufReader<R>,
    len: usize,
) -> std::io::Result<Bytes> {
    use bytes::BufMut;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    if let Some(mut buf) = crate::huge_buffers::HugeBuf::get(len) {
        let dst = buf.as_mut_slice();
        let buffered = rd.buffer();
        let n = buffered.len().min(len);
        dst[..n].copy_from_slice(&buffered[..n]);
        rd.consume(n);
        rd.get_mut().read_exact(&mut dst[n..]).await?;
        return Ok(buf.freeze());
    }
    let mut buf = bytes::BytesMut::with_capacity(len + DIRECT_ALIGN - 1);
    let pad = to_boundary(buf.as_ptr());
    buf.put_bytes(0, pad);
    let mut buf = buf.split_off(pad);
    let buffered = rd.buffer();
    let n = buffered.len().min(len);
    buf.extend_from_slice(&buffered[..n]);
    rd.consume(n);
    // Past what was buffered, `rd`'s buffer is empty: reading its source directly is in order.
    while buf.len() < len {
        let want = len - buf.len();
        if rd.get_mut().read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
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

    #[tokio::test]
    async fn payloads_read_from_a_stream_are_aligned_and_exact() {
        use tokio::io::{AsyncReadExt, BufReader};
        // Payloads after a header, with the reader's buffer smaller and larger than they are.
        for capacity in [64usize, 4096, 256 << 10] {
            for len in [0usize, 1, 4095, 4096, 131072, 1 << 20] {
                let stream: Vec<u8> = (0..len + 128).map(|i| (i % 251) as u8).collect();
                let mut rd = BufReader::with_capacity(capacity, std::io::Cursor::new(stream));
                let mut header = [0u8; 28];
                rd.read_exact(&mut header).await.unwrap();
                let got = read_aligned(&mut rd, len).await.unwrap();
                assert!(is_aligned(&got) || len == 0, "len {len}");
                assert_eq!(got.len(), len);
                assert!(got.iter().enumerate().all(|(i, b)| *b == ((i + 28) % 251) as u8), "len {len}");
                // The bytes after the payload are still there, in order.
                let mut rest = Vec::new();
                rd.read_to_end(&mut rest).await.unwrap();
                assert_eq!(rest.len(), 100, "capacity {capacity} len {len}");
                assert_eq!(rest[0], ((len + 28) % 251) as u8);
            }
        }
        let mut short = BufReader::new(std::io::Cursor::new(vec![1u8; 10]));
        let e = read_aligned(&mut short, 11).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
