//! Entry point shared by the cargo-fuzz target and the corpus replay in the test suite: feeds
//! arbitrary client bytes through negotiation and transmission against an in-memory export.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::budget::SessionShared;
use crate::handshake::{ServerConfig, negotiate};
use crate::mem_device::{MemCatalog, MemDevice};
use crate::session::{SessionLimits, Stop, serve};

/// Runs one server connection whose client sends exactly `data` and then closes. Must never
/// panic or hang, whatever `data` holds.
pub fn server_input(data: &[u8]) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(_) => return,
    };
    rt.block_on(async {
        let catalog = MemCatalog { exports: vec![("disk".into(), Arc::new(MemDevice::new(1 << 20, false)))] };
        let config = ServerConfig { tls: None, max_payload: 1 << 20 };
        let limits = SessionLimits { max_payload: 1 << 20, max_in_flight: 4, ..SessionLimits::default() };
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let input = data.to_vec();
        // The client side writes its bytes and drains whatever the server answers.
        let feeder = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut client);
            let write = async {
                let _ = w.write_all(&input).await;
                let _ = w.shutdown().await;
            };
            let drain = async {
                let mut sink = vec![0u8; 1 << 16];
                while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            tokio::join!(write, drain);
        });
        let run = async {
            if let Ok(Some(neg)) = negotiate(Box::new(server), &catalog, &config, None).await {
                let _ = serve(neg, limits, SessionShared::new(8 << 20), Stop::default()).await;
            }
        };
        let finished = tokio::time::timeout(Duration::from_secs(10), run).await;
        assert!(finished.is_ok(), "server hung on fuzz input");
        let _ = feeder.await;
    });
}
