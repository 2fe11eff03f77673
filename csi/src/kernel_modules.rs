//! The kernel modules the node service needs: `nbd` (the block devices, driven over netlink)
//! and `tls` (kernel TLS, for NBD over TLS). Loaded at start with the host's `modprobe` (the
//! image has kmod; the DaemonSet mounts the host's /lib/modules); Probe then tells whether the
//! kernel can attach at all.

use std::process::Command;

/// Runs `modprobe` for each module; a failure is logged, not fatal: the module may be built
/// in, or loaded already by the host, and Probe reports what matters.
pub fn load() {
    for module in ["nbd", "tls"] {
        match Command::new("modprobe").arg(module).output() {
            Ok(out) if out.status.success() => tracing::info!(module, "kernel module loaded"),
            Ok(out) => tracing::warn!(
                module,
                error = %String::from_utf8_lossy(&out.stderr).trim(),
                "modprobe failed (fine if the module is built in or already loaded)"
            ),
            Err(e) => tracing::warn!(module, error = %e, "cannot run modprobe"),
        }
    }
}

/// Whether the kernel can attach NBD devices: the `nbd` generic netlink family resolves.
/// `Err` holds the reason, worded for an operator.
pub fn nbd_ready() -> Result<(), String> {
    crate::nbd_netlink::Nbd::open().map(|_| ()).map_err(|e| match e {
        crate::nbd_netlink::NetlinkError::NoFamily => {
            "the kernel has no nbd netlink family: load the nbd module on this node (modprobe nbd; \
             the node plugin tried at start) or use a kernel built with CONFIG_BLK_DEV_NBD"
                .to_string()
        }
        e => format!("cannot talk to the kernel's nbd driver: {e}"),
    })
}
