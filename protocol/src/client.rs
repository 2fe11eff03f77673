//! An async NBD client: fixed-newstyle handshake with GO, optional STARTTLS, structured replies
//! and `base:allocation`; any number of requests in flight, matched to replies by cookie.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::consts::*;
use crate::device::Extent;
use crate::io::BoxIo;
use crate::wire::Request;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("server replied with error {errno}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Server { errno: u32, message: String },
    #[error("option {option} refused with {reply:#x}: {message}")]
    OptionRefused { option: u32, reply: u32, message: String },
    #[error("protocol violation by server: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connection closed")]
    Closed,
}

impl ClientError {
    /// The NBD errno of a server error reply, if this is one.
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

#[derive(Clone, Default)]
pub struct ClientOptions {
    pub export: String,
    pub structured: bool,
    pub base_allocation: bool,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl ClientOptions {
    pub fn new(export: &str) -> Self {
        ClientOptions { export: export.to_string(), structured: true, base_allocation: true, tls: None }
    }
}

/// What a read returned, chunk by chunk, so tests can see holes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadPiece {
    Data { offset: u64, len: u32 },
    Hole { offset: u64, len: u32 },
}

#[derive(Debug, Default)]
pub struct ReadResult {
    pub data: Vec<u8>,
    pub pieces: Vec<ReadPiece>,
}

enum Kind {
    Read { offset: u64, len: u32 },
    BlockStatus,
    Other,
}

struct Pending {
    kind: Kind,
    read: ReadResult,
    extents: Vec<Extent>,
    error: Option<(u32, String)>,
    tx: oneshot::Sender<Result<Completed, ClientError>>,
}

enum Completed {
    Done,
    Read(ReadResult),
    Extents(Vec<Extent>),
}

/// Read and write buffers of a connection.
const IO_BUFFER: usize = 256 << 10;

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

pub struct Client {
    /// Buffered so that a request's header and payload leave in one write.
    writer: tokio::sync::Mutex<BufWriter<WriteHalf<BoxIo>>>,
    pending: PendingMap,
    /// Set (under the `pending` lock) once the reply reader has stopped: new requests would
    /// never be answered.
    closed: Arc<std::sync::atomic::AtomicBool>,
    next_cookie: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub base_allocation: Option<u32>,
    pub block_size: Option<(u32, u32, u32)>,
}

async fn read_greeting<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<(), ClientError> {
    let magic = io.read_u64().await?;
    let opt = io.read_u64().await?;
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(ClientError::Protocol(format!("bad greeting {magic:#x} {opt:#x}")));
    }
    let flags = io.read_u16().await?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("server is not fixed-newstyle".into()));
    }
    io.write_u32(FLAG_C_FIXED_NEWSTYLE | (flags as u32 & FLAG_C_NO_ZEROES)).await?;
    Ok(())
}

async fn send_option<S: AsyncWrite + Unpin>(io: &mut S, opt: u32, data: &[u8]) -> Result<(), ClientError> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    io.write_all(&b).await?;
    io.flush().await?;
    Ok(())
}

/// Reads one option reply: (reply type, data). Errors become `OptionRefused`.
async fn option_reply<S: AsyncRead + Unpin>(io: &mut S, opt: u32) -> Result<(u32, Vec<u8>), ClientError> {
    let magic = io.read_u64().await?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::Protocol(format!("bad option reply magic {magic:#x}")));
    }
    let got = io.read_u32().await?;
    let rep = io.read_u32().await?;
    let len = io.read_u32().await?;
    if got != opt || len > MAX_OPTION_LEN {
        return Err(ClientError::Protocol(format!("reply to option {got} (len {len}) while waiting for {opt}")));
    }
    let mut data = vec![0u8; len as usize];
    io.read_exact(&mut data).await?;
    if rep & (1 << 31) != 0 {
        return Err(ClientError::OptionRefused {
            option: opt,
            reply: rep,
            message: String::from_utf8_lossy(&data).into_owned(),
        });
    }
    Ok((rep, data))
}

async fn open_stream<A: ToSocketAddrs>(addr: A, opts: &ClientOptions) -> Result<BoxIo, ClientError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut io: BoxIo = Box::new(tcp);
    read_greeting(&mut io).await?;
    if let Some((connector, name)) = &opts.tls {
        send_option(&mut io, OPT_STARTTLS, &[]).await?;
        option_reply(&mut io, OPT_STARTTLS).await?;
        let tls = connector.connect(name.clone(), io).await.map_err(|e| ClientError::Tls(e.to_string()))?;
        io = Box::new(tls);
    }
    Ok(io)
}

