//! The kernel's NBD client driven over generic netlink (family "nbd"): connect a device to
//! sockets we negotiated, reconfigure it with fresh sockets, disconnect it. Facts (attribute and
//! command numbers) are the kernel's uapi `nbd-netlink.h`; the message framing is netlink's.
//!
//! Messages are built by hand: a netlink message is a 16-byte header, a 4-byte generic-netlink
//! header and type-length-value attributes padded to 4 bytes, and the NBD family needs nothing
//! more. Decoding is bounds-checked throughout; the kernel is trusted no further than that.

use std::os::fd::{AsRawFd, OwnedFd};

// nix's socket-option macros expand to calls of each other and of `libc`.
use nix::{libc, setsockopt_impl, sockopt_impl};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto, socket,
};

/// `setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group)`: joins a multicast group by id.
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
sockopt_impl!(AddMembership, SetOnly, libc::SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, u32);

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLA_F_NESTED: u16 = 0x8000;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_LINK_DEAD: u8 = 4;

const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("the kernel has no NBD netlink family (is the nbd module loaded?)")]
    NoFamily,
    #[error("{op} refused by the kernel: {errno}")]
    Kernel { op: &'static str, errno: nix::errno::Errno },
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

/// Attributes being built into a message.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(ty, &b)
    }
    fn nested(&mut self, ty: u16, inner: &Attrs) -> &mut Self {
        self.put(ty | NLA_F_NESTED, &inner.0)
    }
}

fn message(family: u16, cmd: u8, seq: u32, attrs: &Attrs) -> Vec<u8> {
    let len = 16 + 4 + attrs.0.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, 1, 0, 0]);
    m.extend_from_slice(&attrs.0);
    m
}

