//! thinbd's gRPC surface: the management API (`thinbd.v1`, what the CLI and the CSI controller
//! call) and the Container Storage Interface (`csi.v1`), compiled from `proto/`, plus the
//! management API's mutual-TLS configuration and how the binaries log. The NBD protocol lives in `thinbd-protocol`.

pub mod logging;
pub mod tls;

/// Generated gRPC code for `thinbd.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("thinbd.v1");
}

/// Generated gRPC code for the Container Storage Interface (`csi.v1`).
pub mod csi {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("csi.v1");
}

/// Whether `s` is a UUID in text form (`8-4-4-4-12` hex digits): the API takes volumes and
/// snapshots by UUID wherever it takes their names.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}
