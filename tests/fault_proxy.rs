//! A TCP proxy that injects network faults between two thinbd nodes: this kernel has no
//! netem, so delay, jitter, black holes (no RST, nothing answers), resets and one-way loss are
//! made here. A node advertises the proxy's address as its NBD address (`--advertise-nbd`), so
//! every replication link to it passes through; the test switches the fault while I/O runs.
//!
//! Blocking sockets and a thread per direction: a handful of links, and the proxy must stay
//! simple enough to trust.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens to the bytes crossing the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded as they come.
    Pass,
    /// Each read forwarded after `base` plus up to `jitter` more, in order.
    Delay { base: Duration, jitter: Duration },
    /// Swallowed both ways; connections stay open and nothing is reset (a dead host, or a
    /// firewall dropping packets). New connections are accepted and go nowhere.
    BlackHole,
    /// Requests reach the node, its answers are swallowed.
    DropReplies,
}

struct Link {
    client: TcpStream,
    upstream: TcpStream,
    /// Set when the link is reset: its pumps end without a FIN.
    reset: Arc<AtomicBool>,
}

/// A running proxy: `listen` forwards to `upstream` under the current [`Fault`].
pub struct FaultProxy {
    fault: Arc<Mutex<Fault>>,
    links: Arc<Mutex<Vec<Link>>>,
    stop: Arc<AtomicBool>,
    pub listen: String,
}

impl FaultProxy {
    /// Binds `listen` and accepts on a thread. Call it on a thread inside the network
    /// namespace the proxy belongs to: the listener, and every connection it makes upstream
    /// (from the accepting thread), live there.
    pub fn start(listen: &str, upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind(listen).unwrap_or_else(|e| panic!("fault proxy on {listen}: {e}"));
        let (fault, links, stop) =
            (Arc::new(Mutex::new(Fault::Pass)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let proxy =
            FaultProxy { fault: fault.clone(), links: links.clone(), stop: stop.clone(), listen: listen.into() };
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(&upstream) else { continue };
                let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else { continue };
                let reset = Arc::new(AtomicBool::new(false));
                pump(client.try_clone().ok(), u2, fault.clone(), false, reset.clone());
                pump(upstream.try_clone().ok(), c2, fault.clone(), true, reset.clone());
                if let Ok(mut l) = links.lock() {
                    l.push(Link { client, upstream, reset });
                }
            }
        });
        proxy
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Resets every connection through the proxy (RST both ways, no FIN), as a peer that
    /// restarted or a middlebox that dropped its state would.
    pub fn reset_all(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.reset.store(true, Ordering::SeqCst);
            for s in [&link.client, &link.upstream] {
                let linger = nix::libc::linger { l_onoff: 1, l_linger: 0 };
                let _ = nix::sys::socket::setsockopt(&s.as_fd(), nix::sys::socket::sockopt::Linger, &linger);
                // Wakes the pumps (no packet is sent); the last close then sends the RST.
                let _ = s.shutdown(Shutdown::Read);
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.reset_all();
        // Unblocks the accept loop.
        let _ = TcpStream::connect_timeout(&self.listen.parse().unwrap(), Duration::from_millis(200));
    }
}

/// Copies `from` to `to` under the fault until either side closes. `replies`: this is the
/// direction from the node back to the client.
fn pump(from: Option<TcpStream>, mut to: TcpStream, fault: Arc<Mutex<Fault>>, replies: bool, reset: Arc<AtomicBool>) {
    let Some(mut from) = from else { return };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        let mut seed = if replies { 0x9e37_79b9_7f4a_7c15u64 } else { 0x2545_f491_4f6c_dd1d };
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = *fault.lock().unwrap();
            match now {
                Fault::Pass => {}
                Fault::BlackHole => continue,
                Fault::DropReplies if replies => continue,
                Fault::DropReplies => {}
                Fault::Delay { base, jitter } => {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let extra = if jitter.is_zero() { 0 } else { seed % jitter.as_micros() as u64 };
                    std::thread::sleep(base + Duration::from_micros(extra));
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        if !reset.load(Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Write);
        }
    });
}
