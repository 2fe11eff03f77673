//! Server side of the fixed-newstyle handshake: one function per option, as the spec lists them.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::ProtocolError;
use crate::consts::*;
use crate::device::{BlockDevice, DeviceInfo};
use crate::io::BoxIo;

/// Context id we hand out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// One export as `NBD_OPT_LIST` shows it.
#[derive(Debug, Clone)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
}

/// Why an export cannot be opened; mapped onto `NBD_REP_ERR_*`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    #[error("no such export")]
    Unknown,
    #[error("refused by policy: {0}")]
    Policy(String),
    #[error("server is shutting down")]
    Shutdown,
    #[error("export unavailable: {0}")]
    Platform(String),
}

impl OpenError {
    fn rep(&self) -> u32 {
        match self {
            OpenError::Unknown => REP_ERR_UNKNOWN,
            OpenError::Policy(_) => REP_ERR_POLICY,
            OpenError::Shutdown => REP_ERR_SHUTDOWN,
            OpenError::Platform(_) => REP_ERR_PLATFORM,
        }
    }
}

/// An opened export.
pub struct Export<D> {
    pub name: String,
    pub description: String,
    pub device: Arc<D>,
    /// Any of these cancelled fences the session (a revoked grant, a newer target epoch);
    /// server shutdown drains it besides.
    pub fences: Vec<tokio_util::sync::CancellationToken>,
}

/// Where the server finds exports. Implemented by the volume engine.
pub trait ExportCatalog: Send + Sync + 'static {
    type Device: BlockDevice;
    /// Asynchronous: opening may ask other parts of a cluster (etcd, the node holding the
    /// volume) or wait for an older target's sessions, while the session's thread serves others.
    fn open(
        &self,
        name: &str,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = Result<Export<Self::Device>, OpenError>> + Send;
    fn list(&self, peer: Option<SocketAddr>) -> Vec<ExportListing>;
}

/// Limits and TLS settings for negotiation.
#[derive(Clone)]
pub struct ServerConfig {
    /// When set, TLS is required: every option but STARTTLS and ABORT gets `ERR_TLS_REQD`
    /// until the client upgrades.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Largest request payload (NBD_INFO_BLOCK_SIZE maximum).
    pub max_payload: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { tls: None, max_payload: 32 * 1024 * 1024 }
    }
}

/// The outcome of a successful negotiation: the stream is ready for transmission.
pub struct Negotiated<D> {
    pub io: BoxIo,
    pub export: Export<D>,
    pub structured: bool,
    /// Context id of `base:allocation` if the client selected it for this export.
    /// Meta contexts selected for this export with NBD_OPT_SET_META_CONTEXT: id and name
    /// (`base:allocation` has id [`BASE_ALLOCATION_ID`]).
    pub meta_contexts: Vec<(u32, String)>,
    pub tls: bool,
    pub transmission_flags: u16,
}

impl State {
    /// The contexts selected for `export` (none if SET_META_CONTEXT named another export).
    fn contexts_for(&self, export: &str) -> Vec<(u32, String)> {
        match &self.meta {
            Some((name, contexts)) if name == export => contexts.clone(),
            _ => Vec::new(),
        }
    }
}

struct State {
    no_zeroes: bool,
    structured: bool,
    tls: bool,
    /// The export the last SET_META_CONTEXT named, and the contexts it selected.
    meta: Option<(String, Vec<(u32, String)>)>,
}

