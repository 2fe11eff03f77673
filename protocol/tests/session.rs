//! The session driver and client against in-memory exports over real TCP: structured reads with
//! holes, DF, block status, simple replies, read-only exports, many requests in flight.

use std::sync::Arc;

use thinbd_protocol::client::{Client, ClientOptions, ReadPiece, list_exports};
use thinbd_protocol::consts::*;
use thinbd_protocol::mem_device::{MemCatalog, MemDevice};
use thinbd_protocol::{Extent, ServerConfig, SessionLimits, SessionShared, Stop, negotiate, serve};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn start() -> (String, CancellationToken) {
    let catalog = Arc::new(MemCatalog {
        exports: vec![
            ("rw".into(), Arc::new(MemDevice::new(4 << 20, false))),
            ("ro".into(), Arc::new(MemDevice::new(1 << 20, true))),
        ],
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            let (sock, peer) = tokio::select! { r = l.accept() => r.unwrap(), _ = s.cancelled() => return };
            let catalog = catalog.clone();
            let s = s.clone();
            tokio::spawn(async move {
                if let Ok(Some(n)) = negotiate(Box::new(sock), &*catalog, &ServerConfig::default(), Some(peer)).await {
                    let stop = Stop { shutdown: s, ..Stop::default() };
                    let _ = serve(n, SessionLimits::default(), SessionShared::new(1 << 30), stop).await;
                }
            });
        }
    });
    (addr, stop)
}

