//! Mutual TLS for the management API (gRPC over tonic), from PEM files.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// The client side: the CA that signed the server's certificate, and this client's certificate
/// and key.
#[derive(Debug, Clone)]
pub struct ApiClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The name the server's certificate must carry, when it is not the host dialled (one
    /// certificate shared by every storage node).
    pub server_name: Option<String>,
}

/// An endpoint for the management API at `addr` (`HOST:PORT` or a URL): https with `tls`,
/// plain http without.
pub fn api_endpoint(addr: &str, tls: Option<&ApiClientTls>) -> Result<tonic::transport::Endpoint, TlsError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let host = addr.split("://").last().unwrap_or(addr);
    let url = if tls.is_some() { format!("https://{host}") } else { format!("http://{host}") };
    let ep = Endpoint::from_shared(url.clone()).map_err(|e| TlsError::Config(format!("{url}: {e}")))?;
    let Some(t) = tls else { return Ok(ep) };
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&t.ca)?))
        .identity(Identity::from_pem(read(&t.cert)?, read(&t.key)?));
    if let Some(name) = &t.server_name {
        cfg = cfg.domain_name(name.clone());
    }
    ep.tls_config(cfg).map_err(|e| TlsError::Config(e.to_string()))
}

/// The server side: clients must present a certificate signed by `client_ca`.
pub fn api_server_tls(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<tonic::transport::ServerTlsConfig, TlsError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .client_ca_root(Certificate::from_pem(read(client_ca)?)))
}
