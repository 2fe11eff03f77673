//! The byte stream a session runs over: plain TCP, TLS after STARTTLS, or an in-memory pipe in
//! tests. Boxed so one negotiation function can switch from plain to TLS halfway.

use tokio::io::{AsyncRead, AsyncWrite};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;
