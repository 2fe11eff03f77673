//! Bad input on the NBD socket: each case gets the spec's error or a closed connection, the
//! daemon never panics, and other sessions keep working.

use std::time::Duration;

use thinbd_protocol::client::{Client, ClientError, ClientOptions};
use thinbd_protocol::consts::*;
use thinbd_tests::{Server, runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects and completes the greeting; returns the stream ready for options.
async fn greet(s: &Server) -> TcpStream {
    let mut t = TcpStream::connect(s.addr()).await.unwrap();
    let mut g = [0u8; 18];
    t.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    t.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
    t
}

async fn send_opt(t: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    t.write_all(&b).await.unwrap();
}

/// Reads one option reply: (option, reply type, data).
async fn opt_reply(t: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(t.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
    let opt = t.read_u32().await.unwrap();
    let rep = t.read_u32().await.unwrap();
    let len = t.read_u32().await.unwrap();
    let mut d = vec![0u8; len as usize];
    t.read_exact(&mut d).await.unwrap();
    (opt, rep, d)
}

/// True once the server has closed the connection (reads hit EOF or reset).
async fn closed(t: &mut TcpStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), t.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn healthy(s: &Server) {
    let c = Client::connect(s.addr(), ClientOptions::new("ok")).await.expect("server still serves");
    c.write(0, b"still alive", 0).await.unwrap();
    assert_eq!(c.read(0, 11).await.unwrap(), b"still alive");
    c.disconnect().await.unwrap();
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

#[test]
fn handshake_errors() {
    let rt = runtime();
    let s = Server::start();
    s.create_volume("ok", "16MiB");
    rt.block_on(async {
        // Bad option magic: the server hangs up.
        let mut t = greet(&s).await;
        t.write_all(&[0xde; 16]).await.unwrap();
        assert!(closed(&mut t).await);

        // Unknown client flags: hang up.
        let mut t = TcpStream::connect(s.addr()).await.unwrap();
        let mut g = [0u8; 18];
        t.read_exact(&mut g).await.unwrap();
        t.write_all(&0x8000_0000u32.to_be_bytes()).await.unwrap();
        assert!(closed(&mut t).await);

        // Unknown option, and one we do not do: ERR_UNSUP, and the session goes on.
        let mut t = greet(&s).await;
        send_opt(&mut t, 0x4242, b"whatever").await;
        assert_eq!(opt_reply(&mut t).await.1, REP_ERR_UNSUP);
        send_opt(&mut t, OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(opt_reply(&mut t).await.1, REP_ERR_UNSUP);
        // Malformed GO (length fields that do not add up): ERR_INVALID.
        send_opt(&mut t, OPT_GO, &[0, 0, 0, 200, b'x']).await;
        assert_eq!(opt_reply(&mut t).await.1, REP_ERR_INVALID);
        // STARTTLS without TLS configured: ERR_UNSUP.
        send_opt(&mut t, OPT_STARTTLS, &[]).await;
        assert_eq!(opt_reply(&mut t).await.1, REP_ERR_UNSUP);
        // Export that does not exist: ERR_UNKNOWN.
        send_opt(&mut t, OPT_GO, &go_payload("missing")).await;
        assert_eq!(opt_reply(&mut t).await.1, REP_ERR_UNKNOWN);
        // Meta context before structured replies: ERR_INVALID.
        send_opt(&mut t, OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]).await;
        assert_eq!(opt_reply(&mut t).await.1, REP_ERR_INVALID);
        // ABORT is acknowledged and the connection closed.
        send_opt(&mut t, OPT_ABORT, &[]).await;
        assert_eq!(opt_reply(&mut t).await.1, REP_ACK);
        assert!(closed(&mut t).await);

        // Oversized option: ERR_TOO_BIG and hang up, without reading 1 GiB.
        let mut t = greet(&s).await;
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&(1u32 << 30).to_be_bytes());
        t.write_all(&b).await.unwrap();
        assert_eq!(opt_reply(&mut t).await.1, REP_ERR_TOO_BIG);
        assert!(closed(&mut t).await);

        // EXPORT_NAME for a missing export: the spec's only answer is to close.
        let mut t = greet(&s).await;
        send_opt(&mut t, OPT_EXPORT_NAME, b"missing").await;
        assert!(closed(&mut t).await);

        // EXPORT_NAME for a real one: size, flags, no zeroes (NO_ZEROES negotiated).
        let mut t = greet(&s).await;
        send_opt(&mut t, OPT_EXPORT_NAME, b"ok").await;
        assert_eq!(t.read_u64().await.unwrap(), 16 << 20);
        let flags = t.read_u16().await.unwrap();
        assert_ne!(flags & FLAG_HAS_FLAGS, 0);
        assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
        assert_eq!(flags & FLAG_SEND_DF, 0, "DF only with structured replies");

        healthy(&s).await;
    });
}

#[test]
fn transmission_errors() {
    let rt = runtime();
    let s = Server::start();
    s.create_volume("ok", "16MiB");
    rt.block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("ok")).await.unwrap();
        let size = 16u64 << 20;
        let errno = |r: Result<(), ClientError>| r.err().and_then(|e| e.errno());
        // Past the end: reads EINVAL, writes ENOSPC; offset+length overflowing u64 too.
        assert_eq!(errno(c.raw(CMD_READ, 0, size - 100, 4096).await), Some(EINVAL));
        assert_eq!(errno(c.write(size - 100, &[1u8; 4096], 0).await), Some(ENOSPC));
        assert_eq!(errno(c.raw(CMD_TRIM, 0, size, 1).await), Some(EINVAL));
        assert_eq!(errno(c.raw(CMD_WRITE_ZEROES, 0, size, 4096).await), Some(ENOSPC));
        assert_eq!(errno(c.raw(CMD_READ, 0, u64::MAX - 10, 4096).await), Some(EINVAL));
        assert_eq!(errno(c.raw(CMD_BLOCK_STATUS, 0, size, 1).await), Some(EINVAL));
        // Oversized: a 64 MiB read and a 33 MiB write (payload swallowed, connection intact).
        assert_eq!(errno(c.raw(CMD_READ, 0, 0, 64 << 20).await), Some(EINVAL));
        assert_eq!(errno(c.write(0, &vec![9u8; 33 << 20], 0).await), Some(EINVAL));
        // Unknown command and unknown flag bits.
        assert_eq!(errno(c.raw(99, 0, 0, 0).await), Some(EINVAL));
        assert_eq!(errno(c.raw(CMD_READ, 0x4000, 0, 512).await), Some(EINVAL));
        // FAST_ZERO that would need real writes (NO_HOLE): ENOTSUP, as the spec asks.
        assert_eq!(errno(c.write_zeroes(0, 4096, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO).await), Some(ENOTSUP));
        // The connection still works after all of that, and nothing was written.
        assert_eq!(c.read(0, 8192).await.unwrap(), vec![0u8; 8192]);
        assert_eq!(s.volume_json("ok")["allocated_bytes"], 0);

        // Bad request magic: the server closes this connection only.
        let mut t = greet(&s).await;
        send_opt(&mut t, OPT_GO, &go_payload("ok")).await;
        loop {
            if opt_reply(&mut t).await.1 == REP_ACK {
                break;
            }
        }
        t.write_all(&[0x55u8; 28]).await.unwrap();
        assert!(closed(&mut t).await);

        // A client that disconnects halfway through a write payload.
        let mut t = greet(&s).await;
        send_opt(&mut t, OPT_GO, &go_payload("ok")).await;
        while opt_reply(&mut t).await.1 != REP_ACK {}
        let hdr =
            thinbd_protocol::wire::Request { flags: 0, command: CMD_WRITE, cookie: 1, offset: 0, length: 1 << 20 };
        t.write_all(&hdr.encode()).await.unwrap();
        t.write_all(&[0xaa; 100_000]).await.unwrap();
        drop(t);

        // A client that disconnects with requests in flight.
        let mut t = greet(&s).await;
        send_opt(&mut t, OPT_GO, &go_payload("ok")).await;
        while opt_reply(&mut t).await.1 != REP_ACK {}
        for cookie in 0..16u64 {
            let r = thinbd_protocol::wire::Request {
                flags: 0,
                command: CMD_READ,
                cookie,
                offset: cookie << 16,
                length: 65536,
            };
            t.write_all(&r.encode()).await.unwrap();
        }
        drop(t);

        assert_eq!(c.read(0, 8192).await.unwrap(), vec![0u8; 8192], "torn write never landed");
        c.disconnect().await.unwrap();
        healthy(&s).await;
    });
}

#[test]
fn a_thousand_idle_connections() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard);
    }
    let rt = runtime();
    let mut s = Server::start();
    s.create_volume("ok", "16MiB");
    rt.block_on(async {
        let mut idle = Vec::new();
        for i in 0..1000 {
            let mut t = TcpStream::connect(s.addr()).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
            // Half stop after the greeting, half mid-negotiation after a LIST.
            let mut g = [0u8; 18];
            t.read_exact(&mut g).await.unwrap();
            if i % 2 == 0 {
                t.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await.unwrap();
            }
            idle.push(t);
        }
        healthy(&s).await;
        drop(idle);
        healthy(&s).await;
    });
    assert!(s.is_running());
    assert!(s.stop().success(), "clean stop with idle clients:\n{}", s.log_text());
}
