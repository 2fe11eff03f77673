//! thinbd-csi: the Container Storage Interface plugin for thinbd. The controller service turns
//! CSI calls into management-API calls on the storage node that holds (or will hold) a volume;
//! the node service attaches volumes through the kernel's NBD client and mounts them.

pub mod attach;
pub mod backend;
pub mod capability;
pub mod controller;
pub mod group_controller;
pub mod identity;
pub mod ids;
pub mod kernel_modules;
pub mod ktls;
pub mod mounts;
pub mod nbd_netlink;
pub mod node;
pub mod params;
pub mod snapshot_metadata;

/// The CSI driver name (`CSIDriver` object, StorageClass `provisioner`).
pub const DRIVER_NAME: &str = "thinbd.csi.io";
/// Topology segment key: the storage node a volume lives on.
pub const TOPOLOGY_KEY: &str = "topology.thinbd.csi.io/node";
/// In a cluster volumes are reachable from every node; a zone (`serve --zone`) is the only
/// topology they have.
pub const ZONE_KEY: &str = "topology.thinbd.csi.io/zone";
/// `publish_context` / `volume_context` keys.
pub const CTX_EXPORT: &str = "thinbd.csi.io/export";
pub const CTX_NBD: &str = "thinbd.csi.io/nbd";
pub const CTX_STORAGE_NODE: &str = "thinbd.csi.io/storage-node";
pub const CTX_MKFS_OPTIONS: &str = "thinbd.csi.io/mkfs-options";
