//! thinbd: thin-provisioned volumes in a pool on local disk, exported over NBD.
//!
//! A READ travels: `nbd::listener` (TCP, admission) → `thinbd_protocol::session` (parse,
//! budget) → `nbd::catalog::NbdVolume` → the volume's `io` stack (`Metered` → `Throttled` →
//! `LocalVolume`) → `layers` (resolve through the chain) → `space::pool` (io_uring). Metadata
//! changes go through `engine` to `meta::store` (redb).

pub mod api;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod grants;
pub mod io;
pub mod layers;
pub mod meta;
pub mod metrics;
pub mod nbd;
pub mod qos;
pub mod size;
pub mod space;
