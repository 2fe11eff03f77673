//! TLS configuration from PEM files, for STARTTLS on both sides.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;
/// What a TLS client needs besides a connector: the name the server's certificate carries.
pub use tokio_rustls::TlsConnector;
pub use tokio_rustls::rustls::pki_types::ServerName;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {what}")]
    Pem { path: String, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| TlsError::Read { path: p.clone(), source })?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: p.clone(), what: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: p, what: "no certificate found".into() });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| TlsError::Read { path: p.clone(), source })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Pem { path: p, what: "no private key found".into() },
        e => TlsError::Pem { path: p, what: e.to_string() },
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server TLS from a certificate chain and key; with `client_ca`, clients must present a
/// certificate signed by it.
pub fn server_acceptor(cert: &Path, key_path: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs(cert)?, key(key_path)?).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Client TLS trusting `ca`, optionally presenting a client certificate.
pub fn client_connector(ca: &Path, client: Option<(&Path, &Path)>) -> Result<TlsConnector, TlsError> {
    client_config(ca, client, false)
}

/// The same, for connections handed to the kernel: the session keys can be extracted after
/// the handshake and installed as kernel TLS on the socket.
pub fn kernel_client_connector(ca: &Path, client: Option<(&Path, &Path)>) -> Result<TlsConnector, TlsError> {
    client_config(ca, client, true)
}

fn client_config(ca: &Path, client: Option<(&Path, &Path)>, extract: bool) -> Result<TlsConnector, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let config = match client {
        Some((c, k)) => {
            builder.with_client_auth_cert(certs(c)?, key(k)?).map_err(|e| TlsError::Config(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = config;
    config.enable_secret_extraction = extract;
    Ok(TlsConnector::from(Arc::new(config)))
}