/// NBD_OPT_GO for `export`, asking for block-size constraints: (size, transmission flags,
/// (min, preferred, max) block sizes if the server sent them).
async fn go<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    export: &str,
) -> Result<(u64, u16, Option<(u32, u32, u32)>), ClientError> {
    let mut d = string_field(export);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(io, OPT_GO, &d).await?;
    let (mut size, mut flags, mut block_size) = (None, 0u16, None);
    loop {
        let (rep, data) = option_reply(io, OPT_GO).await?;
        match rep {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => match (u16::from_be_bytes([data[0], data[1]]), data.len()) {
                (INFO_EXPORT, 12) => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap_or_default()));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                (INFO_BLOCK_SIZE, 14) => {
                    let f = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap_or_default());
                    block_size = Some((f(2), f(6), f(10)));
                }
                _ => {}
            },
            _ => return Err(ClientError::Protocol(format!("unexpected reply {rep} to GO"))),
        }
    }
    let size = size.ok_or_else(|| ClientError::Protocol("GO without NBD_INFO_EXPORT".into()))?;
    Ok((size, flags, block_size))
}

/// What the kernel's NBD client needs from a negotiated connection.
pub struct KernelHandoff {
    /// Blocking-mode socket, ready for transmission (simple replies only: the kernel client
    /// does not speak structured replies).
    pub socket: std::net::TcpStream,
    pub size: u64,
    pub flags: u16,
    /// After STARTTLS: the negotiated version and the session keys with their sequence
    /// numbers, for kernel TLS on `socket`.
    pub tls: Option<(rustls::ProtocolVersion, rustls::ExtractedSecrets)>,
}

/// Connects and negotiates `export` on plain TCP for the kernel to take over.
pub async fn handshake_for_kernel<A: ToSocketAddrs>(addr: A, export: &str) -> Result<KernelHandoff, ClientError> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    read_greeting(&mut tcp).await?;
    let (size, flags, _) = go(&mut tcp, export).await?;
    let socket = tcp.into_std()?;
    socket.set_nonblocking(false)?;
    Ok(KernelHandoff { socket, size, flags, tls: None })
}

/// Connects, upgrades with STARTTLS (`connector` from `tls::kernel_client_connector`),
/// negotiates `export`, and extracts the TLS session so the kernel can carry it on.
pub async fn handshake_for_kernel_tls<A: ToSocketAddrs>(
    addr: A,
    export: &str,
    connector: &TlsConnector,
    server_name: ServerName<'static>,
) -> Result<KernelHandoff, ClientError> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    read_greeting(&mut tcp).await?;
    send_option(&mut tcp, OPT_STARTTLS, &[]).await?;
    option_reply(&mut tcp, OPT_STARTTLS).await?;
    let mut tls = connector.connect(server_name, tcp).await.map_err(|e| ClientError::Tls(e.to_string()))?;
    let (size, flags, _) = go(&mut tls, export).await?;
    let (tcp, conn) = tls.into_inner();
    let version = conn.protocol_version().ok_or_else(|| ClientError::Tls("no protocol version".into()))?;
    let secrets = conn.dangerous_extract_secrets().map_err(|e| ClientError::Tls(e.to_string()))?;
    let socket = tcp.into_std()?;
    socket.set_nonblocking(false)?;
    Ok(KernelHandoff { socket, size, flags, tls: Some((version, secrets)) })
}

