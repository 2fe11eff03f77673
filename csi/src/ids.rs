//! CSI ids. A volume lives on one storage node, so its id names both: `NODE/VOLUME`; a snapshot
//! is `NODE/VOLUME@SNAPSHOT`. `/` cannot occur in thinbd volume names, so parsing is exact.

use tonic::Status;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeId {
    pub node: String,
    pub volume: String,
}

impl VolumeId {
    pub fn parse(id: &str) -> Option<VolumeId> {
        let (node, volume) = id.rsplit_once('/')?;
        (!node.is_empty() && !volume.is_empty() && !volume.contains('@'))
            .then(|| VolumeId { node: node.to_string(), volume: volume.to_string() })
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.node, self.volume)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotId {
    pub node: String,
    pub volume: String,
    pub snapshot: String,
}

impl SnapshotId {
    pub fn parse(id: &str) -> Option<SnapshotId> {
        let (node, key) = id.rsplit_once('/')?;
        let (volume, snapshot) = key.split_once('@')?;
        (!node.is_empty() && !volume.is_empty() && !snapshot.is_empty()).then(|| SnapshotId {
            node: node.to_string(),
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
        })
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.node, self.key())
    }

    /// The server's name for it: `VOLUME@SNAPSHOT`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.volume, self.snapshot)
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
        let v = VolumeId::parse("node-1/pvc-1").unwrap();
        assert_eq!((v.node.as_str(), v.volume.as_str()), ("node-1", "pvc-1"));
        assert_eq!(v.id(), "node-1/pvc-1");
        let s = SnapshotId::parse("n/v@s").unwrap();
        assert_eq!((s.key().as_str(), s.id().as_str()), ("v@s", "n/v@s"));
        for bad in ["", "novolume", "/v", "n/", "n/v@s"] {
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