/// Runs the handshake. Returns `Ok(None)` when the client ended it cleanly (ABORT).
pub async fn negotiate<C: ExportCatalog>(
    mut io: BoxIo,
    catalog: &C,
    config: &ServerConfig,
    peer: Option<SocketAddr>,
) -> Result<Option<Negotiated<C::Device>>, ProtocolError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&greeting).await?;
    io.flush().await?;
    let client_flags = io.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::Malformed(format!("unknown client flags {client_flags:#x}")));
    }
    let mut st = State { no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0, structured: false, tls: false, meta: None };
    loop {
        let magic = io.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadMagic(magic));
        }
        let opt = io.read_u32().await?;
        let len = io.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // We will not read that much: say so and hang up.
            reply(&mut io, opt, REP_ERR_TOO_BIG, b"option too long").await?;
            return Err(ProtocolError::Malformed(format!("option {opt} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data).await?;
        debug!(opt, len, "option");
        if config.tls.is_some() && !st.tls && !matches!(opt, OPT_STARTTLS | OPT_ABORT) {
            if opt == OPT_EXPORT_NAME {
                return Err(ProtocolError::Refused("EXPORT_NAME before STARTTLS".into()));
            }
            reply(&mut io, opt, REP_ERR_TLS_REQD, b"TLS is required").await?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => return opt_export_name(io, catalog, config, peer, &st, data).await.map(Some),
            OPT_ABORT => {
                // The client may already have closed; a failed ACK is not an error.
                let _ = reply(&mut io, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => opt_list(&mut io, catalog, peer, &data).await?,
            OPT_STARTTLS => io = opt_starttls(io, config, &mut st, &data).await?,
            OPT_INFO | OPT_GO => {
                if let Some(export) = opt_info_go(&mut io, catalog, config, peer, &st, opt, &data).await? {
                    let meta_contexts = st.contexts_for(&export.name);
                    let transmission_flags = transmission_flags(&export.device.info(), st.structured);
                    return Ok(Some(Negotiated {
                        io,
                        export,
                        structured: st.structured,
                        meta_contexts,
                        tls: st.tls,
                        transmission_flags,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => opt_structured_reply(&mut io, &mut st, &data).await?,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                opt_meta_context(&mut io, catalog, peer, &mut st, opt, &data).await?
            }
            _ => reply(&mut io, opt, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
}

/// Transmission flags for a device; `SEND_DF` only exists with structured replies.
pub fn transmission_flags(info: &DeviceInfo, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if info.read_only {
        f |= FLAG_READ_ONLY;
    }
    if info.can_trim && !info.read_only {
        f |= FLAG_SEND_TRIM;
    }
    if info.can_zero && !info.read_only {
        f |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if info.can_multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    if info.can_cache {
        f |= FLAG_SEND_CACHE;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}

async fn reply(io: &mut BoxIo, opt: u32, rep: u32, data: &[u8]) -> Result<(), ProtocolError> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&rep.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    io.write_all(&buf).await?;
    io.flush().await?;
    Ok(())
}

/// A cursor over an option payload that reports malformed data instead of panicking.
struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A length-prefixed string of at most `MAX_STRING_LEN` bytes.
    fn string(&mut self) -> Option<String> {
        let n = self.u32()?;
        if n > MAX_STRING_LEN {
            return None;
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).ok().filter(|s| !s.contains('\0'))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

async fn opt_export_name<C: ExportCatalog>(
    mut io: BoxIo,
    catalog: &C,
    _config: &ServerConfig,
    peer: Option<SocketAddr>,
    st: &State,
    data: Vec<u8>,
) -> Result<Negotiated<C::Device>, ProtocolError> {
    // This option has no error reply: on failure the spec says to close the connection.
    let name = String::from_utf8(data).map_err(|_| ProtocolError::Malformed("export name is not UTF-8".into()))?;
    if name.len() > MAX_STRING_LEN as usize {
        return Err(ProtocolError::Malformed("export name too long".into()));
    }
    // The name may hold a secret (a grant token): it stays out of the error, which gets logged.
    let export =
        catalog.open(&name, peer).await.map_err(|e| ProtocolError::Refused(format!("EXPORT_NAME refused: {e}")))?;
    let info = export.device.info();
    let flags = transmission_flags(&info, st.structured);
    let mut buf = Vec::with_capacity(134);
    buf.extend_from_slice(&info.size.to_be_bytes());
    buf.extend_from_slice(&flags.to_be_bytes());
    if !st.no_zeroes {
        buf.extend_from_slice(&[0u8; 124]);
    }
    io.write_all(&buf).await?;
    io.flush().await?;
    let meta_contexts = st.contexts_for(&name);
    Ok(Negotiated { io, export, structured: st.structured, meta_contexts, tls: st.tls, transmission_flags: flags })
}

async fn opt_list<C: ExportCatalog>(
    io: &mut BoxIo,
    catalog: &C,
    peer: Option<SocketAddr>,
    data: &[u8],
) -> Result<(), ProtocolError> {
    if !data.is_empty() {
        return reply(io, OPT_LIST, REP_ERR_INVALID, b"LIST takes no data").await;
    }
    for e in catalog.list(peer) {
        let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
        d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
        d.extend_from_slice(e.name.as_bytes());
        d.extend_from_slice(e.description.as_bytes());
        reply(io, OPT_LIST, REP_SERVER, &d).await?;
    }
    reply(io, OPT_LIST, REP_ACK, &[]).await
}

async fn opt_starttls(
    mut io: BoxIo,
    config: &ServerConfig,
    st: &mut State,
    data: &[u8],
) -> Result<BoxIo, ProtocolError> {
    let Some(acceptor) = &config.tls else {
        reply(&mut io, OPT_STARTTLS, REP_ERR_UNSUP, b"TLS is not configured").await?;
        return Ok(io);
    };
    if !data.is_empty() {
        reply(&mut io, OPT_STARTTLS, REP_ERR_INVALID, b"STARTTLS takes no data").await?;
        return Ok(io);
    }
    if st.tls {
        reply(&mut io, OPT_STARTTLS, REP_ERR_INVALID, b"TLS already negotiated").await?;
        return Ok(io);
    }
    reply(&mut io, OPT_STARTTLS, REP_ACK, &[]).await?;
    let tls = acceptor.accept(io).await.map_err(|e| ProtocolError::Tls(e.to_string()))?;
    // Anything negotiated in the clear is forgotten (spec: STARTTLS resets state).
    st.tls = true;
    st.structured = false;
    st.meta = None;
    Ok(Box::new(tls))
}

async fn opt_info_go<C: ExportCatalog>(
    io: &mut BoxIo,
    catalog: &C,
    config: &ServerConfig,
    peer: Option<SocketAddr>,
    st: &State,
    opt: u32,
    data: &[u8],
) -> Result<Option<Export<C::Device>>, ProtocolError> {
    let mut p = Payload(data);
    let parsed = (|| {
        let name = p.string()?;
        let n = p.u16()?;
        let reqs = (0..n).map(|_| p.u16()).collect::<Option<Vec<u16>>>()?;
        p.is_empty().then_some((name, reqs))
    })();
    let Some((name, reqs)) = parsed else {
        reply(io, opt, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
        return Ok(None);
    };
    let export = match catalog.open(&name, peer).await {
        Ok(e) => e,
        Err(e) => {
            reply(io, opt, e.rep(), e.to_string().as_bytes()).await?;
            return Ok(None);
        }
    };
    let info = export.device.info();
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&info.size.to_be_bytes());
    d.extend_from_slice(&transmission_flags(&info, st.structured).to_be_bytes());
    reply(io, opt, REP_INFO, &d).await?;
    if reqs.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        reply(io, opt, REP_INFO, &d).await?;
    }
    if reqs.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(export.description.as_bytes());
        reply(io, opt, REP_INFO, &d).await?;
    }
    // Always sent: minimum 1 says any alignment works (we read-modify-write partial clusters).
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&info.preferred_block.to_be_bytes());
    d.extend_from_slice(&config.max_payload.to_be_bytes());
    reply(io, opt, REP_INFO, &d).await?;
    reply(io, opt, REP_ACK, &[]).await?;
    Ok((opt == OPT_GO).then_some(export))
}

async fn opt_structured_reply(io: &mut BoxIo, st: &mut State, data: &[u8]) -> Result<(), ProtocolError> {
    if !data.is_empty() {
        return reply(io, OPT_STRUCTURED_REPLY, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data").await;
    }
    if st.structured {
        return reply(io, OPT_STRUCTURED_REPLY, REP_ERR_INVALID, b"already negotiated").await;
    }
    st.structured = true;
    reply(io, OPT_STRUCTURED_REPLY, REP_ACK, &[]).await
}

async fn opt_meta_context<C: ExportCatalog>(
    io: &mut BoxIo,
    catalog: &C,
    peer: Option<SocketAddr>,
    st: &mut State,
    opt: u32,
    data: &[u8],
) -> Result<(), ProtocolError> {
    if !st.structured {
        return reply(io, opt, REP_ERR_INVALID, b"structured replies must be negotiated first").await;
    }
    let mut p = Payload(data);
    let parsed = (|| {
        let name = p.string()?;
        let n = p.u32()?;
        // Each query needs at least its 4-byte length, which bounds n by the payload.
        if n as usize > data.len() / 4 {
            return None;
        }
        let queries = (0..n).map(|_| p.string()).collect::<Option<Vec<String>>>()?;
        p.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply(io, opt, REP_ERR_INVALID, b"malformed meta context request").await;
    };
    let export = match catalog.open(&name, peer).await {
        Ok(e) => e,
        Err(e) => return reply(io, opt, e.rep(), e.to_string().as_bytes()).await,
    };
    let list = opt == OPT_LIST_META_CONTEXT;
    let mut names: Vec<String> = Vec::new();
    let base = if list {
        queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
    } else {
        queries.iter().any(|q| q == BASE_ALLOCATION)
    };
    if base {
        names.push(BASE_ALLOCATION.to_string());
    }
    let others: Vec<String> = if list && queries.is_empty() {
        export.device.meta_contexts("")
    } else {
        // SET takes only full names; LIST also namespace prefixes.
        queries.iter().filter(|q| list || !q.ends_with(':')).flat_map(|q| export.device.meta_contexts(q)).collect()
    };
    for n in others {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    // Ids: base:allocation keeps its own; the others follow it in order.
    let selected: Vec<(u32, String)> = names
        .into_iter()
        .scan(BASE_ALLOCATION_ID, |next, n| {
            let id = if n == BASE_ALLOCATION {
                BASE_ALLOCATION_ID
            } else {
                *next += 1;
                *next
            };
            Some((id, n))
        })
        .collect();
    for (id, n) in &selected {
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(n.as_bytes());
        reply(io, opt, REP_META_CONTEXT, &d).await?;
    }
    if !list {
        st.meta = (!selected.is_empty()).then(|| (name.clone(), selected));
    }
    reply(io, opt, REP_ACK, &[]).await
}