#[tokio::test]
async fn structured_reads_report_holes_and_df_merges() {
    let (addr, _stop) = start().await;
    let c = Client::connect(&addr, ClientOptions::new("rw")).await.unwrap();
    assert!(c.structured);
    assert_eq!(c.size, 4 << 20);
    assert_eq!(c.block_size, Some((1, 4096, 32 << 20)));
    c.write(8192, &[7u8; 4096], 0).await.unwrap();
    let r = c.read_pieces(0, 16384, 0).await.unwrap();
    assert_eq!(
        r.pieces,
        vec![
            ReadPiece::Hole { offset: 0, len: 8192 },
            ReadPiece::Data { offset: 8192, len: 4096 },
            ReadPiece::Hole { offset: 12288, len: 4096 }
        ]
    );
    assert_eq!(&r.data[8192..12288], &[7u8; 4096][..]);
    assert!(r.data[..8192].iter().all(|b| *b == 0));
    // DF: one chunk for the whole read.
    let r = c.read_pieces(0, 16384, CMD_FLAG_DF).await.unwrap();
    assert_eq!(r.pieces, vec![ReadPiece::Data { offset: 0, len: 16384 }]);
    assert_eq!(&r.data[8192..12288], &[7u8; 4096][..]);
    // base:allocation, and REQ_ONE limits it to one extent.
    assert_eq!(c.base_allocation, Some(1));
    let e = c.block_status(0, 16384, 0).await.unwrap();
    assert_eq!(
        e,
        vec![
            Extent { length: 8192, flags: STATE_HOLE | STATE_ZERO },
            Extent { length: 4096, flags: 0 },
            Extent { length: 4096, flags: STATE_HOLE | STATE_ZERO }
        ]
    );
    assert_eq!(c.block_status(0, 16384, CMD_FLAG_REQ_ONE).await.unwrap().len(), 1);
    // Trim and zero make it a hole again.
    c.trim(8192, 4096).await.unwrap();
    assert_eq!(c.block_status(0, 16384, 0).await.unwrap(), vec![Extent { length: 16384, flags: 3 }]);
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn simple_replies_without_structured() {
    let (addr, _stop) = start().await;
    let mut o = ClientOptions::new("rw");
    o.structured = false;
    let c = Client::connect(&addr, o).await.unwrap();
    assert!(!c.structured);
    assert_eq!(c.flags & FLAG_SEND_DF, 0);
    c.write(100, b"hello", CMD_FLAG_FUA).await.unwrap();
    let r = c.read_pieces(98, 9, 0).await.unwrap();
    assert_eq!(r.data, b"\0\0hello\0\0");
    assert_eq!(r.pieces.len(), 1, "a simple reply is one piece");
    // No meta context without structured replies: BLOCK_STATUS is EINVAL.
    assert_eq!(c.raw(CMD_BLOCK_STATUS, 0, 0, 512).await.err().and_then(|e| e.errno()), Some(EINVAL));
    // DF needs structured replies.
    assert_eq!(c.raw(CMD_READ, CMD_FLAG_DF, 0, 512).await.err().and_then(|e| e.errno()), Some(EINVAL));
}

#[tokio::test]
async fn read_only_export_refuses_writes() {
    let (addr, _stop) = start().await;
    let c = Client::connect(&addr, ClientOptions::new("ro")).await.unwrap();
    assert_ne!(c.flags & FLAG_READ_ONLY, 0);
    assert_eq!(c.flags & FLAG_SEND_TRIM, 0);
    assert_eq!(c.write(0, b"x", 0).await.err().and_then(|e| e.errno()), Some(EPERM));
    assert_eq!(c.trim(0, 4096).await.err().and_then(|e| e.errno()), Some(EPERM));
    assert_eq!(c.write_zeroes(0, 4096, 0).await.err().and_then(|e| e.errno()), Some(EPERM));
    assert_eq!(c.read(0, 4).await.unwrap(), vec![0; 4]);
    c.flush().await.unwrap();
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection() {
    let (addr, _stop) = start().await;
    let c = Arc::new(Client::connect(&addr, ClientOptions::new("rw")).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..256u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let data = vec![i as u8; 4096];
            c.write(i * 4096, &data, 0).await.unwrap();
            assert_eq!(c.read(i * 4096, 4096).await.unwrap(), data);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(list_exports(&addr, &ClientOptions::default()).await.unwrap(), ["rw", "ro"]);
    // Unknown export over GO: the client sees ERR_UNKNOWN.
    let err = Client::connect(&addr, ClientOptions::new("nope")).await.err().unwrap();
    assert!(err.to_string().contains(&format!("{REP_ERR_UNKNOWN:#x}")), "{err}");
}

/// A client that sends requests but reads no reply is read no further once its replies fill the
/// socket and a bounded backlog: the server does not pile replies up in memory for it.
#[tokio::test]
async fn a_client_that_reads_no_replies_stops_being_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, _stop) = start().await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut c = sock.connect(addr.parse().unwrap()).await.unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).await.unwrap();
    c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&2u32.to_be_bytes());
    opt.extend_from_slice(b"rw");
    c.write_all(&opt).await.unwrap();
    let mut export = [0u8; 10];
    c.read_exact(&mut export).await.unwrap();
    // Reads with a flag the protocol does not define: each is answered EINVAL at once.
    let mut batch = Vec::new();
    for cookie in 0..1024u64 {
        batch.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        batch.extend_from_slice(&0x0100u16.to_be_bytes());
        batch.extend_from_slice(&CMD_READ.to_be_bytes());
        batch.extend_from_slice(&cookie.to_be_bytes());
        batch.extend_from_slice(&0u64.to_be_bytes());
        batch.extend_from_slice(&4096u32.to_be_bytes());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut sent = 0usize;
    loop {
        let write = tokio::time::timeout(std::time::Duration::from_secs(1), c.write_all(&batch));
        match write.await {
            Ok(r) => r.unwrap(),
            Err(_) => break,
        }
        sent += 1024;
        assert!(std::time::Instant::now() < deadline, "still reading after {sent} requests whose replies nobody took");
    }
    // The socket buffers hold some MiB of requests and replies (about 400k requests here); the
    // session itself at most twice its in-flight limit of replies. Without that limit it read
    // 2.8M requests in 20 s and went on.
    assert!(sent < 1_000_000, "{sent} requests read");
}