/// Top-level attributes of a generic-netlink payload: (type without flags, payload).
fn parse_attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED & 0x3fff;
        if len < 4 || len > b.len() {
            return Err(NetlinkError::Malformed("attribute length"));
        }
        out.push((ty, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok(out)
}

/// One reply of a request: the generic-netlink attributes of data messages, then the ACK.
fn parse_replies(mut b: &[u8], seq: u32, op: &'static str) -> Result<(Vec<Vec<u8>>, bool), NetlinkError> {
    let mut data = Vec::new();
    let mut acked = false;
    while b.len() >= 16 {
        let len = u32::from_ne_bytes(b[0..4].try_into().map_err(|_| NetlinkError::Malformed("header"))?) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        let rseq = u32::from_ne_bytes(b[8..12].try_into().map_err(|_| NetlinkError::Malformed("header"))?);
        if len < 16 || len > b.len() {
            return Err(NetlinkError::Malformed("message length"));
        }
        let body = &b[16..len];
        if rseq == seq {
            match ty {
                NLMSG_ERROR => {
                    let code = body.get(0..4).ok_or(NetlinkError::Malformed("error message"))?;
                    let code = i32::from_ne_bytes(code.try_into().map_err(|_| NetlinkError::Malformed("error"))?);
                    if code != 0 {
                        return Err(NetlinkError::Kernel { op, errno: nix::errno::Errno::from_raw(-code) });
                    }
                    acked = true;
                }
                NLMSG_DONE => acked = true,
                _ if body.len() >= 4 => data.push(body[4..].to_vec()),
                _ => return Err(NetlinkError::Malformed("short generic netlink message")),
            }
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok((data, acked))
}

/// Settings for a connected device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub size: u64,
    pub block_size: u64,
    pub server_flags: u16,
    /// Seconds before a request is considered lost and its connection dead.
    pub io_timeout: u64,
    /// Seconds the kernel keeps I/O waiting for RECONFIGURE once every connection is dead.
    pub dead_conn_timeout: u64,
    /// Shown in /sys/block/nbdX/backend; names the volume so the device can be found again.
    pub backend: String,
}

pub struct Nbd {
    sock: OwnedFd,
    family: u16,
    /// The "nbd_mc_group" multicast group, on which the kernel announces dead connections.
    mcast_group: Option<u32>,
    seq: std::sync::atomic::AtomicU32,
}

impl Nbd {
    pub fn open() -> Result<Nbd, NetlinkError> {
        let sock = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkGeneric)?;
        bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let mut nbd = Nbd { sock, family: GENL_ID_CTRL, mcast_group: None, seq: 1.into() };
        let mut a = Attrs::default();
        a.string(CTRL_ATTR_FAMILY_NAME, "nbd");
        let replies = nbd.request(CTRL_CMD_GETFAMILY, &a, "resolve the nbd family").map_err(|e| match e {
            NetlinkError::Kernel { errno: nix::errno::Errno::ENOENT, .. } => NetlinkError::NoFamily,
            e => e,
        })?;
        let id = replies
            .iter()
            .flat_map(|r| parse_attrs(r).unwrap_or_default())
            .find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID)
            .and_then(|(_, p)| p.get(0..2).map(|b| u16::from_ne_bytes([b[0], b[1]])))
            .ok_or(NetlinkError::NoFamily)?;
        nbd.family = id;
        nbd.mcast_group = replies
            .iter()
            .flat_map(|r| parse_attrs(r).unwrap_or_default())
            .filter(|(t, _)| *t == CTRL_ATTR_MCAST_GROUPS)
            .flat_map(|(_, groups)| parse_attrs(groups).unwrap_or_default())
            .find_map(|(_, group)| {
                let attrs = parse_attrs(group).ok()?;
                let name = attrs.iter().find(|(t, _)| *t == CTRL_ATTR_MCAST_GRP_NAME)?.1;
                let id = attrs.iter().find(|(t, _)| *t == CTRL_ATTR_MCAST_GRP_ID)?.1;
                (name.strip_suffix(&[0]).unwrap_or(name) == b"nbd_mc_group")
                    .then(|| id.get(0..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])))
                    .flatten()
            });
        Ok(nbd)
    }

    /// A socket that receives the kernel's dead-connection announcements. Joins the group with
    /// `NETLINK_ADD_MEMBERSHIP`, which takes any group id (the bind mask reaches ids 1–32 only,
    /// and generic netlink numbers its groups past that on a kernel with many families).
    pub fn link_dead_listener(&self) -> Result<LinkDeadListener, NetlinkError> {
        let group =
            self.mcast_group.filter(|g| *g > 0).ok_or(NetlinkError::Malformed("no usable nbd multicast group"))?;
        let sock = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkGeneric)?;
        bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        nix::sys::socket::setsockopt(&sock, AddMembership, &group)?;
        Ok(LinkDeadListener { sock, family: self.family })
    }

    fn request(&self, cmd: u8, attrs: &Attrs, op: &'static str) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let msg = message(self.family, cmd, seq, attrs);
        sendto(self.sock.as_raw_fd(), &msg, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
        let mut data = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let (mut d, acked) = parse_replies(&buf[..n], seq, op)?;
            data.append(&mut d);
            if acked {
                return Ok(data);
            }
        }
    }

    fn sockets(fds: &[&std::net::TcpStream]) -> Attrs {
        let mut list = Attrs::default();
        for fd in fds {
            let mut item = Attrs::default();
            item.u32(NBD_SOCK_FD, fd.as_raw_fd() as u32);
            list.nested(NBD_SOCK_ITEM, &item);
        }
        list
    }

    /// Connects a free device (the kernel picks it) to `sockets`; returns its index (nbdN).
    /// The kernel holds its own references to the sockets, so the caller may close its copies.
    pub fn connect(&self, cfg: &DeviceConfig, sockets: &[&std::net::TcpStream]) -> Result<u32, NetlinkError> {
        let mut a = Attrs::default();
        a.u64(NBD_ATTR_SIZE_BYTES, cfg.size)
            .u64(NBD_ATTR_BLOCK_SIZE_BYTES, cfg.block_size)
            .u64(NBD_ATTR_SERVER_FLAGS, cfg.server_flags as u64)
            .u64(NBD_ATTR_TIMEOUT, cfg.io_timeout)
            .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, cfg.dead_conn_timeout)
            .string(NBD_ATTR_BACKEND_IDENTIFIER, &cfg.backend)
            .nested(NBD_ATTR_SOCKETS, &Self::sockets(sockets));
        let replies = self.request(NBD_CMD_CONNECT, &a, "NBD connect")?;
        replies
            .iter()
            .flat_map(|r| parse_attrs(r).unwrap_or_default())
            .find(|(t, _)| *t == NBD_ATTR_INDEX)
            .and_then(|(_, p)| p.get(0..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])))
            .ok_or(NetlinkError::Malformed("CONNECT reply without an index"))
    }

    /// Replaces dead connections of device `index` with `sockets` (after a server restart);
    /// the kernel keeps live ones and ignores sockets it has no dead slot for.
    pub fn reconfigure(&self, index: u32, backend: &str, sockets: &[&std::net::TcpStream]) -> Result<(), NetlinkError> {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index)
            .string(NBD_ATTR_BACKEND_IDENTIFIER, backend)
            .nested(NBD_ATTR_SOCKETS, &Self::sockets(sockets));
        self.request(NBD_CMD_RECONFIGURE, &a, "NBD reconfigure").map(drop)
    }

    /// Tells the kernel device `index` is now `size` bytes (online expansion).
    pub fn resize(&self, index: u32, backend: &str, size: u64, block_size: u64) -> Result<(), NetlinkError> {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index)
            .string(NBD_ATTR_BACKEND_IDENTIFIER, backend)
            .u64(NBD_ATTR_SIZE_BYTES, size)
            .u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size);
        self.request(NBD_CMD_RECONFIGURE, &a, "NBD resize").map(drop)
    }

    pub fn disconnect(&self, index: u32) -> Result<(), NetlinkError> {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index);
        self.request(NBD_CMD_DISCONNECT, &a, "NBD disconnect").map(drop)
    }
}

