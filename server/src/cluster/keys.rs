//! The cluster's key layout in etcd. Everything lives under one prefix, so one watch sees every
//! change and a second cluster can share an etcd under another prefix later.
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `/thinbd/v1/nodes/NODE` | [`super::nodes::NodeRecord`] (JSON): addresses, capacity, free space, zone, labels | kept; rewritten when it changes |
//! | `/thinbd/v1/alive/NODE` | the node's start time | under the node's lease: gone when the node stops renewing it |
//! | `/thinbd/v1/volumes/UUID` | [`super::volumes::VolumeSpec`] (JSON): name, size, the node holding the data | from creation to deletion |
//! | `/thinbd/v1/volume-names/NAME` | the volume's UUID (names are unique labels) | written in one transaction with the spec |
//! | `/thinbd/v1/targets/UUID` | [`super::targets::Target`] (JSON): the node serving the volume and its epoch | taken by compare-and-swap; deleted with the volume |
//! | `/thinbd/v1/snapshots/UUID` | [`super::snapshots::SnapshotSpec`] (JSON): name, volume, size, the node holding it | from creation to deletion |
//! | `/thinbd/v1/isr/UUID` | [`super::isr::InSync`] (JSON): the replicas holding every acknowledged write, the epoch that last changed it, copies being rebuilt or departed, the target's activity record, suspect copies | written with the spec; changed by compare-and-swap; deleted with the volume |
//! | `/thinbd/v1/grants/UUID/NODE` | [`super::grants::GrantEntry`] (JSON): access and a hash of the token | from publish to unpublish; deleted with the volume |

/// The prefix of every key.
pub const ROOT: &str = "/thinbd/v1/";
pub const NODES: &str = "/thinbd/v1/nodes/";
pub const ALIVE: &str = "/thinbd/v1/alive/";
pub const VOLUMES: &str = "/thinbd/v1/volumes/";
pub const VOLUME_NAMES: &str = "/thinbd/v1/volume-names/";

pub fn volume(uuid: &str) -> String {
    format!("{VOLUMES}{uuid}")
}

pub const TARGETS: &str = "/thinbd/v1/targets/";

pub fn target(uuid: &str) -> String {
    format!("{TARGETS}{uuid}")
}

pub const ISR: &str = "/thinbd/v1/isr/";

pub fn isr(uuid: &str) -> String {
    format!("{ISR}{uuid}")
}

pub const SNAPSHOTS: &str = "/thinbd/v1/snapshots/";

pub fn snapshot(uuid: &str) -> String {
    format!("{SNAPSHOTS}{uuid}")
}

pub const GRANTS: &str = "/thinbd/v1/grants/";

/// The prefix of volume `uuid`'s grants.
pub fn grants_of(uuid: &str) -> String {
    format!("{GRANTS}{uuid}/")
}

pub fn grant(uuid: &str, node: &str) -> String {
    format!("{GRANTS}{uuid}/{node}")
}

pub fn volume_name(name: &str) -> String {
    format!("{VOLUME_NAMES}{name}")
}

pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}

pub fn alive(name: &str) -> String {
    format!("{ALIVE}{name}")
}

/// The name after `prefix`, if `key` is under it.
pub fn name_under<'a>(key: &'a [u8], prefix: &str) -> Option<&'a str> {
    std::str::from_utf8(key).ok()?.strip_prefix(prefix).filter(|n| !n.is_empty() && !n.contains('/'))
}