fn string_field(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// Lists the server's exports (NBD_OPT_LIST), then aborts.
pub async fn list_exports<A: ToSocketAddrs>(addr: A, opts: &ClientOptions) -> Result<Vec<String>, ClientError> {
    let mut io = open_stream(addr, opts).await?;
    send_option(&mut io, OPT_LIST, &[]).await?;
    let mut names = Vec::new();
    loop {
        let (rep, data) = option_reply(&mut io, OPT_LIST).await?;
        match rep {
            REP_ACK => break,
            REP_SERVER if data.len() >= 4 => {
                let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let name = data.get(4..4 + n).ok_or_else(|| ClientError::Protocol("short REP_SERVER".into()))?;
                names.push(String::from_utf8_lossy(name).into_owned());
            }
            _ => return Err(ClientError::Protocol(format!("unexpected reply {rep} to LIST"))),
        }
    }
    send_option(&mut io, OPT_ABORT, &[]).await?;
    let _ = option_reply(&mut io, OPT_ABORT).await;
    Ok(names)
}

impl Client {
    pub async fn connect<A: ToSocketAddrs>(addr: A, opts: ClientOptions) -> Result<Client, ClientError> {
        let mut io = open_stream(addr, &opts).await?;
        let mut structured = false;
        if opts.structured {
            send_option(&mut io, OPT_STRUCTURED_REPLY, &[]).await?;
            option_reply(&mut io, OPT_STRUCTURED_REPLY).await?;
            structured = true;
        }
        let mut base_allocation = None;
        if structured && opts.base_allocation {
            let mut d = string_field(&opts.export);
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&string_field(BASE_ALLOCATION));
            send_option(&mut io, OPT_SET_META_CONTEXT, &d).await?;
            loop {
                let (rep, data) = option_reply(&mut io, OPT_SET_META_CONTEXT).await?;
                match rep {
                    REP_ACK => break,
                    REP_META_CONTEXT if data.len() >= 4 => {
                        base_allocation = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]]))
                    }
                    _ => return Err(ClientError::Protocol(format!("unexpected reply {rep} to SET_META_CONTEXT"))),
                }
            }
        }
        let (size, flags, block_size) = go(&mut io, &opts.export).await?;
        let (rd, wr) = tokio::io::split(io);
        let pending: PendingMap = Arc::default();
        let closed: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        // Replies are parsed field by field: buffered, that is one read per burst of replies
        // rather than several per reply.
        let rd = BufReader::with_capacity(IO_BUFFER, rd);
        let reader = tokio::spawn(read_replies(rd, pending.clone(), closed.clone()));
        Ok(Client {
            closed,
            writer: tokio::sync::Mutex::new(BufWriter::with_capacity(IO_BUFFER, wr)),
            pending,
            next_cookie: AtomicU64::new(1),
            reader,
            size,
            flags,
            structured,
            base_allocation,
            block_size,
        })
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        kind: Kind,
    ) -> Result<Completed, ClientError> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read = match kind {
            Kind::Read { len, .. } => ReadResult { data: vec![0u8; len as usize], pieces: Vec::new() },
            _ => ReadResult::default(),
        };
        let pending = Pending { kind, read, extents: Vec::new(), error: None, tx };
        {
            let mut map = self.pending.lock().map_err(|_| ClientError::Closed)?;
            if self.closed.load(Ordering::Relaxed) {
                return Err(ClientError::Closed);
            }
            map.insert(cookie, pending);
        }
        let hdr = Request { flags, command, cookie, offset, length }.encode();
        {
            let mut w = self.writer.lock().await;
            w.write_all(&hdr).await?;
            if !payload.is_empty() {
                w.write_all(payload).await?;
            }
            w.flush().await?;
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    pub async fn read_pieces(&self, offset: u64, len: u32, flags: u16) -> Result<ReadResult, ClientError> {
        match self.request(CMD_READ, flags, offset, len, &[], Kind::Read { offset, len }).await? {
            Completed::Read(r) => Ok(r),
            _ => Err(ClientError::Protocol("read completed without data".into())),
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        Ok(self.read_pieces(offset, len, 0).await?.data)
    }

    pub async fn write(&self, offset: u64, data: &[u8], flags: u16) -> Result<(), ClientError> {
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data, Kind::Other).await.map(|_| ())
    }

    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[], Kind::Other).await.map(|_| ())
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_TRIM, 0, offset, len, &[], Kind::Other).await.map(|_| ())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32, flags: u16) -> Result<(), ClientError> {
        self.request(CMD_WRITE_ZEROES, flags, offset, len, &[], Kind::Other).await.map(|_| ())
    }

    pub async fn cache(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_CACHE, 0, offset, len, &[], Kind::Other).await.map(|_| ())
    }

    /// Sends any request as-is (tests use it for requests a well-behaved client would not send).
    pub async fn raw(&self, command: u16, flags: u16, offset: u64, length: u32) -> Result<(), ClientError> {
        let kind = match command {
            CMD_READ => Kind::Read { offset, len: length },
            CMD_BLOCK_STATUS => Kind::BlockStatus,
            _ => Kind::Other,
        };
        self.request(command, flags, offset, length, &[], kind).await.map(|_| ())
    }

    pub async fn block_status(&self, offset: u64, len: u32, flags: u16) -> Result<Vec<Extent>, ClientError> {
        match self.request(CMD_BLOCK_STATUS, flags, offset, len, &[], Kind::BlockStatus).await? {
            Completed::Extents(e) => Ok(e),
            _ => Err(ClientError::Protocol("block status without extents".into())),
        }
    }

    /// Sends DISC and closes the connection.
    pub async fn disconnect(self) -> Result<(), ClientError> {
        let hdr = Request { flags: 0, command: CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode();
        let mut w = self.writer.lock().await;
        w.write_all(&hdr).await?;
        w.flush().await?;
        let _ = w.shutdown().await;
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_replies(
    mut rd: BufReader<ReadHalf<BoxIo>>,
    pending: PendingMap,
    closed: Arc<std::sync::atomic::AtomicBool>,
) {
    let err = match reply_loop(&mut rd, &pending).await {
        Ok(()) => ClientError::Closed,
        Err(e) => e,
    };
    let msg = err.to_string();
    if let Ok(mut map) = pending.lock() {
        closed.store(true, Ordering::Relaxed);
        for (_, p) in map.drain() {
            let _ = p.tx.send(Err(ClientError::Protocol(msg.clone())));
        }
    }
}

async fn reply_loop(rd: &mut BufReader<ReadHalf<BoxIo>>, pending: &PendingMap) -> Result<(), ClientError> {
    let take = |cookie: u64| -> Result<Pending, ClientError> {
        pending
            .lock()
            .map_err(|_| ClientError::Closed)?
            .remove(&cookie)
            .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))
    };
    loop {
        let magic = match rd.read_u32().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = rd.read_u32().await?;
                let cookie = rd.read_u64().await?;
                let mut p = take(cookie)?;
                let result = if error != 0 {
                    Err(ClientError::Server { errno: error, message: String::new() })
                } else if let Kind::Read { offset, len } = p.kind {
                    rd.read_exact(&mut p.read.data).await?;
                    p.read.pieces.push(ReadPiece::Data { offset, len });
                    Ok(Completed::Read(p.read))
                } else {
                    Ok(Completed::Done)
                };
                let _ = p.tx.send(result);
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = rd.read_u16().await?;
                let kind = rd.read_u16().await?;
                let cookie = rd.read_u64().await?;
                let len = rd.read_u32().await?;
                if len > 64 * 1024 * 1024 {
                    return Err(ClientError::Protocol(format!("chunk of {len} bytes")));
                }
                let mut p = take(cookie)?;
                let mut payload = vec![0u8; len as usize];
                rd.read_exact(&mut payload).await?;
                apply_chunk(&mut p, kind, &payload)?;
                if flags & REPLY_FLAG_DONE != 0 {
                    let result = match (p.error.take(), &p.kind) {
                        (Some((errno, message)), _) => Err(ClientError::Server { errno, message }),
                        (None, Kind::Read { .. }) => Ok(Completed::Read(std::mem::take(&mut p.read))),
                        (None, Kind::BlockStatus) => Ok(Completed::Extents(std::mem::take(&mut p.extents))),
                        (None, Kind::Other) => Ok(Completed::Done),
                    };
                    let _ = p.tx.send(result);
                } else {
                    pending.lock().map_err(|_| ClientError::Closed)?.insert(cookie, p);
                }
            }
            other => return Err(ClientError::Protocol(format!("bad reply magic {other:#x}"))),
        }
    }
}

