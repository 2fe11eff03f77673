//! The least an NBD server can do with a disk, as a yardstick for the fio harness: one thread
//! and one io_uring per connection carry the socket's reads and writes and the file's
//! O_DIRECT reads and writes, so a pass of the loop is one `io_uring_enter` that submits
//! everything the last pass produced and waits for the next completion (submitting each disk
//! request at once instead measured no better). No epoll, no other
//! thread, no volume layer, no budget, no checks beyond what keeps it from crashing. It is not
//! thinbd and serves nothing but benchmarks: what it reaches through fio's nbd engine on a disk
//! is what any server could reach there (`benches/fio/harness.py --only ceiling`).
//!
//! Usage: `nbd-ceiling FILE PORT` (serves FILE, whole, as every export name, on 127.0.0.1:PORT).
//!
//! With `NBD_CEILING_SOCKET=epoll` the socket leaves the ring, to measure what that costs: it
//! is read and written with plain system calls when epoll says it is ready, each disk request
//! enters the kernel as it starts, and completions wake the thread through an eventfd in the
//! same epoll — the shape of thinbd's session threads (tokio's epoll for the socket, a ring of
//! their own for the disk), without anything else of thinbd.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use io_uring::{IoUring, opcode, types};
use thinbd_protocol::aligned::AlignedBuf;
use thinbd_protocol::consts::*;
use thinbd_protocol::wire::{REQUEST_HEADER_LEN, Request, SIMPLE_REPLY_LEN, simple_reply_header};

const RECV: u64 = u64::MAX;
const SEND: u64 = u64::MAX - 1;
const RECV_BUF: usize = 4 << 20;
const MAX_LEN: u32 = 1 << 20;
/// Replies gathered into one send at most (two pieces each: within Linux's 1024 iovecs).
const MAX_REPLIES: usize = 512;
/// `IORING_ENTER_GETEVENTS` (the io-uring crate does not export the enter flags).
const IORING_ENTER_GETEVENTS: u32 = 1;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, port] = &args[..] else { bail!("usage: nbd-ceiling FILE PORT") };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    let size = file.metadata()?.len();
    let file = Arc::new(file);
    let listener = TcpListener::bind(("127.0.0.1", port.parse::<u16>()?))?;
    for conn in listener.incoming() {
        let conn = conn?;
        let file = file.clone();
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            if let Err(e) = serve(conn, file.as_raw_fd(), size) {
                eprintln!("nbd-ceiling: connection ended: {e:#}");
            }
        });
    }
    Ok(())
}

fn serve(mut s: TcpStream, file: i32, size: u64) -> Result<()> {
    if !handshake(&mut s, size)? {
        return Ok(());
    }
    let conn = Conn::new(s, file)?;
    if std::env::var("NBD_CEILING_SOCKET").is_ok_and(|v| v == "epoll") { conn.run_epoll() } else { conn.run() }
}

