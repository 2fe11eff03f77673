//! Hostile clients against the real binary: a client that pipelines large reads and never takes
//! the replies, revocation racing half-sent and pipelined writes, and floods of idle
//! connections. Each test measures the server from outside (RSS, open descriptors, metrics).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thinbd_protocol::client::{Client, ClientOptions, handshake_for_kernel};
use thinbd_protocol::consts::{CMD_READ, CMD_WRITE};
use thinbd_protocol::wire::Request;
use thinbd_tests::{Server, pattern, runtime};

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn metric(s: &Server, name: &str) -> u64 {
    s.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// A negotiated raw socket (simple replies), for clients that misbehave on purpose.
fn raw_session(s: &Server, export: &str) -> TcpStream {
    runtime().block_on(handshake_for_kernel(s.addr(), export)).expect("handshake").socket
}

fn request(command: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    Request { flags: 0, command, cookie, offset, length }.encode()
}

fn pid(s: &Server) -> u32 {
    s.child.as_ref().expect("running").id()
}

#[test]
fn replies_a_client_never_reads_cost_bounded_memory_and_end_the_session() {
    let s =
        Server::start_with(&["--session-memory", "64MiB", "--server-memory", "160MiB", "--client-write-timeout", "3"]);
    s.create_volume("big", "64MiB");
    let rt = runtime();
    rt.block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("big")).await.unwrap();
        let data = pattern(1, 32 << 20);
        for (i, chunk) in data.chunks(8 << 20).enumerate() {
            c.write(i as u64 * (8 << 20), chunk, 0).await.unwrap();
        }
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
    });
    let before = rss_bytes(pid(&s));
    // Two clients each ask for 100 reads of 32 MiB and read nothing back: 6.4 GiB of replies.
    let mut hostile = Vec::new();
    for _ in 0..2 {
        let mut sock = raw_session(&s, "big");
        let mut burst = Vec::new();
        for i in 0..100u64 {
            burst.extend_from_slice(&request(CMD_READ, i, 0, 32 << 20));
        }
        sock.write_all(&burst).unwrap();
        hostile.push(sock);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let grown = rss_bytes(pid(&s)).saturating_sub(before);
    assert!(grown < 400 << 20, "server RSS grew by {} MiB holding unread replies", grown >> 20);
    assert!(metric(&s, "thinbd_nbd_throttled_requests_total") > 0, "no back-pressure was counted");
    // Others are served meanwhile.
    rt.block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("big")).await.unwrap();
        assert_eq!(c.read(4096, 4096).await.unwrap(), pattern(1, 8192)[4096..]);
        c.disconnect().await.unwrap();
    });
    // The stuck clients are cut off after the write timeout, and their memory comes back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&s, "thinbd_nbd_write_timeouts_total") < 2 {
        assert!(Instant::now() < deadline, "stuck clients were never disconnected:\n{}", s.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&s, "thinbd_nbd_buffered_bytes") > 0 || metric(&s, "thinbd_nbd_connections") > 0 {
        assert!(Instant::now() < deadline, "budget not returned:\n{}", s.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(hostile);
}

/// Reads `len` bytes at `offset` through a fresh read-only grant.
fn read_through_grant(s: &Server, node: &str, offset: u64, len: u32) -> Vec<u8> {
    let name = s.cli(&["volume", "publish", "vol", "--node", node, "--read-only"]).trim().to_string();
    let data = runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new(&name)).await.unwrap();
        let d = c.read(offset, len).await.unwrap();
        c.disconnect().await.unwrap();
        d
    });
    s.cli(&["volume", "unpublish", "vol", "--node", node]);
    data
}

