//! thinbd: thin-provisioned volumes in a pool on local disk, exported over NBD.

pub mod allocator;
pub mod api;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod extent_map;
pub mod fault_disk;
pub mod fsck;
pub mod grace;
pub mod grants;
pub mod io;
pub mod layer;
pub mod metadata;
pub mod metrics;
pub mod nbd;
pub mod pool;
pub mod recovery;
pub mod size;
pub mod superblock;
pub mod uring;
