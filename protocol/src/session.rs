//! Server side of the transmission phase. One task per connection reads requests, runs the
//! started ones (many in flight, see [`crate::in_flight`]) and writes their replies in the
//! order they finish.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::ProtocolError;
use crate::budget::{Held, SessionBudget, SessionShared};
use crate::consts::*;
use crate::device::{BlockDevice, DeviceError, Extent, ReadChunk};
use crate::handshake::Negotiated;
use crate::in_flight::InFlight;
use crate::io::{StallTimeout, WriteSide};
use crate::reply_queue::ReplyQueue;
use crate::stages::{SessionStage, StageClock};
use crate::stop_watch::StopWatch;
use crate::wire::{REQUEST_HEADER_LEN, Request, simple_reply_header, structured_header};

#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Largest payload a request may carry or ask for.
    pub max_payload: u32,
    /// Requests being served at once; the reader stops reading beyond this (back-pressure).
    pub max_in_flight: usize,
    /// Bytes of request data this session may hold in memory at once (write payloads, read
    /// replies not yet sent); beyond it the reader stops reading. A request larger than the
    /// whole budget still runs, alone.
    pub max_session_bytes: u64,
    /// A client that takes no reply data for this long is disconnected.
    pub write_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_payload: 32 * 1024 * 1024,
            max_in_flight: 128,
            max_session_bytes: 64 * 1024 * 1024,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// How a session is ended from outside. `shutdown` drains: requests already started finish and
/// their replies are sent. `fence` cuts (a revoked grant): nothing more is read from the client
/// or sent to it, requests not yet started never start, and [`serve`] returns only after every
/// started request has finished, so once it returns nothing of this session touches the device.
#[derive(Clone, Default)]
pub struct Stop {
    pub shutdown: CancellationToken,
    pub fence: CancellationToken,
}

enum Reply {
    Simple {
        cookie: u64,
        error: u32,
    },
    SimpleRead {
        cookie: u64,
        chunks: Vec<ReadChunk>,
    },
    Read {
        cookie: u64,
        offset: u64,
        chunks: Vec<ReadChunk>,
    },
    Error {
        cookie: u64,
        errno: u32,
        message: String,
    },
    /// One chunk per selected meta context.
    BlockStatus {
        cookie: u64,
        contexts: Vec<(u32, Vec<Extent>)>,
    },
}

/// Budget a request holds until its reply is on the socket (reads) or its data is written.
struct Charge {
    _session: Held,
    _server: OwnedSemaphorePermit,
}

const KNOWN_FLAGS: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
/// Writes from this size on have their next header read past the session's read buffer.
const LARGE_WRITE: u32 = 32 * 1024;
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Bytes of data a request brings (write) or asks for (read) while it is in memory.
fn data_bytes(req: &Request, limits: &SessionLimits) -> u64 {
    match req.command {
        CMD_READ | CMD_WRITE if req.length <= limits.max_payload => req.length as u64,
        _ => 0,
    }
}

