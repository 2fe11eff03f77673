//! The NBD edge of the server: export names, the catalog of exports (each a volume's I/O stack
//! adapted to the protocol crate's `BlockDevice`), the TCP listener and the threads sessions run
//! on. A READ goes socket → `thinbd_protocol::session` (on a session thread, [`threads`]) →
//! [`catalog::NbdVolume`] → `crate::io` stack → `LocalVolume` → layers → pool.

pub mod catalog;
pub mod export_name;
pub mod listener;
pub mod threads;

pub use catalog::{Catalog, NbdVolume, VolumeStack};
pub use export_name::ExportName;
pub use listener::{ListenerStats, NbdLimits, serve_nbd};
