//! CSI ids. A volume's id is its UUID and a snapshot's id its snapshot's UUID: cluster-unique,
//! naming no node, resolved by the storage API the controller talks to. Ids of the older form
//! (`NODE/VOLUME`, `NODE/VOLUME@SNAPSHOT`) keep working; they are also what the controller still
//! makes when it reaches storage nodes through a `{node}` address template, which cannot look a
//! UUID up (the cluster directory replaces templates).

use tonic::Status;

pub use thinbd_api::is_uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeId {
    /// The storage node, for ids of the node-naming form.
    pub node: Option<String>,
    /// What the storage API knows the volume by: its UUID, or its name in the older form.
    pub volume: String,
}

impl VolumeId {
    pub fn parse(id: &str) -> Option<VolumeId> {
        if is_uuid(id) {
            return Some(VolumeId { node: None, volume: id.to_string() });
        }
        let (node, volume) = id.rsplit_once('/')?;
        (!node.is_empty() && !volume.is_empty() && !volume.contains('@'))
            .then(|| VolumeId { node: Some(node.to_string()), volume: volume.to_string() })
    }

    /// The id of a volume the storage API returned, on `node` when the controller routes by node.
    pub fn of(node: Option<&str>, name: &str, uuid: &str) -> String {
        match node {
            Some(node) => format!("{node}/{name}"),
            None => uuid.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotId {
    /// The storage node, for ids of the node-naming form.
    pub node: Option<String>,
    /// What the storage API knows the snapshot by: its UUID, or `VOLUME@SNAPSHOT`.
    pub key: String,
}

impl SnapshotId {
    pub fn parse(id: &str) -> Option<SnapshotId> {
        if is_uuid(id) {
            return Some(SnapshotId { node: None, key: id.to_string() });
        }
        let (node, key) = id.rsplit_once('/')?;
        let (volume, snapshot) = key.split_once('@')?;
        (!node.is_empty() && !volume.is_empty() && !snapshot.is_empty())
            .then(|| SnapshotId { node: Some(node.to_string()), key: key.to_string() })
    }

    /// The id of a snapshot the storage API returned (see [`VolumeId::of`]).
    pub fn of(node: Option<&str>, volume: &str, name: &str, uuid: &str) -> String {
        match node {
            Some(node) => format!("{node}/{volume}@{name}"),
            None => uuid.to_string(),
        }
    }

    /// Whether the storage API's snapshot `s` is this one.
    pub fn matches(&self, volume: &str, name: &str, uuid: &str) -> bool {
        self.key == uuid || self.key == format!("{volume}@{name}")
    }
}

pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() { Err(Status::invalid_argument(format!("{field} is required"))) } else { Ok(value) }
}
/// A thinbd volume or snapshot name for a CSI name: kept when it is valid as it is (Kubernetes'
/// `pvc-UUID` / `snapshot-UUID` are), else derived from a hash so the mapping stays stable.
pub fn server_name(csi_name: &str) -> String {
    let ok = csi_name.len() <= 128
        && !csi_name.starts_with(['.', '-'])
        && csi_name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        return csi_name.to_string();
    }
    // FNV-1a, 64 bit: stable across builds and platforms.
    let h = csi_name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let prefix: String =
        csi_name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect::<String>();
    format!("csi-{}-{h:016x}", prefix.trim_start_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_malformed() {
        let uuid = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
        assert_eq!(VolumeId::parse(uuid), Some(VolumeId { node: None, volume: uuid.into() }));
        assert_eq!(VolumeId::of(None, "pvc-1", uuid), uuid);
        assert_eq!(SnapshotId::parse(uuid), Some(SnapshotId { node: None, key: uuid.into() }));
        // The older form keeps working.
        let v = VolumeId::parse("node-1/pvc-1").unwrap();
        assert_eq!((v.node.as_deref(), v.volume.as_str()), (Some("node-1"), "pvc-1"));
        assert_eq!(VolumeId::of(Some("node-1"), "pvc-1", uuid), "node-1/pvc-1");
        let s = SnapshotId::parse("n/v@s").unwrap();
        assert_eq!((s.node.as_deref(), s.key.as_str()), (Some("n"), "v@s"));
        assert_eq!(SnapshotId::of(Some("n"), "v", "s", uuid), "n/v@s");
        assert!(s.matches("v", "s", "other") && SnapshotId::parse(uuid).unwrap().matches("v", "s", uuid));
        for bad in ["", "novolume", "/v", "n/", "n/v@s", "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4", "pvc-0b1c2d3e"] {
            assert!(VolumeId::parse(bad).is_none(), "{bad}");
        }
        for bad in ["", "n/v", "n/@s", "n/v@", "v@s"] {
            assert!(SnapshotId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn server_names_are_valid_and_stable() {
        assert_eq!(server_name("pvc-0b1c"), "pvc-0b1c");
        let a = server_name("Some Name/with spaces");
        assert_eq!(a, server_name("Some Name/with spaces"));
        assert_ne!(a, server_name("Some Name/with spaces2"));
        assert!(a.starts_with("csi-") && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
    }
}