/// Serves requests until the client disconnects, sends DISC, or `stop` fires (see [`Stop`]).
pub async fn serve<D: BlockDevice>(
    neg: Negotiated<D>,
    limits: SessionLimits,
    shared: Arc<SessionShared>,
    stop: Stop,
) -> Result<(), ProtocolError> {
    let Stop { shutdown, fence } = stop;
    let structured = neg.structured;
    let contexts = Arc::new(neg.meta_contexts.clone());
    let dev = neg.export.device.clone();
    let info = dev.info();
    let (rd, wr) = crate::io::split(neg.io);
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let stages = shared.stages.clone();
    let clock = || stages.as_ref().map(|_| Instant::now());
    let mut replies = Replies {
        w: StallTimeout::new(wr, limits.write_timeout),
        q: ReplyQueue::default(),
        dirty: false,
        unwritten: VecDeque::new(),
        backlog: limits.max_in_flight.max(1) * 2,
        closed: false,
        stop: StopWatch::new(&fence, &shutdown),
        shared: shared.clone(),
    };
    // What a started request checks before it runs (see the job below).
    let fence = Arc::new(fence);
    let max_in_flight = limits.max_in_flight.max(1);
    let session_budget = SessionBudget::new(limits.max_session_bytes);
    // Started requests, run by this task while it reads the next ones (see `driving`).
    let mut running = InFlight::default();

    // After a large write the next header is read straight from the socket, exactly 28 bytes:
    // a fill of `rd` would pull the next payload into its buffer, and `read_aligned` would then
    // copy it out again (a 128 KiB memmove per request). Small requests keep the buffer, where
    // one read brings many of them.
    let mut large_writes = false;
    let result: Result<(), ProtocolError> = loop {
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        let header = async {
            if large_writes && rd.buffer().is_empty() {
                rd.get_mut().read_exact(&mut hdr).await
            } else {
                rd.read_exact(&mut hdr).await
            }
        };
        let read = driving(&mut running, &mut replies, Until::FenceOrShutdown, header).await;
        // Stopped, or the replies could not be written (the client is gone or stuck).
        let Ok(Some(read)) = read else { break Ok(()) };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let received = clock();
        let Some(req) = Request::parse(&hdr) else {
            break Err(ProtocolError::BadMagic(u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as u64));
        };
        if req.command == CMD_DISC {
            debug!("client sent DISC");
            break Ok(());
        }
        large_writes = req.command == CMD_WRITE && req.length >= LARGE_WRITE;
        // Budget first: a write's payload is only read, and a read only started, once the
        // memory it needs is granted, by this session's budget and then the server's.
        let bytes = data_bytes(&req, &limits);
        let mut charge = None;
        if bytes > 0 {
            // The session's own budget comes back only as its requests finish and their
            // replies are written, which happens in its passes: it asks again after each.
            let session = match session_budget.try_take(bytes) {
                Some(held) => held,
                None => {
                    shared.count_wait();
                    let room = drive(&mut running, &mut replies, Until::FenceOrShutdown, |_, _| {
                        session_budget.try_take(bytes).map_or(std::task::Poll::Pending, std::task::Poll::Ready)
                    });
                    let Ok(Some(held)) = room.await else { break Ok(()) };
                    held
                }
            };
            let server = match shared.budget.try_take(bytes) {
                Some(p) => Some(p),
                None => {
                    shared.count_wait();
                    let take = shared.budget.take(bytes);
                    let taken = driving(&mut running, &mut replies, Until::FenceOrShutdown, take).await;
                    let Ok(Some(taken)) = taken else { break Ok(()) };
                    taken
                }
            };
            charge = server.map(|server| Charge { _session: session, _server: server });
        }
        // A write's payload follows its header whatever we think of the request.
        let mut payload = None;
        if req.command == CMD_WRITE {
            let body = async {
                if req.length > limits.max_payload {
                    discard(&mut rd, req.length).await.map(|()| None)
                } else {
                    crate::aligned::read_aligned(&mut rd, req.length as usize).await.map(Some)
                }
            };
            // Once started, a payload is read to its end on shutdown (its request then runs).
            let r = driving(&mut running, &mut replies, Until::Fence, body).await;
            let Ok(Some(r)) = r else { break Ok(()) };
            match r {
                Ok(p) => payload = p,
                Err(e) => break Err(e.into()),
            }
        }
        // The size is read per request: a device may grow while the session is open.
        if let Err(errno) = check(&req, dev.info().size, info.read_only, structured, !contexts.is_empty(), limits) {
            replies.push((error_reply(&req, structured, errno, "request rejected".into()), None, None));
            continue;
        }
        if running.len() >= max_in_flight {
            let room = drive(&mut running, &mut replies, Until::Fence, |running, _| {
                if running.len() < max_in_flight { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
            });
            let Ok(Some(())) = room.await else { break Ok(()) };
        }
        let dev = dev.clone();
        let job_fence = fence.clone();
        let contexts = contexts.clone();
        let stages = stages.clone();
        let spawned = clock();
        observe(&stages, SessionStage::Admit, received, spawned);
        let job = async move {
            // Started before a fence but not yet polled: it must not run after it.
            if job_fence.is_cancelled() {
                return None;
            }
            let running = stages.as_ref().map(|_| Instant::now());
            observe(&stages, SessionStage::Schedule, spawned, running);
            let is_read = req.command == CMD_READ;
            let reply = execute(&*dev, req, payload, structured, &contexts).await;
            let executed = stages.as_ref().map(|_| Instant::now());
            observe(&stages, SessionStage::Execute, running, executed);
            // A read keeps its budget until the reply is written; a write is done with it.
            let charge = if is_read { charge } else { None };
            Some((reply, charge, executed))
        };
        running.push(job);
    };
    // Finish what was started. Unless the session was cut (fenced) or the client cannot take
    // them, their replies go out; then the write side closes.
    std::future::poll_fn(|cx| {
        replies.stop.refresh(cx);
        let finished = running.poll(cx, &mut |q| replies.push_some(q));
        let written = replies.poll_write(cx);
        if finished.is_ready() && (written.is_ready() || replies.closed) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    if !replies.closed
        && let Err(e) = replies.w.shutdown().await
    {
        debug!(error = %e, "closing the reply stream");
    }
    drop(rd);
    result
}

async fn discard<R: AsyncReadExt + Unpin>(rd: &mut R, mut n: u32) -> std::io::Result<()> {
    let mut sink = vec![0u8; 64 * 1024];
    while n > 0 {
        let k = (n as usize).min(sink.len());
        rd.read_exact(&mut sink[..k]).await?;
        n -= k as u32;
    }
    Ok(())
}

/// Validates a request against the export; `Err(errno)` is what the spec says to answer.
fn check(
    req: &Request,
    size: u64,
    read_only: bool,
    structured: bool,
    has_context: bool,
    limits: SessionLimits,
) -> Result<(), u32> {
    if req.flags & !KNOWN_FLAGS != 0 {
        return Err(EINVAL);
    }
    if req.flags & CMD_FLAG_DF != 0 && (!structured || req.command != CMD_READ) {
        return Err(EINVAL);
    }
    let end = req.offset.checked_add(req.length as u64);
    let past_end = end.is_none_or(|e| e > size);
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Err(EPERM);
    }
    match req.command {
        CMD_READ | CMD_WRITE if req.length > limits.max_payload => Err(EINVAL),
        CMD_READ | CMD_TRIM | CMD_CACHE if past_end => Err(EINVAL),
        CMD_WRITE | CMD_WRITE_ZEROES if past_end => Err(ENOSPC),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_FLUSH => Ok(()),
        CMD_BLOCK_STATUS if !has_context || req.length == 0 || past_end => Err(EINVAL),
        CMD_BLOCK_STATUS => Ok(()),
        _ => Err(EINVAL),
    }
}

fn error_reply(req: &Request, structured: bool, errno: u32, message: String) -> Reply {
    if structured && matches!(req.command, CMD_READ | CMD_BLOCK_STATUS) {
        Reply::Error { cookie: req.cookie, errno, message }
    } else {
        Reply::Simple { cookie: req.cookie, error: errno }
    }
}

async fn execute<D: BlockDevice>(
    dev: &D,
    req: Request,
    payload: Option<bytes::Bytes>,
    structured: bool,
    contexts: &[(u32, String)],
) -> Reply {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = |r: Result<(), DeviceError>| match r {
        Ok(()) => Reply::Simple { cookie: req.cookie, error: 0 },
        Err(e) => error_reply(&req, structured, e.errno(), e.to_string()),
    };
    match req.command {
        CMD_READ => match dev.read(req.offset, req.length).await {
            Ok(mut chunks) if structured => {
                if req.flags & CMD_FLAG_DF != 0 && chunks.len() > 1 {
                    chunks = vec![ReadChunk::Data(materialize(&chunks).into())];
                }
                Reply::Read { cookie: req.cookie, offset: req.offset, chunks }
            }
            Ok(chunks) => Reply::SimpleRead { cookie: req.cookie, chunks },
            Err(e) => error_reply(&req, structured, e.errno(), e.to_string()),
        },
        CMD_WRITE => done(dev.write(req.offset, payload.unwrap_or_default(), fua).await),
        CMD_FLUSH => done(dev.flush().await),
        CMD_TRIM => done(dev.trim(req.offset, req.length, fua).await),
        CMD_CACHE => done(dev.cache(req.offset, req.length).await),
        CMD_WRITE_ZEROES => {
            let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            done(dev.write_zeroes(req.offset, req.length, may_unmap, fast, fua).await)
        }
        CMD_BLOCK_STATUS => {
            let mut out = Vec::with_capacity(contexts.len());
            for (id, name) in contexts {
                let r = if name == BASE_ALLOCATION {
                    dev.block_status(req.offset, req.length).await
                } else {
                    dev.context_status(name, req.offset, req.length).await
                };
                match r {
                    Ok(mut extents) => {
                        if req.flags & CMD_FLAG_REQ_ONE != 0 {
                            extents.truncate(1);
                        }
                        out.push((*id, extents));
                    }
                    Err(e) => return error_reply(&req, structured, e.errno(), e.to_string()),
                }
            }
            Reply::BlockStatus { cookie: req.cookie, contexts: out }
        }
        _ => error_reply(&req, structured, EINVAL, "unknown command".into()),
    }
}

fn materialize(chunks: &[ReadChunk]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.iter().map(|c| c.len() as usize).sum());
    for c in chunks {
        match c {
            ReadChunk::Data(b) => out.extend_from_slice(b),
            ReadChunk::Hole(n) => out.resize(out.len() + *n as usize, 0),
        }
    }
    out
}

/// Which stops end a wait in [`driving`]: a payload already started is read to its end on
/// shutdown (its request then runs), so only a fence cuts that.
#[derive(Clone, Copy, PartialEq)]
enum Until {
    Fence,
    FenceOrShutdown,
}

/// Runs `f` to its end while running the started requests (see [`InFlight`]) and writing
/// their replies as they finish; `None` if a stop named by `until` comes first. `Err` when the
/// replies cannot be written (the client is gone or took nothing for the write timeout): the
/// session then stops reading.
///
/// While as many replies as allowed wait for the client, `f` (a read from the client, or a
/// wait before one) is not polled until they go out or a fence comes: a client that sends
/// requests but takes no replies is read no further, instead of having its replies pile up in
/// memory (the write timeout then ends it).
async fn driving<J: std::future::Future<Output = Option<Queued>>, F: std::future::Future>(
    running: &mut InFlight<J>,
    replies: &mut Replies,
    until: Until,
    f: F,
) -> std::io::Result<Option<F::Output>> {
    let mut f = std::pin::pin!(f);
    drive(running, replies, until, |_, cx| f.as_mut().poll(cx)).await
}

/// [`driving`] with a condition instead of a future: `ready` is asked after each pass over the
/// started requests, with them.
async fn drive<J: std::future::Future<Output = Option<Queued>>, T>(
    running: &mut InFlight<J>,
    replies: &mut Replies,
    until: Until,
    mut ready: impl FnMut(&InFlight<J>, &mut std::task::Context<'_>) -> std::task::Poll<T>,
) -> std::io::Result<Option<T>> {
    std::future::poll_fn(|cx| {
        replies.stop.refresh(cx);
        let _ = running.poll(cx, &mut |q| replies.push_some(q));
        if let std::task::Poll::Ready(Err(e)) = replies.poll_write(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        if replies.stop.fenced() || (until == Until::FenceOrShutdown && replies.stop.shut()) {
            return std::task::Poll::Ready(Ok(None));
        }
        if replies.backlogged() {
            return std::task::Poll::Pending;
        }
        ready(running, cx).map(|r| Ok(Some(r)))
    })
    .await
}

/// Replies on their way to the client, written by the session's own task between its reads as
/// soon as their requests finish (no writer task to wake), in as few `writev`s as the socket
/// takes.
struct Replies {
    w: StallTimeout<WriteSide>,
    q: ReplyQueue,
    /// Queued since the last complete write and flush.
    dirty: bool,
    /// Replies not yet fully written, oldest first: where each ends in the stream, the read
    /// budget it holds until then, and (stages timed) when its request finished.
    unwritten: VecDeque<(u64, Option<Charge>, Option<Instant>)>,
    /// Replies that may wait for the client before the session stops reading requests.
    backlog: usize,
    /// Nothing more goes out: the session was cut, or writing failed.
    closed: bool,
    /// Whether the session was cut or told to end; refreshed on each poll of its task.
    stop: StopWatch,
    shared: Arc<SessionShared>,
}

impl Replies {
    fn push(&mut self, (reply, charge, executed): Queued) {
        if self.closed {
            return;
        }
        encode(&mut self.q, reply);
        self.dirty = true;
        self.unwritten.push_back((self.q.queued(), charge, executed));
    }

    /// A finished request's reply (none when it was cut before it ran).
    fn push_some(&mut self, q: Option<Queued>) {
        if let Some(q) = q {
            self.push(q);
        }
    }

    /// Writes what is queued; ready once it is all written and flushed. A cut session writes
    /// nothing more; a failed write closes the replies for good.
    fn poll_write(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        if self.stop.fenced() {
            self.close();
        }
        if self.closed || !self.dirty {
            return std::task::Poll::Ready(Ok(()));
        }
        let r = self.q.poll_write_to(cx, &mut self.w);
        // Replies now wholly on the socket: their budget is released (the charge dropped).
        let written = self.q.written();
        let mut now = None;
        while let Some((end, _, executed)) = self.unwritten.front()
            && *end <= written
        {
            if let Some(executed) = *executed {
                let now = *now.get_or_insert_with(Instant::now);
                observe(&self.shared.stages, SessionStage::Reply, Some(executed), Some(now));
            }
            self.unwritten.pop_front();
        }
        match r {
            std::task::Poll::Ready(Ok(())) => {
                self.dirty = false;
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Ready(Err(e)) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    self.shared.write_timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.close();
                std::task::Poll::Ready(Err(e))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// Whether as many replies as allowed wait for the client.
    fn backlogged(&self) -> bool {
        !self.closed && self.unwritten.len() >= self.backlog
    }

    /// Drops what is queued and sends nothing more; held budget is released.
    fn close(&mut self) {
        self.closed = true;
        self.q.clear();
        self.unwritten.clear();
    }
}

/// A reply for the writer, with the read budget it releases once written and, when stages are
/// timed, when the device finished it.
type Queued = (Reply, Option<Charge>, Option<Instant>);

/// The time from `from` to `to` as `stage`, when both were taken (stages are timed).
fn observe(stages: &Option<Arc<dyn StageClock>>, stage: SessionStage, from: Option<Instant>, to: Option<Instant>) {
    if let (Some(s), Some(from), Some(to)) = (stages, from, to) {
        s.observe(stage, to.saturating_duration_since(from));
    }
}

fn encode(q: &mut ReplyQueue, reply: Reply) {
    match reply {
        Reply::Simple { cookie, error } => q.put_slice(&simple_reply_header(cookie, error)),
        Reply::SimpleRead { cookie, chunks } => {
            q.put_slice(&simple_reply_header(cookie, 0));
            for c in chunks {
                match c {
                    ReadChunk::Data(b) => q.put_bytes(b),
                    ReadChunk::Hole(mut n) => {
                        while n > 0 {
                            let k = (n as usize).min(ZEROS.len());
                            q.put_bytes(Bytes::from_static(&ZEROS[..k]));
                            n -= k as u32;
                        }
                    }
                }
            }
        }
        Reply::Read { cookie, mut offset, chunks } => {
            let chunks: Vec<_> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
            if chunks.is_empty() {
                return q.put_slice(&structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0));
            }
            let last = chunks.len() - 1;
            for (i, c) in chunks.into_iter().enumerate() {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                match c {
                    ReadChunk::Data(b) => {
                        let len = b.len() as u32;
                        q.put_slice(&structured_header(cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + len));
                        q.put_slice(&offset.to_be_bytes());
                        q.put_bytes(b);
                        offset += len as u64;
                    }
                    ReadChunk::Hole(n) => {
                        q.put_slice(&structured_header(cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12));
                        q.put_slice(&offset.to_be_bytes());
                        q.put_slice(&n.to_be_bytes());
                        offset += n as u64;
                    }
                }
            }
        }
        Reply::Error { cookie, errno, message } => {
            let msg = &message.as_bytes()[..message.len().min(MAX_STRING_LEN as usize)];
            let len = 6 + msg.len() as u32;
            q.put_slice(&structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, len));
            q.put_slice(&errno.to_be_bytes());
            q.put_slice(&(msg.len() as u16).to_be_bytes());
            q.put_slice(msg)
        }
        Reply::BlockStatus { cookie, contexts } => {
            let last = contexts.len().saturating_sub(1);
            for (i, (context, extents)) in contexts.into_iter().enumerate() {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                let len = 4 + 8 * extents.len() as u32;
                q.put_slice(&structured_header(cookie, flags, REPLY_TYPE_BLOCK_STATUS, len));
                let mut b = Vec::with_capacity(len as usize);
                b.extend_from_slice(&context.to_be_bytes());
                for e in extents {
                    b.extend_from_slice(&e.length.to_be_bytes());
                    b.extend_from_slice(&e.flags.to_be_bytes());
                }
                q.put_slice(&b);
            }
        }
    }
}