/// Fixed newstyle; answers EXPORT_NAME, INFO and GO with the file's size, refuses the rest.
fn handshake(s: &mut TcpStream, size: u64) -> Result<bool> {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut client_flags = [0u8; 4];
    s.read_exact(&mut client_flags)?;
    let no_zeroes = u32::from_be_bytes(client_flags) & FLAG_C_NO_ZEROES != 0;
    let tflags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if len > 64 * 1024 {
            bail!("option of {len} bytes");
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut TcpStream, kind: u32, body: &[u8]| -> std::io::Result<()> {
            let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&(body.len() as u32).to_be_bytes());
            r.extend_from_slice(body);
            s.write_all(&r)
        };
        match opt {
            OPT_EXPORT_NAME => {
                let mut r = size.to_be_bytes().to_vec();
                r.extend_from_slice(&tflags.to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&r)?;
                return Ok(true);
            }
            OPT_INFO | OPT_GO => {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                reply(s, REP_INFO, &info)?;
                reply(s, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_ABORT => {
                reply(s, REP_ACK, &[])?;
                return Ok(false);
            }
            _ => reply(s, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// A request at the disk.
struct Job {
    cookie: u64,
    command: u16,
    buf: Option<AlignedBuf>,
}

/// Bytes on their way to the client: a reply header and, for reads, the data.
struct Out {
    header: [u8; SIMPLE_REPLY_LEN],
    data: Option<AlignedBuf>,
}

struct Conn {
    s: TcpStream,
    file: i32,
    ring: IoUring,
    rbuf: Vec<u8>,
    /// Parsed up to here; received up to `rend`.
    rstart: usize,
    rend: usize,
    recv_armed: bool,
    jobs: Vec<Option<Job>>,
    free_slots: Vec<usize>,
    /// Replies not yet sent, the first `sent` bytes of the front one already on the socket.
    out: VecDeque<Out>,
    sent: usize,
    /// The iovecs and header of the send in flight (kept alive until it completes).
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    send_armed: bool,
    spare: Vec<AlignedBuf>,
    done: bool,
    /// Each disk request enters the kernel as it starts (the epoll loop).
    submit_each: bool,
}

impl Conn {
    fn new(s: TcpStream, file: i32) -> Result<Conn> {
        Ok(Conn {
            s,
            file,
            // Completions posted only when this thread enters the ring, instead of the kernel
            // interrupting it for each: 0.56x -> 0.73x the raw file's 4k random reads here.
            ring: IoUring::builder().setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun().build(512)?,
            rbuf: vec![0u8; RECV_BUF],
            rstart: 0,
            rend: 0,
            recv_armed: false,
            jobs: Vec::new(),
            free_slots: Vec::new(),
            out: VecDeque::new(),
            sent: 0,
            iov: Vec::new(),
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msg: Box::new(unsafe { std::mem::zeroed() }),
            send_armed: false,
            spare: Vec::new(),
            done: false,
            submit_each: false,
        })
    }

    fn push(&mut self, e: io_uring::squeue::Entry) -> Result<()> {
        // SAFETY: every buffer an entry points at (rbuf, a job's buffer, `iov`/`msg` and the
        // reply buffers they point at) stays where it is until its completion is reaped.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn run(mut self) -> Result<()> {
        let sock = self.s.as_raw_fd();
        loop {
            if !self.recv_armed && !self.done {
                self.make_room();
                if self.rend < RECV_BUF {
                    let ptr = self.rbuf[self.rend..].as_mut_ptr();
                    let e =
                        opcode::Recv::new(types::Fd(sock), ptr, (RECV_BUF - self.rend) as u32).build().user_data(RECV);
                    self.push(e)?;
                    self.recv_armed = true;
                }
            }
            if !self.send_armed && !self.out.is_empty() {
                self.arm_send(sock)?;
            }
            if self.done && !self.send_armed && self.jobs.iter().all(|j| j.is_none()) {
                return Ok(());
            }
            self.ring.submit_and_wait(1)?;
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (ud, res) in cqes {
                match ud {
                    RECV => {
                        self.recv_armed = false;
                        if res <= 0 {
                            self.done = true;
                        } else {
                            self.rend += res as usize;
                            self.parse()?;
                        }
                    }
                    SEND => {
                        self.send_armed = false;
                        if res < 0 {
                            bail!("send: {}", std::io::Error::from_raw_os_error(-res));
                        }
                        self.sent_bytes(res as usize);
                    }
                    slot => self.finish(slot as usize, res),
                }
            }
        }
    }

    /// Moves what is received but not parsed to the front of the receive buffer when the front
    /// is mostly used up.
    fn make_room(&mut self) {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rstart > RECV_BUF / 2 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
    }

    /// The loop with the socket outside the ring (`NBD_CEILING_SOCKET=epoll`).
    fn run_epoll(mut self) -> Result<()> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let s = self.s.try_clone()?;
        s.set_nonblocking(true)?;
        self.submit_each = true;
        let completions = EventFd::from_flags(EfdFlags::EFD_NONBLOCK)?;
        self.ring.submitter().register_eventfd(completions.as_raw_fd())?;
        let epoll = Epoll::new(EpollCreateFlags::empty())?;
        epoll.add(&s, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
        epoll.add(&completions, EpollEvent::new(EpollFlags::EPOLLIN, 1))?;
        let mut events = [EpollEvent::empty(); 4];
        loop {
            // Receive what is there and start it.
            if !self.done {
                self.make_room();
                if self.rend < RECV_BUF {
                    match (&s).read(&mut self.rbuf[self.rend..]) {
                        Ok(0) => self.done = true,
                        Ok(n) => {
                            self.rend += n;
                            self.parse()?;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => self.done = true,
                    }
                }
            }
            // Reap completions (deferred task work runs only when this thread asks).
            // SAFETY: no submission is involved and no signal mask is passed.
            unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)? };
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (slot, res) in cqes {
                self.finish(slot as usize, res);
            }
            // Send the replies, as much as the socket takes.
            while !self.out.is_empty() {
                let n = {
                    let mut slices = [std::io::IoSlice::new(&[]); 2 * MAX_REPLIES];
                    let mut k = 0;
                    self.unsent(|p| {
                        slices[k] = std::io::IoSlice::new(p);
                        k += 1;
                    });
                    match (&s).write_vectored(&slices[..k]) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => bail!("writev: {e}"),
                    }
                };
                self.sent_bytes(n);
            }
            if self.done && self.out.is_empty() && self.jobs.iter().all(|j| j.is_none()) {
                return Ok(());
            }
            // Wait for the socket or a completion.
            // (Interrupted by the kernel's task work for the ring: go round again.)
            let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => 0,
                r => r?,
            };
            if events[..n].iter().any(|e| e.data() == 1) {
                let _ = completions.read();
            }
        }
    }

    /// Hands `f` each piece of what is left to send (of the first [`MAX_REPLIES`] replies), in
    /// order.
    fn unsent<'a>(&'a self, mut f: impl FnMut(&'a [u8])) {
        let mut skip = self.sent;
        for o in self.out.iter().take(MAX_REPLIES) {
            let data = o.data.as_ref().map_or(&[][..], |d| d.as_slice());
            for part in [&o.header[..], data] {
                if part.len() <= skip {
                    skip -= part.len();
                    continue;
                }
                f(&part[skip..]);
                skip = 0;
            }
        }
    }

    /// Starts every whole request received.
    fn parse(&mut self) -> Result<()> {
        while self.rend - self.rstart >= REQUEST_HEADER_LEN && !self.done {
            let h = &self.rbuf[self.rstart..self.rstart + REQUEST_HEADER_LEN];
            let h: &[u8; REQUEST_HEADER_LEN] = h.try_into().expect("a header's length");
            let Some(Request { command, cookie, offset, length, .. }) = Request::parse(h) else {
                bail!("bad request magic");
            };
            let payload = if command == CMD_WRITE { length as usize } else { 0 };
            if self.rend - self.rstart < REQUEST_HEADER_LEN + payload {
                if REQUEST_HEADER_LEN + payload > RECV_BUF {
                    bail!("write of {length} bytes");
                }
                return Ok(());
            }
            let body = self.rstart + REQUEST_HEADER_LEN;
            self.rstart = body + payload;
            match command {
                CMD_DISC => self.done = true,
                CMD_READ | CMD_WRITE if length > MAX_LEN || length % 512 != 0 || offset % 512 != 0 => {
                    self.reply(cookie, EINVAL, None)
                }
                CMD_READ => {
                    let mut buf = self.buffer(length as usize);
                    let e =
                        opcode::Read::new(types::Fd(self.file), buf.as_mut_slice().as_mut_ptr(), length).offset(offset);
                    self.start(Job { cookie, command, buf: Some(buf) }, e.build())?;
                }
                CMD_WRITE => {
                    let mut buf = self.buffer(length as usize);
                    buf.as_mut_slice().copy_from_slice(&self.rbuf[body..body + payload]);
                    let e = opcode::Write::new(types::Fd(self.file), buf.as_slice().as_ptr(), length).offset(offset);
                    self.start(Job { cookie, command, buf: Some(buf) }, e.build())?;
                }
                CMD_FLUSH => {
                    let e = opcode::Fsync::new(types::Fd(self.file)).flags(types::FsyncFlags::DATASYNC);
                    self.start(Job { cookie, command, buf: None }, e.build())?;
                }
                _ => self.reply(cookie, EINVAL, None),
            }
        }
        Ok(())
    }

    /// A buffer of `len` bytes, reused from finished requests (zeroed only when new).
    fn buffer(&mut self, len: usize) -> AlignedBuf {
        match self.spare.iter().position(|b| b.len() == len) {
            Some(i) => self.spare.swap_remove(i),
            None => AlignedBuf::zeroed(len),
        }
    }

    fn start(&mut self, job: Job, e: io_uring::squeue::Entry) -> Result<()> {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.jobs.push(None);
                self.jobs.len() - 1
            }
        };
        self.jobs[slot] = Some(job);
        self.push(e.user_data(slot as u64))?;
        if self.submit_each {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn finish(&mut self, slot: usize, res: i32) {
        let Some(job) = self.jobs.get_mut(slot).and_then(Option::take) else { return };
        self.free_slots.push(slot);
        let error = if res < 0 { EIO } else { 0 };
        match (job.command, job.buf) {
            (CMD_READ, Some(buf)) if error == 0 => self.reply(job.cookie, 0, Some(buf)),
            (_, buf) => {
                if let Some(buf) = buf {
                    self.spare.push(buf);
                }
                self.reply(job.cookie, error, None)
            }
        }
    }

    fn reply(&mut self, cookie: u64, error: u32, data: Option<AlignedBuf>) {
        self.out.push_back(Out { header: simple_reply_header(cookie, error), data });
    }

    /// One send in flight at a time, so replies never interleave on the stream.
    fn arm_send(&mut self, sock: i32) -> Result<()> {
        // The vector is kept from send to send (taken out while `out` is read).
        let mut iov = std::mem::take(&mut self.iov);
        iov.clear();
        self.unsent(|p| iov.push(libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }));
        self.iov = iov;
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len();
        let e = opcode::SendMsg::new(types::Fd(sock), &*self.msg).build().user_data(SEND);
        self.push(e)?;
        self.send_armed = true;
        Ok(())
    }

    fn sent_bytes(&mut self, mut n: usize) {
        n += self.sent;
        while let Some(front) = self.out.front() {
            let len = SIMPLE_REPLY_LEN + front.data.as_ref().map_or(0, |d| d.len());
            if n < len {
                break;
            }
            n -= len;
            if let Some(Out { data: Some(d), .. }) = self.out.pop_front() {
                self.spare.push(d);
            }
        }
        self.sent = n;
    }
}
