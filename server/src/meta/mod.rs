//! Metadata: the redb store every mapping, layer, volume, snapshot and grant is committed to
//! (with a digest over all rows), and fsck, which proves it consistent.

pub mod fsck;
pub mod qos;
pub mod store;
pub mod uuid;