/// A memory device whose reads wait at a gate, counting how many wait at once.
struct Gated {
    mem: MemDevice,
    gate: tokio::sync::Semaphore,
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl thinbd_protocol::BlockDevice for Gated {
    fn info(&self) -> thinbd_protocol::DeviceInfo {
        self.mem.info()
    }
    async fn read(&self, offset: u64, len: u32) -> thinbd_protocol::DeviceResult<Vec<thinbd_protocol::ReadChunk>> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(n, SeqCst);
        if let Ok(p) = self.gate.acquire().await {
            p.forget();
        }
        self.now.fetch_sub(1, SeqCst);
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> thinbd_protocol::DeviceResult<()> {
        self.mem.write(offset, data, fua).await
    }
    async fn flush(&self) -> thinbd_protocol::DeviceResult<()> {
        self.mem.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> thinbd_protocol::DeviceResult<()> {
        self.mem.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, o: u64, l: u32, u: bool, f: bool, fua: bool) -> thinbd_protocol::DeviceResult<()> {
        self.mem.write_zeroes(o, l, u, f, fua).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> thinbd_protocol::DeviceResult<Vec<Extent>> {
        self.mem.block_status(offset, len).await
    }
}

struct GatedCatalog(Arc<Gated>);

impl thinbd_protocol::ExportCatalog for GatedCatalog {
    type Device = Gated;
    async fn open(
        &self,
        _name: &str,
        _peer: Option<std::net::SocketAddr>,
    ) -> Result<thinbd_protocol::Export<Gated>, thinbd_protocol::OpenError> {
        Ok(thinbd_protocol::Export {
            name: "g".into(),
            description: String::new(),
            device: self.0.clone(),
            fences: Vec::new(),
        })
    }
    fn list(&self, _peer: Option<std::net::SocketAddr>) -> Vec<thinbd_protocol::ExportListing> {
        Vec::new()
    }
}

/// Serves one session of a [`Gated`] device under `limits`, sends `n` pipelined reads of `len`
/// bytes and returns how many ran at once at most, and how often the session waited for budget.
async fn most_at_once(limits: SessionLimits, n: u64, len: u32) -> (usize, u64) {
    use std::sync::atomic::Ordering::SeqCst;
    let dev = Arc::new(Gated {
        mem: MemDevice::new(4 << 20, false),
        gate: tokio::sync::Semaphore::new(0),
        now: Default::default(),
        most: Default::default(),
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let catalog = GatedCatalog(dev.clone());
    let shared = SessionShared::new(1 << 30);
    let sh = shared.clone();
    tokio::spawn(async move {
        let (sock, peer) = l.accept().await.unwrap();
        let n = negotiate(Box::new(sock), &catalog, &ServerConfig::default(), Some(peer)).await.unwrap().unwrap();
        let _ = serve(n, limits, sh, Stop::default()).await;
    });
    let c = Arc::new(Client::connect(&addr, ClientOptions::new("g")).await.unwrap());
    let reads: Vec<_> = (0..n)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * len as u64, len).await.unwrap() })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dev.now.load(SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the first requests never started");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Time for the session to start more, were it going to.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let most = dev.most.load(SeqCst);
    dev.gate.add_permits(n as usize);
    for r in reads {
        assert_eq!(r.await.unwrap(), vec![0u8; len as usize]);
    }
    assert_eq!(dev.most.load(SeqCst), most, "no more ran at once later");
    (most, shared.budget_waits.load(SeqCst))
}

/// No more requests run at once than the session's in-flight limit, however many the client
/// sends; the others are served as the first ones finish.
#[tokio::test]
async fn requests_beyond_the_in_flight_limit_wait_for_room() {
    let limits = SessionLimits { max_in_flight: 4, ..SessionLimits::default() };
    assert_eq!(most_at_once(limits, 16, 4096).await.0, 4, "at most the limit runs at once");
}

/// Reads whose replies would hold more than the session's memory budget wait for the earlier
/// replies to be written, and then all are served.
#[tokio::test]
async fn reads_beyond_the_session_budget_wait_for_earlier_replies() {
    let limits = SessionLimits { max_session_bytes: 64 << 10, ..SessionLimits::default() };
    let (most, waits) = most_at_once(limits, 16, 32 << 10).await;
    assert_eq!(most, 2, "two 32 KiB reads fill a 64 KiB budget");
    assert!(waits > 0, "the waits are counted");
}