#[test]
fn a_half_sent_write_is_never_applied_after_unpublish() {
    let s = Server::start_with(&["--require-grants"]);
    s.create_volume("vol", "16MiB");
    for trial in 0..5u64 {
        let name = s.cli(&["volume", "publish", "vol", "--node", "writer", "--single-writer"]).trim().to_string();
        let mut sock = raw_session(&s, &name);
        let payload = pattern(100 + trial, 1 << 20);
        sock.write_all(&request(CMD_WRITE, 1, 0, 1 << 20)).unwrap();
        sock.write_all(&payload[..512 << 10]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        s.cli(&["volume", "unpublish", "vol", "--node", "writer"]);
        // The rest arrives after the revocation returned: it must not be written or acked.
        let _ = sock.write_all(&payload[512 << 10..]);
        std::thread::sleep(Duration::from_millis(200));
        let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reply = [0u8; 16];
        let acked = matches!(sock.read(&mut reply), Ok(16));
        assert!(!acked, "trial {trial}: the revoked write was acknowledged");
        let now = read_through_grant(&s, "checker", 0, 1 << 20);
        assert!(now != payload, "trial {trial}: the revoked write reached the volume");
    }
}

#[test]
fn no_pipelined_write_lands_after_unpublish_returns() {
    let s = Server::start_with(&["--require-grants"]);
    s.create_volume("vol", "128MiB");
    const WRITES: u64 = 256;
    const LEN: u64 = 256 << 10;
    let rt = runtime();
    // The checker is connected before the revocation, so it looks the moment unpublish returns.
    let checker = s.cli(&["volume", "publish", "vol", "--node", "checker", "--read-only"]).trim().to_string();
    let checker = rt.block_on(Client::connect(s.addr(), ClientOptions::new(&checker))).unwrap();
    let snapshot = |c: &Client| {
        rt.block_on(async {
            let mut all = c.read(0, 32 << 20).await.unwrap();
            all.extend(c.read(32 << 20, 32 << 20).await.unwrap());
            all
        })
    };
    for trial in 0..10u64 {
        let name = s.cli(&["volume", "publish", "vol", "--node", "writer", "--single-writer"]).trim().to_string();
        let mut sock = raw_session(&s, &name);
        let mut burst = Vec::new();
        for i in 0..WRITES {
            burst.extend_from_slice(&request(CMD_WRITE, i, i * LEN, LEN as u32));
            burst.extend_from_slice(&pattern(trial * 1000 + i + 1, LEN as usize));
        }
        let mut sender = sock.try_clone().unwrap();
        let send = std::thread::spawn(move || {
            let _ = sender.write_all(&burst);
        });
        // Revoke once the first replies arrive, with most writes still queued or running.
        let mut first = [0u8; 16];
        sock.read_exact(&mut first).unwrap();
        s.cli(&["volume", "unpublish", "vol", "--node", "writer"]);
        let at_return = snapshot(&checker);
        std::thread::sleep(Duration::from_millis(300));
        let later = snapshot(&checker);
        let chunk = LEN as usize;
        let changed =
            (0..WRITES as usize).filter(|i| at_return[i * chunk..][..chunk] != later[i * chunk..][..chunk]).count();
        assert_eq!(changed, 0, "trial {trial}: {changed} writes landed after unpublish returned");
        drop(sock);
        let _ = send.join();
    }
}

#[test]
fn stuck_revoked_sessions_do_not_block_unpublish_or_delete() {
    let s = Server::start_with(&["--require-grants"]);
    s.create_volume("vol", "16MiB");
    // One session trickles a payload, one never reads the replies to its reads.
    let name = s.cli(&["volume", "publish", "vol", "--node", "a"]).trim().to_string();
    let mut trickle = raw_session(&s, &name);
    trickle.write_all(&request(CMD_WRITE, 1, 0, 4 << 20)).unwrap();
    trickle.write_all(&[1u8; 1000]).unwrap();
    let mut deaf = raw_session(&s, &name);
    let mut burst = Vec::new();
    for i in 0..64u64 {
        burst.extend_from_slice(&request(CMD_READ, i, 0, 4 << 20));
    }
    deaf.write_all(&burst).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    s.cli(&["volume", "unpublish", "vol", "--node", "a"]);
    assert!(started.elapsed() < Duration::from_secs(5), "unpublish took {:?}", started.elapsed());
    s.cli(&["volume", "delete", "vol"]);
    drop((trickle, deaf));
}

/// Raises this process's open-file limit so the test can hold thousands of sockets.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

async fn connect_from(source: [u8; 4], to: SocketAddr) -> Option<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind(SocketAddr::from((source, 0))).ok()?;
    sock.connect(to).await.ok()
}

#[test]
fn idle_connection_floods_cannot_exhaust_descriptors() {
    raise_fd_limit();
    let s = Server::start_with(&[
        "--max-handshakes",
        "64",
        "--max-handshakes-per-source",
        "8",
        "--handshake-timeout",
        "60",
    ]);
    s.create_volume("vol", "1MiB");
    let to: SocketAddr = s.addr().parse().unwrap();
    let rt = runtime();
    // 3,000 connections that never speak: from one address, then from a hundred.
    let idle = rt.block_on(async {
        let mut idle = Vec::new();
        for i in 0..3000u32 {
            let source = if i < 1000 { [127, 0, 0, 2] } else { [127, 0, 1, (i % 100) as u8 + 1] };
            if let Some(c) = connect_from(source, to).await {
                idle.push(c);
            }
        }
        idle
    });
    assert!(idle.len() > 2500, "only {} connections opened", idle.len());
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(pid(&s));
    assert!(fds < 400, "server holds {fds} descriptors under an idle flood");
    // Sessions and the API still work.
    rt.block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("vol")).await.expect("a real client gets in");
        c.write(0, b"still here", 0).await.unwrap();
        assert_eq!(c.read(0, 10).await.unwrap(), b"still here");
        c.disconnect().await.unwrap();
    });
    assert!(s.cli(&["volume", "list"]).contains("vol"));
    assert!(metric(&s, "thinbd_nbd_evicted_per_source_total") > 0);
    assert!(metric(&s, "thinbd_nbd_evicted_handshakes_total") > 0);
    assert!(metric(&s, "thinbd_nbd_handshakes") <= 64);
    drop(idle);
}
