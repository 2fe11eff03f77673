//! Encoded replies waiting for the socket. Headers and small payloads are gathered in one
//! buffer; a large read payload stays the `Bytes` the disk filled and goes out by `writev`
//! beside its header, so a 128 KiB read reply is not copied in user space on its way out.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWrite;

/// Payloads from this size on are queued by reference instead of copied.
const BY_REFERENCE: usize = 16 * 1024;
/// At most this many slices per `writev` (Linux allows 1024).
const MAX_SLICES: usize = 64;

#[derive(Default)]
pub struct ReplyQueue {
    /// Bytes gathered since the last sealed part.
    small: BytesMut,
    /// Parts in the order they go out.
    parts: VecDeque<Bytes>,
    /// Bytes in `parts`.
    sealed: usize,
    /// Bytes written since the queue was made.
    written: u64,
}

impl ReplyQueue {
    pub fn put_slice(&mut self, b: &[u8]) {
        self.small.extend_from_slice(b);
    }

    /// Queues `b`, by reference when it is large enough for a copy to cost more than a slice.
    pub fn put_bytes(&mut self, b: Bytes) {
        if b.len() < BY_REFERENCE {
            self.small.extend_from_slice(&b);
        } else {
            self.seal();
            self.sealed += b.len();
            self.parts.push_back(b);
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.sealed + self.small.len()
    }

    /// Bytes written since the queue was made: a reply queued when [`ReplyQueue::queued`] was
    /// N is on the socket once this reaches N.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes queued since the queue was made (written or waiting).
    pub fn queued(&self) -> u64 {
        self.written + self.len() as u64
    }

    /// Drops what is waiting (the session was cut).
    pub fn clear(&mut self) {
        self.written += self.len() as u64;
        self.small.clear();
        self.parts.clear();
        self.sealed = 0;
    }

    fn seal(&mut self) {
        if !self.small.is_empty() {
            let b = self.small.split().freeze();
            self.sealed += b.len();
            self.parts.push_back(b);
        }
    }

    /// Writes everything queued to `w`, in as few `writev`s as the socket takes; ready once
    /// all of it is written and flushed. The gathered bytes go out from their buffer as they
    /// are, so that the buffer is kept and reused instead of being handed off and grown anew
    /// every time.
    pub fn poll_write_to<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<std::io::Result<()>> {
        while self.len() > 0 {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut k = 0;
            for b in self.parts.iter().take(MAX_SLICES) {
                slices[k] = IoSlice::new(b);
                k += 1;
            }
            if k < MAX_SLICES && !self.small.is_empty() {
                slices[k] = IoSlice::new(&self.small);
                k += 1;
            }
            let mut n = ready!(Pin::new(&mut *w).poll_write_vectored(cx, &slices[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n as u64;
            while n > 0 {
                let Some(front) = self.parts.front_mut() else { break };
                let k = n.min(front.len());
                self.sealed -= k;
                n -= k;
                if k < front.len() {
                    front.advance(k);
                } else {
                    self.parts.pop_front();
                }
            }
            self.small.advance(n);
        }
        Pin::new(w).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, to exercise partial writes; with
    /// `vectored`, a call takes them across slices as a socket's `writev` does.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        vectored: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if !self.vectored {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
                return self.poll_write(cx, first);
            }
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.step - n);
                self.out.extend_from_slice(&b[..k]);
                n += k;
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bytes_go_out_in_order_through_partial_writes() {
        for (step, vectored) in [(1, false), (7, false), (4096, false), (1 << 20, false), (7, true), (5000, true)] {
            let mut q = ReplyQueue::default();
            let mut want = Vec::new();
            let mut w = Trickle { out: Vec::new(), step, vectored };
            // Several rounds, each written out before the next is queued, so that the gathered
            // bytes' buffer is reused after it was drained.
            for round in 0..3u32 {
                for i in 0..20u32 {
                    let head = (i + 100 * round).to_be_bytes();
                    q.put_slice(&head);
                    want.extend_from_slice(&head);
                    let len = if i % 3 == 0 { 40_000 + i as usize } else { 100 + i as usize };
                    let body: Bytes = (0..len).map(|k| (k as u32 * 31 + i + round) as u8).collect::<Vec<_>>().into();
                    want.extend_from_slice(&body);
                    q.put_bytes(body);
                }
                let queued = q.queued();
                std::future::poll_fn(|cx| q.poll_write_to(cx, &mut w)).await.unwrap();
                assert_eq!(q.len(), 0);
                assert_eq!(q.written(), queued);
            }
            assert_eq!(w.out, want, "step {step}, vectored {vectored}");
        }
    }
}
