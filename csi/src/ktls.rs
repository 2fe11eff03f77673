//! Kernel TLS: after a STARTTLS handshake in user space, the session keys are installed on the
//! socket (TCP_ULP "tls", then TLS_TX and TLS_RX), so the kernel's NBD client keeps talking TLS
//! to the server. Supports the AEADs the kernel and rustls share: AES-128/256-GCM and
//! ChaCha20-Poly1305, TLS 1.2 and 1.3.

use nix::libc;
use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};

#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("kernel TLS: {what}: {source}")]
    Sys { what: &'static str, source: nix::Error },
    #[error("kernel TLS cannot carry {0}")]
    Unsupported(String),
}

fn crypto_info(
    version: ProtocolVersion,
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> Result<TlsCryptoInfo, KtlsError> {
    let version = match version {
        ProtocolVersion::TLSv1_2 => libc::TLS_1_2_VERSION,
        ProtocolVersion::TLSv1_3 => libc::TLS_1_3_VERSION,
        v => return Err(KtlsError::Unsupported(format!("{v:?}"))),
    };
    let rec_seq = seq.to_be_bytes();
    let split = |iv: &[u8]| -> ([u8; 4], [u8; 8]) {
        let mut salt = [0u8; 4];
        let mut rest = [0u8; 8];
        salt.copy_from_slice(&iv[..4]);
        rest.copy_from_slice(&iv[4..12]);
        (salt, rest)
    };
    Ok(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (salt, iv) = split(iv.as_ref());
            let mut k = [0u8; 16];
            k.copy_from_slice(key.as_ref());
            TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: libc::tls_crypto_info { version, cipher_type: libc::TLS_CIPHER_AES_GCM_128 },
                iv,
                key: k,
                salt,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (salt, iv) = split(iv.as_ref());
            let mut k = [0u8; 32];
            k.copy_from_slice(key.as_ref());
            TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: libc::tls_crypto_info { version, cipher_type: libc::TLS_CIPHER_AES_GCM_256 },
                iv,
                key: k,
                salt,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            let mut k = [0u8; 32];
            k.copy_from_slice(key.as_ref());
            let mut v = [0u8; 12];
            v.copy_from_slice(iv.as_ref());
            TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: libc::tls_crypto_info { version, cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305 },
                iv: v,
                key: k,
                salt: [],
                rec_seq,
            })
        }
        _ => return Err(KtlsError::Unsupported("this cipher suite".into())),
    })
}

/// Moves the TLS session onto `sock` in the kernel.
pub fn install(
    sock: &std::net::TcpStream,
    version: ProtocolVersion,
    secrets: ExtractedSecrets,
) -> Result<(), KtlsError> {
    let tx = crypto_info(version, secrets.tx.0, &secrets.tx.1)?;
    let rx = crypto_info(version, secrets.rx.0, &secrets.rx.1)?;
    setsockopt(sock, TcpUlp::default(), b"tls").map_err(|source| KtlsError::Sys { what: "TCP_ULP tls", source })?;
    setsockopt(sock, TcpTlsTx, &tx).map_err(|source| KtlsError::Sys { what: "TLS_TX", source })?;
    setsockopt(sock, TcpTlsRx, &rx).map_err(|source| KtlsError::Sys { what: "TLS_RX", source })?;
    Ok(())
}
