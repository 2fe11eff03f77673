//! The byte stream a session runs over: plain TCP, TLS after STARTTLS, or an in-memory pipe in
//! tests. Boxed so one negotiation function can switch from plain to TLS halfway.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::any::Any {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;

pub type ReadSide = Box<dyn AsyncRead + Unpin + Send>;
pub type WriteSide = Box<dyn AsyncWrite + Unpin + Send>;

/// Halves to read and write from two tasks at once. Plain TCP splits without a lock;
/// other streams (TLS, test pipes) share one between the halves. With a lock, a reader and
/// a writer running at the same moment on two threads meet in it, and the loser sleeps on a
/// futex: two extra context switches per request at queue depth 1.
pub fn split(io: BoxIo) -> (ReadSide, WriteSide) {
    let stream: &dyn std::any::Any = &*io;
    if stream.is::<tokio::net::TcpStream>() {
        let any: Box<dyn std::any::Any> = io;
        if let Ok(tcp) = any.downcast::<tokio::net::TcpStream>() {
            let (r, w) = tcp.into_split();
            return (Box::new(r), Box::new(w));
        }
        unreachable!("checked to be a TcpStream");
    }
    let (r, w) = tokio::io::split(io);
    (Box::new(r), Box::new(w))
}

/// A writer that fails with `TimedOut` when the peer accepts no byte for `limit`: a client
/// that stops reading replies must not pin the memory of the replies queued for it.
pub struct StallTimeout<W> {
    inner: W,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<W> StallTimeout<W> {
    pub fn new(inner: W, limit: Duration) -> Self {
        StallTimeout { inner, limit, stalled: None }
    }

    /// Ready(result) passes through and ends a stall; Pending starts or checks the clock.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the peer took no data for {} s", limit.as_secs_f64()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StallTimeout<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}
