//! thinbd: thin-provisioned volumes in a pool on local disk, exported over NBD.
//!
//! A READ travels: `nbd::listener` (TCP, admission) → `thinbd_protocol::session` (parse,
//! budget) → `nbd::catalog::NbdVolume` → the volume's `io` stack (`Metered` → `Throttled` →
//! `LocalVolume`) → `layers` (resolve through the chain) → `space::pool` → a
//! `space::backend::BlockStore` (io_uring). A first write allocates from `space` and commits a
//! `layers::edit::LayerEdit` through `layers::graph::LayerGraph` to `meta::store` (redb).
//!
//! Modules depend one way (`tests/layering.rs` checks it): `nbd` → `engine` (the façade: admin
//! operations, grants, checks) → `io` → `layers` → `space` → `meta`; `qos`, `grants`,
//! `epochs`, `metrics` and `error` are leaves beside them.

pub mod api;
pub mod cluster;
pub mod daemon;
pub mod engine;
pub mod epochs;
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
pub mod stages;