fn apply_chunk(p: &mut Pending, kind: u16, payload: &[u8]) -> Result<(), ClientError> {
    let bad = |what: &str| ClientError::Protocol(what.to_string());
    let u64_at = |i: usize| payload.get(i..i + 8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
    let u32_at = |i: usize| payload.get(i..i + 4).map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()));
    match kind {
        REPLY_TYPE_NONE => Ok(()),
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            let Kind::Read { offset: base, len } = p.kind else { return Err(bad("data chunk for a non-read")) };
            let offset = u64_at(0).ok_or_else(|| bad("short chunk"))?;
            let n = if kind == REPLY_TYPE_OFFSET_DATA {
                payload.len() as u64 - 8
            } else {
                u32_at(8).ok_or_else(|| bad("short hole chunk"))? as u64
            };
            if offset < base || offset + n > base + len as u64 {
                return Err(bad("chunk outside the request"));
            }
            let at = (offset - base) as usize;
            if kind == REPLY_TYPE_OFFSET_DATA {
                p.read.data[at..at + n as usize].copy_from_slice(&payload[8..]);
                p.read.pieces.push(ReadPiece::Data { offset, len: n as u32 });
            } else {
                p.read.pieces.push(ReadPiece::Hole { offset, len: n as u32 });
            }
            Ok(())
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let mut i = 4;
            while i + 8 <= payload.len() {
                let length = u32_at(i).unwrap_or(0);
                let flags = u32_at(i + 4).unwrap_or(0);
                p.extents.push(Extent { length, flags });
                i += 8;
            }
            Ok(())
        }
        k if k & (1 << 15) != 0 => {
            let errno = u32_at(0).ok_or_else(|| bad("short error chunk"))?;
            let mlen = payload.get(4..6).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize).unwrap_or(0);
            let message = payload.get(6..6 + mlen).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
            p.error = Some((errno, message));
            Ok(())
        }
        _ => Err(bad("unknown chunk type")),
    }
}