pub struct LinkDeadListener {
    sock: OwnedFd,
    family: u16,
}

impl LinkDeadListener {
    /// Blocks until the kernel reports a device whose connections died; returns its index.
    pub fn next(&self) -> Result<u32, NetlinkError> {
        let mut buf = vec![0u8; 8192];
        loop {
            let n = recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if let Some(index) = parse_link_dead(&buf[..n], self.family) {
                return Ok(index);
            }
        }
    }
}

/// The device index of a LINK_DEAD announcement of `family`, if `b` is one.
fn parse_link_dead(b: &[u8], family: u16) -> Option<u32> {
    let len = u32::from_ne_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    let ty = u16::from_ne_bytes(b.get(4..6)?.try_into().ok()?);
    let body = b.get(16..len)?;
    if ty != family || *body.first()? != NBD_CMD_LINK_DEAD {
        return None;
    }
    parse_attrs(body.get(4..)?)
        .ok()?
        .into_iter()
        .find(|(t, _)| *t == NBD_ATTR_INDEX)
        .and_then(|(_, p)| p.get(0..4).map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested() {
        let mut inner = Attrs::default();
        inner.u32(NBD_SOCK_FD, 7);
        let mut a = Attrs::default();
        a.string(NBD_ATTR_BACKEND_IDENTIFIER, "ab").nested(NBD_ATTR_SOCKETS, &inner);
        // "ab\0" is 3 bytes: 4 header + 3, padded to 8; nested: 4 + 8.
        assert_eq!(a.0.len(), 8 + 12);
        assert_eq!(u16::from_ne_bytes([a.0[0], a.0[1]]), 7);
        assert_eq!(u16::from_ne_bytes([a.0[10], a.0[11]]), NBD_ATTR_SOCKETS | NLA_F_NESTED);
        let parsed = parse_attrs(&a.0).unwrap();
        assert_eq!(parsed[0], (NBD_ATTR_BACKEND_IDENTIFIER, &b"ab\0"[..]));
        assert_eq!(parse_attrs(parsed[1].1).unwrap()[0], (NBD_SOCK_FD, &7u32.to_ne_bytes()[..]));
        let m = message(0x20, NBD_CMD_CONNECT, 9, &a);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(m[16], NBD_CMD_CONNECT);
    }

    /// The join the dead-connection listener makes, on a group every kernel has: generic
    /// netlink's own "notify" group (id 16, fixed in the kernel's uapi as GENL_ID_CTRL's).
    #[test]
    fn multicast_groups_are_joined_by_id() {
        let sock = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkGeneric)
            .expect("a generic netlink socket");
        bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0)).unwrap();
        nix::sys::socket::setsockopt(&sock, AddMembership, &16u32).expect("join nlctrl's notify group");
    }

    #[test]
    fn link_dead_announcements() {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, 3);
        let mut m = message(0x21, NBD_CMD_LINK_DEAD, 0, &a);
        assert_eq!(parse_link_dead(&m, 0x21), Some(3));
        assert_eq!(parse_link_dead(&m, 0x22), None, "other family");
        m[16] = NBD_CMD_CONNECT;
        assert_eq!(parse_link_dead(&m, 0x21), None, "other command");
        assert_eq!(parse_link_dead(&m[..10], 0x21), None);
    }

    #[test]
    fn replies_decode_errors_acks_and_reject_garbage() {
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0, 0]);
        err.extend_from_slice(&5u32.to_ne_bytes());
        err.extend_from_slice(&0u32.to_ne_bytes());
        err.extend_from_slice(&(-16i32).to_ne_bytes());
        err.extend_from_slice(&[0u8; 16]);
        match parse_replies(&err, 5, "x") {
            Err(NetlinkError::Kernel { errno, .. }) => assert_eq!(errno, nix::errno::Errno::EBUSY),
            other => panic!("{other:?}"),
        }
        err[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert!(parse_replies(&err, 5, "x").unwrap().1, "ack");
        assert!(!parse_replies(&err, 6, "x").unwrap().1, "other sequence");
        assert!(parse_replies(&err[..20], 5, "x").is_err(), "truncated");
        assert!(parse_attrs(&[200, 0, 1, 0]).is_err());
    }
}
